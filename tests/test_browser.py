"""JupyterLab in a real browser: run a notebook, move a viewer's slice slider, see the image change.

Headless Debian Chromium driven by Playwright (``.ci/run`` installs Chromium; the README says how).
Screenshots land in ``ui/`` of the results root (``$MEDIMG_RESULTS_DIR``: a temporary folder under pytest,
so a test run writes nothing into the repository). The server and the browser are stopped in
every outcome.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lib import paths

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install chromium)")]


def _ui_dir() -> Path:
    ui = paths.results_dir() / "ui"
    ui.mkdir(parents=True, exist_ok=True)
    return ui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    port, token = _free_port(), secrets.token_hex(16)
    log = tmp_path_factory.mktemp("lab") / "jupyterlab.log"
    # JupyterLab saves what it opens (kernel metadata, autosaved outputs): serve copies, never the repository's
    root = tmp_path_factory.mktemp("notebooks")
    for nb in paths.NOTEBOOKS_DIR.glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    env = {**os.environ, "PRESET": "smoke", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start on port {port} (exit code {server.poll()}):\n"
                                + log.read_text()[-2000:])
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32)


def _screenshot(locate, path: Path, seconds: float = 30) -> None:
    """Screenshot of the element ``locate()`` finds; the widget redraws its image (a new element) whenever
    a cell or the slider changes it, so an element that went away is looked up again."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + seconds
    while True:
        try:
            locate().screenshot(path=str(path), timeout=10_000)
            return
        except Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _run_and_slide(lab, browser, notebook: str, name: str) -> float:
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        # a workspace of its own: only this notebook open, so "Run All Cells" can only mean this one
        page.goto(f"{url}/lab/workspaces/{name}/tree/{notebook}?reset&token={token}", timeout=90_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=90_000)
        page.get_by_text("| Idle").first.wait_for(timeout=90_000)  # status bar: the kernel is up
        page.locator(".jp-NotebookPanel .jp-Cell").first.click()
        page.get_by_text("Run", exact=True).first.click()
        page.get_by_text("Run All Cells", exact=True).first.click()
        slider = page.locator(".widget-slider .noUi-handle, .widget-hslider .noUi-handle").first
        slider.wait_for(timeout=180_000)
        viewer = page.locator(".widget-vbox").filter(has=page.locator(".noUi-handle")).first
        image = lambda: viewer.locator(".widget-output img, .jp-OutputArea-output img").first  # noqa: E731
        image().wait_for(timeout=60_000)
        page.get_by_text("| Idle").first.wait_for(timeout=180_000)  # every cell has run: nothing redraws now
        image().scroll_into_view_if_needed()
        UI = _ui_dir()
        before, after = UI / f"{name}_before.png", UI / f"{name}_after.png"
        _screenshot(image, before)
        slider.focus()
        for _ in range(6):
            page.keyboard.press("ArrowRight")
        deadline, diff = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline:
            page.wait_for_timeout(500)
            _screenshot(image, after)
            a, b = _pixels(before), _pixels(after)
            diff = float(np.abs(a - b).mean()) if a.shape == b.shape else float("inf")
            if diff > 0.5:
                break
        page.screenshot(path=str(UI / f"{name}_page.png"), full_page=False)
        return diff
    except Exception:
        UI = _ui_dir()
        page.screenshot(path=str(UI / f"{name}_failure.png"))
        raise
    finally:
        page.close()


def test_explore_data_viewer_reacts_to_its_slider(lab, browser):
    diff = _run_and_slide(lab, browser, "01_explore_data.ipynb", "01_explore_data")
    assert diff > 0.5, f"the viewer image did not change after moving the slider (mean pixel difference {diff})"


def test_visualize_viewer_reacts_to_its_slider(lab, browser):
    diff = _run_and_slide(lab, browser, "08_visualize.ipynb", "08_visualize")
    assert diff > 0.5, f"the viewer image did not change after moving the slider (mean pixel difference {diff})"
