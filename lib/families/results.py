"""The results contract shared by every family: held-out rows, written as ``heldout_metrics.json``.

A row is one (task, metric) on the held-out split beside one baseline, with the keys of
:data:`ROW_KEYS`. A family's ``evaluate`` builds its rows with :func:`row` and writes them with
:func:`write_heldout`; :mod:`lib.summary` adds ``family``, ``preset``, ``run_id`` (and ``seeds`` when a
row has none) and reads nothing else. Exactly one row per family is its ``headline`` (the SSL family's
comes from 07_evaluate's downstream comparison, so its run writes none). A baseline whose name says
``ceiling`` is an upper bound, not something to beat.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from lib.atomic import write_json

ROW_KEYS = ["family", "task", "metric", "headline", "higher_is_better", "value", "baseline", "baseline_value",
            "split", "n", "preset", "run_id", "seeds", "data"]
METRICS_FILE = "heldout_metrics.json"
_WRITTEN_BY_FAMILY = ["task", "metric", "headline", "higher_is_better", "value", "baseline", "baseline_value",
                      "split", "n", "seeds"]


def row(task: str, metric: str, value: float, baseline: str, baseline_value: float | str, higher_is_better: bool,
        n: int | str, headline: bool = False, split: str = "test", seeds: str = "") -> dict[str, Any]:
    """One held-out row (values rounded to 4 decimals, as the summary reports them)."""
    missing_n = n == "" or (isinstance(n, float) and math.isnan(n))
    return {"task": task, "metric": metric, "headline": bool(headline), "higher_is_better": bool(higher_is_better),
            "value": round(float(value), 4), "baseline": baseline,
            "baseline_value": "" if baseline_value == "" else round(float(baseline_value), 4),
            "split": split, "n": "" if missing_n else int(n), "seeds": seeds}


def check_rows(rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``rows`` as written by a family, checked: the keys of the contract, finite numbers, at most one headline."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: held-out rows must be a non-empty list, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        missing = [k for k in _WRITTEN_BY_FAMILY if k not in r]
        if missing:
            raise ValueError(f"{where}: row {i} lacks {', '.join(missing)} (keys: {', '.join(_WRITTEN_BY_FAMILY)})")
        if not math.isfinite(float(r["value"])):
            raise ValueError(f"{where}: row {i} ({r['metric']}) has a non-finite value {r['value']!r}")
    heads = [r["metric"] for r in rows if r["headline"] is True]
    if len(heads) > 1:
        raise ValueError(f"{where}: {len(heads)} headline rows {heads}; a family has exactly one")
    return rows


def write_heldout(run_dir: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write a family's held-out rows as ``run_dir/heldout_metrics.json`` (checked, atomically)."""
    path = Path(run_dir) / METRICS_FILE
    return write_json(path, check_rows(rows, str(path)))


def read_heldout(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``run_dir/heldout_metrics.json``; ``ValueError`` naming the file when it is unusable."""
    path = Path(run_dir) / METRICS_FILE
    try:
        rows = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_rows(rows, str(path))
