"""Pages in headless Chromium (Debian's package), driven by Playwright as a person would use them: the
labeling page, and MLflow's own UI started by `alignflow ui`; read what is on screen, take screenshots."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ML_VIEW = "workflowType=machine_learning"  # MLflow 3 opens on its GenAI views without it


def need_chromium() -> None:
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh --test installs it")
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh --test installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(cwd: Path, config: Path | None = None):
    """`alignflow ui` on a free port, in `cwd`; yields its base URL; stops it afterwards."""
    port = free_port()
    cli = str(Path(sys.executable).parent / "alignflow")
    server = subprocess.Popen([cli, "ui", "--port", str(port), *(["-c", str(config)] if config else [])], cwd=cwd,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the MLflow UI did not start"
                assert server.poll() is None, "the MLflow UI exited"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@contextmanager
def browser_page(width: int = 1400, height: int = 2000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def run_artifact_url(base: str, experiment_id: str, run_id: str, artifact: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact}?{ML_VIEW}"


def keep(path: Path) -> None:
    """Copy a screenshot to $ALIGNFLOW_SCREENSHOT_DIR, to look at."""
    if os.environ.get("ALIGNFLOW_SCREENSHOT_DIR"):
        target = Path(os.environ["ALIGNFLOW_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
