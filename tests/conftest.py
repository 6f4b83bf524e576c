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
