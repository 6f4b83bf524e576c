"""The built-in demo cohort: deterministic, offline, small, and enough for every notebook to learn.

    python -m lib.data.demo --size smoke --out data/smoke      # seconds (CI)
    python -m lib.data.demo --size demo  --out data/demo       # about a minute or two on 2 cores

Layout under ``--out`` (every subject in exactly one split, ``train`` / ``val`` / ``test``)::

    cohort.json                          size, seed, grids, DRR model, counts (no timestamps: it is checksummed)
    subjects.csv                         dataset, subject, split, and per-subject facts (aneurysm, emboli, ...)
    brain_mri/<sub>/t1.nii.gz t2.nii.gz mra.nii.gz          MNI152-based brains, intensities in [0, ~1.2]
    head_ct/<sub>/ct.nii.gz aneurysm.nii.gz                 CTA-like head CT in HU (int16), blob mask (uint8)
    chest_ct/<sub>/noncontrast.nii.gz contrast.nii.gz       paired chest CT series in HU (int16)
    drr/<sub>/frontal.npy lateral.npy                       Beer–Lambert DRRs of the non-contrast series
    cxr_pairs/<pair>/baseline.npy followup.npy change.npy   longitudinal pairs, signed change map
    cxr_pairs/pairs.csv                                     findings appeared / resolved / persistent, nuisance
    dataset.json index.csv labels.csv points.csv pairs.csv report.csv    the prepared-dataset format

The cohort is a prepared dataset (``lib/data/dataset_format.md``): :func:`write_format` indexes its files
(modality MRI for brain_mri, CT for head_ct and chest_ct, XR for DRRs and CXR images), puts the subject
facts into ``labels.csv``, the aneurysm centres into ``points.csv`` and the CXR pairs into ``pairs.csv``;
readers (:mod:`lib.data.datasets`) find every file and fact through it. ``subjects.csv`` and
``cxr_pairs/pairs.csv`` stay as the generator's own record (``data_manifest.csv`` checksums them); no
reader uses them. Index rows run in the order readers have always listed files (subjects.csv order).

Aneurysm-like blobs (the downstream task of pre-training) sit on the vessel tree of about half of the
MRA and head CT subjects. The CXR change map is ``DRR(follow-up CT) - DRR(baseline CT)`` in the
follow-up's pose, cleaned (``|change| < CHANGE_FLOOR`` set to 0, components under
``MIN_COMPONENT_PX`` pixels dropped); positive = appeared, negative = resolved. A quarter of the pairs
are nuisance-only (pose and exposure differ, nothing changed: the change map is all zero).

Each subject draws from its own generator, seeded from ``(seed, dataset, index)``, so the same seed
gives the same arrays; ``data_manifest.csv`` holds their checksums (rows ``smoke_*`` and ``demo_*``),
and every build verifies itself against them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from lib.data import drr, phantoms as ph
from lib.data.demo_format import IMAGES, format_current, writable_cohort, write_format

if TYPE_CHECKING:
    from lib.data.prepared import PreparedDataset

CHANGE_FLOOR = 0.005     # |change| below this (in radiograph units) is not a change
MIN_COMPONENT_PX = 4     # smaller connected components of the change map are dropped
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
DATASETS = ("brain_mri", "head_ct", "chest_ct", "drr", "cxr_pairs")


@dataclass(frozen=True)
class Size:
    brain_subjects: int
    head_ct_subjects: int
    chest_subjects: int
    pairs_per_subject: int
    image_size: int


SIZES = {
    "smoke": Size(brain_subjects=4, head_ct_subjects=4, chest_subjects=6, pairs_per_subject=2, image_size=64),
    "demo": Size(brain_subjects=24, head_ct_subjects=24, chest_subjects=40, pairs_per_subject=4, image_size=128),
}


def subject_rng(seed: int, dataset: str, index: int) -> np.random.Generator:
    """The generator of one subject: independent of every other subject and of build order."""
    return np.random.default_rng(np.random.SeedSequence([seed, DATASETS.index(dataset), index]))


def assign_splits(n: int) -> list[str]:
    """Deterministic split of ``n`` subjects (by index), at least one in each split when n >= 3."""
    n_val = max(1, round(n * SPLITS[1][1])) if n >= 3 else 0
    n_test = max(1, round(n * SPLITS[2][1])) if n >= 3 else 0
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


# --------------------------------------------------------------------------- writing

def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, dtype=np.int16, slope: float = 1.0) -> None:
    """Quantised NIfTI (``dtype`` with ``scl_slope``), gzipped without a timestamp, written atomically."""
    import gzip

    import nibabel as nib

    from lib.atomic import atomic_path

    stored = np.round(np.asarray(array, np.float64) / slope)
    info = np.iinfo(dtype)
    img = nib.Nifti1Image(np.clip(stored, info.min, info.max).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    if slope != 1.0:
        img.header.set_slope_inter(slope, 0.0)
    data = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from lib.data.prepared import write_array

    write_array(path.parent, path.name, array, decimals=5)


# --------------------------------------------------------------------------- brain MRI and head CT

_MRI_CONTRAST = {  # relative intensity per tissue: gm, wm, csf, skull, scalp, vessel
    "t1": (0.55, 0.80, 0.12, 0.08, 0.65, 0.30),
    "t2": (0.55, 0.40, 1.00, 0.05, 0.45, 0.10),
    "mra": (0.20, 0.25, 0.10, 0.02, 0.30, 1.00),
}


def _vessels_with_aneurysm(rng, tissues, grid):
    tree = ph.vessel_tree(rng)
    vessels = ph.vessel_fraction(tissues["template_mm"], tree, radius_scale=float(rng.uniform(0.9, 1.2)))
    has_aneurysm = bool(rng.random() < 0.5)
    blob = np.zeros(grid.shape, np.float32)
    facts = {"aneurysm": int(has_aneurysm), "aneurysm_radius_mm": "", "aneurysm_voxel": ""}
    if has_aneurysm:
        center, radius = ph.aneurysm_site(rng, tree)
        blob = ph.ellipsoid_fraction(tissues["template_mm"], center, (radius,) * 3, soft=1.0)
        if blob.max() < 0.5:  # the site fell outside the field of view: no aneurysm after all
            blob[:] = 0
            facts["aneurysm"] = 0
        else:
            vox = np.unravel_index(int(np.argmax(blob)), grid.shape)
            facts.update(aneurysm_radius_mm=round(radius, 2), aneurysm_voxel=" ".join(map(str, vox)))
    return np.maximum(vessels, blob), blob, facts


def mr_magnitude(rng: np.random.Generator, t: dict, vessels: np.ndarray, contrast: str) -> np.ndarray:
    """An MR image of the tissues ``t`` with ``vessels`` at the :data:`_MRI_CONTRAST` of ``contrast`` (jittered),
    a smooth bias field and Rician magnitude noise (also what :mod:`lib.data.demo_rsna`'s MRA is made of)."""
    gm, wm, csf, skull, scalp, vessel = _MRI_CONTRAST[contrast]
    jitter = rng.uniform(0.9, 1.1, 5)
    img = (gm * jitter[0] * t["gm"] + wm * jitter[1] * t["wm"] + csf * jitter[2] * t["csf"]
           + skull * t["skull"] + scalp * jitter[3] * t["scalp"])
    img = img * (1 - vessels) + vessel * jitter[4] * vessels
    bias = np.exp(0.15 * ph.smooth_noise(rng, vessels.shape, coarse=3))
    noise = rng.normal(0, 0.02, (2, *vessels.shape))
    return np.sqrt((img * bias + noise[0]) ** 2 + noise[1] ** 2)


def cta_hu(rng: np.random.Generator, t: dict, vessels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(HU without noise, head occupancy)`` of a CTA of the tissues ``t``: bone with a smooth density field,
    contrast-filled ``vessels`` (also what :mod:`lib.data.demo_rsna`'s CTA is made of)."""
    bone = rng.uniform(700, 1100) + 300 * ph.smooth_noise(rng, vessels.shape, coarse=3)
    head = np.clip(t["gm"] + t["wm"] + t["csf"] + t["skull"] + t["scalp"], 0, 1)
    hu = (-1000 * (1 - head) + 40 * t["gm"] + 30 * t["wm"] + 8 * t["csf"] + bone * t["skull"] + 35 * t["scalp"])
    return hu * (1 - vessels) + rng.uniform(250, 350) * vessels, head


def brain_mri_subject(seed: int, index: int, grid: ph.Grid) -> tuple[dict[str, np.ndarray], dict]:
    """T1, T2 and MRA-like volumes of one brain subject, and its facts (aneurysm on the MRA)."""
    rng = subject_rng(seed, "brain_mri", index)
    t = ph.brain_tissues(rng, grid)
    vessels, _, facts = _vessels_with_aneurysm(rng, t, grid)
    return {name: mr_magnitude(rng, t, vessels, name) for name in _MRI_CONTRAST}, facts


def head_ct_subject(seed: int, index: int, grid: ph.Grid) -> tuple[dict[str, np.ndarray], dict]:
    """CTA-like head CT in HU and the aneurysm mask of one subject."""
    rng = subject_rng(seed, "head_ct", index)
    t = ph.brain_tissues(rng, grid)
    vessels, blob, facts = _vessels_with_aneurysm(rng, t, grid)
    hu, head = cta_hu(rng, t, vessels)
    hu = hu + rng.normal(0, 6, grid.shape) * head
    return {"ct": hu, "aneurysm": (blob >= 0.5).astype(np.uint8)}, facts


# --------------------------------------------------------------------------- chest

def chest_subject(seed: int, index: int, grid: ph.Grid, image_size: int) -> tuple[dict[str, np.ndarray], dict, tuple]:
    """Paired non-contrast / contrast chest CT (HU) with DRRs, its facts, and ``(anat, texture, cache)``
    from which :func:`cxr_pair` renders the subject's longitudinal pairs."""
    rng = subject_rng(seed, "chest_ct", index)
    anat = ph.sample_chest(rng)
    texture = ph.lung_texture(rng, grid)
    cache: dict = {}
    clean = ph.apply_findings(anat, grid, [], contrast=False, texture=texture, cache=cache)
    enhanced = ph.apply_findings(anat, grid, [], contrast=True, texture=texture, cache=cache)
    n_emboli = int(rng.random() < 0.3) * int(rng.integers(1, 3))
    if n_emboli:
        vessels = cache[(1.0, True)]["vessels"]
        p = grid.world()
        for _ in range(n_emboli):
            line = anat.pulmonary[int(rng.integers(1, len(anat.pulmonary)))]
            c = line[0] + (line[1] - line[0]) * rng.uniform(0.3, 0.9)
            occ = ph.ellipsoid_fraction(p, c, (6, 6, 9), soft=1.0) * vessels
            enhanced = enhanced * (1 - occ) + 40.0 * occ  # filling defect: unenhanced clot
    body = clean > -900
    arrays = {"noncontrast": clean + rng.normal(0, 12, grid.shape) * body,
              "contrast": enhanced + rng.normal(0, 12, grid.shape) * body}
    drrs = {"frontal": drr.radiograph(arrays["noncontrast"], grid.spacing, 0.0, image_size),
            "lateral": drr.radiograph(arrays["noncontrast"], grid.spacing, 90.0, image_size)}
    facts = {"emboli": n_emboli, "enhancement_hu": round(anat.enhancement, 1)}
    return {**arrays, **drrs}, facts, (anat, texture, cache)


def clean_change(change: np.ndarray) -> np.ndarray:
    """Zero the change map below :data:`CHANGE_FLOOR` and drop components under :data:`MIN_COMPONENT_PX`."""
    change = np.where(np.abs(change) < CHANGE_FLOOR, 0.0, change).astype(np.float32)
    labels, n = ndimage.label(change != 0)
    if n:
        sizes = ndimage.sum_labels(np.ones_like(change), labels, index=np.arange(1, n + 1))
        change[np.isin(labels, np.flatnonzero(sizes < MIN_COMPONENT_PX) + 1)] = 0.0
    return change


def cxr_pair(seed: int, subject: int, k: int, chest: tuple, grid: ph.Grid,
             image_size: int) -> tuple[dict[str, np.ndarray], dict]:
    """One longitudinal pair of frontal radiographs of a chest phantom and its signed change map."""
    rng = subject_rng(seed, "cxr_pairs", subject * 1000 + k)
    anat, texture, cache = chest
    nuisance_only = bool(rng.random() < 0.25)
    kinds = list(rng.permutation(ph.FINDINGS))
    persistent = [ph.sample_finding(rng, anat, kinds.pop())] if rng.random() < 0.3 else []
    appeared, resolved = [], []
    if not nuisance_only:
        for _ in range(int(rng.integers(1, 3))):
            (appeared if rng.random() < 0.6 else resolved).append(ph.sample_finding(rng, anat, kinds.pop()))
    base_ct = ph.apply_findings(anat, grid, persistent + resolved, texture=texture, cache=cache)
    follow_ct = ph.apply_findings(anat, grid, persistent + appeared, texture=texture, cache=cache)
    pose_b, pose_f = rng.uniform(-3, 3, 2)
    gain_b, gain_f = rng.uniform(0.95, 1.05, 2)
    baseline = drr.radiograph(base_ct, grid.spacing, pose_b, image_size)
    follow_clean = drr.radiograph(follow_ct, grid.spacing, pose_f, image_size)
    change = clean_change(follow_clean - drr.radiograph(base_ct, grid.spacing, pose_f, image_size))
    images = {"baseline": gain_b * baseline + rng.normal(0, 0.004, baseline.shape),
              "followup": gain_f * follow_clean + rng.normal(0, 0.004, baseline.shape),
              "change": change}
    facts = {"appeared": ";".join(f.kind for f in appeared), "resolved": ";".join(f.kind for f in resolved),
             "persistent": ";".join(f.kind for f in persistent), "nuisance_only": int(nuisance_only),
             "pose_deg_baseline": round(float(pose_b), 3), "pose_deg_followup": round(float(pose_f), 3),
             "gain_baseline": round(float(gain_b), 4), "gain_followup": round(float(gain_f), 4),
             "changed_px": int((change != 0).sum())}
    return images, facts


# --------------------------------------------------------------------------- the cohort

def build(out: str | Path, size: str = "demo", seed: int = 0, progress: bool = True) -> dict:
    """Build the cohort into ``out`` (replacing a previous build there); returns the ``cohort.json`` dict."""
    from tqdm.auto import tqdm

    from lib.atomic import write_csv, write_json

    if size not in SIZES:
        raise ValueError(f"unknown cohort size {size!r}; valid sizes: {', '.join(SIZES)}")
    spec, out = SIZES[size], Path(out)
    brain_grid, chest_grid = ph.BRAIN_GRID[size], ph.CHEST_GRID[size]
    for d in DATASETS:
        shutil.rmtree(out / d, ignore_errors=True)
    subjects, pairs = [], []
    work = ([("brain_mri", i) for i in range(spec.brain_subjects)] + [("head_ct", i) for i in range(spec.head_ct_subjects)]
            + [("chest_ct", i) for i in range(spec.chest_subjects)])
    splits = {d: assign_splits(n) for d, n in (("brain_mri", spec.brain_subjects), ("head_ct", spec.head_ct_subjects),
                                               ("chest_ct", spec.chest_subjects))}
    for dataset, i in tqdm(work, desc=f"demo cohort ({size})", disable=not progress):
        sub, split = f"sub-{i:03d}", splits[dataset][i]
        if dataset == "brain_mri":
            images, facts = brain_mri_subject(seed, i, brain_grid)
            for name, arr in images.items():
                _save_nifti(out / dataset / sub / f"{name}.nii.gz", arr, brain_grid.affine, slope=1e-3)
        elif dataset == "head_ct":
            images, facts = head_ct_subject(seed, i, brain_grid)
            _save_nifti(out / dataset / sub / "ct.nii.gz", images["ct"], brain_grid.affine)
            _save_nifti(out / dataset / sub / "aneurysm.nii.gz", images["aneurysm"], brain_grid.affine, dtype=np.uint8)
        else:
            images, facts, chest = chest_subject(seed, i, chest_grid, spec.image_size)
            for name in ("noncontrast", "contrast"):
                _save_nifti(out / "chest_ct" / sub / f"{name}.nii.gz", images[name], chest_grid.affine)
            for name in ("frontal", "lateral"):
                _save_npy(out / "drr" / sub / f"{name}.npy", images[name])
            for k in range(spec.pairs_per_subject):
                pid = f"pair-{i:03d}-{k}"
                pair, pfacts = cxr_pair(seed, i, k, chest, chest_grid, spec.image_size)
                for name, arr in pair.items():
                    _save_npy(out / "cxr_pairs" / pid / f"{name}.npy", arr)
                pairs.append({"pair": pid, "subject": sub, "split": split, **pfacts})
        subjects.append({"dataset": dataset, "subject": sub, "split": split, **facts})
    columns = ["dataset", "subject", "split", "aneurysm", "aneurysm_radius_mm", "aneurysm_voxel", "emboli", "enhancement_hu"]
    write_csv(out / "subjects.csv", [{c: s.get(c, "") for c in columns} for s in subjects])
    write_csv(out / "cxr_pairs" / "pairs.csv", pairs)
    info = {
        "size": size, "seed": seed, "generator": "lib.data.demo v1",
        "counts": {"brain_mri": spec.brain_subjects, "head_ct": spec.head_ct_subjects,
                   "chest_ct": spec.chest_subjects, "cxr_pairs": len(pairs)},
        "grids": {"brain": {"shape": brain_grid.shape, "spacing_mm": brain_grid.spacing},
                  "chest": {"shape": chest_grid.shape, "spacing_mm": chest_grid.spacing}},
        "image_size": spec.image_size, "drr": drr.parameters(),
        "change_map": {"floor": CHANGE_FLOOR, "min_component_px": MIN_COMPONENT_PX,
                       "sign": "positive = appeared (more attenuation), negative = resolved"},
        "splits": dict(SPLITS),
    }
    write_json(out / "cohort.json", info)
    write_format(out, size)  # the prepared-dataset tables (lib.data.demo_format)
    return info


def cohort_dir(size: str) -> Path:
    """Where the built-in cohort of ``size`` lives: ``<data root>/<size>``, or on Kaggle an attached
    dataset holding ``<size>/cohort.json`` (found by globbing the input root) when there is one."""
    from lib import paths

    if size not in SIZES:
        raise ValueError(f"unknown cohort size {size!r}; valid sizes: {', '.join(SIZES)}")
    if paths.on_kaggle():
        attached = [p.parent for p in paths.find_inputs(f"{size}/cohort.json")]
        if attached:
            return attached[0]
    return paths.data_dir() / size


def ensure(size: str, rebuild: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """The cohort of ``size``, built if missing, damaged or ``rebuild``; always verified; indexed (the format's
    tables, :func:`lib.data.demo_format.write_format`) if it lacks them or an older version wrote them.

    Returns its folder and a report (``built``, seconds, files checked). Raises ``RuntimeError`` with the
    mismatching files if a build does not reproduce the manifest's checksums.
    """
    from lib import paths
    from lib.data import manifest

    out = cohort_dir(size)
    t0 = time.monotonic()
    problems = [] if rebuild else manifest.verify_cohort(out, size)
    built = rebuild or bool(problems)
    if built:
        out = paths.data_dir() / size  # never write into an attached (read-only) dataset
        build(out, size, progress=progress)
        problems = manifest.verify_cohort(out, size)
    if problems:
        raise RuntimeError(f"the {size} cohort in {out} does not match data_manifest.csv "
                           f"({len(problems)} file(s)):\n  " + "\n  ".join(problems[:10]))
    if not built and not format_current(out):  # verified, but indexed by no or another version: (re)index it
        out = writable_cohort(out, size)
        if not format_current(out):
            write_format(out, size)
    n = int((manifest.load_manifest()["source"] == f"builtin:{size}").sum())
    return out, {"cohort": size, "path": str(out), "built": built, "files_verified": n,
                 "seconds": round(time.monotonic() - t0, 1)}


def summary(root: str | Path | PreparedDataset) -> "pd.DataFrame":
    """Subjects (and CXR pairs) per dataset and split, from the cohort's index."""
    import pandas as pd

    from lib.data.datasets import cohort

    ds = cohort(root)
    subjects = ds.index[ds.index["dataset"].isin(IMAGES)].drop_duplicates(["dataset", "subject"])
    pairs = ds.pairs.assign(dataset="cxr_pairs")
    both = pd.concat([subjects[["dataset", "split"]], pairs[["dataset", "split"]]])
    table = both.groupby(["dataset", "split"]).size().unstack(fill_value=0)
    return table.reindex(columns=[s for s, _ in SPLITS]).assign(total=lambda t: t.sum(axis=1))


def examples(root: str | Path | PreparedDataset, subject: str = "sub-000", pair: str | None = None) -> dict[str, np.ndarray]:
    """One 2D view of every kind of image in the cohort, titled, for a gallery figure."""
    import nibabel as nib

    from lib.data.datasets import cohort, image_file
    from lib.data.transforms import WINDOWS, oriented_slice, window

    def mid(path, axis=2, fraction=0.5):
        v = np.asarray(nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32))
        return oriented_slice(v, axis, int(v.shape[axis] * fraction))

    ds = cohort(root)
    out = {f"MRI {n.upper()}": mid(image_file(ds, "brain_mri", subject, n)) for n in ("t1", "t2", "mra")}
    ct = mid(image_file(ds, "head_ct", subject, "ct"), fraction=0.35)
    for name in ("brain", "subdural", "bone"):
        out[f"head CT, {name} window"] = window(ct, *WINDOWS[name])
    for name in ("noncontrast", "contrast"):
        out[f"chest CT {name}"] = window(mid(image_file(ds, "chest_ct", subject, name), fraction=0.6), *WINDOWS["diffusion"])
    for name in ("frontal", "lateral"):
        out[f"DRR {name}"] = np.load(image_file(ds, "drr", subject, name))
    row = ds.pairs.iloc[0] if pair is None else ds.pairs.set_index("pair").loc[pair].rename(pair)
    pair = row["pair"] if pair is None else pair
    for name, path in (("baseline", ds.file(row["a"])), ("followup", ds.file(row["b"])), ("change", ds.root / row["target_path"])):
        out[f"CXR {name} ({pair})"] = np.load(path)
    return out


def main(argv: list[str] | None = None) -> int:
    from lib import paths
    from lib.data import manifest

    parser = argparse.ArgumentParser(prog="python -m lib.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--out", type=Path, help="cohort folder (default: <data root>/<size>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-manifest", action="store_true",
                        help="write this build's checksums into data_manifest.csv (after changing the generator)")
    parser.add_argument("--ensure", action="store_true",
                        help="build only if the cohort in <data root>/<size> is missing or does not verify")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.ensure:
        if args.out or args.seed != 0 or args.update_manifest:
            parser.error("--ensure works on the default folder and seed only")
        try:
            out, report = ensure(args.size, progress=not args.quiet)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.size} cohort {'built and ' if report['built'] else ''}verified "
              f"({report['files_verified']} files, {report['seconds']} s) -> {out}")
        return 0
    out = args.out or paths.data_dir() / args.size
    t0 = time.monotonic()
    build(out, args.size, args.seed, progress=not args.quiet)
    rows = manifest.rows_for_cohort(out, args.size)
    size_mb = sum(int(r["bytes"]) for r in rows) / 1e6
    print(f"built the {args.size} cohort in {time.monotonic() - t0:.1f} s: {len(rows)} files, {size_mb:.1f} MB -> {out}")
    if args.update_manifest:
        if args.seed != 0:
            parser.error("--update-manifest records the default seed 0 only")
        manifest.replace_rows(f"{args.size}_", rows)
        print(f"data_manifest.csv: {len(rows)} rows of {args.size}_* replaced")
        return 0
    if args.seed != 0:
        print("seed differs from the manifest's (0): checksums not verified")
        return 0
    problems = manifest.verify_cohort(out, args.size)
    if problems:
        print(f"{len(problems)} file(s) differ from data_manifest.csv:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    print(f"verified against data_manifest.csv: all {len(rows)} checksums match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
