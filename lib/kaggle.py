"""Run any numbered notebook as a Kaggle kernel, with or without internet.

    python -m lib.kaggle build 03_pretrain --preset prod --gpu t4x2 --internet off --user NAME
    python -m lib.kaggle push 03_pretrain --preset prod --user NAME     # code dataset, then the kernel
    python -m lib.kaggle status 03_pretrain --preset prod --user NAME
    python -m lib.kaggle output 03_pretrain --preset prod --user NAME   # -> results/03_pretrain/kaggle-<kernel>/

    # a code-competition submission kernel (RSNA 2025): internet off, the competition and the trained run attached
    python -m lib.kaggle build 09_rsna_aneurysm --preset prod --competition rsna-intracranial-aneurysm-detection \
        --internet off --submission NAME/medimg-09-weights --user NAME   # kernel <title> + " submit"

``build`` writes ``build/kaggle/<kernel-slug>/``::

    kernel-metadata.json   every field explicit; T4 x2 via machine_shape "NvidiaTeslaT4"
    <notebook>.ipynb       parameters baked in (papermill --prepare-only), a bootstrap cell on top
    code/                  the code dataset <user>/medimg-lib-code: lib/, data_manifest.csv, pyproject.toml,
                           medimg_bootstrap.py, BUILD_INFO.json, dataset-metadata.json, and with
                           --internet off wheels/ + requirements-kaggle.txt for what the Kaggle image lacks

``--submission OWNER/SLUG`` (a Kaggle dataset holding the trained run folder) makes a submission kernel:
the dataset is attached, the notebook's ``mode`` becomes ``submit`` and its ``weights`` the dataset's path
``/kaggle/input/<slug>`` (the notebook resolves deeper mounts: ``lib.families.rsna_submission.resolve_weights``;
``-p weights /kaggle/input/<slug>/<run>`` to point inside it); the build refuses it without
``--competition`` or with internet on (code competitions run offline). Its kernel is a separate one (title
``... submit``; pass ``--submission`` to push/status/output too). Submit a finished version with
``kaggle competitions submit <competition> -k <kernel> -v <version> -f submission.parquet -m MSG``.

Push does not run papermill: the parameters are baked in at build time. The code dataset is uploaded
with ``-r zip`` (the CLI's default ``-r skip`` silently drops subfolders such as ``lib/data``).
Plain ``enable_gpu`` can land on a P100 (sm_60), which the current Kaggle image's torch no longer
supports; ``machine_shape`` asks for the T4s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from lib import config, paths
from lib.atomic import atomic_dir

CODE_DATASET = "medimg-lib-code"
# Pinned dependencies shipped as wheels to internet-off kernels: pure-Python packages that the Kaggle
# image does not carry at our pins (torch, numpy, scipy, pandas, scikit-*, matplotlib, tqdm are used
# as the image has them).
OFFLINE_WHEELS = ("monai", "einops", "nibabel", "pydicom", "pydicom-data", "nilearn")
GPUS = ("t4x2", "none")
KAGGLE_INPUT = "/kaggle/input"  # where Kaggle mounts attached datasets (at <slug>/ or deeper)
_DATASET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*/[a-z0-9][a-z0-9-]{2,49}$")
_COMPETITION = re.compile(r"^[a-z0-9][a-z0-9-]{2,99}$")
_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,49}$")
BOOTSTRAP_CELL = '''# Kaggle bootstrap (added by `python -m lib.kaggle build`): import lib from the attached code dataset,
# installing its shipped wheels offline first when the kernel has no internet.
import glob, os, sys
_found = sorted(glob.glob(os.path.join(os.environ.get("MEDIMG_KAGGLE_INPUT", "/kaggle/input"), "**", "medimg_bootstrap.py"), recursive=True))
if not _found:
    raise RuntimeError("attach the code dataset {dataset} to this kernel: medimg_bootstrap.py not found under the input root")
sys.path.insert(0, os.path.dirname(_found[0]))
import medimg_bootstrap
medimg_bootstrap.setup()
import lib
print("lib from", os.path.dirname(os.path.dirname(lib.__file__)))'''


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class Bundle:
    """What ``build`` makes, validated before anything is written."""

    notebook: Path
    preset: str
    user: str
    params: dict[str, Any] = field(default_factory=dict)
    gpu: str = "t4x2"
    internet: bool = True
    datasets: list[str] = field(default_factory=list)
    competition: str | None = None
    kernels: list[str] = field(default_factory=list)  # kernels whose output is attached (kernel_sources)
    title: str | None = None
    wheels_from: Path | None = None
    submission: str | None = None  # owner/slug of the dataset with the trained run: a code-competition submission

    def __post_init__(self) -> None:
        self.notebook = resolve_notebook(self.notebook)
        if self.submission is not None:
            self.params = _submission_params(self.submission, self.params)
        elif self.gpu == "t4x2" and "gpus" not in self.params and _trains(self.notebook.stem):
            self.params = {**self.params, "gpus": 0}  # both T4s, a process each (lib.multigpu); -p gpus 1: one
        try:
            config.resolve(self.notebook.stem, self.preset, **self.params)  # unknown preset/parameter/type -> ValueError
        except ValueError as e:
            if self.submission is None:
                raise
            raise ValueError(f"--submission needs a notebook with the parameters mode (submit) and weights: {e}") from None
        if not _USER.match(self.user or ""):
            raise ValueError(f"--user {self.user!r} is not a Kaggle user name")
        if self.gpu not in GPUS:
            raise ValueError(f"--gpu {self.gpu!r}: valid choices: {', '.join(GPUS)}")
        for d in self.datasets:
            if not _DATASET.match(d):
                raise ValueError(f"--dataset {d!r} is not a Kaggle dataset slug (owner/slug, slug of 3-50 lower-case "
                                 "letters, digits and dashes)")
        for k in self.kernels:
            if not _DATASET.match(k):
                raise ValueError(f"--kernel {k!r} is not a Kaggle kernel slug (owner/slug)")
        if self.competition is not None and not _COMPETITION.match(self.competition):
            raise ValueError(f"--competition {self.competition!r} is not a Kaggle competition slug")
        self.title = self.title or (f"medimg {self.notebook.stem.replace('_', ' ')} {self.preset}"
                                    + (" submit" if self.submission else ""))
        if len(self.title) < 5 or len(self.title) > 50:
            raise ValueError(f"--title {self.title!r}: Kaggle needs a title of 5 to 50 characters")
        if len(self.slug) < 5:
            raise ValueError(f"--title {self.title!r} gives the kernel slug {self.slug!r}, shorter than 5 characters")

    @property
    def slug(self) -> str:
        return slugify(self.title or "")

    @property
    def kernel_id(self) -> str:
        return f"{self.user}/{self.slug}"

    @property
    def code_dataset(self) -> str:
        return f"{self.user}/{CODE_DATASET}"

    def check_buildable(self) -> None:
        """What only a build needs: a submission kernel is a code-competition kernel (competition, no internet)."""
        if self.submission is None:
            return
        if self.competition is None:
            raise ValueError("--submission: name the code competition with --competition SLUG")
        if self.internet:
            raise ValueError("--submission: a code competition's notebook runs without internet: pass --internet off")

    @property
    def dataset_sources(self) -> list[str]:
        extra = [self.submission] if self.submission else []
        return list(dict.fromkeys([self.code_dataset, *self.datasets, *extra]))

    def metadata(self) -> dict:
        return {
            "id": self.kernel_id, "title": self.title, "code_file": self.notebook.name, "language": "python",
            "kernel_type": "notebook", "is_private": True, "enable_gpu": self.gpu != "none", "enable_tpu": False,
            "enable_internet": self.internet, "machine_shape": "NvidiaTeslaT4" if self.gpu == "t4x2" else None,
            "dataset_sources": self.dataset_sources,
            "competition_sources": [self.competition] if self.competition else [],
            "kernel_sources": list(self.kernels), "model_sources": [], "keywords": [],
        }


def _trains(notebook: str) -> bool:
    """Whether ``notebook`` has the ``gpus`` parameter of the training notebooks."""
    try:
        return "gpus" in config.resolve(notebook, "smoke")
    except ValueError:
        return False


def _submission_params(dataset: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``mode = "submit"`` and ``weights`` at the attached dataset (unless given)."""
    if not _DATASET.match(dataset):
        raise ValueError(f"--submission {dataset!r} is not a Kaggle dataset slug (owner/slug)")
    if params.get("mode") not in (None, "submit"):
        raise ValueError(f"--submission runs the notebook with mode 'submit', not -p mode {params['mode']!r}")
    weights = params.get("weights") or f"{KAGGLE_INPUT}/{dataset.split('/')[1]}"
    return {**params, "mode": "submit", "weights": weights}


def resolve_notebook(name: str | Path) -> Path:
    """``03_pretrain``, ``03`` or ``notebooks/03_pretrain.ipynb`` -> the notebook's path."""
    stem = Path(str(name)).name.removesuffix(".ipynb")
    known = sorted(p.stem for p in paths.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    matches = [k for k in known if k == stem or k.split("_")[0] == stem]
    if len(matches) != 1:
        raise ValueError(f"unknown notebook {str(name)!r}; notebooks: {', '.join(known)}")
    return paths.NOTEBOOKS_DIR / f"{matches[0]}.ipynb"


def default_user() -> str | None:
    """The Kaggle user name from ``$KAGGLE_USERNAME`` or kaggle.json (only the name is read)."""
    import os

    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    cfg = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"
    try:
        return json.loads(cfg.read_text()).get("username")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- build

def _pins() -> dict[str, str]:
    import tomllib

    deps = tomllib.loads((paths.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps)


def _wheel_name(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name.replace("_", "-").lower(), version


def _collect_wheels(target: Path, wheels_from: Path | None) -> list[str]:
    """Put the wheels for an internet-off kernel into ``target``; returns the requirement lines."""
    target.mkdir(parents=True)
    if wheels_from is not None:  # a folder of wheels prepared beforehand (and the tests)
        wheels = sorted(Path(wheels_from).glob("*.whl"))
        if not wheels:
            raise ValueError(f"--wheels {wheels_from}: no .whl files there")
        for w in wheels:
            shutil.copy2(w, target / w.name)
        return [f"{n}=={v}" for n, v in map(_wheel_name, wheels)]
    pins = _pins()
    wanted = [f"{name}=={pins[name]}" for name in OFFLINE_WHEELS]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                             "--dest", str(target), *wanted], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip download of the offline wheels failed (needs PyPI): {result.stderr.strip()[-400:]}")
    return wanted


def _code_dataset(folder: Path, bundle: Bundle) -> None:
    from lib.runs import git_info

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    shutil.copytree(paths.ROOT / "lib", folder / "lib", ignore=ignore)
    for name in ("data_manifest.csv", "pyproject.toml"):
        shutil.copy2(paths.ROOT / name, folder / name)
    shutil.copy2(paths.ROOT / "lib" / "kaggle_bootstrap.py", folder / "medimg_bootstrap.py")
    (folder / "BUILD_INFO.json").write_text(json.dumps(
        {"git": git_info(), "notebook": bundle.notebook.stem, "preset": bundle.preset, "params": bundle.params,
         "internet": bundle.internet}, indent=2) + "\n")
    if not bundle.internet:
        lines = _collect_wheels(folder / "wheels", bundle.wheels_from)
        (folder / "requirements-kaggle.txt").write_text("\n".join(lines) + "\n")
    (folder / "dataset-metadata.json").write_text(json.dumps(
        {"title": "medimg lib code", "id": bundle.code_dataset, "licenses": [{"name": "apache-2.0"}],
         "subtitle": "The lib package of the medimg notebooks, for Kaggle kernels"}, indent=2) + "\n")


def _notebook(src: Path, dst: Path, bundle: Bundle) -> None:
    import papermill

    papermill.execute_notebook(str(src), str(dst), parameters={"preset": bundle.preset, **bundle.params},
                               prepare_only=True, progress_bar=False, kernel_name="python3")
    nb = nbformat.read(dst, as_version=4)
    cell = nbformat.v4.new_code_cell(BOOTSTRAP_CELL.format(dataset=bundle.code_dataset))
    cell.metadata["tags"] = ["kaggle-bootstrap"]
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    nb.cells.insert(first_code, cell)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nbformat.write(nb, dst)


def build(bundle: Bundle, out_root: str | Path | None = None) -> Path:
    """Write ``build/kaggle/<slug>/`` for ``bundle`` (replacing an older build; all or nothing)."""
    bundle.check_buildable()
    final = Path(out_root or paths.ROOT / "build" / "kaggle") / bundle.slug
    with atomic_dir(final) as tmp:
        _notebook(bundle.notebook, tmp / bundle.notebook.name, bundle)
        _code_dataset(tmp / "code", bundle)
        (tmp / "kernel-metadata.json").write_text(json.dumps(bundle.metadata(), indent=2) + "\n")
    return final


# --------------------------------------------------------------------------- the kaggle CLI

def _credentials_or_stop() -> None:
    from lib.data.manifest import kaggle_credentials

    if not kaggle_credentials():
        raise RuntimeError("the kaggle CLI needs credentials: create an API token at https://www.kaggle.com/settings "
                           "(API section) and save kaggle.json in ~/.kaggle/ (chmod 600), or set KAGGLE_USERNAME and "
                           "KAGGLE_KEY (or KAGGLE_API_TOKEN) in the environment; then run this again")


def _kaggle(*args: str, exe: str = "kaggle", check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([paths.executable(exe), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"kaggle {' '.join(args[:2])} failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-400:]}")
    return result


def push(folder: str | Path, exe: str = "kaggle") -> str:
    """Create or version the code dataset (``-r zip``), then push the kernel. Returns the CLI's report."""
    _credentials_or_stop()
    folder = Path(folder)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    code_id = json.loads((folder / "code" / "dataset-metadata.json").read_text())["id"]
    exists = _kaggle("datasets", "status", code_id, exe=exe, check=False).returncode == 0
    if exists:
        _kaggle("datasets", "version", "-p", str(folder / "code"), "-r", "zip", "-m", "medimg build", exe=exe)
    else:
        _kaggle("datasets", "create", "-p", str(folder / "code"), "-r", "zip", exe=exe)
    out = _kaggle("kernels", "push", "-p", str(folder), exe=exe).stdout.strip()
    return f"{code_id}: {'new version' if exists else 'created'}; {meta['id']}: {out}"


def status(kernel_id: str, exe: str = "kaggle") -> str:
    _credentials_or_stop()
    return _kaggle("kernels", "status", kernel_id, exe=exe).stdout.strip()


def output(kernel_id: str, notebook: str, exe: str = "kaggle") -> Path:
    """Download a kernel's outputs into ``results/<notebook>/kaggle-<kernel>/``."""
    _credentials_or_stop()
    target = paths.results_dir() / notebook / f"kaggle-{kernel_id.split('/')[-1]}"
    target.mkdir(parents=True, exist_ok=True)
    _kaggle("kernels", "output", kernel_id, "-p", str(target), exe=exe)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.kaggle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "push", "status", "output"):
        p = sub.add_parser(name)
        p.add_argument("notebook")
        p.add_argument("--preset", required=True, choices=config.PRESETS)
        p.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
        p.add_argument("--user", default=None, help="Kaggle user name (default: $KAGGLE_USERNAME or kaggle.json)")
        p.add_argument("--title", default=None)
        p.add_argument("--submission", default=None, metavar="OWNER/SLUG",
                       help="a code-competition submission kernel: the dataset holding the trained run folder "
                            "(mode submit, weights there; needs --competition and --internet off)")
        if name == "build":
            p.add_argument("--gpu", default="t4x2", choices=GPUS)
            p.add_argument("--internet", default="on", choices=("on", "off"))
            p.add_argument("--dataset", action="extend", nargs="+", default=[], help="owner/slug of datasets to attach")
            p.add_argument("--competition", default=None)
            p.add_argument("--kernel", action="extend", nargs="+", default=[],
                           help="owner/slug of kernels whose output to attach (e.g. 02_prepare_data's prepared datasets)")
            p.add_argument("--wheels", type=Path, default=None, help="folder of wheels to ship instead of downloading")
    args = parser.parse_args(argv)
    from lib.pipeline import _parse_value

    try:
        user = args.user or default_user()
        if not user:
            raise ValueError("no Kaggle user name: pass --user NAME (or set KAGGLE_USERNAME)")
        extra = dict(gpu=args.gpu, internet=args.internet == "on", datasets=args.dataset, competition=args.competition,
                     kernels=args.kernel,
                     wheels_from=args.wheels) if args.command == "build" else {}
        bundle = Bundle(args.notebook, args.preset, user, {k: _parse_value(v) for k, v in args.p}, title=args.title,
                        submission=args.submission, **extra)
        folder = paths.ROOT / "build" / "kaggle" / bundle.slug
        if args.command == "build":
            folder = build(bundle)
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            print(f"built {folder} ({size / 1e6:.1f} MB): kernel {bundle.kernel_id}, code dataset {bundle.code_dataset}")
        elif args.command == "push":
            if not folder.is_dir():
                raise ValueError(f"{folder} does not exist: run `python -m lib.kaggle build` first")
            print(push(folder))
        elif args.command == "status":
            print(status(bundle.kernel_id))
        else:
            print(f"outputs in {output(bundle.kernel_id, bundle.notebook.stem)}")
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
