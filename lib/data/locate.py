"""Where raw downloads and prepared datasets are: ``--src``/a path, the data root, or Kaggle's input root.

- raw ``NAME``: ``<data root>/raw/NAME``, else any folder under ``/kaggle/input`` (at most
  ``MAX_DEPTH`` levels down, skipping folders of more than ``WIDE`` entries: a competition's million files
  are never listed) holding the converter's
  marker file (``train.csv`` and ``series/`` for RSNA, ``openneuro_metadata.csv`` for OpenMind, ...);
- prepared ``NAME``: ``<data root>/prepared/NAME``, else an attached dataset holding ``NAME/dataset.json``
  (02_prepare_data's output attached to a GPU kernel), else a folder path given as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from lib import paths

MAX_DEPTH = 6
WIDE = 2000


def _search(root: Path, relative: str, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Folders ``d`` under ``root`` (depth 0..max_depth) with ``d/relative`` present, shallowest first.

    Breadth first, never descending into a folder of more than ``WIDE`` entries (a DICOM series, a folder of
    images): a competition's million files are never listed.
    """
    found, level = [], [root] if root.is_dir() else []
    for _ in range(max_depth + 1):
        found += [d for d in level if (d / relative).exists()]
        below = []
        for d in level:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            if len(entries) <= WIDE:
                below += sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=True))
        level = below
    return found


def raw_dir(name: str) -> Path:
    return paths.data_dir() / "raw" / name


def prepared_dir(name: str) -> Path:
    return paths.data_dir() / "prepared" / name


def find_raw(name: str, marker: str | None) -> list[Path]:
    """Raw downloads of ``name`` found on this machine (the data root first, then Kaggle's inputs)."""
    local = raw_dir(name)
    out = [local] if local.is_dir() and (marker is None or (local / marker).exists()) else []
    if marker:
        out += [d for d in _search(paths.kaggle_input_root(), marker) if d not in out]
    return out


def find_prepared(spec: str) -> Path | None:
    """A prepared dataset by folder path or by name (data root, then Kaggle inputs); None if nowhere."""
    p = Path(spec).expanduser()
    if (p / "dataset.json").is_file():
        return p.resolve()
    if os.sep in spec or spec.startswith("."):
        return None
    local = prepared_dir(spec)
    if (local / "dataset.json").is_file():
        return local
    attached = _search(paths.kaggle_input_root(), f"{spec}/dataset.json")
    return attached[0] / spec if attached else None


def list_prepared() -> list[Path]:
    """Every prepared dataset on this machine: the built-in cohorts and ``<data root>/prepared/*``, then any
    attached under the Kaggle input root."""
    root = paths.data_dir()
    local = [d for d in [root / "smoke", root / "demo", *sorted((root / "prepared").glob("*"))] if (d / "dataset.json").is_file()]
    attached = [d for d in _search(paths.kaggle_input_root(), "dataset.json") if d not in local]
    return local + attached


def _manifest_row(name: str) -> dict | None:
    from lib.data import manifest

    rows = manifest.load_manifest()
    rows = rows[rows["dataset"] == name]
    return None if rows.empty else rows.iloc[0].to_dict()


def how_to_get(name: str) -> str:
    """What to run to have the prepared dataset ``name``: convert the raw download found here, or fetch it first."""
    from lib.data import convert

    out = prepared_dir(name)
    module = convert.get(name)
    base = getattr(module, "FROM_PREPARED", None)  # made from another prepared dataset (ct_to_cxr_pairs)
    if base:
        found = find_prepared(base)
        command = f"python -m lib.data.convert {name} --src {found or prepared_dir(base)} --out {out}"
        if found:
            return f"- {name}: not made yet from the prepared {base} at {found}. Make it with: {command}"
        return how_to_get(base) + f"\n- {name}: then make it from the prepared {base} with: {command}"
    raw = find_raw(name, getattr(module, "MARKER", None))
    command = f"python -m lib.data.convert {name} --src {raw[0] if raw else raw_dir(name)} --out {out} --workers 4"
    if raw:
        return f"- {name}: not prepared yet; its raw download is at {raw[0]}. Convert it with: {command}"
    row = _manifest_row(name) or {}
    fetch = (f"python -m lib.data.manifest fetch {name}   ({row.get('fetch', 'see data_manifest.csv')}; "
             f"licence: {row.get('licence', '?')})")
    return (f"- {name}: neither a prepared dataset ({out}, or NAME/dataset.json under the Kaggle input root) nor its "
            f"raw download ({raw_dir(name)}, or a folder with {getattr(module, 'MARKER', '?')} under the Kaggle input "
            f"root) is on this machine. Get it with: {fetch}; then convert it with: {command}")


def require_prepared(specs: list[str] | str) -> list[Path]:
    """The prepared dataset folders of ``specs`` (comma-separated or a list; each a folder or a dataset name).

    Before anything else happens, raises ``FileNotFoundError`` naming every one that is missing and the
    commands that fetch and convert it; an unknown name (neither a folder nor a converter) raises
    ``ValueError`` listing the converters.
    """
    from lib.data import convert

    specs = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not specs:
        raise ValueError("no prepared dataset named (give folders or names, e.g. openmind,rsna2025_aneurysm)")
    found, missing = [], []
    for spec in specs:
        path = find_prepared(spec)
        if path is not None:
            found.append(path)
        elif spec in convert.names():
            missing.append(how_to_get(spec))
        elif os.sep in spec or Path(spec).expanduser().exists():
            missing.append(f"- {spec}: not a prepared dataset (no dataset.json there)")
        else:
            raise ValueError(f"{spec!r} is neither a prepared dataset folder nor a dataset name; "
                             f"names: {', '.join(convert.names())}")
    if missing:
        raise FileNotFoundError(f"prepared data missing ({len(missing)} of {len(specs)}):\n" + "\n".join(missing)
                                + "\nOr run a preset that uses the built-in cohort (smoke, demo, subset).")
    return found
