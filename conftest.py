"""Root pytest configuration, shared by the unit tests and the notebooks run by nbval.

Notebook kernels inherit this process's environment, so the defaults set here reach them:
- ``PRESET=smoke`` unless set (CI and ``make test`` set it anyway);
- results go to a temporary folder (removed at the end) unless ``MEDIMG_RESULTS_DIR`` is set, so
  running the suite never adds runs to the repository's own ``results/``;
- no progress bars.
"""

import os
import shutil
import tempfile

os.environ.setdefault("PRESET", "smoke")
os.environ.setdefault("TQDM_DISABLE", "1")
_TEMP_RESULTS = None
if "MEDIMG_RESULTS_DIR" not in os.environ:
    _TEMP_RESULTS = tempfile.mkdtemp(prefix="medimg-test-results-")
    os.environ["MEDIMG_RESULTS_DIR"] = _TEMP_RESULTS


def pytest_unconfigure(config):
    if _TEMP_RESULTS:
        shutil.rmtree(_TEMP_RESULTS, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Each notebook runs once per session, and notebook runs count as slow.

    ``make test`` collects the notebooks twice: nbval executes them (``--nbval-lax ... notebooks``) and
    ``tests/test_notebooks.py`` executes them with papermill from another working directory. When nbval
    executes a notebook in this session, its papermill run is deselected (and the terminal summary says
    so); run ``pytest tests/test_notebooks.py`` alone for the papermill runs. nbval's cells are marked
    ``slow``, so ``-m "not slow"`` (``make test-fast``) leaves every notebook out.
    """
    import pytest

    by_nbval = set()
    for item in items:
        if type(item).__module__.startswith("nbval"):
            item.add_marker(pytest.mark.slow)
            by_nbval.add(item.path.stem)
    _feed_07_first(items)
    twice = [item for item in items if item.get_closest_marker("executes_notebook")
             and item.callspec.params.get("path") is not None and item.callspec.params["path"].stem in by_nbval]
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = [item for item in items if item not in twice]
        config._medimg_deselected = sorted(item.callspec.params["path"].stem for item in twice)


def _feed_07_first(items):
    """nbval's cells of the notebooks whose results 07_evaluate reports (``lib.pipeline.FEED_07``, numbered after
    it) move, as a block, just before 07's cells: the order ``make demo`` runs them in."""
    from lib.pipeline import FEED_07

    nbval = [i for i, item in enumerate(items) if type(item).__module__.startswith("nbval")]
    feeding = [items[i] for i in nbval if items[i].path.stem in FEED_07]
    first_07 = next((i for i in nbval if items[i].path.stem == "07_evaluate"), None)
    if not feeding or first_07 is None:
        return
    rest = [item for item in items if item not in feeding]
    at = rest.index(items[first_07])
    items[:] = rest[:at] + feeding + rest[at:]


def pytest_terminal_summary(terminalreporter, config):
    names = getattr(config, "_medimg_deselected", [])
    if names:
        terminalreporter.write_line(f"papermill runs deselected, nbval runs these notebooks in this session: "
                                    f"{', '.join(names)}")
