"""The project's results table: one row per (family, task, metric), each beside its baseline.

Every training notebook writes ``heldout_metrics.json`` into its run folder: a list of rows with the
keys of :data:`ROW_KEYS` (``family`` and ``run_id``/``preset`` are filled in here). 07_evaluate
collects the latest completed run of each family for a preset (or the run ids it is given), adds what
it evaluates itself (the SSL downstream comparison), and writes ``results/summary.csv`` and
``results/summary.md``. A family without a usable run gets a row saying ``missing``, never silence.
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


def run_rows(family: str, run_dir: Path | None, preset: str) -> list[dict[str, Any]]:
    """The held-out rows a family's run recorded, or one ``missing`` row saying why there are none."""
    notebook, _ = FAMILIES[family]
    reason = None
    if run_dir is None:
        reason = f"no completed {notebook} run at preset {preset}"
    elif not (run_dir / METRICS_FILE).is_file():
        reason = f"run {run_dir.name} wrote no {METRICS_FILE}"
    if reason:
        return [{**dict.fromkeys(ROW_KEYS, ""), "family": family, "task": "missing", "metric": reason,
                 "headline": False, "preset": preset}]
    rows = json.loads((run_dir / METRICS_FILE).read_text())
    return [{**dict.fromkeys(ROW_KEYS, ""), **r, "family": family, "preset": preset, "run_id": run_dir.name}
            for r in rows]


def verdict(row: dict[str, Any]) -> str:
    """``better`` / ``worse`` / ``tie`` of the model against its baseline, in plain words."""
    try:
        v, b = float(row["value"]), float(row["baseline_value"])
    except (TypeError, ValueError):
        return ""
    if not (math.isfinite(v) and math.isfinite(b)) or v == b:
        return "tie"
    better = v > b if row["higher_is_better"] in (True, "True", "true", 1) else v < b
    return "better than baseline" if better else "WORSE than baseline"


def write_summary(rows: list[dict[str, Any]], results_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Write ``summary.csv`` and ``summary.md`` under the results root; returns the table."""
    root = Path(results_root or paths.results_dir())
    table = pd.DataFrame(rows, columns=ROW_KEYS)
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
            mark = "**" if r["headline"] in (True, "True") else ""
            lines.append(f"| {r['task']} | {mark}{r['metric']}{mark} | {_fmt(r['value'])} | {r['baseline']} | "
                         f"{_fmt(r['baseline_value'])} | {verdict(r)} | {r['split']} | {r['n']} | {r['seeds']} |")
        head = sub[sub["headline"].isin([True, "True"])]
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
