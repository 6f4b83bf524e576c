"""A mini RSNA 2025 Intracranial Aneurysm Detection competition, synthetic, offline and deterministic.

    python -m lib.data.demo_rsna --size smoke --out DIR      # ~16 series, seconds
    python -m lib.data.demo_rsna --size demo                 # ~72 series into <data root>/demo_rsna/raw

Written exactly as the competition's download (``../shared/design/real_data.md``, RSNA section)::

    competition.json          this generator's stamp: VERSION, size, seed, grid, counts, and each aneurysm's
                              location, RAS centre (mm) and radius: the truth behind the tables (no timestamps)
    train.csv                 SeriesInstanceUID, PatientAge, PatientSex, Modality, 13 locations, Aneurysm Present
    train_localizers.csv      SeriesInstanceUID, SOPInstanceUID, coordinates ("{'x': col, 'y': row}"), location
    series/<SeriesInstanceUID>/<SOPInstanceUID>.dcm     one axial slice per file

Every series is a head from :mod:`lib.data.phantoms` (MNI152 tissues, the circle-of-Willis-like
:func:`~lib.data.phantoms.vessel_tree`) on the demo cohort's brain grid, written as CTA (CT, HU through
RescaleSlope/Intercept) or MRA (MR, time-of-flight-like: bright arteries). About half the series carry
one or two aneurysm-like blobs, each on the artery named by its competition location (:data:`SITES`);
its localizer is the blob's brightest voxel on its own slice. DICOM geometry is exact (axial,
ImageOrientationPatient 1\\0\\0\\0\\1\\0, LPS positions), so :mod:`lib.data.convert.rsna2025_aneurysm` maps
each localizer onto the blob. UIDs derive from (size, seed); the same size and seed give identical bytes.

:func:`ensure` keeps the seed-0 build of a size under ``<data root>/<size>_rsna/raw`` (rebuilt when missing or
of another :data:`VERSION`), :func:`prepared` its conversion under ``<data root>/<size>_rsna/prepared``.
On 2 cores: smoke 16 series, 3 MB, ~5 s (conversion < 1 s); demo 72 series, 49 MB, ~28 s (conversion ~3 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lib.data import phantoms as ph
from lib.data.convert.rsna2025_aneurysm import LABELS

VERSION = "1"
STAMP = "competition.json"
LOCATIONS = LABELS[:-1]  # the 13 locations, in the competition's order
SIZES = {"smoke": 16, "demo": 72}  # series per size; grids: lib.data.phantoms.BRAIN_GRID
CTA_FRACTION, POSITIVE_FRACTION, SECOND_ANEURYSM = 0.6, 0.5, 0.3
SIDE_MARGIN_MM = 3.0     # a Left/Right blob lies at least this far on its side of the head's centre
MIN_PEAK = 0.7           # the blob's brightest voxel is at least this much blob (partial volume)
MR_SCALE = 1000.0        # MRA stored as round(intensity * MR_SCALE)
SEED_TAG = 2025          # seeds series generators apart from the demo cohort's

# vessel_tree's pieces: 0 the ring (vertices 0 AComm front, 1/6 R/L ICA top, 2/5 R/L MCA origin, 3/4 R/L
# P1 by the basilar tip), 1/2 R/L ICA (z -40 -> -26 -> ring), 3 basilar (its top: the tip), then per side
# (R, L) MCA, PCA, ACA: 4 5 6 (Right), 7 8 9 (Left). MNI x > 0 is the patient's Right.
RING, ICA, BASILAR = 0, {1: 1, -1: 2}, 3
MCA, PCA, ACA = {1: 4, -1: 7}, {1: 5, -1: 8}, {1: 6, -1: 9}


def _sided(name: str, s: int) -> str:
    return f"{'Right' if s > 0 else 'Left'} {name}"


# location -> (side: +1 Right, -1 Left, 0 midline; bias of the bulge direction; [(piece, segment, t_lo, t_hi)]):
# a site is the point line[a] + t (line[a+1] - line[a]) of one of the listed segments, drawn uniformly.
SITES: dict[str, tuple[int, tuple, list[tuple[int, int, float, float]]]] = {
    "Anterior Communicating Artery": (0, (0, 1, 0.3), [(RING, 0, 0.0, 0.08)]),
    "Basilar Tip": (0, (0, 0, 1), [(BASILAR, 1, 0.92, 1.0)]),
    "Other Posterior Circulation": (0, (0, 0, 0), [(PCA[1], 0, 0.35, 1.0), (PCA[1], 1, 0.0, 0.7), (PCA[-1], 0, 0.35, 1.0),
                                                   (PCA[-1], 1, 0.0, 0.7), (BASILAR, 0, 0.15, 0.85)]),
}
for _s in (1, -1):
    SITES[_sided("Infraclinoid Internal Carotid Artery", _s)] = (_s, (_s, 0, 0), [(ICA[_s], 0, 0.15, 0.85)])
    SITES[_sided("Supraclinoid Internal Carotid Artery", _s)] = (_s, (_s, 0, 0), [(ICA[_s], 1, 0.45, 0.95)])
    SITES[_sided("Middle Cerebral Artery", _s)] = (_s, (_s, 0, 0), [(MCA[_s], 0, 0.45, 1.0)])
    # ACA: its A1 (the ring from the ICA top to the front vertex) and the ACA piece beyond the vertex (A2)
    SITES[_sided("Anterior Cerebral Artery", _s)] = (_s, (_s, 0, 0), [(RING, 0, 0.3, 0.8) if _s > 0 else
                                                                     (RING, 6, 0.2, 0.7), (ACA[_s], 0, 0.6, 1.0)])
    # PComm: the ring from the MCA origin back to P1 (ICA top -> P1 without the MCA origin's junction)
    SITES[_sided("Posterior Communicating Artery", _s)] = (_s, (_s, -0.3, 0), [(RING, 2, 0.25, 0.8) if _s > 0
                                                                               else (RING, 4, 0.2, 0.75)])
assert sorted(SITES) == sorted(LOCATIONS)


def place_aneurysm(rng: np.random.Generator, tree: list[tuple[np.ndarray, float]], location: str) -> tuple[np.ndarray, float]:
    """Centre (MNI mm, the frame of :func:`lib.data.phantoms.vessel_tree`) and radius (mm) of an aneurysm-like
    blob bulging from the artery of competition ``location`` (lateral ones outwards, on their own side)."""
    if location not in SITES:
        raise ValueError(f"unknown location {location!r}; locations: {', '.join(LOCATIONS)}")
    _, bias, segments = SITES[location]
    piece, a, lo, hi = segments[int(rng.integers(len(segments)))]
    line, r = tree[piece]
    point = line[a] + rng.uniform(lo, hi) * (line[a + 1] - line[a])
    direction = rng.normal(size=3) + 1.5 * np.asarray(bias, float)
    direction /= np.linalg.norm(direction)
    radius = float(rng.uniform(4.0, 7.0))
    return (point + direction * (r + 0.6 * radius)).astype(np.float32), radius


# --------------------------------------------------------------------------- the plan

def uid(size: str, seed: int, *parts: int) -> str:
    """A fixed DICOM UID (56 characters) under the competition's root, from (size, seed, parts)."""
    from lib.data.fixtures.rsna2025_aneurysm import ROOT_UID

    h = int(hashlib.sha256(f"rsna-mini/{size}/{seed}/{'/'.join(map(str, parts))}".encode()).hexdigest(), 16)
    return f"{ROOT_UID}{10 ** 29 + h % (9 * 10 ** 29)}"


def plan(size: str, seed: int = 0) -> list[dict]:
    """Every series of the mini competition: uid, index, Modality, age, sex and aneurysm locations. Positives'
    first locations run through shuffled rounds of all 13, so every location occurs once there are 13."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    n = SIZES[size]
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_TAG, 0]))
    cta = set(rng.permutation(n)[:round(CTA_FRACTION * n)].tolist())
    positive = sorted(rng.permutation(n)[:round(POSITIVE_FRACTION * n)].tolist())
    rounds = np.concatenate([rng.permutation(len(LOCATIONS)) for _ in range(len(positive) // len(LOCATIONS) + 1)])
    sites: dict[int, list[str]] = {}
    for p, i in enumerate(positive):
        first = LOCATIONS[int(rounds[p])]
        sites[i] = [first]
        if rng.random() < SECOND_ANEURYSM:
            sites[i].append(str(rng.choice([loc for loc in LOCATIONS if loc != first])))
    return [{"uid": uid(size, seed, i), "index": i, "modality": "CTA" if i in cta else "MRA",
             "age": int(rng.integers(25, 86)), "sex": str(rng.choice(["Female", "Male"])), "locations": sites.get(i, [])}
            for i in range(n)]


# --------------------------------------------------------------------------- one series

def head_centre_x(head: np.ndarray, affine: np.ndarray, j: int, k: int) -> float:
    """RAS x (mm) of the head's centre on row ``(j, k)`` (axes 1 and 2) of a RAS head mask: the local
    mid-sagittal plane, which a yawed head moves away from its centroid's x."""
    return float(affine[0, 0] * np.flatnonzero(head[:, j, k]).mean() + affine[0, 3])


def _blobs(rng, t: dict, tree, grid: ph.Grid, locations: list[str]) -> list[tuple[str, np.ndarray, float, tuple]]:
    """(location, blob occupancy, radius, peak voxel) per aneurysm: redrawn until the blob is in view, its
    peak at least :data:`MIN_PEAK`, and a lateral one clearly on its side of the head's centre (on its row)."""
    head = (t["gm"] + t["wm"] + t["csf"] + t["skull"] + t["scalp"]) > 0.5
    out = []
    for location in locations:
        side = SITES[location][0]
        for _ in range(50):
            center, radius = place_aneurysm(rng, tree, location)
            blob = ph.ellipsoid_fraction(t["template_mm"], center, (radius,) * 3, soft=1.0)
            peak = np.unravel_index(int(np.argmax(blob)), grid.shape)
            x = float(grid.affine[0, 0] * peak[0] + grid.affine[0, 3])
            if blob[peak] >= MIN_PEAK and (side == 0 or side * (x - head_centre_x(head, grid.affine, *peak[1:]))
                                           >= SIDE_MARGIN_MM):
                out.append((location, blob, radius, tuple(int(v) for v in peak)))
                break
        else:
            raise RuntimeError(f"no aneurysm site for {location} in view after 50 draws")
    return out


def _render(rng, t: dict, occupancy: np.ndarray, modality: str) -> np.ndarray:
    """The stored pixel values: CTA in HU (contrast-filled arteries), MRA as time-of-flight-like intensity
    (bright arteries) times :data:`MR_SCALE`; noise everywhere, so no slice is blank."""
    from lib.data.demo import cta_hu, mr_magnitude

    if modality == "CTA":
        hu, _ = cta_hu(rng, t, occupancy)
        return np.round(hu + rng.normal(0, 6, occupancy.shape))
    return np.round(mr_magnitude(rng, t, occupancy, "mra") * MR_SCALE)


def series_volume(entry: dict, grid: ph.Grid, seed: int) -> tuple[np.ndarray, list[dict]]:
    """The RAS volume of one planned series (stored values, see :func:`_render`) and its aneurysms:
    location, radius, peak voxel and its RAS mm."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_TAG, 1, entry["index"]]))
    t = ph.brain_tissues(rng, grid)
    tree = ph.vessel_tree(rng)
    occupancy = ph.vessel_fraction(t["template_mm"], tree, radius_scale=float(rng.uniform(0.9, 1.2)))
    aneurysms = []
    for location, blob, radius, peak in _blobs(rng, t, tree, grid, entry["locations"]):
        occupancy = np.maximum(occupancy, blob)
        ras = (grid.affine @ [*peak, 1.0])[:3]
        aneurysms.append({"location": location, "radius_mm": round(radius, 2), "voxel": peak,
                          "ras": [round(float(v), 3) for v in ras]})
    return _render(rng, t, occupancy, entry["modality"]), aneurysms


def _write_slice(path: Path, entry: dict, sop: str, k: int, pixels: np.ndarray, ipp, grid: ph.Grid) -> None:
    from lib.data.fixtures.rsna2025_aneurysm import SOP_CLASS, dicom_dataset

    modality = "CT" if entry["modality"] == "CTA" else "MR"
    ds = dicom_dataset(modality, entry["uid"], sop, SOP_CLASS[modality])
    ds.PatientAge, ds.PatientSex = f"{entry['age']:03d}Y", entry["sex"][0]
    ds.SeriesDescription = "CTA HEAD" if modality == "CT" else "MRA TOF HEAD"
    ds.InstanceNumber, (ds.Rows, ds.Columns) = k + 1, pixels.shape
    ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [grid.spacing[1], grid.spacing[0]], grid.spacing[2]
    ds.SpacingBetweenSlices = grid.spacing[2]
    if modality == "CT":  # stored HU + 1024, as scanners do
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        pixels = pixels + 1024
    ds.PixelData = np.clip(pixels, -32768, 32767).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(out: Path, entry: dict, grid: ph.Grid, seed: int, size: str) -> dict:
    """Write one series as axial DICOM slices under ``out/series/<uid>/``; returns its aneurysms with their
    localizer (SOP, column, row on that slice)."""
    volume, aneurysms = series_volume(entry, grid, seed)
    nx, ny, nz = volume.shape
    a = grid.affine
    # pixel (row r, column c) of slice k is voxel (nx-1-c, ny-1-r, k): LPS x = -RAS x, LPS y = -RAS y
    origin_lps = [-(a[0, 3] + (nx - 1) * a[0, 0]), -(a[1, 3] + (ny - 1) * a[1, 1])]
    folder = out / "series" / entry["uid"]
    folder.mkdir(parents=True, exist_ok=True)
    sops = [uid(size, seed, entry["index"], k + 1) for k in range(nz)]
    for k in range(nz):
        _write_slice(folder / f"{sops[k]}.dcm", entry, sops[k], k, volume[::-1, ::-1, k].T,
                     [*origin_lps, a[2, 3] + k * a[2, 2]], grid)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_TAG, 2, entry["index"]]))
    for an in aneurysms:
        i, j, k = an["voxel"]
        dx, dy = rng.uniform(-0.3, 0.3, 2)  # annotators click near, not on, the pixel centre
        an.update(sop=sops[k], col=round(float(nx - 1 - i + dx), 2), row=round(float(ny - 1 - j + dy), 2))
    return {"uid": entry["uid"], "modality": entry["modality"], "slices": nz, "aneurysms": aneurysms}


# --------------------------------------------------------------------------- the competition

def _tables(plan_: list[dict], series: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Rows of train.csv and train_localizers.csv."""
    train, localizers = [], []
    for entry in plan_:
        labels = {loc: int(loc in entry["locations"]) for loc in LOCATIONS}
        train.append({"SeriesInstanceUID": entry["uid"], "PatientAge": entry["age"], "PatientSex": entry["sex"],
                      "Modality": entry["modality"], **labels, "Aneurysm Present": int(bool(entry["locations"]))})
        for an in series[entry["uid"]]["aneurysms"]:
            localizers.append({"SeriesInstanceUID": entry["uid"], "SOPInstanceUID": an["sop"],
                               "coordinates": str({"x": an["col"], "y": an["row"]}), "location": an["location"]})
    return train, localizers


def build(out: str | Path, size: str = "demo", seed: int = 0, workers: int = 1, progress: bool = False) -> dict:
    """Write the mini competition of ``size`` under ``out`` (replacing one there); returns the stamp
    (``competition.json``) plus ``series``: uid -> modality, slices and aneurysms (location, radius, peak
    voxel and RAS mm, localizer SOP, column, row). ``workers``: processes (the files do not depend on it)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from lib.atomic import write_csv, write_json

    out, entries, grid = Path(out), plan(size, seed), ph.BRAIN_GRID[size]
    (out / STAMP).unlink(missing_ok=True)  # no stamp until the build is complete
    shutil.rmtree(out / "series", ignore_errors=True)
    args = [(out, e, grid, seed, size) for e in entries]
    with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
        done = list(tqdm(pool.map(write_series, *zip(*args)), total=len(args), desc=f"rsna mini ({size})",
                         disable=not progress))
    series = {s["uid"]: s for s in done}
    train, localizers = _tables(entries, series)
    write_csv(out / "train.csv", train)
    write_csv(out / "train_localizers.csv", localizers)
    located = [loc for e in entries for loc in e["locations"]]
    stamp = {"version": VERSION, "generator": "lib.data.demo_rsna", "size": size, "seed": seed,
             "grid": {"shape": list(grid.shape), "spacing_mm": list(grid.spacing)},
             "counts": {"series": len(entries), "CTA": sum(e["modality"] == "CTA" for e in entries),
                        "MRA": sum(e["modality"] == "MRA" for e in entries),
                        "positive": sum(bool(e["locations"]) for e in entries), "aneurysms": len(located),
                        "files": sum(s["slices"] for s in done),
                        "locations": {loc: located.count(loc) for loc in LOCATIONS}},
             "aneurysms": [{"SeriesInstanceUID": u, "location": an["location"], "ras_mm": an["ras"],
                            "radius_mm": an["radius_mm"], "SOPInstanceUID": an["sop"]}
                           for u, s in series.items() for an in s["aneurysms"]]}
    write_json(out / STAMP, stamp)
    return {**stamp, "series": series}


class _Serial:
    """A stand-in for a process pool: ``map`` in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def _workers(n: int | None) -> int:
    return n or min(2, os.cpu_count() or 1)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stamp_of(raw: str | Path) -> dict | None:
    """The ``competition.json`` of a built mini competition, or None (missing, unreadable: not built)."""
    return _read_json(Path(raw) / STAMP)


def folder(size: str, root: str | Path | None = None) -> Path:
    """``<data root>/<size>_rsna`` (``root`` replaces the data root): holds ``raw/`` and ``prepared/``."""
    from lib import paths

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return (Path(root) if root is not None else paths.data_dir()) / f"{size}_rsna"


def ensure(size: str, root: str | Path | None = None, workers: int | None = None, progress: bool = False) -> Path:
    """The mini competition of ``size`` (seed 0) under ``<data root>/<size>_rsna/raw``, built there if missing
    or written by another :data:`VERSION` (its conversion, ``prepared/``, then goes too)."""
    base = folder(size, root)
    raw = base / "raw"
    stamp = stamp_of(raw)
    if stamp and stamp.get("version") == VERSION and stamp.get("size") == size and stamp.get("seed") == 0:
        return raw
    partial = base / "raw.partial"
    for path in (raw, partial, base / "prepared"):
        shutil.rmtree(path, ignore_errors=True)
    (base / "prepared.json").unlink(missing_ok=True)
    build(partial, size, 0, workers=_workers(workers), progress=progress)
    partial.rename(raw)
    return raw


def prepared(size: str, root: str | Path | None = None, workers: int | None = None, progress: bool = False) -> Path:
    """The mini competition of ``size`` converted by :mod:`lib.data.convert.rsna2025_aneurysm` into
    ``<data root>/<size>_rsna/prepared`` (a re-run skips what is converted); open it with
    :func:`lib.data.prepared.open_dataset`."""
    from lib.atomic import write_json
    from lib.data import convert

    raw = ensure(size, root, workers, progress)
    out, record = raw.parent / "prepared", raw.parent / "prepared.json"  # which raw build it was converted from
    stamp = stamp_of(raw)
    if _read_json(record) != stamp:  # none yet, or converted from another build: start afresh
        shutil.rmtree(out, ignore_errors=True)
        write_json(record, stamp)  # before converting: an interrupted conversion resumes
    summary = convert.run("rsna2025_aneurysm", raw, out, workers=_workers(workers), progress=progress)
    if summary["refused"]:
        raise RuntimeError(f"{out}: {summary['refused']} series refused by the converter (see report.csv)")
    return out


def _megabytes(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.data.demo_rsna", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="demo")
    parser.add_argument("--out", type=Path, help="folder to write (default: <data root>/<size>_rsna/raw, built "
                        "only if missing or of another version)")
    parser.add_argument("--seed", type=int, default=0, help="with --out only (the default folder holds seed 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--prepare", action="store_true", help="also convert it (default folder only): "
                        "<data root>/<size>_rsna/prepared")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.out is None and args.seed != 0:
        parser.error("--seed needs --out (the default folder holds seed 0)")
    if args.out is not None and args.prepare:
        parser.error("--prepare works on the default folder (convert DIR with python -m lib.data.convert "
                     "rsna2025_aneurysm --src DIR --out PREPARED)")
    t0 = time.monotonic()
    if args.out is not None:
        build(args.out, args.size, args.seed, workers=_workers(args.workers), progress=not args.quiet)
        raw = args.out
    else:
        raw = ensure(args.size, workers=args.workers, progress=not args.quiet)
    counts = stamp_of(raw)["counts"]
    print(f"rsna mini competition ({args.size}): {counts['series']} series ({counts['CTA']} CTA, {counts['MRA']} MRA, "
          f"{counts['positive']} positive), {counts['files']} DICOM files, {_megabytes(raw):.1f} MB, "
          f"{time.monotonic() - t0:.1f} s -> {raw}")
    if args.prepare:
        t0 = time.monotonic()
        out = prepared(args.size, workers=args.workers, progress=not args.quiet)
        print(f"converted in {time.monotonic() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
