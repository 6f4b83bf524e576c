import pytest


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory):
    """The smoke-size demo cohort, built once per test session (about 4 s)."""
    from lib.data import demo

    out = tmp_path_factory.mktemp("cohort") / "smoke"
    demo.build(out, "smoke", seed=0, progress=False)
    return out


@pytest.fixture
def results(tmp_path, monkeypatch):
    """An empty results root for this test (MEDIMG_RESULTS_DIR), with no run id inherited."""
    from lib import runs

    root = tmp_path / "results"
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(root))
    monkeypatch.delenv(runs.RUN_ID_ENV, raising=False)
    return root


@pytest.fixture(scope="session")
def convert_fixture(tmp_path_factory):
    """``make(name, **run_options)``: the raw fixture of a real dataset (lib.data.fixtures) written under a new
    folder's ``raw/`` and converted into its ``prepared/``; returns ``(folder, facts, summary, dataset)``."""
    from lib.data import convert, fixtures, prepared

    def make(name, **run_options):
        tmp = tmp_path_factory.mktemp(name)
        facts = fixtures.write(name, tmp / "raw")
        summary = convert.run(name, tmp / "raw", tmp / "prepared", progress=False, **run_options)
        return tmp, facts, summary, prepared.open_dataset(tmp / "prepared")

    return make
