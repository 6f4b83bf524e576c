"""From raw downloads to training, through the notebooks: the fixtures of the three real datasets are
converted by 02_prepare_data, surveyed by 01_explore_data, and 03_pretrain trains on them at the smoke
preset; 03 at prod on a machine without data stops at once, saying what to fetch and convert."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from papermill.exceptions import PapermillExecutionError

from lib.data import fixtures, prepared
from references import execute_notebook, only_run

DATASETS = ("openmind", "rsna2025_aneurysm", "deeplesion")
pytestmark = pytest.mark.slow


_execute, _run_record = execute_notebook, only_run


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """A data root holding the three raw fixtures under raw/NAME, and a results root."""
    tmp = tmp_path_factory.mktemp("real")
    for name in DATASETS:
        fixtures.write(name, tmp / "data" / "raw" / name)
    return tmp


def test_02_converts_01_surveys_03_trains(roots, monkeypatch):
    data, results = roots / "data", roots / "results"
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(data))
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(results))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(roots / "no-kaggle"))

    _execute("02_prepare_data", roots / "02.ipynb", preset="smoke", convert="auto", workers=2)
    run_dir, record = _run_record(results, "02_prepare_data")
    conversions = pd.read_csv(run_dir / "conversions.csv")
    done = conversions[conversions["status"] == "done"]
    assert sorted(done["dataset"]) == sorted(DATASETS)  # the others' downloads are not there: listed, not failed
    assert set(conversions.loc[conversions["status"] != "done", "status"]) == {"raw download not found"}
    assert (done["converted"] > 0).all() and (done["refused"] > 0).all()  # every fixture has bad items
    sets = {name: prepared.open_dataset(data / "prepared" / name) for name in DATASETS}
    for ds in sets.values():
        assert len(ds.report) == len(ds.report["source"].unique()) and len(ds.index) > 0

    _execute("01_explore_data", roots / "01.ipynb", preset="smoke")
    run_dir, record = _run_record(results, "01_explore_data")
    for name in DATASETS:
        counts = pd.read_csv(run_dir / "prepared" / f"{name}_counts.csv")
        assert counts["total"].sum() == len(sets[name].index)
        refused = pd.read_csv(run_dir / "prepared" / f"{name}_refused.csv")
        assert len(refused) == min(20, len(sets[name].refused())) and refused["reason"].str.len().min() > 0

    folders = ",".join(str(data / "prepared" / name) for name in DATASETS)
    _execute("03_pretrain", roots / "03.ipynb", preset="smoke", real_data=folders)
    run_dir, record = _run_record(results, "03_pretrain")
    assert record["status"] == "completed" and record["config"]["real_data"] == folders
    heldout = json.loads((run_dir / "heldout_metrics.json").read_text())
    tested = {m: sum(len(ds.images(m, "test")) for ds in sets.values()) for m in ("MRI", "CT")}
    rows = {r["metric"].rsplit(", ", 1)[1]: r for r in heldout}
    assert {m: rows[m]["n"] for m in rows} == tested  # every test image of every dataset, per modality
    assert (run_dir / "encoder.pt").is_file()


def test_03_prod_without_data_stops_at_once_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MEDIMG_KAGGLE_INPUT", str(tmp_path / "input"))
    with pytest.raises(PapermillExecutionError) as e:
        _execute("03_pretrain", tmp_path / "out.ipynb", preset="prod")
    assert e.value.ename == "FileNotFoundError"
    for name in ("openmind", "rsna2025_aneurysm"):
        assert f"python -m lib.data.manifest fetch {name}" in e.value.evalue
        assert f"python -m lib.data.convert {name}" in e.value.evalue
    assert not (tmp_path / "data").exists()
