"""The one entry point, ``python -m lib.bench`` (``make bench``): the report's sections (:data:`SECTIONS`, all by
default), and the extras (:data:`EXTRAS`, only when ``--only`` names them), each writing its own JSON file."""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import sys
import time
from pathlib import Path

from lib import paths
from lib.atomic import write_json, write_text
from lib.bench.measure import ceilings, machine, machine_line
from lib.bench.report import SECTIONS, report, table, targets

# name -> (module, function, what it measures); function(quick, out, **options) -> the JSON file it wrote.
# Not part of the report: run only when ``--only`` names them.
EXTRAS: dict[str, tuple[str, str, str]] = {
    "pretrain_step": ("lib.bench.pretrain", "pretrain_step",
                      "03_pretrain's step per preset, each in a fresh process, and wavelet against full attention "
                      "at the subset and prod grids (pretrain_step.json)"),
    "train_loop": ("lib.bench.train", "loop_overhead",
                   "lib.train.fit against a bare PyTorch loop on a tiny model (train_loop_overhead.json)"),
}


def parser() -> argparse.ArgumentParser:
    import lib.bench

    names = [*SECTIONS, *EXTRAS]
    p = argparse.ArgumentParser(prog="python -m lib.bench", description=lib.bench.__doc__.split("\n\n")[0],
                                epilog="extras (run only when --only names them): "
                                       + "; ".join(f"{k}: {v[2]}" for k, v in EXTRAS.items()))
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test of every section)")
    p.add_argument("--only", nargs="+", metavar="SECTION",
                   help=f"sections to run (default: every section of the report): {', '.join(names)}")
    p.add_argument("--out", type=Path, default=None, help="folder (default results/benchmarks)")
    g = p.add_argument_group("pretrain_step")
    g.add_argument("--pretrain-presets", default="subset,prod", help="comma-separated presets of 03_pretrain")
    g.add_argument("--attention-repeats", type=int, default=3)
    g = p.add_argument_group("train_loop")
    g.add_argument("--loop-epochs", type=int, default=3)
    g.add_argument("--loop-steps", type=int, default=100, help="optimizer steps per epoch")
    g.add_argument("--loop-repeats", type=int, default=5)
    g.add_argument("--loop-threads", type=int, default=1,
                   help="torch intra-op threads (1: steadier on a shared machine)")
    p.add_argument("--pretrain-worker", help=argparse.SUPPRESS)  # internal: run one pretrain step, print its JSON
    return p


def run_sections(chosen: list[str], quick: bool, out: Path) -> dict:
    """Run the report's sections ``chosen`` (the ceiling first), write ``<timestamp>.json`` and ``README.md``."""
    m = machine()
    rows: list[dict] = []
    cap: dict[str, float] = {}
    for name in chosen:
        module, fn_name, title, _ = SECTIONS[name]
        print(f"[bench] {title} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        new = getattr(importlib.import_module(module), fn_name)(quick, cap, out)
        for r in new:
            r.setdefault("section", name)
            r["machine"] = machine_line(m)
        rows += new
        if name == "ceiling":
            cap = ceilings(rows)
        print(table(new) + f"\n[bench] {name}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"machine": m, "date": _dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
              "sections": chosen, "ceiling_gflops": cap, "targets": targets(rows, chosen),
              "figures": [str(out / SECTIONS[s][3]) for s in chosen if SECTIONS[s][3]], "rows": rows}
    write_json(out / f"{stamp}.json", record)
    write_text(out / "README.md", report(record, stamp))
    print("\n".join(record["targets"]))
    print(f"\nwritten: {out / (stamp + '.json')} and {out / 'README.md'}")
    return record


def run_extra(name: str, args: argparse.Namespace, out: Path) -> Path:
    module, fn_name, what = EXTRAS[name]
    options = ({"presets": args.pretrain_presets, "attention_repeats": args.attention_repeats}
               if name == "pretrain_step" else
               {"epochs": args.loop_epochs, "steps": args.loop_steps, "repeats": args.loop_repeats,
                "threads": args.loop_threads})
    print(f"[bench] {name}: {what} ...", file=sys.stderr, flush=True)
    path = getattr(importlib.import_module(module), fn_name)(args.quick, out, **options)
    print(f"-> {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.pretrain_worker:
        from lib.bench.pretrain import step_case

        print(json.dumps(step_case(args.pretrain_worker)))
        return 0
    unknown = [s for s in args.only or [] if s not in SECTIONS and s not in EXTRAS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; valid choices: {', '.join([*SECTIONS, *EXTRAS])}")
    if min(args.loop_epochs, args.loop_steps, args.loop_repeats) < 1:
        ap.error("--loop-epochs, --loop-steps and --loop-repeats must be >= 1")
    out = args.out or paths.results_dir() / "benchmarks"
    reported = not args.only or any(s in SECTIONS for s in args.only)
    chosen = [s for s in SECTIONS if reported and (not args.only or s in args.only or s == "ceiling")]
    if chosen:
        run_sections(chosen, args.quick, out)
    for name in EXTRAS:
        if args.only and name in args.only:
            run_extra(name, args, out)
    return 0
