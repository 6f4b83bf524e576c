"""The house rules of ``lib``, checked on its source so that the layers stay as built.

Who imports whom (``../shared/design/README.md``): the ground floor (config, presets, paths, device,
atomic, runs) imports nothing above it; ``lib.data``, ``lib.models``, ``lib.losses`` and
``lib.metrics`` are unaware of each other; a network never opens a file; the training loop never
names a model; ``lib.families`` composes the layers, and only the top floor (summary, viz, kaggle,
pipeline, bench, notebooks) imports the families. Every import counts, including the ones inside
functions. Also: no module over 450 lines, no function over 80.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lib import paths

LIB = paths.ROOT / "lib"
GROUND = {"lib", "lib.config", "lib.presets", "lib.paths", "lib.device", "lib.atomic", "lib.runs"}
# module (or package prefix) -> the lib modules (or prefixes) it may import
ALLOWED = {
    "lib.atomic": set(),
    "lib.paths": set(),
    "lib.config": {"lib.presets"},
    "lib.presets": {"lib.config"},
    "lib.device": set(),
    "lib.runs": {"lib.config", "lib.paths", "lib.atomic", "lib.device"},
    "lib.models": {"lib.models"},
    "lib.losses": {"lib.losses"},
    "lib.metrics": set(),
    "lib.data": {"lib.data", "lib.atomic", "lib.paths", "lib.config"},
    "lib.checkpoint": {"lib.atomic", "lib.config", "lib.models"},
    "lib.distributed": {"lib.device"},
    "lib.loaders": {"lib.distributed", "lib.runs"},
    "lib.multigpu": {"lib.checkpoint", "lib.distributed", "lib.atomic", "lib.config", "lib.device", "lib.runs",
                     "lib.train", "lib.train_log"},
    "lib.train": {"lib.train_log", "lib.train_settings", "lib.checkpoint", "lib.device", "lib.distributed",
                  "lib.atomic", "lib.loaders"},
    "lib.train_log": {"lib.atomic"},
    "lib.train_settings": set(),
    "lib.families": {"lib.families", "lib.data", "lib.models", "lib.losses", "lib.metrics", "lib.train",
                     "lib.checkpoint", "lib.viz", "lib.loaders", "lib.multigpu", "lib.distributed", *GROUND},
    "lib.viz": {"lib.data", "lib.atomic"},
}
# modules that are the top floor: they may import any lib module
TOP = {"lib.summary", "lib.kaggle", "lib.kaggle_bootstrap", "lib.pipeline", "lib.bench", "lib.launch", "lib.gpu_check"}
IO_MODULES = {"pathlib", "json", "csv", "pickle", "shutil", "tempfile", "nibabel", "pydicom", "pandas", "SimpleITK",
              "h5py", "zipfile"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(paths.ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (``from lib import x`` counts as ``lib.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module in ("lib", "lib.data", "lib.models", "lib.losses", "lib.families", "lib.presets"):
                out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _rule(module: str) -> set[str] | None:
    """The allowed set of the closest rule (``lib.data.io`` falls under ``lib.data``); None: top floor."""
    if _within(module, TOP):
        return None
    if module == "lib":
        return set()
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        key = ".".join(parts[:i])
        if key in ALLOWED:
            return ALLOWED[key]
    raise AssertionError(f"{module}: no import rule; add it to ALLOWED or TOP in {Path(__file__).name}")


MODULES = sorted(LIB.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_import_directions(path):
    module = _module_name(path)
    allowed = _rule(module)
    if allowed is None:
        return
    own = {module, module.rsplit(".", 1)[0]} if path.name != "__init__.py" else {module}
    bad = sorted(name for name in _imports(path) if (name == "lib" or name.startswith("lib."))
                 and not _within(name, allowed | own) and name != "lib")
    assert not bad, f"{module} imports {bad}; its layer may import only {sorted(allowed) or 'nothing of lib'}"


@pytest.mark.parametrize("path", sorted((LIB / "models").rglob("*.py")), ids=lambda p: p.stem)
def test_networks_do_no_io(path):
    bad = sorted(name for name in _imports(path) if name.split(".")[0] in IO_MODULES)
    assert not bad, f"lib/models/{path.name} imports {bad}: a network is configured by arguments and opens no file"
    assert "open(" not in path.read_text().replace("_open(", ""), f"lib/models/{path.name} opens a file"


def test_the_loop_names_no_model():
    for name in ("train.py", "train_log.py", "train_settings.py", "distributed.py"):
        path = LIB / name
        if path.exists():
            text = path.read_text()
            assert not {n for n in _imports(path) if _within(n, {"lib.models", "lib.families", "lib.losses", "lib.data"})}
            for model in ("WaveFormer", "FrameVAE", "SeriesDenoiser", "LongitudinalMIM", "HybridCNNViT"):
                assert model not in text, f"lib/{name} names {model}"


def test_the_checker_catches_a_wrong_direction(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from lib.data import io\n    import lib.metrics\n")
    assert {"lib.data", "lib.data.io", "lib.metrics"} <= _imports(bad)
    assert _rule("lib.models.vae") == {"lib.models"} and _rule("lib.summary") is None
    assert not _within("lib.data.io", ALLOWED["lib.models"])


EXCEPTIONS: dict[str, str] = {}  # "lib/x.py" or "lib/x.py:function" -> why it may be longer


def test_sizes():
    long = []
    for path in MODULES:
        rel = str(path.relative_to(paths.ROOT))
        lines = path.read_text().count("\n")
        if lines > 450 and rel not in EXCEPTIONS:
            long.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80 and f"{rel}:{node.name}" not in EXCEPTIONS:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long, "over the limits (450 lines a module, 80 a function):\n" + "\n".join(long)
