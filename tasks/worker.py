"""One process of a launched stage (tasks/launch.py starts them with torchrun or accelerate launch):

    python -m tasks.worker <output>/.launch/job.json

Every process runs the stage's body; the trainers' `Accelerator` joins the process group. Rank 0 logs to the
stage's MLflow run and writes the stage's output folder; the other ranks write into scratch folders whose
`checkpoints` is rank 0's, so every rank saves into and resumes from the same checkpoints. An error is
written to the launch folder, where the pipeline's process reads it back as the stage's error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from tasks.context import StageContext
from tasks.stages import MODULES
from tasks.store import StageOutput, Store


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


def main(job_file: Path) -> int:
    """One process of a launched stage (rank from the launcher's environment)."""
    from accelerate import PartialState

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
    sys.exit(main(Path(sys.argv[1])))
