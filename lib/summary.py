"""The project's results table: one row per (family, task, metric), each beside its baseline.

Every training notebook scores its model on the test split through its family's ``evaluate``, which
writes ``heldout_metrics.json`` in the run folder (:mod:`lib.families.results` holds the schema). The
families and their questions come from the registry, :mod:`lib.families`. 07_evaluate collects the
latest completed run of each family for a preset (or the run ids it is given), adds what it evaluates
itself (the SSL downstream comparison), and writes ``results/summary.csv`` and ``results/summary.md``.
A family without a usable run gets a row saying ``missing``, never silence.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from lib import families, paths
from lib.families import results
from lib.runs import read_index, write_csv, write_text

METRICS_FILE = results.METRICS_FILE
ROW_KEYS = results.ROW_KEYS


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


def _run_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _run_seed(run_dir: Path) -> str:
    seed = _run_record(run_dir).get("seed")
    return "" if seed is None else str(seed)


def run_data(run_dir: Path) -> str:
    """What a run trained on, from its configuration: the prepared datasets of ``real_data`` (folder names),
    else ``built-in <cohort>``."""
    cfg = _run_record(run_dir).get("config") or {}
    real = [Path(p.strip()).name for p in str(cfg.get("real_data") or "").split(",") if p.strip()]
    if real:
        return ",".join(real)
    return f"built-in {cfg['cohort']}" if cfg.get("cohort") else ""


def run_rows(family: str, run_dir: Path | None, preset: str) -> list[dict[str, Any]]:
    """The held-out rows a family's run recorded, or one ``missing`` row saying why there are none."""
    notebook = families.get(family).notebook
    reason, rows = None, []
    if run_dir is None:
        reason = f"no completed {notebook} run at preset {preset}"
    elif not (run_dir / METRICS_FILE).is_file():
        reason = f"run {run_dir.name} wrote no {METRICS_FILE}"
    else:
        try:
            rows = results.read_heldout(run_dir)
        except ValueError as e:
            reason = f"run {run_dir.name}: {METRICS_FILE} unusable ({e})"
    if reason:
        return [{**dict.fromkeys(ROW_KEYS, ""), "family": family, "task": "missing", "metric": reason,
                 "headline": False, "preset": preset}]
    seed, data = _run_seed(run_dir), run_data(run_dir)
    return [{**dict.fromkeys(ROW_KEYS, ""), **r, "family": family, "preset": preset, "run_id": run_dir.name,
             "seeds": r.get("seeds") if r.get("seeds") not in (None, "") else seed,
             "data": r.get("data") or data} for r in rows]


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
    order = {family: i for i, family in enumerate(families.FAMILIES)}
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
    for family, (notebook, question) in ((f.name, (f.notebook, f.question)) for f in families.FAMILIES.values()):
        sub = table[table["family"] == family]
        lines += [f"## {family} ({notebook})", "", f"Question: {question}", ""]
        if (sub["task"] == "missing").any():
            lines += [f"**Missing**: {sub['metric'].iloc[0]}.", ""]
            continue
        lines += ["| task | metric | model | baseline | baseline value | verdict | data | split | n | seeds |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for _, r in sub.iterrows():
            mark = "**" if is_true(r["headline"]) else ""
            lines.append(f"| {r['task']} | {mark}{r['metric']}{mark} | {_fmt(r['value'])} | {r['baseline']} | "
                         f"{_fmt(r['baseline_value'])} | {verdict(r)} | {r['data']} | {r['split']} | {r['n']} | {r['seeds']} |")
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
