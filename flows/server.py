"""The temporary Prefect server of `alignflow run` when no PREFECT_API_URL is configured.

Prefect would start one itself when the flow begins (its "ephemeral" server), but

- only after this process has imported torch, transformers and MLflow: about 8 s more on 2 cores, where
  started first it boots on the other core while they import;
- in this process's process group: Ctrl-C in a terminal stops it together with the command, which then
  hangs at exit, sending its last log lines to a server that is gone.

So the command starts `prefect server start` (API only, no UI or services) in a session of its own, points
Prefect at it through PREFECT_API_URL, and stops it at exit. A PREFECT_API_URL set in the environment or in
the active Prefect profile is used as it is.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 180.0  # a busy 2-core machine can take a while


class ServerError(RuntimeError):
    pass


class TemporaryServer:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the API answers; a ServerError says why it did not, and where its output is."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {self.process.returncode}" if self.process.poll() is not None else f"did not answer in {timeout:.0f} s"
                self.stop(keep_log=True)  # the error names it
                raise ServerError(f"the temporary Prefect server {why} (its output: {self.log}); start one with "
                                  f"`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
            time.sleep(0.1)

    def stop(self, wait: float = 10.0, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL after `wait` seconds. At exit the command waits 1 s only: the server finishes
        closing its connections (this process's) once the process is gone, 2-4 s later.
        The server's log folder goes with it, unless keep_log or the server had stopped by itself (its log
        then says why)."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            if wait >= 10:
                self.process.kill()
                self.process.wait()
        if not keep_log:
            shutil.rmtree(self.log.parent, ignore_errors=True)


def start() -> TemporaryServer | None:
    """Start the temporary server when no API is configured (None otherwise); call wait_ready() before the
    first flow. It is stopped when this process exits."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp(prefix="alignflow-prefect-")) / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--no-services", "--analytics-off"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    server = TemporaryServer(process, f"http://127.0.0.1:{port}/api", log)
    atexit.register(server.stop, 1.0)
    os.environ["PREFECT_API_URL"] = server.url
    os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at <url>" line a flow run
    refresh_global_settings_context()  # Prefect read its settings at import; this picks up the variable
    print(f"Starting a temporary Prefect server on http://127.0.0.1:{port} (to keep flow runs between commands, "
          f"run `prefect server start` and set PREFECT_API_URL)", file=sys.stderr, flush=True)
    return server
