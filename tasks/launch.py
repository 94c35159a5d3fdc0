"""Where a stage's body runs: `run_body`, which the lifecycle (tasks/stage.py) calls, runs it in the
pipeline's process, or on several processes when the stage asks for them in pipelines.yaml
(`resources: {processes: N}`, and optionally an accelerate config).

The pipeline's process writes the stage's job (its type, params, inputs, output folder and MLflow run) to
`<output>/.launch/job.json` and starts `torchrun --standalone` (or `accelerate launch` with the stage's
accelerate config: FSDP2, DeepSpeed, several machines) in a process group of its own, streaming its output.
Every worker runs the stage's body; the trainers' `Accelerator` joins the process group (DDP over gloo on
CPU, NCCL on GPUs). Rank 0 logs to the stage's MLflow run and writes the stage's output folder, which
becomes the same content-addressed cache entry as a one-process run; the other ranks write into scratch
folders whose `checkpoints` is rank 0's, so every rank saves into and resumes from the same checkpoints.
Stopping or killing the pipeline stops the group; a worker's error comes back as the stage's error.

    python -m tasks.worker <output>/.launch/job.json     (what the launcher runs on every process)

Imports: tasks.stage -> tasks.launch -> tasks.context; tasks.worker -> tasks.stages -> tasks.stage. No cycle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from tasks.context import STOP, StageContext
from tasks.data import DataError
from tasks.store import StageOutput

LAUNCH_DIR = ".launch"  # inside the stage's partial output; removed before it is published


class LaunchError(RuntimeError):
    """A launched stage's processes died without an error of their own (killed, out of memory, a lost host)."""


class LauncherOutput:
    """The launcher's and its workers' output, line by line: to the pipeline's output, and whole to a log
    file. Python tracebacks (a worker's error comes back as the stage's own message, from error.json) and
    torchrun's failure report are held back from the pipeline's output; the report's root cause (which rank
    died, and how) is kept for the stage's error."""

    ELASTIC_LOG = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/")
    FIELD = re.compile(r"^\s+(rank|exitcode)\s*:\s*(.*)$")

    def __init__(self, log_file: Path, echo=None):
        self.log_file, self.echo = log_file, echo or sys.stdout.write
        self.cause: dict[str, str] = {}

    def copy(self, stream) -> None:
        hiding, in_cause = "", False
        with open(self.log_file, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                text = line.rstrip("\n")
                if text.startswith("Traceback (most recent call last):"):
                    hiding = "traceback"
                elif hiding == "traceback" and not text[:1].isspace():
                    hiding = "report" if "ChildFailedError" in text else ""  # the exception line ends a traceback
                    continue
                elif hiding == "report":
                    in_cause = in_cause or text.startswith("Root Cause")
                    field = self.FIELD.match(text) if in_cause else None
                    if field:
                        self.cause[field.group(1)] = field.group(2).strip()
                    if in_cause and text.startswith("====="):
                        hiding = ""
                    continue
                if hiding or self.ELASTIC_LOG.match(text) or text.startswith(("During handling of the above", "The above exception")):
                    continue
                self.echo(line)

    def why(self) -> str:
        """The root cause in words: "process 1 was killed by SIGKILL" (torchrun's report), or ""."""
        rank, code = self.cause.get("rank", "").split(" ")[0], self.cause.get("exitcode", "")
        signal_name = re.search(r"\((SIG\w+)\)", code)
        if not rank:
            return ""
        if signal_name:
            return f"process {rank} was killed by {signal_name.group(1)}"
        return f"process {rank} exited with code {code.split(' ')[0]}"


def _error_type(name: str) -> type[BaseException]:
    """The type a worker's error keeps in the pipeline (bad data: exit 2; divergence: its own message)."""
    from alignment.trainers.common import NonFiniteLossError

    return {"DataError": DataError, "NonFiniteLossError": NonFiniteLossError, "ValueError": ValueError}.get(name, RuntimeError)


def command(resources, job_file: Path) -> list[str]:
    """torchrun for processes on this machine; accelerate launch when the stage names a config."""
    if resources.accelerate_config is None:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(resources.processes),
                "-m", "tasks.worker", str(job_file)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resources.accelerate_config),
            "--num_processes", str(resources.processes), "-m", "tasks.worker", str(job_file)]


# Run before the launcher, in its own process: ask Linux for SIGTERM when the pipeline's process dies (even
# by kill -9; PR_SET_PDEATHSIG survives exec), then become the launcher. A preexec_fn would do the same but
# is unsafe in a process with threads, and Prefect runs stages in threads.
DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                   "try:\n    ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM)\nexcept OSError:\n    pass\n"
                   "os.execv(sys.argv[1], sys.argv[1:])")


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the launcher's process group (torchrun passes it to the workers), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_body(ctx: StageContext, stage, module, inputs: dict[str, StageOutput], out: Path, run_id: str) -> dict[str, float]:
    """The stage's body, `module.run`: here, or launched on its resources. Returns its metrics."""
    if not stage.resources.launched:
        return module.run(ctx, stage.params, inputs, out, run_id)
    return run_launched(ctx, stage, inputs, out, run_id)


NODE_ENGINES: dict[str, Callable] = {}
"""How a stage's nodes are started when resources.nodes > 1: engine(ctx, stage, job_file, run_id) -> (exit code,
why it failed). flows/nodes.py registers "prefect" (a flow run a node on a work pool's workers)."""


def launcher_env(cmd: list[str]) -> dict[str, str]:
    """The launcher's environment. With several processes a host, torchrun (and accelerate launch through it) gives
    each one torch thread unless OMP_NUM_THREADS says otherwise, and prints a banner saying so into the stage's
    output: the same default is set here, so the threads are the same and the banner is not printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for flag in ("--nproc_per_node", "--num_processes"):
        if flag in cmd and cmd[cmd.index(flag) + 1] != "1":
            env.setdefault("OMP_NUM_THREADS", "1")
    return env


def start(cmd: list[str], log_file: Path, echo=None) -> tuple[subprocess.Popen, LauncherOutput, threading.Thread]:
    """Start a launcher command in a process group of its own that dies with this process, its output copied."""
    proc = subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT, *cmd], start_new_session=True, env=launcher_env(cmd),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    output = LauncherOutput(log_file, echo)
    reader = threading.Thread(target=output.copy, args=(proc.stdout,), daemon=True)
    reader.start()
    return proc, output, reader


def wait(proc: subprocess.Popen, reader: threading.Thread) -> int:
    """The launcher's exit code; a stop request (Ctrl-C, SIGTERM) or an error here stops its group."""
    try:
        while proc.poll() is None:
            if STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            time.sleep(0.2)
    except BaseException:
        stop_group(proc)
        raise
    finally:
        reader.join(timeout=10)
    return proc.returncode


def run_launched(ctx: StageContext, stage, inputs: dict[str, StageOutput], out: Path, run_id: str) -> dict[str, float]:
    """Run the stage's body on its processes (and nodes); returns rank 0's metrics."""
    launch = out / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "error.json"):
        (launch / stale).unlink(missing_ok=True)
    job = {"type": stage.type, "name": stage.name, "params": stage.params.model_dump(mode="json"), "out": str(out),
           "inputs": {slot: dataclasses.asdict(o) for slot, o in inputs.items()}, "run_id": run_id,
           "tracking_uri": ctx.tracker.uri, "experiment": ctx.tracker.experiment, "store": str(ctx.store.root),
           "parent_run_id": ctx.parent_run_id}
    (launch / "job.json").write_text(json.dumps(job, indent=1))
    res = stage.resources
    if res.nodes > 1:
        returncode, why = NODE_ENGINES["prefect"](ctx, stage, launch / "job.json", run_id)
    else:
        cmd = command(res, launch / "job.json")
        ctx.log(f"[{stage.name}] on {res.processes} process(es): {' '.join(cmd[2:])}")
        proc, output, reader = start(cmd, launch / "output.log")
        returncode = wait(proc, reader)
        why = output.why() or f"its launcher exited with code {returncode}"
    if returncode != 0:
        error = launch / "error.json"
        if error.is_file():
            e = json.loads(error.read_text())
            raise _error_type(e["type"])(e["message"])
        raise LaunchError(f"{why}, and the stage's other processes were stopped. Its last checkpoint is kept: run the "
                          f"same command again to resume from it (the processes' output is in {launch})")
    metrics = json.loads((launch / "metrics.json").read_text())
    shutil.rmtree(launch)
    return metrics
