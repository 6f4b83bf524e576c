"""09_rsna_aneurysm through papermill, as a user runs it: 03 at smoke, 09 training (arms, the built-in mini
competition built and converted on the way, a local submission), 09 in submit mode from those weights (no
training, the same predictions), and 07 reporting 09 as the SSL family's headline."""

import pandas as pd
import pytest
from references import execute_notebook, only_run

from lib.families.rsna_aneurysm import LABELS

pytestmark = pytest.mark.slow


def test_train_then_submit_then_07(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setenv("MEDIMG_RESULTS_DIR", str(results))
    monkeypatch.setenv("MEDIMG_DATA_DIR", str(tmp_path / "data"))
    execute_notebook("03_pretrain", tmp_path / "03.ipynb", preset="smoke")
    execute_notebook("09_rsna_aneurysm", tmp_path / "09.ipynb", preset="smoke")
    trained, record = only_run(results, "09_rsna_aneurysm")
    assert record["status"] == "completed" and record["summary"]["mode"] == "train"
    arms = pd.read_csv(trained / "arms.csv")
    assert set(arms["arm"]) == {"finetune", "scratch", "probe"} and arms["weighted_auc"].between(0, 1).all()
    first = pd.read_parquet(trained / "submission.parquet")
    assert list(first.columns) == ["SeriesInstanceUID", *LABELS] and first[LABELS].stack().between(0, 1).all()
    assert len(first) == record["summary"]["submission_rows"] > 0

    execute_notebook("09_rsna_aneurysm", tmp_path / "09s.ipynb", preset="smoke", mode="submit", weights=str(trained))
    runs = sorted((results / "09_rsna_aneurysm").iterdir())
    submitted = next(r for r in runs if r != trained)
    assert not (submitted / "arms.csv").exists() and not (submitted / "heldout_metrics.json").exists()  # never trains
    again = pd.read_parquet(submitted / "submission.parquet")
    pd.testing.assert_frame_equal(again, first, atol=1e-6)  # the same weights give the same answers

    execute_notebook("07_evaluate", tmp_path / "07.ipynb", preset="smoke")
    summary = pd.read_csv(results / "summary.csv", dtype=str, keep_default_na=False)
    ssl = summary[summary["family"] == "ssl_pretraining"]
    head = ssl[ssl["headline"] == "True"]
    assert len(head) == 1 and "RSNA 2025" in head["task"].item() and head["run_id"].item() == trained.name
