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

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        is_dataset_row = rows["path"].str.endswith("/")
        file_rows, dataset_rows = rows[~is_dataset_row], rows[is_dataset_row]
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


# --------------------------------------------------------------------------- checksums

ARRAY_SUFFIXES = (".nii", ".nii.gz", ".npy")
# the prepared-dataset tables of a cohort (lib.data.demo.write_format): derived from its files, rewritten by
# every ``ensure``, and not checksummed here (index.csv records the gzip bytes' sha256, which zlib versions change)
FORMAT_TABLES = ("dataset.json", "index.csv", "labels.csv", "points.csv", "pairs.csv", "report.csv")


def checksum(path: str | os.PathLike) -> str:
    """``array-sha256:`` of the decoded float32 array (NIfTI, npy) or ``sha256:`` of the file bytes.

    Decoded arrays are hashed because gzip output differs between zlib versions; the shape is part of
    the hash, so a reshaped array does not pass for the original.
    """
    path = Path(path)
    if path.name.endswith(ARRAY_SUFFIXES):
        if path.name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            import nibabel as nib

            array = nib.load(path).get_fdata(dtype=np.float32)
        array = np.ascontiguousarray(array, dtype=np.float32)
        h = hashlib.sha256(repr(array.shape).encode())
        h.update(array.tobytes())
        return "array-sha256:" + h.hexdigest()
    from lib.data.cache import sha256_of

    return "sha256:" + sha256_of(path)


# --------------------------------------------------------------------------- the demo cohort's rows

_MODALITY = {"t1.nii.gz": "T1", "t2.nii.gz": "T2", "mra.nii.gz": "MRA", "ct.nii.gz": "CTA",
             "aneurysm.nii.gz": "SEG", "noncontrast.nii.gz": "CT", "contrast.nii.gz": "CT",
             "frontal.npy": "DRR", "lateral.npy": "DRR", "baseline.npy": "CXR", "followup.npy": "CXR",
             "change.npy": "CXR-CHANGE"}
_COHORT_LICENCE = ("project-generated (Apache-2.0); brain anatomy from the MNI ICBM152 2009c template "
                   "shipped with nilearn (free use with attribution)")


def rows_for_cohort(out: str | os.PathLike, size: str) -> list[dict[str, str]]:
    """Manifest rows (dataset ``<size>_<part>``) for every file of a built cohort in ``out``."""
    out = Path(out)
    splits = {}
    from lib.data.demo_format import read_subjects

    subjects = read_subjects(out / "subjects.csv")  # names the file and the columns it lacks
    for _, r in subjects.iterrows():
        splits[(r["dataset"], r["subject"])] = r["split"]
    pairs = pd.read_csv(out / "cxr_pairs" / "pairs.csv", dtype=str, keep_default_na=False)
    pair_split = dict(zip(pairs["pair"], pairs["split"]))
    rows = []
    for f in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(out)
        if rel.as_posix() in FORMAT_TABLES:  # derived from the files (index.csv holds gzip bytes' sha256)
            continue
        part = rel.parts[0] if len(rel.parts) > 1 else "cohort"
        case = rel.parts[1] if len(rel.parts) > 2 else ""
        split = pair_split.get(case, "") if part == "cxr_pairs" else splits.get(("chest_ct" if part == "drr" else part, case), "")
        rows.append({"dataset": f"{size}_{part}", "case_id": case, "split": split,
                     "modality": _MODALITY.get(f.name, "TABLE"), "channels": "1" if f.name in _MODALITY else "",
                     "path": f"{size}/{rel.as_posix()}", "checksum": checksum(f), "bytes": str(f.stat().st_size),
                     "source": f"builtin:{size}", "licence": _COHORT_LICENCE, "expected_files": "",
                     "fetch": f"python -m lib.data.demo --size {size}"})
    return rows


def replace_rows(dataset_prefix: str, rows: list[dict[str, str]], path: str | os.PathLike | None = None) -> None:
    """Replace the manifest rows whose dataset starts with ``dataset_prefix`` by ``rows`` (atomically)."""
    from lib.atomic import write_csv

    path = Path(path or paths.MANIFEST)
    df = load_manifest(path)
    kept = df[~df["dataset"].str.startswith(dataset_prefix)]
    new = pd.concat([kept, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)
    write_csv(path, new[COLUMNS])
    load_manifest(path)  # what was written must read back valid


def verify_rows(rows: pd.DataFrame, resolve) -> list[str]:
    """Problems (one line per file) of the file rows in ``rows``; ``resolve(row_path)`` gives the local path."""
    problems = []
    for _, r in rows.iterrows():
        if r["path"].endswith("/"):
            continue
        local = Path(resolve(r["path"]))
        if not local.is_file():
            problems.append(f"{r['path']}: missing ({local})")
            continue
        if r["checksum"].startswith("sha256:") and r["bytes"] and int(r["bytes"]) != local.stat().st_size:
            problems.append(f"{r['path']}: size {local.stat().st_size} bytes, manifest says {r['bytes']}")
            continue
        if r["checksum"]:
            try:
                actual = checksum(local)
            except Exception as e:  # unreadable counts as a mismatch, reported with its reason
                problems.append(f"{r['path']}: unreadable ({type(e).__name__}: {e})")
                continue
            if actual != r["checksum"]:
                problems.append(f"{r['path']}: checksum {actual[:28]}... differs from the manifest's {r['checksum'][:28]}...")
    return problems


def verify_cohort(out: str | os.PathLike, size: str, manifest_path: str | os.PathLike | None = None) -> list[str]:
    """Compare a cohort built in ``out`` with the manifest's ``<size>_*`` rows, both ways."""
    out = Path(out)
    df = load_manifest(manifest_path)
    rows = df[df["source"] == f"builtin:{size}"]
    if rows.empty:
        return [f"data_manifest.csv has no rows for the {size} cohort (run with --update-manifest)"]
    problems = verify_rows(rows, lambda p: out / p.split("/", 1)[1])
    listed = {p.split("/", 1)[1] for p in rows["path"]}
    extra = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file() and not f.name.startswith("."))
    problems += [f"{size}/{e}: not in the manifest" for e in extra if e not in listed and e not in FORMAT_TABLES]
    return problems


def verify(dataset: str | None = None, data_root: str | os.PathLike | None = None,
           manifest_path: str | os.PathLike | None = None) -> list[str]:
    """Problems of every listed file (or of one dataset) under the data root; empty when all is well."""
    df = load_manifest(manifest_path)
    root = Path(data_root or paths.data_dir())
    if dataset is not None:
        if dataset not in set(df["dataset"]):
            raise ValueError(f"unknown dataset {dataset!r}; datasets: {', '.join(dict.fromkeys(df['dataset']))}")
        df = df[df["dataset"] == dataset]
    return verify_rows(df, lambda p: root / p)


# --------------------------------------------------------------------------- fetching real datasets

def kaggle_credentials() -> bool:
    """Whether the kaggle CLI can authenticate (environment variables or a kaggle.json file)."""
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or (config_dir / "access_token").is_file()


def fetch(dataset: str, data_root: str | os.PathLike | None = None, manifest_path: str | os.PathLike | None = None,
          kaggle: str = "kaggle") -> Path:
    """Download one dataset of the manifest into the data root (opt-in; the only network access).

    Kaggle sources go through the kaggle CLI when credentials exist; every other source, and Kaggle
    without credentials, raises ``RuntimeError`` saying exactly what to do.
    """
    df = load_manifest(manifest_path)
    rows = df[df["dataset"] == dataset]
    if rows.empty:
        raise ValueError(f"unknown dataset {dataset!r}; datasets: {', '.join(dict.fromkeys(df['dataset']))}")
    row = rows.iloc[0]
    source, root = row["source"], Path(data_root or paths.data_dir())
    if source.startswith("builtin:"):
        raise RuntimeError(f"{dataset} is built, not fetched: {row['fetch']}")
    target = root / (row["path"] if row["path"].endswith("/") else Path(row["path"]).parent.as_posix())
    kind, _, ident = source.partition(":")
    if kind in ("kaggle-competition", "kaggle-dataset"):
        if not kaggle_credentials():
            raise RuntimeError(
                f"{dataset}: the kaggle CLI needs credentials. Create an API token at "
                "https://www.kaggle.com/settings (API section) and put kaggle.json in ~/.kaggle/ (chmod 600), "
                "or set KAGGLE_USERNAME and KAGGLE_KEY"
                + (f"; also accept the competition rules at https://www.kaggle.com/competitions/{ident}/rules"
                   if kind == "kaggle-competition" else "") + ". Then run this again.")
        exe = paths.executable(kaggle)
        sub = ["competitions", "download", "-c", ident] if kind == "kaggle-competition" else ["datasets", "download", "-d", ident]
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([exe, *sub, "-p", str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{dataset}: kaggle {' '.join(sub)} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        for archive in target.glob("*.zip"):
            shutil.unpack_archive(archive, target)
            archive.unlink()
        return target
    raise RuntimeError(f"{dataset} ({source}) is fetched by hand: {row['fetch']}. Put the files under {target}, "
                       f"then run: python -m lib.data.manifest verify --dataset {dataset}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.data.manifest", description="Verify or fetch the datasets of data_manifest.csv")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="report missing files and size/checksum mismatches; exit 1 on any")
    v.add_argument("--dataset")
    f = sub.add_parser("fetch", help="download a real dataset (opt-in)")
    f.add_argument("dataset")
    sub.add_parser("list", help="datasets and what is present")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(summarize(load_manifest()).to_string(index=False))
            return 0
        if args.command == "fetch":
            print(f"{args.dataset}: fetched into {fetch(args.dataset)}")
            return 0
        problems = verify(args.dataset)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "all listed files present and matching", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
