"""Pages in headless Chromium (Debian's package), driven by Playwright as a person would use them: the
labeling page, and MLflow's own UI started by `alignflow ui`; read what is on screen, take screenshots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
ML_VIEW = "workflowType=machine_learning"  # MLflow 3 opens on its GenAI views without it
OWN_TEXT = "const own = e => [...e.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();"
DRAWN = ("const drawn = e => { const r = e.getBoundingClientRect(), at = document.elementFromPoint(r.left + r.width / 2,"
         " r.top + r.height / 2); return at !== null && (at === e || e.contains(at) || at.contains(e)); };"
         )  # drawn on top at its centre: not clipped away, not covered


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


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    q = urllib.parse.quote
    return f"{base}/#/compare-runs?runs={q(json.dumps(run_ids))}&experiments={q(json.dumps([experiment_id]))}&{ML_VIEW}"


def runs_table_url(base: str, experiment_id: str, search: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?searchFilter={urllib.parse.quote(search)}&{ML_VIEW}"


def run_artifact_url(base: str, experiment_id: str, run_id: str, artifact: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{artifact}?{ML_VIEW}"


def grid_row(page, label: str) -> list[str]:
    """The row of `label` in one of MLflow's compare grids (metrics), as it reaches the screen.

    There the names and the values are two virtualized grids side by side; the values grid scrolls and
    the names grid follows it one scroll event late in MLflow 3.17 (seen in headless Chromium), so a row
    below the grid's first screen cannot be read off one screen line. The row is what the UI lays out:
    the value cells at the name cell's row offset. The values are wheeled into view, as a person would,
    and must be drawn on screen. Empty when `label` is not in a grid."""
    found = page.evaluate(
        "(label) => { " + OWN_TEXT + """
             const name = [...document.querySelectorAll('.ReactVirtualized__Grid *')].filter(e => own(e) === label).pop();
             if (!name) return null;
             const cell = e => { while (e && !(e.style && e.style.top)) e = e.parentElement; return e; };
             const nameCell = cell(name), namesGrid = nameCell.closest('.ReactVirtualized__Grid');
             const grids = [...namesGrid.parentElement.parentElement.querySelectorAll('.ReactVirtualized__Grid')];
             const values = grids[grids.indexOf(namesGrid) + 1];
             const r = values.getBoundingClientRect();
             return {top: nameCell.style.top, x: r.left + r.width / 2, y: r.top + r.height / 2,
                     dy: parseFloat(nameCell.style.top) - values.scrollTop - r.height / 2 + nameCell.offsetHeight / 2};
           }""", label)
    if found is None:
        return []
    page.mouse.move(found["x"], found["y"])
    page.mouse.wheel(0, found["dy"])
    page.wait_for_timeout(500)
    return [label] + page.evaluate(
        "([label, top]) => { " + OWN_TEXT + DRAWN + """
             const name = [...document.querySelectorAll('.ReactVirtualized__Grid *')].filter(e => own(e) === label).pop();
             if (!name) return ['(the row left the page)'];
             const namesGrid = name.closest('.ReactVirtualized__Grid');
             const grids = [...namesGrid.parentElement.parentElement.querySelectorAll('.ReactVirtualized__Grid')];
             const values = grids[grids.indexOf(namesGrid) + 1];
             return [...values.querySelectorAll('*')].filter(e => e.style && e.style.top === top)
               .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
               .map(e => drawn(e) ? e.innerText.trim() : '(not on screen)');
           }""", [label, found["top"]])


def same_line(page, label: str) -> list[str]:
    """The texts drawn on the screen line of `label` (outside the plots): a table row as a person reads it,
    whatever the DOM. Empty when `label` is not on the page."""
    return page.evaluate(
        "(label) => { " + OWN_TEXT + DRAWN + """
             const texts = [...document.querySelectorAll('body *')].filter(e => own(e) && e.getClientRects().length && !e.closest('svg'));
             const hit = texts.filter(e => own(e) === label).pop();
             if (!hit) return [];
             const box = hit.getBoundingClientRect(), y = box.top + box.height / 2;
             return texts.filter(drawn).map(e => { const r = e.getBoundingClientRect(); return [own(e), r.top + r.height / 2, r.left]; })
               .filter(([t, c]) => Math.abs(c - y) < 8).sort((a, b) => a[2] - b[2]).map(([t]) => t);
           }""",
        label,
    )


def keep(path: Path) -> None:
    """Copy a screenshot to $ALIGNFLOW_SCREENSHOT_DIR, to look at."""
    if os.environ.get("ALIGNFLOW_SCREENSHOT_DIR"):
        target = Path(os.environ["ALIGNFLOW_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
