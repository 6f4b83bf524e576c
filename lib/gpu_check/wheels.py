"""``make gpu-wheels``: every wheel the project needs but torch, for the GPU box's Python on manylinux x86_64,
in ``build/gpu-wheels/`` (run it here, where PyPI is reachable; the GPU box has no network).

What goes in: the closure of ``pyproject.toml``'s dependencies at the versions installed in this
environment (``make install`` pins them), markers evaluated for the target Python, less torch and what
torch itself requires (``COMES_WITH_TORCH``: the box has them). The Kaggle internet-off bundle's wheels
(:data:`lib.kaggle.OFFLINE_WHEELS`) are collected by :func:`lib.kaggle._collect_wheels` itself, into
``kaggle/``, so that the check builds the bundle from the very wheels a kernel gets.

The folder travels to the GPU box as a carried path, and what travels is limited (``--budget-mib``; the
default leaves room for the repository within 64 MiB). Over budget, wheels are left out, in this order,
each one largest first, until the rest fits: :data:`NOT_FOR_THE_CHECK` (the project needs them, the check
does not), then :data:`IMAGE_USUAL` (what PyTorch images usually carry). ``manifest.json`` lists what is in
and what was left out and why; ``python -m lib.gpu_check run`` installs from it offline.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from lib import kaggle, paths
from lib.atomic import atomic_dir
from lib.gpu_check.install import MANIFEST, wheel_tags

PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 24, 26, 27, 28, 31, 34))]
NOT_FOR_THE_CHECK = {
    "simpleitk": "registration of Coltea's phases and the converters' tests (prod data), not the smoke notebooks",
    "debugpy": "ipykernel's debugger; kernels run without it", "jedi": "IPython's completion", "parso": "jedi's",
    **dict.fromkeys(("kaggle", "kagglesdk", "protobuf", "bleach", "webencodings", "jupytext", "markdown-it-py",
                     "mdit-py-plugins", "mdurl", "python-slugify", "text-unidecode", "python-dotenv"),
                    "the kaggle CLI (push/status/output), not used by the check"),
    **dict.fromkeys(("ipywidgets", "widgetsnbextension", "jupyterlab-widgets"),
                    "interactive viewers in JupyterLab, not used headless"),
}
IMAGE_USUAL = ("numpy", "scipy", "pandas", "pyarrow", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver",
               "pyparsing", "pillow", "scikit-image", "scikit-learn", "joblib", "threadpoolctl", "imageio", "tifffile",
               "lazy-loader", "narwhals", "pyyaml", "tqdm", "requests", "urllib3", "idna", "certifi",
               "charset-normalizer", "psutil", "packaging", "pygments", "python-dateutil", "six", "tzdata", "click",
               "attrs", "einops")
DEFAULT_BUDGET_MIB = 60.0  # 64 MiB travel to the GPU box in all; the repository itself takes about 3


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def marker_env(python_version: str) -> dict[str, str]:
    return {"python_version": python_version, "python_full_version": python_version + ".0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def closure(roots: list[str], python_version: str) -> dict[str, str]:
    """Name -> requirement (``name==version`` as installed here, else the requirement itself) of ``roots`` and
    everything they require on the target Python."""
    from packaging.requirements import Requirement

    env, found, stack = marker_env(python_version), {}, [Requirement(r) for r in roots]
    while stack:
        req = stack.pop()
        name = canon(req.name)
        if name in found or (req.marker and not req.marker.evaluate(env)):
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            found[name] = str(Requirement(f"{req.name}{req.specifier}"))
            continue
        version = dist.version.split("+")[0]
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            found[name] = f"{req.name}{req.specifier}"
            continue
        found[name] = f"{name}=={version}"
        stack += [Requirement(r) for r in dist.requires or []]
    return found


def comes_with_torch(python_version: str) -> set[str]:
    return set(closure(["torch"], python_version))


def _pip_download(reqs: list[str], dest: Path, python_version: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", python_version, "--implementation", "cp",
           *(a for p in PLATFORMS for a in ("--platform", p)), *reqs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    return "" if result.returncode == 0 else (result.stderr or result.stdout).strip()[-600:]


def download(reqs: list[str], dest: Path, python_version: str) -> dict[str, str]:
    """Download ``reqs`` into ``dest`` (all at once, one by one if that fails); returns name -> why not, for
    those with no wheel for the target."""
    if not reqs or not _pip_download(reqs, dest, python_version):
        return {}
    failed = {}
    for r in reqs:
        error = _pip_download([r], dest, python_version)
        if error:
            failed[canon(re.split(r"[<>=!~ ;\[]", r)[0])] = f"no wheel for Python {python_version}: {error[-200:]}"
    return failed


def leave_out(sizes: dict[str, float], budget_mib: float | None) -> dict[str, str]:
    """Which wheels to leave out (name -> reason) so that the rest is within ``budget_mib`` (None: no limit)."""
    total, out = sum(sizes.values()), {}
    if budget_mib is None:
        return out
    by_size = sorted(sizes, key=lambda n: -sizes[n])
    order = ([n for n in by_size if n in NOT_FOR_THE_CHECK] + [n for n in by_size if n in IMAGE_USUAL]
             + [n for n in by_size if n not in NOT_FOR_THE_CHECK and n not in IMAGE_USUAL])
    for name in order:
        if total <= budget_mib:
            break
        total -= sizes[name]
        out[name] = (f"{NOT_FOR_THE_CHECK[name]} ({sizes[name]:.1f} MiB)" if name in NOT_FOR_THE_CHECK else
                     f"PyTorch images usually carry it; the box's own is used ({sizes[name]:.1f} MiB)"
                     if name in IMAGE_USUAL else f"over budget ({sizes[name]:.1f} MiB): stages that need it fail")
    return out


def build(dest: Path, python_version: str, budget_mib: float | None = DEFAULT_BUDGET_MIB) -> dict:
    """Fill ``dest`` (replacing it when done) and write its ``manifest.json``; returns the manifest."""
    import tomllib

    deps = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_own = comes_with_torch(python_version)
    offline = {canon(n) for n in kaggle.OFFLINE_WHEELS}
    direct = {canon(re.split(r"[<>=!~ ;\[]", d)[0]) for d in deps}  # pinned by the project: ours beat the box's
    wanted = {n: r for n, r in closure([d for d in deps if canon(d.split("==")[0]) != "torch"], python_version).items()
              if n not in torch_own}
    with atomic_dir(dest) as stage:  # dest replaced only when every wheel is in
        kaggle._collect_wheels(stage / "kaggle", None)  # the bundle's own wheels, as `lib.kaggle build` gets them
        failed = download([r for n, r in wanted.items() if n not in offline], stage, python_version)
        files = {canon(wheel_tags(p.name)[0]): p for p in [*stage.glob("*.whl"), *(stage / "kaggle").glob("*.whl")]}
        sizes = {n: p.stat().st_size / 2 ** 20 for n, p in files.items()}
        dropped = leave_out(sizes, budget_mib)
        for name in dropped:
            files.pop(name).unlink()
        manifest = {
            "python_version": python_version, "platforms": PLATFORMS, "budget_mib": budget_mib,
            "total_mib": round(sum(sizes[n] for n in files), 1), "all_mib": round(sum(sizes.values()), 1),
            "wheels": [{"file": p.name, "name": n, "version": wheel_tags(p.name)[1], "kaggle": p.parent.name == "kaggle",
                        "direct": n in direct, "mib": round(sizes[n], 2)} for n, p in sorted(files.items())],
            "left_out": {**dropped, **failed}, "comes_with_torch": sorted(torch_own),
            "unresolved": sorted(r for n, r in wanted.items() if "==" not in r and n in files)}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def repository_mib() -> float | None:
    """What of the repository travels with it (tracked files and untracked ones git does not ignore), in MiB."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=paths.ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    files = [paths.ROOT / f for f in listed if f]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2 ** 20


def report(manifest: dict, dest: Path) -> str:
    repo = repository_mib()
    together = f"; with the repository ({repo:.1f} MiB) {manifest['total_mib'] + repo:.1f} of 64 MiB" if repo else ""
    lines = [f"{dest}: {len(manifest['wheels'])} wheels for Python {manifest['python_version']}, "
             f"{manifest['total_mib']:.1f} MiB (budget {manifest['budget_mib']} MiB; all would be "
             f"{manifest['all_mib']:.1f} MiB{together})"]
    lines += [f"  left out: {n}: {why}" for n, why in manifest["left_out"].items()]
    lines += [f"  not installed here, so fetched without its own dependencies: {r}" for r in manifest.get("unresolved", [])]
    return "\n".join(lines)
