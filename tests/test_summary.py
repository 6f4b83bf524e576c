import json

import pandas as pd
import pytest

from lib import runs, summary


def _run(notebook, preset, status="completed", rows=None):
    run = runs.Run(notebook, {"preset": preset, "seed": 0, "device": "cpu"}, run_id=f"{notebook}-{preset}-{status}-{len(rows or [])}")
    if rows is not None:
        run.save_json(summary.METRICS_FILE, rows)
    if status == "completed":
        run.finish()
    elif status == "failed":
        run.fail("boom")
    return run


def test_latest_completed_run_per_preset_and_explicit_run_ids(results):
    first = _run("05_cxr_change", "demo", rows=[])
    failed = _run("05_cxr_change", "demo", status="failed")
    other = _run("05_cxr_change", "smoke", rows=[])
    assert summary.latest_run("05_cxr_change", "demo", results_root=results) == first.dir
    assert summary.latest_run("05_cxr_change", "prod", results_root=results) is None
    assert summary.latest_run("05_cxr_change", "demo", run_id=other.run_id, results_root=results) == other.dir
    with pytest.raises(ValueError, match="is failed, not completed"):
        summary.latest_run("05_cxr_change", "demo", run_id=failed.run_id, results_root=results)
    with pytest.raises(ValueError, match="no run 'nope'"):
        summary.latest_run("05_cxr_change", "demo", run_id="nope", results_root=results)


def test_missing_families_are_listed_and_losses_said_plainly(results):
    row = {"task": "change map", "metric": "dice", "headline": True, "higher_is_better": True, "value": 0.31,
           "baseline": "subtraction", "baseline_value": 0.42, "split": "test", "n": 16, "seeds": "0"}
    run = _run("05_cxr_change", "demo", rows=[row])
    rows = []
    for family, (notebook, _) in summary.FAMILIES.items():
        rows += summary.run_rows(family, summary.latest_run(notebook, "demo", results_root=results), "demo")
    table = summary.write_summary(rows, results)
    assert list(table.columns) == summary.ROW_KEYS
    assert (table.set_index("family").loc["ssl_pretraining", "task"]) == "missing"
    text = (results / "summary.md").read_text()
    assert "**Missing**: no completed 03_pretrain run at preset demo." in text
    assert "the model is WORSE than baseline" in text
    assert pd.read_csv(results / "summary.csv").query("family == 'cxr_change'")["run_id"].item() == run.run_id


def test_verdict_respects_direction_and_ceilings():
    assert summary.verdict({"value": 1.0, "baseline_value": 2.0, "higher_is_better": False}) == "better than baseline"
    assert summary.verdict({"value": 1.0, "baseline_value": 2.0, "higher_is_better": True}) == "WORSE than baseline"
    assert summary.verdict({"value": "", "baseline_value": 2.0, "higher_is_better": True}) == ""
    ceiling = {"value": 140.0, "baseline_value": 125.0, "higher_is_better": False, "baseline": "VAE (ceiling)"}
    assert summary.verdict(ceiling) == "short of the ceiling by 15"
    assert summary.verdict({**ceiling, "value": 120.0}) == "at the ceiling"


def test_one_headline_per_family_and_the_run_seed_fills_empty_seeds(results):
    row = {"task": "t", "metric": "psnr", "headline": True, "higher_is_better": True, "value": 2.0,
           "baseline": "mean", "baseline_value": 1.0, "split": "test", "n": 3, "seeds": ""}
    two = _run("06_xray_to_ct", "demo", rows=[row, {**row, "metric": "ssim"}])
    with pytest.raises(ValueError, match=r"xray_to_ct \(runs .*\) has 2 headline rows \['psnr', 'ssim'\]"):
        summary.write_summary(summary.run_rows("xray_to_ct", two.dir, "demo"), results)
    none = _run("06_xray_to_ct", "demo", rows=[{**row, "headline": False}])
    with pytest.raises(ValueError, match="has 0 headline rows"):
        summary.write_summary(summary.run_rows("xray_to_ct", none.dir, "demo"), results)
    assert not (results / "summary.csv").exists()  # nothing half-written
    one = _run("06_xray_to_ct", "demo", rows=[row, {**row, "metric": "ssim", "headline": False, "seeds": "4,5"}])
    rows = summary.run_rows("xray_to_ct", one.dir, "demo")
    assert [r["seeds"] for r in rows] == ["0", "4,5"]  # _run records seed 0


def test_family_readers_turn_saved_scores_into_rows_beside_baselines(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    pd.DataFrame([{"comparison": c, "subject": f"s{i}", "psnr_db": p, "ssim": 0.5, "mae_changed_hu": m, "changed_voxels": n}
                  for c, p, m in (("translation", 20.0, 50.0), ("identity", 18.0, 250.0), ("vae_ceiling", 30.0, 20.0))
                  for i, n in ((0, 100), (1, 300))]).to_csv(d / "scores_per_series.csv", index=False)
    rows = summary.run_rows("ct_diffusion", d, "demo")
    head = [r for r in rows if r["headline"]]
    assert len(head) == 1 and head[0]["value"] == 50.0 and head[0]["baseline_value"] == 250.0
    assert summary.verdict(head[0]) == "better than baseline" and head[0]["n"] == 2
    ceiling = [r for r in rows if "ceiling" in r["baseline"] and r["metric"] == head[0]["metric"]]
    assert ceiling[0]["baseline_value"] == 20.0 and summary.verdict(ceiling[0]) == "short of the ceiling by 30"
    pd.DataFrame([{"method": "model", "dice": 0.5, "pixel_auc": 0.9, "fp_area": 0.01},
                  {"method": "subtraction", "dice": 0.3, "pixel_auc": 0.8, "fp_area": 0.05}]).to_csv(d / "test_scores.csv", index=False)
    pd.DataFrame({"pair": list("abcde"), "nuisance_only": [1, 0, 0, 0, 1]}).to_csv(d / "test_pairs.csv", index=False)
    rows = summary.run_rows("cxr_change", d, "demo")
    assert [r["metric"] for r in rows if r["headline"]] == ["Dice on changed pixels (mean over pairs with change)"]
    assert all(summary.verdict(r) == "better than baseline" for r in rows)
    assert [r["n"] for r in rows] == [3, 5, 2]  # pairs with change, all pairs, nuisance-only pairs
    pd.DataFrame([{"modality": "MRI", "pretrained": 0.4, "mean patch": 1.0, "volumes": 7}]).to_csv(d / "heldout_reconstruction.csv", index=False)
    (row,) = summary.run_rows("ssl_pretraining", d, "demo")
    assert row["value"] == 0.4 and row["higher_is_better"] is False and row["n"] == 7
    (missing,) = summary.run_rows("xray_to_ct", d, "demo")
    assert missing["task"] == "missing" and "wrote no heldout_metrics.json" in missing["metric"]
