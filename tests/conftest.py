import pytest


@pytest.fixture(scope="session")
def smoke_cohort(tmp_path_factory):
    """The smoke-size demo cohort, built once per test session (about 4 s)."""
    from lib.data import demo

    out = tmp_path_factory.mktemp("cohort") / "smoke"
    demo.build(out, "smoke", seed=0, progress=False)
    return out
