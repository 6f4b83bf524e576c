import json

import pandas as pd
import pytest

from lib import families, runs, summary
from lib.families import results as heldout


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
    for f in families.FAMILIES.values():
        rows += summary.run_rows(f.name, summary.latest_run(f.notebook, "demo", results_root=results), "demo")
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
    (refused,) = summary.run_rows("xray_to_ct", two.dir, "demo")  # a run's file is checked when it is read
    assert refused["task"] == "missing" and "2 headline rows ['psnr', 'ssim']" in refused["metric"]
    gathered = [{**row, "family": "xray_to_ct", "run_id": two.run_id},  # rows from several sources (07's hooks)
                {**row, "metric": "ssim", "family": "xray_to_ct", "run_id": two.run_id}]
    with pytest.raises(ValueError, match=r"xray_to_ct \(runs .*\) has 2 headline rows \['psnr', 'ssim'\]"):
        summary.write_summary(gathered, results)
    none = _run("06_xray_to_ct", "demo", rows=[{**row, "headline": False}])
    with pytest.raises(ValueError, match="has 0 headline rows"):
        summary.write_summary(summary.run_rows("xray_to_ct", none.dir, "demo"), results)
    assert not (results / "summary.csv").exists()  # nothing half-written
    one = _run("06_xray_to_ct", "demo", rows=[row, {**row, "metric": "ssim", "headline": False, "seeds": "4,5"}])
    rows = summary.run_rows("xray_to_ct", one.dir, "demo")
    assert [r["seeds"] for r in rows] == ["0", "4,5"]  # _run records seed 0


def test_rows_come_from_heldout_metrics_json_only(tmp_path):
    """Each family's evaluate writes its rows (tests/test_<family>.py pin them); the summary adds the family,
    preset, run id and the run's seed, and reads no other file of a run."""
    d = tmp_path / "run"
    d.mkdir()
    pd.DataFrame([{"modality": "MRI", "pretrained": 0.4, "mean patch": 1.0, "volumes": 7}]).to_csv(d / "heldout_reconstruction.csv", index=False)
    (missing,) = summary.run_rows("ssl_pretraining", d, "demo")  # a family's own files are not read
    assert missing["task"] == "missing" and "wrote no heldout_metrics.json" in missing["metric"]
    written = [heldout.row("t", "mse, MRI", 0.4, "mean", 1.0, higher_is_better=False, n=7),
               heldout.row("t", "dice", 0.5, "subtraction", 0.3, higher_is_better=True, n=3, headline=True, seeds="1,2")]
    heldout.write_heldout(d, written)
    rows = summary.run_rows("cxr_change", d, "demo")
    assert [{k: r[k] for k in written[0]} for r in rows] == written
    assert all(r["family"] == "cxr_change" and r["preset"] == "demo" and r["run_id"] == "run" for r in rows)
    assert rows[0]["value"] == 0.4 and rows[0]["higher_is_better"] is False and rows[0]["n"] == 7
    assert summary.verdict(rows[0]) == "better than baseline" and summary.verdict(rows[1]) == "better than baseline"
    (d / "heldout_metrics.json").write_text(json.dumps([{"task": "t"}]))
    (bad,) = summary.run_rows("xray_to_ct", d, "demo")
    assert bad["task"] == "missing" and "heldout_metrics.json unusable" in bad["metric"] and "lacks" in bad["metric"]
    (missing,) = summary.run_rows("xray_to_ct", None, "demo")
    assert missing["metric"] == "no completed 06_xray_to_ct run at preset demo"


def test_every_row_is_judged_against_its_own_baseline(results):
    """Not only the headline: each row's verdict in summary.csv and summary.md compares its own value with
    its own baseline column, in its own direction (a mutation that judged every row by the headline's
    baseline, or by one direction, passed the older tests)."""
    def r(metric, value, baseline, baseline_value, higher, headline=False):
        return heldout.row("change map", metric, value, baseline, baseline_value, higher, n=4, headline=headline)

    rows = [r("dice", 0.8, "subtraction", 0.7, True, headline=True),   # better
            r("auc", 0.6, "subtraction", 0.9, True),                   # worse, though the headline wins
            r("fp area", 0.1, "subtraction", 0.3, False),              # lower is better: better
            r("fp area, smoothed", 0.1, "smoothed subtraction", 0.05, False),  # worse against its own baseline
            r("dice", 0.8, "VAE round trip (ceiling)", 0.9, True)]     # a ceiling: short of it
    run = _run("05_cxr_change", "demo", rows=rows)
    table = summary.write_summary(summary.run_rows("cxr_change", run.dir, "demo"), results_root=results)
    verdicts = [summary.verdict(row) for _, row in table.iterrows()]
    assert verdicts == ["better than baseline", "WORSE than baseline", "better than baseline", "WORSE than baseline",
                        "short of the ceiling by 0.1"]
    md = (results / "summary.md").read_text()
    for row, verdict in zip(rows, verdicts):
        line = next(l for l in md.splitlines() if f"| {row['baseline']} | {summary._fmt(row['baseline_value'])} |" in l
                    and row["metric"] in l)
        assert f"| {verdict} |" in line, line
    saved = pd.read_csv(results / "summary.csv", keep_default_na=False)
    assert saved["baseline_value"].astype(float).tolist() == [0.7, 0.9, 0.3, 0.05, 0.9]
