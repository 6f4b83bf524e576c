"""Notebook hygiene: committed stripped, one parameters cell, portable, and each runs at smoke from anywhere."""

import json
import re

import nbformat
import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from lib import config, paths

NOTEBOOKS = sorted(paths.NOTEBOOKS_DIR.glob("*.ipynb"))
NAMES = [p.stem for p in NOTEBOOKS]
ABSOLUTE_PATH = re.compile(r"""["'](/(?!/)|~|[A-Za-z]:\\)""")


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_eight_notebooks_exist_and_match_the_presets():
    assert NAMES == list(config.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_committed_stripped_and_valid(path):
    nb = _read(path)
    nbformat.validate(nb)
    for cell in _code(nb):
        assert cell.outputs == [], f"{path.name}: cell {cell.get('id')} has outputs (strip before committing)"
        assert cell.execution_count is None, f"{path.name}: cell {cell.get('id')} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_structure(path):
    nb = _read(path)
    assert nb.metadata.kernelspec.name == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name}: first cell must be a markdown title"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', need exactly one"
    params = nb.cells[tagged[0]]
    assert params.cell_type == "code"
    assert re.search(r'^preset = os\.environ\.get\("PRESET", "demo"\)', params.source, re.M)
    # the notebook resolves its parameters under its own name, right after the parameters cell
    after = next(c for c in nb.cells[tagged[0] + 1:] if c.cell_type == "code")
    assert f'start_notebook("{path.stem}", globals())' in after.source
    # every override of the parameters cell is a declared parameter of the notebook
    names = set(re.findall(r"^(\w+) = ", params.source, re.M)) - {"preset"}
    assert names <= set(config.NOTEBOOKS[path.stem].params), names - set(config.NOTEBOOKS[path.stem].params)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_portable_code(path):
    for cell in _code(_read(path)):
        assert not ABSOLUTE_PATH.search(cell.source), f"{path.name}: absolute path in\n{cell.source}"
        assert ".cuda(" not in cell.source, f"{path.name}: use the device from lib.device, not .cuda()"
        assert "os.chdir" not in cell.source and "getcwd" not in cell.source, f"{path.name}: paths come from lib.paths"


def _execute(path, out, **parameters):
    return papermill.execute_notebook(str(path), str(out), parameters=parameters, kernel_name="python3",
                                      progress_bar=False)


@pytest.mark.slow
@pytest.mark.executes_notebook  # deselected where nbval runs the same notebook (conftest.py)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_runs_at_smoke_from_another_working_directory(path, tmp_path, monkeypatch):
    elsewhere, results = tmp_path / "elsewhere", tmp_path / "results"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(results))
    _execute(path, tmp_path / "out.ipynb", preset="smoke")
    (run_dir,) = (results / path.stem).iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["preset"] == "smoke"
    assert record["config"] == json.loads(json.dumps(dict(config.resolve(path.stem, "smoke"))))  # tuples -> lists
    assert list(elsewhere.iterdir()) == []  # nothing written relative to the working directory


@pytest.mark.slow
@pytest.mark.parametrize("name", ["01_explore_data", "05_cxr_change"])
@pytest.mark.parametrize("parameters,message", [
    ({"preset": "bogus"}, "valid presets: smoke, demo, subset, prod"),
    ({"preset": "smoke", "epcohs": 3}, "unknown parameter(s) epcohs; valid parameters: preset, seed"),
])
def test_bad_parameters_fail_loudly(name, parameters, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    with pytest.raises(PapermillExecutionError) as e:
        _execute(paths.NOTEBOOKS_DIR / f"{name}.ipynb", tmp_path / "out.ipynb", **parameters)
    assert e.value.ename == "ValueError" and message in e.value.evalue
