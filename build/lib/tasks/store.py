"""Content-addressed stage outputs: the cache across runs and the crash safety of every stage.

A stage's output lives in `<workdir>/stages/<type>/<key>/`, where key = hash(stage type, its params,
the content hashes of its inputs, the code version). While the stage runs it writes to
`<key>.partial/` (its checkpoints live there too, so a killed stage resumes); when it finishes,
`_SUCCESS.json` (with the content hash of the files) is written and the folder is renamed to `<key>/`.
A folder without `_SUCCESS.json` is never read, so no partial artifact is ever used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

SUCCESS = "_SUCCESS.json"
SKIP_IN_HASH = {"checkpoints", SUCCESS}


@dataclass(frozen=True)
class StageOutput:
    """What a stage hands downstream: where its files are and what they are."""

    name: str  # stage name in the pipeline
    type: str  # stage type
    path: str  # completed output folder
    key: str  # cache key (inputs + params + code)
    content_hash: str  # sha256 of the output files
    run_id: str  # MLflow run that produced the output
    cached: bool = False  # True when this run reused an earlier output
    duration_s: float | None = None  # seconds the stage's work took when it was computed (cached: back then)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_hash(path: Path) -> str:
    """sha256 over the relative names and contents of every file (checkpoints excluded)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        if rel.parts[0] in SKIP_IN_HASH:
            continue
        h.update(str(rel).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the core library and task sources: a code change invalidates cached stages."""
    import alignment

    h = hashlib.sha256(alignment.__version__.encode())
    root = Path(alignment.__file__).parent.parent
    for package in ("alignment", "tasks"):
        for f in sorted((root / package).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def runtime_versions() -> dict[str, str]:
    """The versions of the libraries that compute a stage's numbers: torch's kernels and transformers' models
    change outputs between releases, so an upgrade computes every stage again instead of reusing old ones."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers")}


def stage_key(stage_type: str, params: dict, input_hashes: dict[str, str]) -> str:
    payload = json.dumps(
        {"type": stage_type, "params": params, "inputs": input_hashes, "code": code_version(), "runtime": runtime_versions()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Store:
    def __init__(self, workdir: str | Path):
        self.root = Path(workdir).resolve() / "stages"

    def final(self, stage_type: str, key: str) -> Path:
        return self.root / stage_type / key

    def partial(self, stage_type: str, key: str) -> Path:
        path = self.root / stage_type / f"{key}.partial"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def lock(self, stage_type: str, key: str, on_wait: Callable[[], None] | None = None):
        """Hold the entry `stage_type/key` for computing it: an exclusive lock on `.locks/<type>-<key>` (flock:
        other processes and other threads wait; the kernel releases it when a process dies, even by kill -9)."""
        folder = self.root / ".locks"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{stage_type}-{key}", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def lookup(self, stage_type: str, key: str, log: Callable[[str], None] | None = None) -> dict | None:
        """The success record of a completed output whose files still have the content hash they were
        published with, or None. An output changed on disk since (an edited or truncated file, a file added
        or removed) is never reused: it is moved aside to `<key>.tampered-<time>/`, kept for a look, reported
        through `log` (else the `alignflow` logger), and the caller computes it again."""
        final = self.final(stage_type, key)
        marker = final / SUCCESS
        if not marker.is_file():
            return None
        record = json.loads(marker.read_text())
        if dir_hash(final) == record.get("content_hash"):
            return record
        aside = final.with_name(f"{key}.tampered-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(final, aside)
        (log or logging.getLogger("alignflow").warning)(
            f"the stored {stage_type} output {final} no longer has the content hash it was written with (a file "
            f"was changed, added or removed since): not reused, moved to {aside.name}, and computed again")
        return None

    def publish(self, stage_type: str, key: str, record: dict) -> tuple[Path, str]:
        """Seal a partial folder: hash it, write the success record, rename. Returns (path, hash)."""
        partial, final = self.partial(stage_type, key), self.final(stage_type, key)
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        content_hash = dir_hash(partial)
        tmp = partial / f".{SUCCESS}.tmp"
        tmp.write_text(json.dumps({**record, "content_hash": content_hash}, indent=2))
        os.replace(tmp, partial / SUCCESS)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return final, content_hash
