"""Submission plumbing of the RSNA 2025 Intracranial Aneurysm Detection code competition, independent of any
model: a ``predict(series_path)`` in, ``submission.parquet`` out.

What Kaggle's ``kaggle_evaluation`` package (shipped with the competition data) does, and what this mirrors:
``kaggle_evaluation.rsna_inference_server.RSNAInferenceServer(predict)`` registers ``predict`` under its
function name; on a competition rerun (``KAGGLE_IS_COMPETITION_RERUN`` set) ``serve()`` answers the hidden
test gateway, otherwise ``run_local_gateway()`` runs its gateway over the sample series in
``kaggle_evaluation/series`` (``data_paths=(test.csv, series_dir)`` to choose others). The gateway (shuffled
order) shares one series at a time under ``/kaggle/shared/<absolute path of the series folder>`` (the last
path part is the SeriesInstanceUID), calls ``predict(that path)``, allows 30 minutes per call (the first
excepted), expects a pandas or polars frame of one row with the 14 label columns (an ID column it
overwrites), and writes ``submission.parquet`` into the working directory (``/kaggle/working``). Its demo
asks ``predict`` to delete ``/kaggle/shared`` before returning (disk space).

- :func:`submission_row`: 14 checked probabilities -> one row (``SeriesInstanceUID`` + :data:`LABELS`).
- :class:`LocalGateway`: the gateway without Kaggle: copies, times, validates, writes the file atomically.
- :func:`serve`: Kaggle's server when ``kaggle_evaluation`` is importable, else :class:`LocalGateway`.
- :func:`resolve_weights`: the trained run folder inside an attached weights dataset.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib import paths
from lib.atomic import atomic_path
from lib.data.convert.rsna2025_aneurysm import LABELS

ID_COL = "SeriesInstanceUID"
COMPETITION = "rsna-intracranial-aneurysm-detection"
LIMIT_S = 30 * 60  # the gateway's response deadline per series
SHARED = "/kaggle/shared"


def submission_row(uid: str, probs: Any) -> dict:
    """``{SeriesInstanceUID: uid, label: probability, ...}`` in :data:`LABELS` order.

    ``probs``: a mapping with exactly the 14 labels (an extra ``SeriesInstanceUID`` equal to ``uid`` is
    allowed), or a sequence / array of 14 numbers in :data:`LABELS` order. Every value must be a finite
    number in [0, 1]; otherwise ValueError naming the series (and the label)."""
    if isinstance(probs, pd.Series):
        probs = probs.to_dict()
    if isinstance(probs, Mapping):
        probs = dict(probs)
        given = probs.pop(ID_COL, uid)
        if str(given) != str(uid):
            raise ValueError(f"series {uid}: the row names series {given}")
        missing, extra = [k for k in LABELS if k not in probs], sorted(set(probs) - set(LABELS))
        if missing or extra:
            raise ValueError(f"series {uid}: label columns missing {missing}, unexpected {extra}")
        values = [probs[k] for k in LABELS]
    else:
        values = list(np.asarray(probs, dtype=object).reshape(-1)) if not isinstance(probs, (str, bytes)) else [probs]
        if len(values) != len(LABELS):
            raise ValueError(f"series {uid}: {len(values)} values, need {len(LABELS)} (in LABELS order)")
    row = {ID_COL: str(uid)}
    for label, v in zip(LABELS, values):
        try:
            p = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"series {uid}: {label!r} is {v!r}, not a number") from None
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"series {uid}: {label!r} is {p}, not a probability in [0, 1]")
        row[label] = p
    return row


def row_of(prediction: Any, uid: str) -> dict:
    """What ``predict`` returned (a pandas or polars frame of one row, a dict, or 14 numbers) -> checked row."""
    if isinstance(prediction, pd.DataFrame) or hasattr(prediction, "to_dicts"):  # pandas / polars
        records = prediction.to_dict("records") if isinstance(prediction, pd.DataFrame) else prediction.to_dicts()
        if len(records) != 1:
            raise ValueError(f"series {uid}: predict returned {len(records)} rows, need exactly 1")
        prediction = records[0]
    return submission_row(uid, prediction)


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[ID_COL, *LABELS]).astype({k: "float64" for k in LABELS})


def write_submission(rows: list[dict], path: str | os.PathLike) -> Path:
    """``submission.parquet`` (``SeriesInstanceUID`` + the 14 labels, one row per series), atomically."""
    frame = _frame(rows)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, engine="pyarrow")
    return Path(path)


@dataclass
class LocalGateway:
    """Kaggle's gateway, locally: each series folder (``.../<SeriesInstanceUID>/*.dcm``) is copied to a fresh
    temporary ``<tmp>/<uid>/`` (as the real one shares it under /kaggle/shared, so ``predict`` never sees the
    original path), ``predict(copy)`` is timed, its row validated (ValueError naming the series), and
    after the last series ``submission.parquet`` is written at once (temp file, then rename): a failure
    half-way leaves no file, or the previous one intact. A call over ``limit_s`` is warned about and
    marked ``over_limit`` (``strict``: raises TimeoutError instead)."""

    predict: Callable[[str], Any]
    limit_s: float = LIMIT_S
    strict: bool = False
    share_root: str | os.PathLike | None = None  # where the copies go (default: the system's temp folder)

    def run(self, series_folders: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> pd.DataFrame:
        """Predict every series in order, write ``out_path``; returns the per-series timing table
        (``SeriesInstanceUID``, ``seconds``, ``files``, ``over_limit``)."""
        folders = [Path(f) for f in series_folders]
        uids, missing = [f.name for f in folders], [str(f) for f in folders if not f.is_dir()]
        if not folders or missing:
            raise ValueError(f"LocalGateway: no series folders given, or not series folders: {missing}")
        if len(set(uids)) != len(uids):
            raise ValueError(f"LocalGateway: series given twice: {sorted({u for u in uids if uids.count(u) > 1})}")
        rows, timing = zip(*(self._one(folder) for folder in folders))
        write_submission(list(rows), out_path)
        return pd.DataFrame(timing, columns=[ID_COL, "seconds", "files", "over_limit"])

    def _one(self, folder: Path) -> tuple[dict, dict]:
        uid = folder.name
        if self.share_root is not None:
            Path(self.share_root).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="rsna-share-", dir=self.share_root))
        try:
            copy = tmp / uid
            shutil.copytree(folder, copy)
            files = sum(1 for p in copy.rglob("*") if p.is_file())
            start = time.perf_counter()
            prediction = self.predict(str(copy))
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = row_of(prediction, uid)
        over = seconds > self.limit_s
        if over:
            message = f"series {uid}: predict took {seconds:.1f} s, over the {self.limit_s:.0f} s the gateway allows"
            if self.strict:
                raise TimeoutError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return row, {ID_COL: uid, "seconds": seconds, "files": files, "over_limit": over}


# --------------------------------------------------------------------------- Kaggle's kaggle_evaluation

def find_kaggle_evaluation(competition: str = COMPETITION):
    """``kaggle_evaluation.rsna_inference_server`` if it can be imported, from ``sys.path`` or from the
    competition's folder under the Kaggle input root (``<input>/<competition>/`` or
    ``<input>/competitions/<competition>/``, then added to ``sys.path``); None where it is absent."""
    name = "kaggle_evaluation.rsna_inference_server"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("kaggle_evaluation"):
            raise  # the package is there but something it needs is not: say so, do not fall back
    root = paths.kaggle_input_root()
    for folder in (root / competition, root / "competitions" / competition):
        if (folder / "kaggle_evaluation" / "rsna_inference_server.py").is_file():
            sys.path.insert(0, str(folder))
            importlib.invalidate_caches()
            return importlib.import_module(name)
    return None


def kaggle_predict(user_predict: Callable[[str], Any], share_root: str = SHARED) -> Callable[[str], Any]:
    """``user_predict`` wrapped for Kaggle's server: the row is checked (:func:`row_of`) and returned as a
    one-row polars frame of the 14 labels (pandas where polars is absent), without the ID column, as
    the demo does; the shared series is deleted afterwards (the demo's required disk-space workaround).
    The wrapper is named ``predict``: the server registers endpoints by function name."""

    def predict(series_path: str):
        uid = os.path.basename(os.path.normpath(str(series_path)))
        try:
            row = row_of(user_predict(series_path), uid)
        finally:
            if os.path.abspath(str(series_path)).startswith(os.path.abspath(share_root) + os.sep):
                shutil.rmtree(share_root, ignore_errors=True)
        values = {k: [row[k]] for k in LABELS}
        try:
            import polars as pl
        except ModuleNotFoundError:
            return pd.DataFrame(values, columns=LABELS)
        return pl.DataFrame(values)

    return predict


@dataclass
class Served:
    """What :func:`serve` did: ``mode`` is ``kaggle-serve`` (rerun: Kaggle's gateway writes the file),
    ``kaggle-local-gateway`` or ``local-gateway``; ``submission`` the file written (None on a rerun);
    ``timing`` the per-series table (local gateway only)."""

    mode: str
    submission: Path | None
    timing: pd.DataFrame | None = None


def _test_csv(series_folders: Sequence[str | os.PathLike], folder: Path) -> tuple[str, str]:
    """``data_paths`` for Kaggle's local gateway: a test.csv naming the series, and their common parent."""
    parents = {Path(f).resolve().parent for f in series_folders}
    if len(parents) != 1:
        raise ValueError(f"Kaggle's gateway reads series from one folder; these lie in {sorted(map(str, parents))}")
    with open(folder / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([[ID_COL], *[[Path(s).name] for s in series_folders]])
    return str(folder / "test.csv"), str(parents.pop())


def serve(predict: Callable[[str], Any], series_folders: Sequence[str | os.PathLike] | None = None,
          out_dir: str | os.PathLike | None = None, limit_s: float = LIMIT_S,
          share_dir: str | os.PathLike | None = None) -> Served:
    """Run ``predict`` the way the competition will.

    With ``kaggle_evaluation`` importable (:func:`find_kaggle_evaluation`): its ``RSNAInferenceServer``
    around ``predict`` (:func:`kaggle_predict`); ``serve()`` on a competition rerun (blocks until the
    gateway is done), otherwise ``run_local_gateway`` inside ``out_dir`` (default: the working directory),
    over ``series_folders`` (all in one folder) or, when None, the package's own sample series.
    Off Kaggle (no ``/kaggle``) the shared copies go to ``share_dir`` (default: a temporary folder).
    Without it: :class:`LocalGateway` over ``series_folders``, writing ``out_dir/submission.parquet``.
    In a Kaggle kernel the file is also copied to ``/kaggle/working/submission.parquet``, the output a
    code-competition submission names.
    """
    server_module = find_kaggle_evaluation()
    out = Path(out_dir) if out_dir is not None else Path.cwd()
    if server_module is None:
        if not series_folders:
            raise ValueError("kaggle_evaluation is not importable: give series_folders for the local gateway")
        timing = LocalGateway(predict, limit_s=limit_s).run(series_folders, out / "submission.parquet")
        return Served("local-gateway", _to_working(out / "submission.parquet"), timing)
    share = str(share_dir) if share_dir is not None else None
    with contextlib.ExitStack() as stack:
        if share is None and not os.path.exists("/kaggle"):
            share = stack.enter_context(tempfile.TemporaryDirectory(prefix="rsna-shared-", ignore_cleanup_errors=True))
        server = server_module.RSNAInferenceServer(kaggle_predict(predict, share or SHARED))
        if os.getenv("KAGGLE_IS_COMPETITION_RERUN"):
            server.serve()
            return Served("kaggle-serve", None)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rsna-test-csv-")))
        data_paths = _test_csv(series_folders, tmp) if series_folders else None
        out.mkdir(parents=True, exist_ok=True)
        stack.enter_context(contextlib.chdir(out))  # the gateway writes submission.parquet into the cwd
        kwargs = {"file_share_dir": share} if share is not None else {}
        server.run_local_gateway(data_paths, **kwargs)
    return Served("kaggle-local-gateway", _to_working(out / "submission.parquet"))


def _to_working(path: Path) -> Path:
    """In a Kaggle kernel, a copy of ``path`` at ``<working>/submission.parquet`` (atomically); ``path``."""
    target = paths.kaggle_working_root() / "submission.parquet"
    if paths.on_kaggle() and path.is_file() and path.resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
    return path


def resolve_weights(weights: str | os.PathLike) -> Path:
    """The trained 09 run folder that ``weights`` names: a folder (or its ``model.pt``) as given, or, for a
    path under the Kaggle input root (``/kaggle/input/<slug>[/...]``) that does not exist as written
    (datasets mount at ``<input>/<slug>/`` or deeper, ``<input>/datasets/<owner>/<slug>/``), that path
    found up to two levels deeper. Inside it, the one folder holding ``model.pt`` (itself, or one below)."""
    path = Path(weights)
    if path.is_file():
        return path.parent
    if not path.exists():
        root, rel = paths.kaggle_input_root(), None
        for base in (root, Path("/kaggle/input")):
            with contextlib.suppress(ValueError):
                rel = rel or path.relative_to(base)
        if rel is None or not str(rel).strip("."):
            raise FileNotFoundError(f"weights {str(weights)!r}: no such file or folder")
        # two levels at most: the competition's own folder holds a million DICOM files
        found = sorted({p for pattern in (str(rel), f"*/{rel}", f"*/*/{rel}") for p in root.glob(pattern)
                        if p.is_dir()}) if root.is_dir() else []
        if len(found) != 1:
            raise FileNotFoundError(f"weights {str(weights)!r}: not there, and {len(found)} folders {str(rel)!r} "
                                    f"under {root} {[str(f) for f in found[:3]]}: attach the weights dataset")
        path = found[0]
    models = sorted(path.glob("model.pt")) or sorted(path.glob("**/model.pt"))
    if len(models) != 1:
        raise FileNotFoundError(f"weights {str(weights)!r}: need exactly one model.pt in {path}, found "
                                f"{[str(m) for m in models[:5]]}")
    return models[0].parent
