"""Raw downloads -> prepared datasets (``lib/data/dataset_format.md``): one engine, one module per dataset.

    python -m lib.data.convert DATASET --src RAW --out PREPARED [--workers N] [--shard I/N] [--limit K]

A converter module (``lib/data/convert/<dataset>.py``) declares:

- ``NAME``, ``VERSION`` (bump it when its output changes: re-runs then convert again), ``INFO`` (the
  ``dataset.json`` fields: source, licence, channels, labels, ...) and optionally ``info(src, options)``
  (fields that depend on the raw source or the options, merged into them), ``MARKER`` (a file at the top of
  the raw download, used to find it under ``/kaggle/input`` or the data root), ``SPLIT_SEED`` and
  ``SPLIT_FRACTIONS`` (used where the dataset defines no split), optionally ``add_arguments(parser)``;
- ``items(src, options) -> list[Item]``: the units of work (a series, an image, a run of slices), in a
  fixed order, with their subject, their raw ``source`` (relative to ``src``) and a picklable payload;
- ``convert(item, src, out, options) -> Output``: writes the item's images under ``out`` (with
  :func:`lib.data.prepared.write_image`) and returns their index rows, labels, points and a note (e.g.
  the files it dropped); raises :class:`Refused` (or anything else) to refuse the item with a reason.

The engine shards the items (``--shard I/N``: a stable hash of the item key, so N machines split one
conversion without talking to each other), skips what an earlier run converted (same converter version
and every output file's sha256 as recorded), runs the rest on ``--workers`` processes with a progress
bar, writes its tables under ``out/parts/<I>-of-<N>/`` (flushed every ``FLUSH_EVERY`` items, so an
interrupted run keeps its work), and finally merges every part into the dataset's top-level tables.
One bad item never stops a run: it becomes a ``refused`` row of ``report.csv`` with its reason.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pkgutil
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

import pandas as pd

from lib.data import prepared as fmt
from lib.data.cache import sha256_of

FLUSH_EVERY = 100
SKIPPED = "already converted, checksums verified: "
NOT_CONVERTERS = {"__main__"}


class Refused(Exception):
    """An item that cannot be converted; the message is the reason written to ``report.csv``."""


@dataclass
class Item:
    key: str                      # unique within the dataset; sharding hashes it
    subject: str
    source: str                   # the raw file or folder, relative to --src
    payload: Any = None           # converter-specific, picklable
    split: str = ""               # set where the dataset defines its split


@dataclass
class Output:
    images: list[dict] = field(default_factory=list)   # index rows (write_image fields + image_id, modality, ...)
    labels: list[dict] = field(default_factory=list)   # rows of labels.csv
    points: list[dict] = field(default_factory=list)   # rows of points.csv
    pairs: list[dict] = field(default_factory=list)    # rows of pairs.csv (pair, subject, split, a, b, ...)
    note: str = ""                                     # written as the reason of a converted item


# --------------------------------------------------------------------------- the registry

def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_CONVERTERS)


def get(name: str) -> ModuleType:
    if name not in names():
        raise ValueError(f"unknown dataset {name!r}; converters: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


# --------------------------------------------------------------------------- shards, splits, skipping

def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``; shards are numbered 1..N."""
    if not text:
        return 1, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"--shard {text}: I must be in 1..N and N >= 1")
    return i, n


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    i, n = shard
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16) % n == i - 1


def split_of(items: Sequence[Item], module: ModuleType) -> dict[str, str]:
    """Subject -> split: the dataset's own where its items carry one, else seeded over all subjects. A
    subject whose items disagree keeps its first item's split (a subject is in one split), with a warning."""
    own: dict[str, str] = {}
    clash = sorted({it.subject for it in items if it.split and own.setdefault(it.subject, it.split) != it.split})
    if clash:
        warnings.warn(f"{module.NAME}: the dataset's own split puts {len(clash)} subject(s) in several splits "
                      f"({', '.join(clash[:5])}); each keeps the split of its first item", stacklevel=2)
    rest = [it.subject for it in items if it.subject not in own]
    seeded = fmt.assign_splits(rest, getattr(module, "SPLIT_SEED", 0), getattr(module, "SPLIT_FRACTIONS", (0.8, 0.1, 0.1)))
    return {**seeded, **own}


def options_key(options: dict) -> str:
    """A short fingerprint of the converter options: outputs made with other options are converted again."""
    return hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _done(out: Path, index: pd.DataFrame, version: str, key: str, sources: set[str]) -> set[str]:
    """Those of ``sources`` whose every image an earlier run wrote with this converter version and these
    options, and whose files still verify (only this run's items are read and hashed)."""
    if index.empty or "converter_version" not in index.columns or "converter_options" not in index.columns:
        return set()
    done = set()
    for source, rows in index[index["source"].isin(sources)].groupby("source"):
        if (rows["converter_version"] == version).all() and (rows["converter_options"] == key).all() and all(
                (out / p).is_file() and sha256_of(out / p) == h for p, h in zip(rows["path"], rows["sha256"])):
            done.add(source)
    return done


def _reasons(out: Path) -> dict[str, str]:
    """Source -> what the last conversion said of it (dropped files, assumptions), from ``report.csv``."""
    path = out / "report.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()
    return dict(zip(df["source"], df["reason"])) if len(df.columns) else {}


# --------------------------------------------------------------------------- running

def _share_cores(workers: int) -> None:
    """In each worker: its share of the cores for libraries that start threads of their own (ITK/SimpleITK's
    registration, OpenMP), read when they are first imported in the worker."""
    n = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, n)


def _run_one(args: tuple) -> dict:
    module_name, item, src, out, options = args
    module = importlib.import_module(module_name)
    t0 = time.perf_counter()
    try:
        result = module.convert(item, Path(src), Path(out), options)
        return {"item": item, "output": result, "seconds": time.perf_counter() - t0}
    except Refused as e:
        return {"item": item, "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # a damaged or odd input: refuse it, keep going
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"item": item, "reason": f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.lineno})",
                "seconds": time.perf_counter() - t0}


@dataclass
class _Tables:
    index: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    report: list[dict] = field(default_factory=list)

    def add(self, result: dict, module: ModuleType, splits: dict[str, str], key: str) -> None:
        item = result["item"]
        if "output" not in result:
            self.report.append({"source": item.source, "status": "refused", "reason": result["reason"]})
            return
        out: Output = result["output"]
        for row in out.images:
            self.index.append({"subject": item.subject, "dataset": module.NAME, "split": splits[item.subject],
                               "source": item.source, "sequence": row.get("modality", ""), **row,
                               "converter_version": module.VERSION, "converter_options": key})
        self.labels += out.labels
        self.points += out.points
        self.pairs += [{"subject": item.subject, "split": splits[item.subject], **p} for p in out.pairs]
        self.report.append({"source": item.source, "status": "converted",
                            "reason": out.note or f"{len(out.images)} image(s)", "seconds": round(result["seconds"], 3)})

    def write(self, part: Path) -> None:
        for name, rows, columns in (("index.csv", self.index, fmt.INDEX_COLUMNS), ("labels.csv", self.labels, ("image_id",)),
                                    ("points.csv", self.points, fmt.POINT_COLUMNS),
                                    ("pairs.csv", self.pairs, fmt.PAIR_COLUMNS),
                                    ("report.csv", self.report, fmt.REPORT_COLUMNS)):
            fmt.write_table(part, name, rows, columns)


def _read_part(part: Path, name: str) -> pd.DataFrame:
    df = pd.read_csv(part / name, dtype=str, keep_default_na=False) if (part / name).is_file() else pd.DataFrame()
    return df.assign(_part=part.name) if len(df.columns) else pd.DataFrame()


def merge(out: str | os.PathLike) -> dict[str, int]:
    """Rebuild the top-level tables of ``out`` from every ``parts/*/``. An image converted by several parts
    (a sharded run, then a whole one) is taken from the last part, with that part's labels and points;
    a source's report row likewise."""
    out = Path(out)
    parts = sorted(p for p in (out / "parts").glob("*") if p.is_dir())
    tables = {}
    for name in ("index.csv", "labels.csv", "points.csv", "pairs.csv", "report.csv"):
        frames = [f for f in (_read_part(p, name) for p in parts) if len(f.columns)]
        tables[name] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not tables["index.csv"].empty:
        index = tables["index.csv"].drop_duplicates("image_id", keep="last")
        winner = dict(zip(index["image_id"], index["_part"]))
        tables["index.csv"] = index
        for name, ref in (("labels.csv", "image_id"), ("points.csv", "image_id"), ("pairs.csv", "a")):
            df = tables[name]  # only the rows of the part whose image won
            if not df.empty:
                tables[name] = df[[winner.get(i) == p for i, p in zip(df[ref], df["_part"])]]
    else:
        tables["labels.csv"] = tables["points.csv"] = tables["pairs.csv"] = pd.DataFrame()
    if not tables["report.csv"].empty:
        tables["report.csv"] = tables["report.csv"].drop_duplicates("source", keep="last")
    columns = {"index.csv": fmt.INDEX_COLUMNS, "labels.csv": ("image_id",), "points.csv": fmt.POINT_COLUMNS,
               "pairs.csv": fmt.PAIR_COLUMNS, "report.csv": fmt.REPORT_COLUMNS}
    for name, df in tables.items():
        fmt.write_table(out, name, df.drop(columns="_part", errors="ignore"), columns[name])
    return {name.split(".")[0]: len(df) for name, df in tables.items()}


def run(name: str | ModuleType, src: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1, shard: str | None = None,
        limit: int | None = None, options: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert ``src`` (a raw download of dataset ``name``) into the prepared dataset ``out``; returns a summary."""
    from tqdm.auto import tqdm

    module = name if isinstance(name, ModuleType) else get(name)
    name, src, out = module.NAME, Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder (the raw {name} download)")
    marker = getattr(module, "MARKER", None)
    if marker and not (src / marker).exists():
        raise FileNotFoundError(f"--src {src}: no {marker} there; is this the raw {name} download?")
    options = {**defaults(module), **(options or {})}
    i, n = parse_shard(shard)
    items = list(module.items(src, options))
    splits = split_of(items, module)
    mine = [it for it in items if in_shard(it.key, (i, n))]
    mine = mine[:limit] if limit else mine
    previous = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in (out / "parts").glob("*/index.csv")]
                         or [pd.DataFrame()], ignore_index=True)
    key = options_key(options)
    mine_sources = {it.source for it in mine}
    done = _done(out, previous, module.VERSION, key, mine_sources)
    todo = [it for it in mine if it.source not in done]
    extra = module.info(src, options) if hasattr(module, "info") else {}  # what depends on the source or options
    fmt.write_info(out, {**module.INFO, **extra, "name": module.NAME, "converter": f"lib.data.convert.{module.NAME}",
                         "converter_version": module.VERSION, "options": options})
    part, tables = out / "parts" / f"{i}-of-{n}", _Tables()
    if (part / "index.csv").is_file():  # keep what this shard converted before
        for t in ("index", "labels", "points", "pairs", "report"):
            path = part / f"{t}.csv"
            df = pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else pd.DataFrame()
            getattr(tables, t).extend(df.to_dict("records") if len(df.columns) else [])
        redo = {it.source for it in todo}
        gone = {r["image_id"] for r in tables.index if r["source"] in redo}
        tables.index = [r for r in tables.index if r["source"] not in redo]
        tables.labels = [r for r in tables.labels if r["image_id"] not in gone]
        tables.points = [r for r in tables.points if r["image_id"] not in gone]
        tables.pairs = [r for r in tables.pairs if r["a"] not in gone]
    tables.report = [r for r in tables.report if r["source"] not in mine_sources]  # each item reported once, afresh
    first_new, reasons = len(tables.report), _reasons(out) if done else {}
    tables.report += [{"source": it.source, "status": "skipped",
                       "reason": SKIPPED + reasons.get(it.source, "").removeprefix(SKIPPED)}
                      for it in mine if it.source in done]
    args = [(module.__name__, it, str(src), str(out), options) for it in todo]
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"convert {name} ({i}/{n})", unit="item", disable=not progress)
    pool = (ProcessPoolExecutor(workers, initializer=_share_cores, initargs=(workers,))
            if workers > 1 and len(args) > 1 else None)
    try:
        results: Iterable[dict] = pool.map(_run_one, args) if pool else map(_run_one, args)
        for k, result in enumerate(results, 1):
            tables.add(result, module, splits, key)
            bar.update()
            if k % FLUSH_EVERY == 0:
                tables.write(part)
    except BrokenProcessPool as e:  # a worker killed (out of memory?): keep what is done, say how to go on
        raise RuntimeError(f"a conversion worker died ({e}); {len(tables.index)} image(s) are kept in {part}. "
                           "Run the same command again (it resumes), with fewer --workers if memory ran out") from e
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        bar.close()
        tables.write(part)
        counts = merge(out)
    seconds = time.perf_counter() - t0
    status = pd.Series([r["status"] for r in tables.report[first_new:]], dtype=object).value_counts().to_dict()
    return {"dataset": name, "out": str(out), "shard": f"{i}/{n}", "items": len(mine), "converted": status.get("converted", 0),
            "skipped": status.get("skipped", 0), "refused": status.get("refused", 0), "seconds": round(seconds, 2),
            "items_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None, "tables": counts}


def defaults(module: ModuleType) -> dict:
    """The converter's options at their defaults (from its ``add_arguments``)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    add_common_arguments(parser)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    return vars(parser.parse_args([]))


def parse_sources(text: str) -> dict[str, str]:
    """``"openmind=/data/OpenMind,deeplesion=/x"`` -> ``{name: folder}`` (02_prepare_data's ``src``)."""
    out = {}
    for part in [p.strip() for p in (text or "").split(",") if p.strip()]:
        name, sep, folder = part.partition("=")
        if not sep or name.strip() not in names():
            raise ValueError(f"src: {part!r} must be NAME=FOLDER with NAME one of {', '.join(names())}")
        out[name.strip()] = folder.strip()
    return out


def convert_all(spec: str, sources: str = "", *, workers: int = 1, shard: str | None = None, limit: int | None = None,
                spacing: float | None = None, progress: bool = True) -> pd.DataFrame:
    """Convert several raw datasets into ``<data root>/prepared/NAME``; one summary row per dataset.

    ``spec``: comma-separated names, ``"auto"`` (every dataset whose raw download is found: the data root,
    the Kaggle input root, or ``sources``) or ``""`` (none). A named dataset that is nowhere raises
    ``FileNotFoundError`` with what to fetch; under ``"auto"`` it is listed as not found.
    """
    from lib.data import locate

    src = parse_sources(sources)
    wanted = names() if spec.strip() == "auto" else [n.strip() for n in spec.split(",") if n.strip()]
    wanted = sorted(wanted, key=lambda n: bool(getattr(get(n), "FROM_PREPARED", None)))  # derived ones last
    rows = []
    for name in wanted:
        module = get(name)
        base = getattr(module, "FROM_PREPARED", None)  # made from a prepared dataset, not from a download
        if name in src:
            found = [Path(src[name])]
        elif base:
            found = [p for p in [locate.find_prepared(base)] if p is not None]
        else:
            found = locate.find_raw(name, getattr(module, "MARKER", None))
        if not found:
            if spec.strip() != "auto":
                raise FileNotFoundError(locate.how_to_get(name))
            rows.append({"dataset": name, "status": "raw download not found"})
            continue
        summary = run(module, found[0], locate.prepared_dir(name), workers=workers, shard=shard, limit=limit,
                      options={"spacing": spacing}, progress=progress)
        rows.append({"status": "done", "src": str(found[0]), **{k: v for k, v in summary.items() if k != "tables"}})
    return pd.DataFrame(rows)


def add_common_arguments(parser: Any) -> None:
    """Options every converter takes (they reach ``convert`` in ``options``)."""
    parser.add_argument("--spacing", type=float, default=None,
                        help="resample every image to cubic voxels of this many mm (smaller datasets: e.g. 1.0); "
                             "default: keep each image's own grid")
