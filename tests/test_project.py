"""The project's own files agree with each other: pins, env.yml, README, CI."""

import re
import tomllib

import yaml

from lib import paths

ROOT = paths.ROOT
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    return deps


def test_every_dependency_is_pinned_exactly():
    for dep in _pyproject_pins():
        assert PIN.match(dep), f"pyproject.toml: {dep!r} is not pinned with =="


def test_env_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "env.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_pins = {d.lower() for d in pip if d != "-e ."}
    assert "-e ." in pip
    py_pins = {d.lower() for d in _pyproject_pins()}
    assert env_pins == py_pins, f"only in env.yml: {sorted(env_pins - py_pins)}; only in pyproject.toml: {sorted(py_pins - env_pins)}"


def test_top_level_layout():
    required = {"notebooks", "lib", "env.yml", "data_manifest.csv", "results", "tests", "README.md",
                "pyproject.toml", "Makefile", ".ci", "conftest.py", ".gitignore"}
    present = {p.name for p in ROOT.iterdir()}
    assert required <= present, required - present


def test_readme_opens_with_the_two_commands_and_ci_runs_the_same():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert commands, "README.md has no command block"
    assert commands[0].strip().splitlines() == ["make demo", "make test"], "README must open with the two commands"
    assert readme.index("```") < readme.index("\n## "), "the two commands come before the first section"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith(("#", "set ", "cd "))]
    assert ci_commands[-1] == "make test"
    readme_lines = {line.strip() for line in readme.splitlines()}
    assert all(c in readme_lines for c in ci_commands), "CI runs something the README does not give"
    for name in sorted(p.stem for p in paths.NOTEBOOKS_DIR.glob("*.ipynb")):
        assert name in readme, f"README does not describe {name}"


def test_no_source_file_is_ignored_by_git():
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--others", "--ignored", "--exclude-standard",
                          "lib", "tests", "notebooks", ".ci"], capture_output=True, text=True, check=True).stdout
    ignored = [f for f in out.splitlines() if "__pycache__" not in f and ".ipynb_checkpoints" not in f]
    assert ignored == [], f".gitignore hides source files: {ignored}"
