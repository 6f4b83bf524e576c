"""Section 8 of :mod:`lib.bench`: converting DICOM series to the prepared format, beside dcm2niix.

On clean RSNA-like series written by :func:`lib.data.fixtures.rsna2025_aneurysm.write_clean` (``SERIES``
series of ``SLICES`` 512x512 slices, alternating CTA and MRA; ``--quick``: two tiny ones), in a temporary
folder: our converter (``python -m lib.data.convert rsna2025_aneurysm``: lenient assembly, RAS, gzip,
sha256, tables) with 1 and 2 worker processes, and dcm2niix (the PyPI binary, ``-z y``: gzipped NIfTI,
no BIDS sidecar) on the same series one after the other, each timed over the whole set, best of
``REPEATS`` (output folders emptied in between, so nothing is skipped). The projection for the RSNA
training set (4,348 series, about 1.03 million DICOM files; 512x512 slices mostly) scales our files per
second per worker to 4 workers, assuming linear scaling (the conversion is per series, no shared state)
and files like these.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SERIES, SLICES, SIZE, REPEATS = 8, 64, 512, 2
RSNA_SERIES, RSNA_FILES, CORES = 4348, 1_030_000, 4


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _dcm2niix(src: Path, out: Path) -> None:
    import dcm2niix

    shutil.rmtree(out, ignore_errors=True)
    for k, folder in enumerate(sorted((src / "series").iterdir())):
        (out / str(k)).mkdir(parents=True)
        subprocess.run([dcm2niix.bin, "-z", "y", "-b", "n", "-f", "%j", "-o", str(out / str(k)), str(folder)],
                       check=True, capture_output=True)


def _measure(quick: bool, workers: tuple[int, ...]) -> list[dict]:
    """Rows ``ours, N worker(s)`` for each N in ``workers``, ``dcm2niix -z y`` and ``projection``."""
    from lib.data import convert
    from lib.data.fixtures import rsna2025_aneurysm as fixture

    n, slices, size = (2, 8, 64) if quick else (SERIES, SLICES, SIZE)
    repeats = 1 if quick else REPEATS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        facts = fixture.write_clean(tmp / "raw", n_series=n, size=size, slices=slices)
        mb = sum(f.stat().st_size for f in (tmp / "raw" / "series").rglob("*.dcm")) / 1e6

        def ours(k):
            shutil.rmtree(tmp / "prepared", ignore_errors=True)
            convert.run("rsna2025_aneurysm", tmp / "raw", tmp / "prepared", workers=k, progress=False)

        runs = [(f"ours, {k} worker{'s' if k > 1 else ''}", (lambda k=k: ours(k)), k) for k in workers]
        runs.append(("dcm2niix -z y", lambda: _dcm2niix(tmp / "raw", tmp / "dcm2niix"), 1))
        for name, fn, k in runs:
            seconds = _best(fn, repeats)
            rows.append({"name": name, "workers": k, "series": n, "files": facts["files"], "slice": f"{size}x{size}",
                         "dicom_mb": round(mb, 1), "seconds": round(seconds, 3), "series_per_s": round(n / seconds, 3),
                         "files_per_s": round(facts["files"] / seconds, 1),
                         "files_per_s_per_worker": round(facts["files"] / seconds / k, 1)})
    ours1, ref = rows[0], rows[-1]
    per_worker = ours1["files_per_s_per_worker"]
    rows.append({"name": "projection", "workers": CORES, "series": RSNA_SERIES, "files": RSNA_FILES,
                 "ratio_ours_vs_dcm2niix": round(ours1["files_per_s"] / ref["files_per_s"], 3),
                 "rsna_hours_on_4_cores": round(RSNA_FILES / (per_worker * CORES) / 3600, 2)})
    return rows


def conversion(quick: bool, ceilings: dict | None = None, out=None) -> list[dict]:
    """The section's rows (:data:`lib.bench.report.SECTIONS`): 1 and 2 workers, dcm2niix, the projection."""
    return _measure(quick, (1, 2))


def run(quick: bool = False) -> dict:
    """The numbers alone, 1 worker beside dcm2niix (prints nothing): ``series_per_s_per_worker``,
    ``files_per_s_per_worker``, ``dcm2niix_series_per_s``, ``dcm2niix_files_per_s``, ``ratio_ours_vs_dcm2niix``
    (series/s, ours over dcm2niix), ``rsna_hours_on_4_cores`` (1.03 M files at 4x the files/s of one worker:
    linear scaling assumed), and the sizes measured on (``series``, ``files``, ``slice_size``, ``slices``)."""
    ours, ref, proj = _measure(quick, (1,))
    return {"series": ours["series"], "files": ours["files"], "slices": ours["files"] // ours["series"],
            "slice_size": int(ours["slice"].split("x")[0]), "seconds": ours["seconds"],
            "series_per_s_per_worker": ours["series_per_s"], "files_per_s_per_worker": ours["files_per_s_per_worker"],
            "dcm2niix_seconds": ref["seconds"], "dcm2niix_series_per_s": ref["series_per_s"],
            "dcm2niix_files_per_s": ref["files_per_s"], "ratio_ours_vs_dcm2niix": proj["ratio_ours_vs_dcm2niix"],
            "rsna_series": RSNA_SERIES, "rsna_files": RSNA_FILES, "cores": CORES,
            "rsna_hours_on_4_cores": proj["rsna_hours_on_4_cores"]}


def targets(rows: list[dict]) -> list[str]:
    ours = next(r for r in rows if r["name"] == "ours, 1 worker")
    two = next(r for r in rows if r["name"] == "ours, 2 workers")
    proj = next(r for r in rows if r["name"] == "projection")
    return [(f"INFO: conversion of {ours['slice']} DICOM series: {ours['series_per_s']:.3g} series/s "
            f"({ours['files_per_s']:.0f} files/s) per worker, {two['files_per_s'] / ours['files_per_s']:.2f}x with 2 workers; "
            f"{proj['ratio_ours_vs_dcm2niix']:.2f}x dcm2niix's speed on the same series; the RSNA training set "
            f"({RSNA_SERIES:,} series, {RSNA_FILES:,} files) projected at {proj['rsna_hours_on_4_cores']:.1f} h on {CORES} cores "
             "(linear scaling assumed)")]
