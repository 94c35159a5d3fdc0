"""Every MLflow call of alignflow lives here. The core library returns plain dicts of floats.

One parent run per pipeline run, one nested run per stage. Runs are addressed by id through
MlflowClient (never the thread-local "active run"), so parallel branches can log at the same time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_DATASET_LOCK = threading.Lock()
SCHEMA_ROWS = 1000  # rows a logged dataset's column types are inferred from
MAX_PARAM = 6000  # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)
CUT = " ...[cut: the full value is in pipelines.resolved.yaml]"
NOTE = "mlflow.note.content"  # what MLflow's UI shows as the description of a run or an experiment


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_value(value: Any) -> str:
    """A param as MLflow stores it: text, cut with a marker when longer than MLflow allows."""
    text = str(value)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - len(CUT)] + CUT


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


ENVIRONMENT_PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "prefect", "mlflow", "alignflow")


def environment() -> dict[str, str]:
    """What a run ran on: the Python, the versions of the packages that make or track its numbers, and the
    git commit. Logged as the pipeline run's `env.*` params, so MLflow's compare view and `alignflow runs
    compare` show where two runs' environments differ."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    env = {"env.python": platform.python_version(), "env.git_commit": git_commit()}
    for name in ENVIRONMENT_PACKAGES:
        try:
            env[f"env.{name}"] = version(name)
        except PackageNotFoundError:
            env[f"env.{name}"] = "not installed"
    return env


def prepare_sqlite(uri: str) -> None:
    """A new local sqlite store starts as a copy of an empty one at this MLflow version's schema (MLflow
    builds its tables with some 60 migrations, 2-3 s for every new store); WAL journal, so parallel
    writers wait instead of failing on locks."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and (template := _empty_store()) is not None:
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        shutil.copyfile(template, partial)
        os.replace(partial, path)
    with sqlite3.connect(path, timeout=30) as con:
        con.execute("PRAGMA journal_mode=WAL")


def _empty_store() -> Path | None:
    """An empty MLflow sqlite store with every table, made by MLflow itself once per MLflow version in the
    user's cache folder ($XDG_CACHE_HOME or ~/.cache, then alignflow/). None where it cannot be written:
    the new store is then made by MLflow in place, as without it."""
    import mlflow

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignflow"
    template = folder / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    try:
        folder.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=folder))
        try:
            made = scratch / "mlflow.db"
            client = MlflowClient(tracking_uri=f"sqlite:///{made}")
            client.search_experiments()  # (the tables are created, and committed, when the store opens)
            engine = getattr(getattr(client._tracking_client, "store", None), "engine", None)
            if engine is not None:
                engine.dispose()  # its connections closed before the file moves
            os.replace(made, template)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    except OSError:
        return None
    return template


@contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a local sqlite store (`<file>.lock`) while it is opened; nothing for a server."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, artifact_root: str | Path | None = None,
                 description: str | None = None):
        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        self.experiment = experiment
        self._pending: dict[str, list[Metric]] = {}  # run id -> training-step metrics not written yet
        self._written: dict[str, float] = {}  # run id -> time.monotonic() of its last write
        self._pending_lock = threading.Lock()
        with _store_lock(self.uri):  # two processes opening a new store would both create its tables and experiment
            prepare_sqlite(self.uri)
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)  # (creates and migrates the tables of a new store)
            if exp is None:
                # a local store keeps artifacts beside the stage outputs; a tracking server keeps them itself (its
                # --artifacts-destination, reached through the server), where every machine that uses it reads them
                served = self.uri.startswith(("http://", "https://", "databricks"))
                location = Path(artifact_root).resolve().as_uri() if artifact_root and not served else None
                # the tag makes MLflow 3's UI open the experiment on its training-runs view
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
                )
                tags = {}
            else:
                self.experiment_id, tags = exp.experiment_id, exp.tags
        if description and tags.get(NOTE) != description:
            self.client.set_experiment_tag(self.experiment_id, NOTE, description)

    # -- runs -------------------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = {**tags, "alignflow.pid": str(os.getpid()), "alignflow.host": socket.gethostname(), "git_commit": git_commit()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)

    def rename_run(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    def log_params(self, run_id: str, params: dict) -> None:
        """Nested dicts flattened with dots; values longer than MLflow allows are cut with a marker."""
        items = [Param(k, param_value(v)) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, every_s: float = 0.0) -> None:
        """Metrics at a step. every_s > 0 (training steps): held back and written together once every_s
        seconds have passed since the run's last write; end_run and flush write the rest. A write to a
        sqlite store costs 10-20 ms, which was about 10 s of the quickstart's 600 training steps."""
        import time

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        with self._pending_lock:
            pending = self._pending.setdefault(run_id, [])
            pending += items
            if every_s and time.monotonic() - self._written.get(run_id, float("-inf")) < every_s:
                return
            self._written[run_id] = time.monotonic()
            items, self._pending[run_id] = pending, []
        self._write_metrics(run_id, items)

    def flush(self, run_id: str) -> None:
        """Write the metrics log_metrics held back for this run."""
        with self._pending_lock:
            items = self._pending.pop(run_id, [])
            self._written.pop(run_id, None)
        self._write_metrics(run_id, items)

    def _write_metrics(self, run_id: str, items: list[Metric]) -> None:
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact, which MLflow's run page shows as a picture."""
        self.client.log_figure(run_id, figure, artifact_file)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dataset(self, run_id: str, df, source: str, name: str, digest: str, context: str) -> None:
        """mlflow.log_input with the dataset's content digest."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            # MLflow's own noise, not the user's: its registry holds LocalArtifactDatasetSource twice, and the
            # schema hint is about serving a model on this data, which nobody does with a training table
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted", category=UserWarning)
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36])
            # the column types, read from the first rows: MLflow reads every value of every column (3-4 s
            # for the quickstart's tables), and a table written through a pandera contract has one type a column
            ds.schema = mlflow.data.from_pandas(df.head(SCHEMA_ROWS), source=source).schema
            inputs = [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        # Two branches logging the same dataset race on MLflow's check-then-insert of the dataset row:
        # serialise within the process, and retry once (the row then exists) across processes.
        with _DATASET_LOCK:
            try:
                self.client.log_inputs(run_id, inputs)
            except Exception:  # noqa: BLE001 - MlflowException wrapping sqlite's IntegrityError
                self.client.log_inputs(run_id, inputs)

    def artifact_uri(self, run_id: str) -> str | None:
        """The run's artifact root; None when this tracking store does not hold the run (a stage output
        the cache kept from runs tracked elsewhere, or from before mlflow.db was deleted)."""
        try:
            return self.client.get_run(run_id).info.artifact_uri
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None

    def output_uri(self, run_id: str, path: str | Path) -> str:
        """Where a stage output's files are: its run's `output` artifacts, or its folder in the stage
        store when this tracking store does not hold that run."""
        root = self.artifact_uri(run_id)
        return f"{root}/output" if root else Path(path).resolve().as_uri()

    # -- hygiene ----------------------------------------------------------------------------------
    def fail_dead_runs(self) -> list[str]:
        """Mark RUNNING runs whose process died (same host, pid gone) as FAILED. Returns their ids."""
        dead = []
        host = socket.gethostname()
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
            tags = run.data.tags
            if tags.get("alignflow.host") != host:
                continue
            pid = int(tags.get("alignflow.pid", "0") or 0)
            if pid == os.getpid() or _alive(pid):
                continue
            self.client.set_terminated(run.info.run_id, status="FAILED")
            self.client.set_tag(run.info.run_id, "alignflow.failure", "process died while the run was RUNNING")
            dead.append(run.info.run_id)
        return dead

    def runs(self, filter_string: str = "", max_results: int = 100) -> Iterable:
        return self.client.search_runs([self.experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"])

    def register(self, run_id: str, output_path: str | Path, name: str) -> str:
        """Register the model of a stage output (its run's `output/model` artifacts, or its folder in the
        stage store when this tracking store does not hold that run). Returns the version."""
        try:
            self.client.get_registered_model(name)
        except Exception:  # noqa: BLE001 - mlflow raises its own RestException for a missing model
            self.client.create_registered_model(name)
        root = self.artifact_uri(run_id)
        source = f"{root}/output/model" if root else (Path(output_path).resolve() / "model").as_uri()
        version = self.client.create_model_version(name, source, run_id=run_id if root else None)
        return version.version


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
