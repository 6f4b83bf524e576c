"""``data_manifest.csv``: every dataset the project knows, one row per file (or per dataset).

Columns (all present, in this order):

=============== =====================================================================================
dataset         short name, e.g. ``demo_brain_mri``, ``lidc_idri``
case_id         subject/case id; empty on a row that describes a whole dataset
split           ``train`` | ``val`` | ``test``; empty on a dataset row
modality        ``MRI``, ``CT``, ``CTA``, ``CXR``, ...; several joined by ``;``
channels        channel count of the decoded array (1 or 3)
path            relative to the data root (:func:`lib.paths.data_dir`); a dataset row's ends in ``/``
checksum        ``sha256:<hex>`` of the file bytes, or ``array-sha256:<hex>`` of the decoded array for
                generated NIfTI (gzip bytes differ between zlib versions); empty if unknown
bytes           file size; empty if unknown
source          ``builtin:demo`` | ``kaggle-competition:<slug>`` | ``kaggle-dataset:<owner/slug>``
                | ``url:<address>`` | ``hf:<repo>``
licence         licence or terms of use
expected_files  on a dataset row: the number of files a complete download holds (empty if unknown)
fetch           how to obtain it (the opt-in fetch step; credentials it needs)
=============== =====================================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lib import paths

COLUMNS = ["dataset", "case_id", "split", "modality", "channels", "path", "checksum", "bytes",
           "source", "licence", "expected_files", "fetch"]
SPLITS = {"train", "val", "test", ""}
SOURCE_KINDS = ("builtin:", "kaggle-competition:", "kaggle-dataset:", "url:", "hf:")


def load_manifest(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and validate the manifest; ``ValueError`` names the file, row and column at fault."""
    path = Path(path or paths.MANIFEST)
    if not path.exists():
        raise ValueError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from e
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected columns {COLUMNS}")
    extra = [c for c in df.columns if c not in COLUMNS]
    if extra:
        raise ValueError(f"{path}: unexpected column(s) {extra}; expected columns {COLUMNS}")
    problems = []
    for i, row in df.iterrows():
        line = i + 2  # header is line 1
        if not row["dataset"]:
            problems.append(f"line {line}: empty dataset")
        if row["split"] not in SPLITS:
            problems.append(f"line {line}: split {row['split']!r} not in {sorted(SPLITS - {''})}")
        if not row["source"].startswith(SOURCE_KINDS):
            problems.append(f"line {line}: source {row['source']!r} does not start with one of {SOURCE_KINDS}")
        if not row["path"] or Path(row["path"]).is_absolute() or ".." in Path(row["path"]).parts:
            problems.append(f"line {line}: path {row['path']!r} must be relative to the data root")
        for col in ("channels", "bytes", "expected_files"):
            if row[col] and not row[col].isdigit():
                problems.append(f"line {line}: {col} {row[col]!r} is not a whole number")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
    return df


def summarize(df: pd.DataFrame, data_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per dataset: what the manifest lists and what is on disk under the data root."""
    root = Path(data_root or paths.data_dir())
    out = []
    for name, rows in df.groupby("dataset", sort=False):
        file_rows = rows[rows["case_id"] != ""]
        dataset_rows = rows[rows["case_id"] == ""]
        present = sum((root / p).is_file() for p in file_rows["path"])
        on_disk = sum(sum(1 for f in (root / p).rglob("*") if f.is_file()) if (root / p).is_dir() else 0
                      for p in dataset_rows["path"])
        expected = sum(int(x) for x in rows["expected_files"] if x)
        out.append({
            "dataset": name,
            "source": ", ".join(sorted(set(rows["source"]))),
            "licence": ", ".join(sorted(set(rows["licence"]))),
            "modality": ", ".join(sorted(set(";".join(rows["modality"]).split(";")) - {""})),
            "listed_files": len(file_rows),
            "present_files": present + on_disk,
            "expected_files": expected or None,
            "listed_bytes": sum(int(b) for b in rows["bytes"] if b),
            "splits": ", ".join(f"{s}={n}" for s, n in file_rows["split"].value_counts().items()),
        })
    return pd.DataFrame(out)
