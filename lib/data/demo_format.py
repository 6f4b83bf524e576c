"""The built-in cohort as a prepared dataset (``lib/data/dataset_format.md``): :func:`write_format` indexes a
built cohort's files (modality MRI for brain_mri, CT for head_ct and chest_ct, XR for DRRs and CXR images,
in the order every reader has always used), puts the subject facts into ``labels.csv``, the aneurysm
centres into ``points.csv`` and the CXR pairs into ``pairs.csv``. Called by :func:`lib.data.demo.build`
and, for a cohort built before the format existed, by :func:`lib.data.demo.ensure`.
"""

from __future__ import annotations

from pathlib import Path

FORMAT_FILES = ("dataset.json", "index.csv", "labels.csv", "points.csv", "pairs.csv", "report.csv")
VERSION = "lib.data.demo v2"  # converter_version of dataset.json: a cohort indexed by another version is re-indexed
IMAGES = {"brain_mri": (("t1", "MRI"), ("t2", "MRI"), ("mra", "MRI")), "head_ct": (("ct", "CT"),),
          "chest_ct": (("noncontrast", "CT"), ("contrast", "CT"))}
FACTS = {"mra": ("aneurysm", "aneurysm_radius_mm", "aneurysm_voxel"), "ct": ("aneurysm", "aneurysm_radius_mm", "aneurysm_voxel"),
         "contrast": ("emboli", "enhancement_hu")}


SUBJECT_COLUMNS = ("dataset", "subject", "split")


def read_subjects(path: Path):
    """``subjects.csv`` of a built cohort as a table of strings; a ``ValueError`` naming the file says which of
    its required columns (:data:`SUBJECT_COLUMNS`) are missing and which it has."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; need the columns {', '.join(SUBJECT_COLUMNS)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV table ({type(e).__name__}: {e})") from None
    missing = [c for c in SUBJECT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(map(str, table.columns))}")
    return table


def _format_rows(out: Path, size: str) -> dict[str, list[dict]]:
    """The format's rows of a built cohort: images in the order every reader has always used (subjects.csv
    order, then t1, t2, mra / ct / noncontrast, contrast), then DRRs, then CXR pair images."""
    import nibabel as nib
    import pandas as pd

    from lib.data.prepared import image_fields

    subjects = read_subjects(out / "subjects.csv")
    pairs = pd.read_csv(out / "cxr_pairs" / "pairs.csv", dtype=str, keep_default_na=False)
    rows: dict[str, list[dict]] = {"index": [], "labels": [], "points": [], "pairs": [], "report": []}
    source = f"builtin:{size}"

    def add(image_id, subject, dataset, modality, sequence, split, rel, **extra):
        rows["index"].append({"image_id": image_id, "subject": subject, "dataset": dataset, "modality": modality,
                              "sequence": sequence, "split": split, **image_fields(out, rel), "source": source, **extra})

    for dataset, images in IMAGES.items():
        for s in subjects[subjects["dataset"] == dataset].to_dict("records"):
            for seq, modality in images:
                image_id = f"{dataset}/{s['subject']}/{seq}"
                add(image_id, s["subject"], dataset, modality, seq, s["split"], f"{image_id}.nii.gz",
                    mask_path=f"head_ct/{s['subject']}/aneurysm.nii.gz" if dataset == "head_ct" else "")
                if seq in FACTS:
                    rows["labels"].append({"image_id": image_id, **{k: s[k] for k in FACTS[seq]}})
                if seq in ("mra", "ct") and s["aneurysm"] == "1":
                    ijk = [int(v) for v in s["aneurysm_voxel"].split()]
                    xyz = nib.load(out / f"{image_id}.nii.gz").affine @ [*ijk, 1]
                    rows["points"].append({"image_id": image_id, "label": "aneurysm", "x": round(float(xyz[0]), 3),
                                           "y": round(float(xyz[1]), 3), "z": round(float(xyz[2]), 3),
                                           "i": ijk[0], "j": ijk[1], "k": ijk[2], "radius_mm": s["aneurysm_radius_mm"]})
            rows["report"].append({"source": f"{dataset}/{s['subject']}", "status": "converted", "reason": "generated"})
    for s in subjects[subjects["dataset"] == "chest_ct"].to_dict("records"):
        for view in ("frontal", "lateral"):
            add(f"drr/{s['subject']}/{view}", s["subject"], "drr", "XR", view, s["split"], f"drr/{s['subject']}/{view}.npy")
        rows["report"].append({"source": f"drr/{s['subject']}", "status": "converted", "reason": "generated"})
    for p in pairs.to_dict("records"):
        for name in ("baseline", "followup"):
            add(f"cxr_pairs/{p['pair']}/{name}", p["subject"], "cxr_pairs", "XR", name, p["split"],
                f"cxr_pairs/{p['pair']}/{name}.npy")
        rows["report"].append({"source": f"cxr_pairs/{p['pair']}", "status": "converted", "reason": "generated"})
        rows["pairs"].append({"pair": p["pair"], "subject": p["subject"], "split": p["split"],
                              "a": f"cxr_pairs/{p['pair']}/baseline", "b": f"cxr_pairs/{p['pair']}/followup",
                              "target_path": f"cxr_pairs/{p['pair']}/change.npy",
                              **{k: v for k, v in p.items() if k not in ("pair", "subject", "split")}})
    return rows


def write_format(out: str | Path, size: str) -> Path:
    """Write the cohort's ``dataset.json``, ``index.csv``, ``labels.csv``, ``points.csv``, ``pairs.csv`` and
    ``report.csv`` (``lib/data/dataset_format.md``) from the files and records of a built cohort."""
    from lib.data import prepared
    from lib.data.manifest import _COHORT_LICENCE

    out = Path(out)
    rows = _format_rows(out, size)
    columns = {"index": prepared.INDEX_COLUMNS, "labels": ("image_id",), "points": prepared.POINT_COLUMNS,
               "pairs": prepared.PAIR_COLUMNS, "report": prepared.REPORT_COLUMNS}
    for name, table in rows.items():
        prepared.write_table(out, f"{name}.csv", table, columns[name])
    prepared.write_info(out, {
        "name": size, "source": f"builtin:{size}", "licence": _COHORT_LICENCE, "converter": "lib.data.demo",
        "converter_version": VERSION, "description": "the built-in synthetic cohort (lib/data/demo.py)",
        "channels": {"MRI": ["intensity"], "CT": ["brain", "subdural", "bone"], "XR": ["line integral"]},
        "labels": {"labels.csv": sorted({k for v in FACTS.values() for k in v}), "mask_path": {"0": "background", "1": "aneurysm"},
                   "points.csv": {"label": "aneurysm centre"}, "pairs.csv": {"target_path": "signed change map"}}})
    return out


def format_current(out: str | Path) -> bool:
    """Whether a cohort folder holds the format's files, written by this version, opening cleanly, every
    indexed file present with the checksum of the index (else :func:`write_format` writes them again)."""
    from lib.data import prepared

    out = Path(out)
    if not all((out / name).is_file() for name in FORMAT_FILES):
        return False
    try:
        ds = prepared.open_dataset(out)
    except prepared.DatasetFormatError:
        return False
    return ds.info.get("converter_version") == VERSION and not ds.verify_checksums()


def writable_cohort(out: str | Path, size: str) -> Path:
    """``out``, or for an attached (read-only) cohort its copy under the data root (copied unless one verifies
    there already), so that :func:`write_format` can index it."""
    import os
    import shutil

    from lib import paths
    from lib.data import manifest

    out = Path(out)
    if os.access(out, os.W_OK):
        return out
    local = paths.data_dir() / size
    if manifest.verify_cohort(local, size):
        shutil.copytree(out, local, dirs_exist_ok=True)
    return local
