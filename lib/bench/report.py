"""The sections of :mod:`lib.bench` and what it writes: one markdown table per section and the README of
``results/benchmarks/`` (machine, ceiling, the targets met or not with their numbers, every section's table)."""

from __future__ import annotations

import importlib
from typing import Any

from lib.bench.measure import machine_line

# name -> (module, function, title, figure the function writes into ``out`` or None);
# function(quick, ceilings, out) -> rows. A section's module may define ``targets(rows) -> list[str]``:
# lines of the README's targets paragraph, from that section's rows.
SECTIONS: dict[str, tuple[str, str, str, str | None]] = {
    "ceiling": ("lib.bench.measure", "ceiling", "1. Ceiling: dense matmul and Conv3d forward+backward", None),
    "steps": ("lib.bench.families", "steps", "2. One training step per family beside its MONAI counterpart", None),
    "attention": ("lib.bench.pretrain", "attention_scaling", "3. Wavelet attention against full attention",
                  "attention_scaling.png"),
    "infonce": ("lib.bench.pretrain", "infonce", "4. Spatial InfoNCE: batched against the loop reference", None),
    "data": ("lib.bench.data", "data_path", "5. Data path: decoding, cache, consumption", None),
    "diffusion": ("lib.bench.families", "diffusion_sampling", "6. Diffusion: DDIM sampling and VAE throughput", None),
    "memory": ("lib.bench.families", "memory_estimate", "7. Memory estimate at prod on a 16 GB GPU (T4)", None),
    "convert": ("lib.bench.convert", "conversion", "8. Conversion: DICOM series to the prepared format, beside dcm2niix",
                None),
    "submission": ("lib.bench.submission", "per_series", "9. RSNA submission: time per series, DICOM to 14 probabilities",
                   None),
    "profile": ("lib.bench.profile", "profile", "10. Training-step profile: where the time goes, ours beside the MONAI peer",
                None),
}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    """A markdown table of ``rows``: columns in first-seen order (not ``section``, ``machine``, nested values)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and k not in ("section", "machine")
                 and not isinstance(v, (dict, list))]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _section_module(name: str):
    return importlib.import_module(SECTIONS[name][0])


def targets(rows: list[dict], sections: list[str]) -> list[str]:
    lines = []
    for name in sections:
        fn = getattr(_section_module(name), "targets", None) if name != "ceiling" else None
        if fn is not None:
            lines += fn([r for r in rows if r["section"] == name])
    return lines


def report(record: dict, stamp: str) -> str:
    m, rows = record["machine"], record["rows"]
    quick = " (--quick: tiny sizes, not representative)" if record["quick"] else ""
    parts = [f"# Benchmarks\n\nWritten by `make bench` (`python -m lib.bench`; its docstring and those of the modules "
             f"it names say what is measured and how). Latest run: `{stamp}.json`{quick}, {record['date']}.\n\n"
             f"Machine: {machine_line(m)}. Ceiling GFLOP/s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in record["ceiling_gflops"].items()) + ".\n"]
    if record["targets"]:
        parts.append("## Targets\n\n" + "\n".join(f"- {t}" for t in record["targets"]) + "\n")
    for name in record["sections"]:
        section_rows = [r for r in rows if r["section"] == name]
        if section_rows:
            parts.append(f"## {SECTIONS[name][2]}\n\n{table(section_rows)}\n")
        if SECTIONS[name][3]:
            parts.append(f"![{name}]({SECTIONS[name][3]})\n")
    return "\n".join(parts)
