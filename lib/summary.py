"""The project's results table: one row per (family, task, metric), each beside its baseline.

Every training notebook scores its model on the test split and saves the scores in its run folder
(03: ``heldout_reconstruction.csv``, 04: ``scores_per_series.csv``, 05: ``test_scores.csv`` and
``test_pairs.csv``); :data:`READERS` turn those files into rows with the keys of :data:`ROW_KEYS`. A run
may also write its rows directly as ``heldout_metrics.json`` (06 does). Each family has exactly one
headline row; a baseline whose name says ``ceiling`` is an upper bound, and the verdict says how far
short of it the model stays. 07_evaluate collects the latest
completed run of each family for a preset (or the run ids it is given), adds what it evaluates itself
(the SSL downstream comparison), and writes ``results/summary.csv`` and ``results/summary.md``. A
family without a usable run gets a row saying ``missing``, never silence.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from lib import paths
from lib.runs import read_index, write_csv, write_text

FAMILIES = {  # family -> (training notebook, the headline question)
    "ssl_pretraining": ("03_pretrain", "does pre-training make the downstream task better than training from scratch?"),
    "ct_diffusion": ("04_ct_diffusion", "does the translation beat copying the input where contrast changes it?"),
    "cxr_change": ("05_cxr_change", "does the model find changed pixels better than subtraction?"),
    "xray_to_ct": ("06_xray_to_ct", "does the reconstruction beat the mean training volume?"),
}
ROW_KEYS = ["family", "task", "metric", "headline", "higher_is_better", "value", "baseline", "baseline_value",
            "split", "n", "preset", "run_id", "seeds"]
METRICS_FILE = "heldout_metrics.json"


def latest_run(notebook: str, preset: str, run_id: str | None = None,
               results_root: str | os.PathLike | None = None) -> Path | None:
    """The folder of ``run_id``, or of the newest completed run of ``notebook`` at ``preset``."""
    root = Path(results_root or paths.results_dir())
    rows = [r for r in read_index(root) if r["notebook"] == notebook]
    if run_id:
        match = [r for r in rows if r["run_id"] == run_id]
        if not match:
            raise ValueError(f"{notebook}: no run {run_id!r} in {root / 'runs.csv'}")
        if match[0]["status"] != "completed":
            raise ValueError(f"{notebook}: run {run_id} is {match[0]['status']}, not completed")
        return root / match[0]["path"]
    done = sorted((r for r in rows if r["preset"] == preset and r["status"] == "completed"),
                  key=lambda r: r["start_time"])
    return root / done[-1]["path"] if done else None


def _row(task, metric, value, baseline, baseline_value, higher_is_better, n, headline=False, split="test"):
    return {"task": task, "metric": metric, "headline": headline, "higher_is_better": higher_is_better,
            "value": round(float(value), 4), "baseline": baseline,
            "baseline_value": "" if baseline_value == "" else round(float(baseline_value), 4),
            "split": split, "n": "" if n == "" or pd.isna(n) else int(n), "seeds": ""}


def _ssl_rows(run_dir: Path) -> list[dict]:
    t = pd.read_csv(run_dir / "heldout_reconstruction.csv")
    return [_row("masked-patch reconstruction", f"per-patch-normalised MSE on masked patches, {r['modality']}",
                 r["pretrained"], "predicting the mean patch", r["mean patch"], False, n=r.get("volumes", ""))
            for _, r in t.iterrows()]


def _diffusion_rows(run_dir: Path) -> list[dict]:
    t = pd.read_csv(run_dir / "scores_per_series.csv")
    by = {name: g for name, g in t.groupby("comparison")}
    model, identity, ceiling = by["translation"], by["identity"], by["vae_ceiling"]

    def pooled(g):
        return float((g["mae_changed_hu"] * g["changed_voxels"]).sum() / g["changed_voxels"].sum())

    n = len(model)
    task = "non-contrast -> contrast chest CT series"
    mae = "MAE (HU) over voxels the contrast changes by > 100 HU"
    return [_row(task, mae, pooled(model), "identity (input copied)", pooled(identity), False, n, headline=True),
            _row(task, mae, pooled(model), "VAE round trip of the target (ceiling)", pooled(ceiling), False, n),
            _row(task, "PSNR (dB), diffusion window [-1, 1], data range 2", model["psnr_db"].mean(),
                 "identity (input copied)", identity["psnr_db"].mean(), True, n),
            _row(task, "SSIM (2D per frame, averaged)", model["ssim"].mean(), "identity (input copied)",
                 identity["ssim"].mean(), True, n),
            _row(task, "PSNR (dB), diffusion window [-1, 1], data range 2", model["psnr_db"].mean(),
                 "VAE round trip of the target (ceiling)", ceiling["psnr_db"].mean(), True, n)]


def _cxr_rows(run_dir: Path) -> list[dict]:
    t = pd.read_csv(run_dir / "test_scores.csv").set_index("method")
    task, m, b = "signed change map of a radiograph pair", t.loc["model"], t.loc["subtraction"]
    base = "naive subtraction (threshold chosen on val)"
    n_all = n_changed = n_nuisance = ""
    if (run_dir / "test_pairs.csv").is_file():
        pairs = pd.read_csv(run_dir / "test_pairs.csv")
        n_all, n_nuisance = len(pairs), int(pairs["nuisance_only"].astype(bool).sum())
        n_changed = n_all - n_nuisance
    return [_row(task, "Dice on changed pixels (mean over pairs with change)", m["dice"], base, b["dice"], True,
                 n_changed, headline=True),
            _row(task, "pixel AUC of |change| (all pixels of all pairs)", m["pixel_auc"], base, b["pixel_auc"],
                 True, n_all),
            _row(task, "false-positive area on nuisance-only pairs (fraction of pixels)", m["fp_area"], base,
                 b["fp_area"], False, n_nuisance)]


READERS = {"ssl_pretraining": ("heldout_reconstruction.csv", _ssl_rows),
           "ct_diffusion": ("scores_per_series.csv", _diffusion_rows),
           "cxr_change": ("test_scores.csv", _cxr_rows)}


def _run_seed(run_dir: Path) -> str:
    try:
        seed = json.loads((run_dir / "run.json").read_text()).get("seed")
    except (OSError, ValueError):
        return ""
    return "" if seed is None else str(seed)


def run_rows(family: str, run_dir: Path | None, preset: str) -> list[dict[str, Any]]:
    """The held-out rows a family's run recorded, or one ``missing`` row saying why there are none."""
    notebook, _ = FAMILIES[family]
    reason, rows = None, []
    if run_dir is None:
        reason = f"no completed {notebook} run at preset {preset}"
    elif (run_dir / METRICS_FILE).is_file():
        rows = json.loads((run_dir / METRICS_FILE).read_text())
    elif family in READERS and (run_dir / READERS[family][0]).is_file():
        try:
            rows = READERS[family][1](run_dir)
        except (KeyError, ValueError) as e:
            reason = f"run {run_dir.name}: {READERS[family][0]} unreadable ({type(e).__name__}: {e})"
    else:
        files = " nor ".join([METRICS_FILE] + ([READERS[family][0]] if family in READERS else []))
        reason = f"run {run_dir.name} wrote {'neither ' if family in READERS else 'no '}{files}"
    if reason:
        return [{**dict.fromkeys(ROW_KEYS, ""), "family": family, "task": "missing", "metric": reason,
                 "headline": False, "preset": preset}]
    seed = _run_seed(run_dir)
    return [{**dict.fromkeys(ROW_KEYS, ""), **r, "family": family, "preset": preset, "run_id": run_dir.name,
             "seeds": r.get("seeds") if r.get("seeds") not in (None, "") else seed} for r in rows]


def is_true(flag: Any) -> bool:
    """A ``headline`` / ``higher_is_better`` flag as written by a run or read back from a CSV (True, 1, "True")."""
    return flag is True or flag == 1 or str(flag).lower() == "true"


def verdict(row: dict[str, Any]) -> str:
    """``better`` / ``worse`` / ``tie`` of the model against its baseline, in plain words."""
    try:
        v, b = float(row["value"]), float(row["baseline_value"])
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(v) and math.isfinite(b)):
        return ""
    better = v > b if is_true(row["higher_is_better"]) else v < b
    if "ceiling" in str(row.get("baseline", "")).lower():
        return "at the ceiling" if v == b or better else f"short of the ceiling by {abs(v - b):.3g}"
    if v == b:
        return "tie"
    return "better than baseline" if better else "WORSE than baseline"


def write_summary(rows: list[dict[str, Any]], results_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write ``summary.csv`` and ``summary.md`` under the results root; returns the table."""
    root = Path(results_root or paths.results_dir())
    table = pd.DataFrame(rows, columns=ROW_KEYS)
    order = {family: i for i, family in enumerate(FAMILIES)}
    table = table.sort_values("family", key=lambda f: f.map(order), kind="stable").reset_index(drop=True)
    for family, sub in table[table["task"] != "missing"].groupby("family"):
        heads = sub.loc[sub["headline"].map(is_true), "metric"].tolist()
        if len(heads) != 1:
            raise ValueError(f"{family} (runs {', '.join(sorted(set(map(str, sub['run_id']))))}) has {len(heads)} "
                             f"headline rows {heads}; exactly one metric per family answers its question")
    write_csv(root / "summary.csv", table)
    lines = ["# Results summary", "",
             "One row per (family, task, metric) on the held-out split, beside its baseline. "
             "Headline rows answer each family's question; nothing here was tuned on the test split.", ""]
    for family, (notebook, question) in FAMILIES.items():
        sub = table[table["family"] == family]
        lines += [f"## {family} ({notebook})", "", f"Question: {question}", ""]
        if (sub["task"] == "missing").any():
            lines += [f"**Missing**: {sub['metric'].iloc[0]}.", ""]
            continue
        lines += ["| task | metric | model | baseline | baseline value | verdict | split | n | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for _, r in sub.iterrows():
            mark = "**" if is_true(r["headline"]) else ""
            lines.append(f"| {r['task']} | {mark}{r['metric']}{mark} | {_fmt(r['value'])} | {r['baseline']} | "
                         f"{_fmt(r['baseline_value'])} | {verdict(r)} | {r['split']} | {r['n']} | {r['seeds']} |")
        head = sub[sub["headline"].map(is_true)]
        for _, r in head.iterrows():
            lines += ["", f"Headline: {r['metric']} {_fmt(r['value'])} against {r['baseline']} "
                          f"{_fmt(r['baseline_value'])}: the model is {verdict(r)}."]
        lines.append("")
    write_text(root / "summary.md", "\n".join(lines) + "\n")
    return table


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)
