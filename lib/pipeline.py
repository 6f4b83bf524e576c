"""Execute the numbered notebooks in order with papermill: what ``make demo`` runs.

    python -m lib.pipeline --preset demo                 # all notebooks, in order
    python -m lib.pipeline --preset smoke --only 01 03   # some of them
    python -m lib.pipeline --preset demo -p seed 1       # a parameter for every notebook

Each executed copy is written into the notebook's run folder,
``results/<notebook>/<run-id>/<notebook>.ipynb``, beside the ``run.json`` the notebook writes itself.
The first failing notebook stops the pipeline; its name, cell and error are printed, its run is
marked failed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from lib import config, paths, runs

NOTEBOOK_PATTERN = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")


class NotebookFailed(RuntimeError):
    def __init__(self, notebook: str, run_dir: Path, message: str):
        super().__init__(f"{notebook} failed: {message}")
        self.notebook, self.run_dir, self.message = notebook, run_dir, message


FEED_07 = ("09_rsna_aneurysm",)  # numbered after 07_evaluate, whose summary reports them: they run before it


def list_notebooks(folder: str | os.PathLike = paths.NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks of ``folder``, in the order they run: by number, except that those of
    :data:`FEED_07` come just before 07_evaluate."""
    found = sorted(p for p in Path(folder).iterdir() if NOTEBOOK_PATTERN.match(p.name))
    return sorted(found, key=lambda p: ("07", 0, p.name) if p.stem in FEED_07 else (p.stem[:2], 1, p.name))


@contextlib.contextmanager
def _env(var: str, value: str) -> Iterator[None]:
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def run_notebook(path: str | os.PathLike, preset: str, parameters: dict[str, Any] | None = None,
                 results_root: str | os.PathLike | None = None) -> Path:
    """Execute one notebook with papermill; return its run folder. Raises :class:`NotebookFailed`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    path = Path(path).resolve()
    results_root = Path(results_root or paths.results_dir())
    run_id = runs.new_run_id(preset)
    run_dir = results_root / path.stem / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _env(runs.RUN_ID_ENV, run_id), _env("MEDIMG_RESULTS_DIR", str(results_root)):
            papermill.execute_notebook(
                str(path), str(run_dir / path.name), parameters={"preset": preset, **(parameters or {})},
                kernel_name="python3", cwd=str(path.parent), progress_bar=False, log_output=False,
            )
    except PapermillExecutionError as e:
        message = f"cell {e.exec_count}: {e.ename}: {e.evalue}"
    except Exception as e:  # kernel died, notebook unreadable, ...
        message = f"{type(e).__name__}: {e}"
    else:
        return run_dir
    runs.mark_failed(run_dir, path.stem, preset, message, results_root=results_root)
    raise NotebookFailed(path.name, run_dir, message)


def run_all(preset: str, only: list[str] | None = None, folder: str | os.PathLike = paths.NOTEBOOKS_DIR,
            parameters: dict[str, Any] | None = None, results_root: str | os.PathLike | None = None,
            log: Callable[[str], None] = print) -> list[tuple[str, Path, float]]:
    """Run the numbered notebooks of ``folder`` in order (``only``: name prefixes such as ``"03"``)."""
    notebooks = list_notebooks(folder)
    if only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in only)]
        if not notebooks:
            raise ValueError(f"--only {only} matches no notebook of {folder}")
    done = []
    for path in notebooks:
        log(f"[{len(done) + 1}/{len(notebooks)}] {path.name} (preset {preset}) ...")
        t0 = time.monotonic()
        run_dir = run_notebook(path, preset, parameters, results_root)
        done.append((path.name, run_dir, time.monotonic() - t0))
        log(f"    done in {done[-1][2]:.1f} s -> {run_dir}")
    return done


def _parse_value(text: str) -> Any:
    import yaml  # papermill's -p parses values the same way

    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help=f"one of {', '.join(config.PRESETS)}")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 01 03")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a parameter passed to every notebook")
    args = parser.parse_args(argv)
    if args.preset not in config.PRESETS:
        parser.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(config.PRESETS)}")
    parameters = {k: _parse_value(v) for k, v in args.p}
    t0 = time.monotonic()
    try:
        done = run_all(args.preset, args.only, parameters=parameters)
    except NotebookFailed as e:
        print(f"\nFAILED: {e.notebook}: {e.message}\n  partial executed copy and run.json: {e.run_dir}",
              file=sys.stderr)
        return 1
    root = paths.results_dir()
    print(f"\nall {len(done)} notebooks completed in {time.monotonic() - t0:.1f} s (preset {args.preset})")
    print(f"results: {root}\n  run index: {root / 'runs.csv'}")
    for name, run_dir, _ in done:
        print(f"  {name}: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
