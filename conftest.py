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
