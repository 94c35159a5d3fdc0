"""A stage on several processes: `resources: {processes: N}` (and optionally an accelerate config) in
pipelines.yaml.

The pipeline's process writes the stage's job (its type, params, inputs, output folder and MLflow run) to
`<output>/.launch/job.json` and starts `torchrun --standalone` (or `accelerate launch` with the stage's
accelerate config: FSDP2, DeepSpeed, several machines) in a process group of its own, streaming its output.
Every worker runs the stage's body; the trainers' `Accelerator` joins the process group (DDP over gloo on
CPU, NCCL on GPUs). Rank 0 logs to the stage's MLflow run and writes the stage's output folder, which
becomes the same content-addressed cache entry as a one-process run; the other ranks write into scratch
folders whose `checkpoints` is rank 0's, so every rank saves into and resumes from the same checkpoints.
Stopping or killing the pipeline stops the group; a worker's error comes back as the stage's error.

    python -m tasks.launch <output>/.launch/job.json     (what the launcher runs on every process)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.data import DataError
from tasks.stage import STOP, StageContext
from tasks.store import StageOutput, Store

LAUNCH_DIR = ".launch"  # inside the stage's partial output; removed before it is published


def _error_type(name: str) -> type[BaseException]:
    """The type a worker's error keeps in the pipeline (bad data: exit 2; divergence: its own message)."""
    from alignment.trainers.common import NonFiniteLossError

    return {"DataError": DataError, "NonFiniteLossError": NonFiniteLossError, "ValueError": ValueError}.get(name, RuntimeError)


def command(resources, job_file: Path) -> list[str]:
    """torchrun for processes on this machine; accelerate launch when the stage names a config."""
    if resources.accelerate_config is None:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(resources.processes),
                "-m", "tasks.launch", str(job_file)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resources.accelerate_config),
            "--num_processes", str(resources.processes), "-m", "tasks.launch", str(job_file)]


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


def run_launched(ctx: StageContext, stage, inputs: dict[str, StageOutput], out: Path, run_id: str) -> dict[str, float]:
    """Run the stage's body on resources.processes processes; returns rank 0's metrics."""
    launch = out / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "error.json"):
        (launch / stale).unlink(missing_ok=True)
    job = {"type": stage.type, "name": stage.name, "params": stage.params.model_dump(mode="json"), "out": str(out),
           "inputs": {slot: dataclasses.asdict(o) for slot, o in inputs.items()}, "run_id": run_id,
           "tracking_uri": ctx.tracker.uri, "experiment": ctx.tracker.experiment, "store": str(ctx.store.root),
           "parent_run_id": ctx.parent_run_id}
    (launch / "job.json").write_text(json.dumps(job, indent=1))
    cmd = command(stage.resources, launch / "job.json")
    ctx.log(f"[{stage.name}] on {stage.resources.processes} process(es): {' '.join(cmd[2:])}")
    proc = subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT, *cmd], start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while proc.poll() is None:
            if STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            time.sleep(0.2)
    except BaseException:
        stop_group(proc)
        raise
    if proc.returncode != 0:
        error = launch / "error.json"
        if error.is_file():
            e = json.loads(error.read_text())
            raise _error_type(e["type"])(e["message"])
        raise RuntimeError(f"the {stage.resources.processes} processes of stage {stage.name!r} exited with code {proc.returncode}; "
                           "their output is above")
    metrics = json.loads((launch / "metrics.json").read_text())
    shutil.rmtree(launch)
    return metrics


class _NoTracking:
    """What ranks other than 0 log to: nothing (rank 0 reports the run)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _ScratchStore:
    """The store as ranks other than 0 see it: they read published outputs, and what they would publish
    (rank 0 publishes the same) goes to their scratch folder."""

    def __init__(self, store: Store, scratch: Path):
        self.store, self.scratch = store, scratch

    def final(self, stage_type: str, key: str) -> Path:
        return self.store.final(stage_type, key)

    def lookup(self, stage_type: str, key: str, log=None):
        return self.store.lookup(stage_type, key, log)

    def lock(self, stage_type: str, key: str, on_wait=None):
        return contextlib.nullcontext()  # rank 0 holds the real lock; what this rank would publish stays in scratch

    def partial(self, stage_type: str, key: str) -> Path:
        path = self.scratch / stage_type / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, stage_type: str, key: str, record: dict):
        return self.partial(stage_type, key), ""


def _write(path: Path, data: dict) -> None:
    """Atomically (several ranks may report an error at once: each writes its own temporary file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def worker(job_file: Path) -> int:
    """One process of a launched stage (rank from the launcher's environment)."""
    from accelerate import PartialState

    from tasks.stages import MODULES

    job = json.loads(job_file.read_text())
    state = PartialState(cpu=not _cuda())
    rank = state.process_index
    out, launch = Path(job["out"]), job_file.parent
    module = MODULES[job["type"]]
    params = module.Params.model_validate(job["params"])
    inputs = {slot: StageOutput(**o) for slot, o in job["inputs"].items()}
    store = Store(job["store"])
    if rank == 0:
        from tasks.tracking import Tracker  # MLflow: only the rank that reports

        ctx = StageContext(Tracker(job["tracking_uri"], job["experiment"]), store, job["parent_run_id"])
        body_out = out
    else:  # a scratch output folder sharing rank 0's checkpoints
        body_out = launch / f"rank-{rank}"
        body_out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        link = body_out / "checkpoints"
        if not link.is_symlink():
            shutil.rmtree(link, ignore_errors=True)
            link.symlink_to(out / "checkpoints", target_is_directory=True)
        ctx = StageContext(_NoTracking(), _ScratchStore(store, body_out / "store"), job["parent_run_id"], log=lambda _: None)
    try:
        metrics = module.run(ctx, params, inputs, body_out, job["run_id"])
    except BaseException as err:  # noqa: BLE001 - reported to the pipeline, which raises it as the stage's error
        if rank == 0 or not (launch / "error.json").exists():
            _write(launch / "error.json", {"type": type(err).__name__, "message": str(err), "rank": rank})
        raise
    finally:
        ctx.tracker.flush(job["run_id"])  # the training metrics rank 0 held back (the pipeline ends the run)
    state.wait_for_everyone()
    if rank == 0:
        _write(launch / "metrics.json", metrics)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(worker(Path(sys.argv[1])))
