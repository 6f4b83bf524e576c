"""Offline installation of the wheels that ``make gpu-wheels`` put in ``build/gpu-wheels/``, standard library
only (it runs before anything but torch is importable).

Each wheel whose package is missing here goes, without its dependencies (the folder holds the whole
closure), into one of two folders under ``build/gpu-check/site/``: ``base`` (all
but the Kaggle bundle's wheels) and ``kaggle`` (:data:`lib.kaggle.OFFLINE_WHEELS`: monai, nibabel, ...).
The check's children get both, and the repository, on ``PYTHONPATH``; the simulated Kaggle kernel gets only
``base``, so that the bundle's own bootstrap has to install the rest from the bundle's wheels.
A package the box has at another version is installed too where the project pins it (``direct`` in the
manifest), and left as the box has it where it is only a dependency of one (the box's own packages were
built against their versions). ``pip install --no-index --no-deps --target`` does the work; without pip,
the wheels are unzipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
STAMP = ".installed-from"


def wheel_tags(filename: str) -> tuple[str, str, str, str]:
    """``(name, version, python tag, platform tag)`` of a wheel's file name (name normalised)."""
    parts = filename.removesuffix(".whl").split("-")
    return parts[0].replace("_", "-").lower(), parts[1], parts[-3] + "|" + parts[-2], parts[-1]


def compatible(filename: str, version: tuple[int, int] | None = None, machine: str | None = None) -> bool:
    """Whether this interpreter (or Python ``version`` on ``machine``) can install the wheel ``filename``."""
    major, minor = version or sys.version_info[:2]
    machine = machine or platform.machine()
    _, _, pyabi, plat = wheel_tags(filename)
    py, abi = pyabi.split("|")
    plat_ok = any(p == "any" or (p.endswith("_" + machine) and "linux" in p) for p in plat.split("."))
    py_ok = False
    for tag in py.split("."):
        if tag.startswith("py") and tag[2:3] == str(major):
            py_ok = True
        elif tag == f"cp{major}{minor}":
            py_ok = True
        elif abi == "abi3" and tag.startswith(f"cp{major}") and int(tag[3:] or 0) <= minor:
            py_ok = True
    return plat_ok and py_ok


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _install(files: list[Path], target: Path) -> str:
    """Install ``files`` into ``target``; returns how (pip or unzip)."""
    target.mkdir(parents=True, exist_ok=True)
    if not files:
        return "nothing to install"
    try:
        import pip  # noqa: F401
    except ImportError:
        for f in files:
            _unzip_wheel(f, target)
        return "unzipped (no pip here)"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install --target {target} failed: {(result.stderr or result.stdout)[-1500:]}")
    return "pip --target"


def _unzip_wheel(path: Path, target: Path) -> None:
    with zipfile.ZipFile(path) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                shutil.move(str(item), str(target / item.name))
        shutil.rmtree(data)


def _digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def install(wheels: Path, site_root: Path) -> dict:
    """Install what the wheel folder holds and this interpreter lacks; returns the stage's record, with
    ``site_dirs`` (``base``, ``kaggle``) for the children's ``PYTHONPATH``."""
    wheels, site_root = Path(wheels), Path(site_root)
    manifest = read_manifest(wheels)
    sites = {"base": site_root / "base", "kaggle": site_root / "kaggle"}
    record: dict = {"python": platform.python_version(), "executable": sys.executable, "wheels": str(wheels),
                    "site_dirs": {k: str(v) for k, v in sites.items()}}
    if manifest is None:
        for d in sites.values():
            d.mkdir(parents=True, exist_ok=True)
        return {**record, "reason": f"no {wheels / MANIFEST}: nothing installed (run `make gpu-wheels` on a "
                                    "networked machine and carry build/gpu-wheels to install offline)"}
    record.update(wheels_python=manifest["python_version"], left_out_of_wheels=manifest.get("left_out", {}),
                  wheels_mib=manifest.get("total_mib"))
    stamp = site_root / STAMP
    if stamp.is_file() and stamp.read_text() == _digest(manifest) + sys.executable:
        return {**record, "reused": True, **json.loads((site_root / "record.json").read_text())}
    shutil.rmtree(site_root, ignore_errors=True)
    todo: dict[str, list[Path]] = {"base": [], "kaggle": []}
    present, kept, incompatible = {}, {}, []
    for w in manifest["wheels"]:
        have = installed_version(w["name"])
        if have == w["version"]:
            present[w["name"]] = have
        elif have is not None and not w.get("direct", True):  # a dependency of a dependency: the box's set hangs together
            kept[w["name"]] = f"{have} (wheel: {w['version']})"
        elif not compatible(w["file"]):
            incompatible.append(w["file"])
        else:
            todo["kaggle" if w.get("kaggle") else "base"].append(wheels / ("kaggle" if w.get("kaggle") else "") / w["file"])
    how = {k: _install(files, sites[k]) for k, files in todo.items()}
    done = {"installed": {k: [f.name for f in files] for k, files in todo.items()}, "how": how,
            "already_present": present, "kept_the_box_s": kept, "incompatible": incompatible}
    (site_root / "record.json").write_text(json.dumps(done))
    stamp.write_text(_digest(manifest) + sys.executable)
    if incompatible:
        done.update(status="failed", reason=f"{len(incompatible)} wheel(s) do not fit Python "
                    f"{platform.python_version()} on {platform.machine()} (rebuild: make gpu-wheels "
                    f"GPU_PYTHON_VERSION={sys.version_info[0]}.{sys.version_info[1]})")
    return {**record, "reused": False, **done}


def child_env(sites: dict[str, str], root: Path, kaggle_kernel: bool = False, extra: dict | None = None) -> dict:
    """The environment of a child: ``PYTHONPATH`` with the installed folders and the repository, or for the
    simulated Kaggle kernel only the ``base`` folder (no repository, no bundle packages)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ours = [sites["base"], sites.get("kaggle", ""), str(root)]
    dirs = ours[:1] if kaggle_kernel else ours
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in ours]
    env["PYTHONPATH"] = os.pathsep.join([*dirs, *old])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env
