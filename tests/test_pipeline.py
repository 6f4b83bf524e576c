import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lib import pipeline, runs


def _notebook(path, code):
    params = new_code_cell('preset = "demo"')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# t"), params, new_code_cell(code)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)


@pytest.mark.slow
def test_runner_stops_at_the_first_failing_notebook_and_says_which(tmp_path, capsys, monkeypatch):
    folder, results = tmp_path / "nbs", tmp_path / "results"
    folder.mkdir()
    _notebook(folder / "01_good.ipynb", 'print("fine", preset)')
    _notebook(folder / "02_bad.ipynb", 'raise ValueError("boom in two")')
    _notebook(folder / "03_never.ipynb", 'print("never")')
    (folder / "notes.ipynb").write_text("{}")  # not numbered: not part of the pipeline
    assert [p.name for p in pipeline.list_notebooks(folder)] == ["01_good.ipynb", "02_bad.ipynb", "03_never.ipynb"]

    with pytest.raises(pipeline.NotebookFailed) as e:
        pipeline.run_all("smoke", folder=folder, results_root=results, log=lambda s: None)
    assert e.value.notebook == "02_bad.ipynb"
    assert "ValueError: boom in two" in e.value.message
    good = next((results / "01_good").iterdir())
    executed = nbformat.read(good / "01_good.ipynb", as_version=4)
    assert "fine smoke" in executed.cells[-1].outputs[0]["text"]  # the preset reached the notebook
    rec = json.loads((e.value.run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and "boom in two" in rec["errors"][0]["error"]
    assert not (results / "03_never").exists()
    assert [r["status"] for r in runs.read_index(results)] == ["failed"]


def test_only_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="matches no notebook"):
        pipeline.run_all("smoke", only=["99"], results_root=tmp_path)


def test_cli_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["--preset", "bogus"])
    assert "valid presets: smoke, demo, subset, prod" in capsys.readouterr().err
