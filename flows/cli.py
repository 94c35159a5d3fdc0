"""The `alignflow` command line. Each command loads pipelines.yaml, picks a pipeline and calls one flow."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import typer

from flows.label_cli import fail, label_app

app = typer.Typer(
    help="alignflow: declarative, reproducible RLHF pipelines (SFT, preferences, reward model, PPO / DPO, evaluation).\n\n"
    "Quick start:  alignflow run quickstart",
    no_args_is_help=True,
    add_completion=False,
)
runs_app = typer.Typer(help="List and compare pipeline runs in the MLflow store.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(label_app, name="label")

SHIPPED = Path(__file__).parent / "pipelines.yaml"  # the repository's pipelines.yaml, packaged
ConfigOpt = typer.Option(None, "--config", "-c", help="pipelines.yaml to use (default: ./pipelines.yaml, else the packaged one).")


def config_path(config: Path | None) -> Path:
    """-c FILE when given, else ./pipelines.yaml, else the packaged copy of the shipped pipelines."""
    if config is not None:
        return config
    return Path("pipelines.yaml") if Path("pipelines.yaml").is_file() else SHIPPED.resolve()


def load_or_exit(config: Path | None, pipeline: str | None = None, overrides: list[str] | None = None):
    from flows.config import ConfigError, load

    try:
        return load(config_path(config), pipeline, overrides)
    except ConfigError as err:
        fail(f"invalid pipeline config: {err}")


def quiet_output() -> None:
    """What `alignflow run` prints: one line a stage (its `[name] done: ...`), the training progress bars on a
    terminal, and the summary. Held back: Prefect's line per task state (the Prefect UI has them) and the
    loading and saving bars of transformers (a tiny model loads in milliseconds, a large one is logged)."""
    import logging

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def reward_function_named(err: Exception) -> str:
    return " (" + err.__notes__[0] + ")" if getattr(err, "__notes__", None) else ""


def where_in(err: Exception) -> str:
    """" in stage 'ppo' (MLflow run ...)": where a stage's error happened (the lifecycle's note), or ""."""
    return " in " + err.__notes__[0] if getattr(err, "__notes__", None) else ""


def unexpected(pipeline: str, err: BaseException) -> str:
    """The sentence for an error no handler knows: what it says (its first line), where it happened, and where
    its traceback is; running out of memory gets what to do instead."""
    where = where_in(err)
    # torch.OutOfMemoryError on a GPU; a RuntimeError from torch's CPU allocator
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err):
        return (f"pipeline {pipeline!r} stopped{where}: it ran out of memory. Lower the stage's batch_size, "
                "micro_batch_tokens or max_length, or turn on gradient_checkpointing in its train params (or train "
                "LoRA adapters)")
    keyed = isinstance(err, KeyError) and err.args and isinstance(err.args[0], str)  # a KeyError's str is a repr
    said = err.args[0] if keyed else str(err)
    text = next((line.strip() for line in said.splitlines() if line.strip()), "an error without a message")
    help_ = "the MLflow run's tag alignflow.traceback holds the traceback" if where else "this is a bug: please report it"
    return f"pipeline {pipeline!r} failed{where}: {text.rstrip('.')} (unexpected: {help_})"


def report(pipeline: str, err: BaseException) -> tuple[str, int]:
    """(what a user reads, the exit code) for an error of a run: 2 for bad input, 1 otherwise."""
    from alignment.rewards import RewardFunctionError
    from tasks.data import DataError

    if isinstance(err, DataError):
        return f"bad input data: {err}", 2
    if isinstance(err, RewardFunctionError):
        return f"bad reward function{reward_function_named(err)}: {err}", 2
    from alignment.trainers.common import NonFiniteLossError  # (torch: not imported for a pre-flight's report)
    from tasks.launch import LaunchError

    if isinstance(err, NonFiniteLossError):
        return f"pipeline {pipeline!r} stopped{where_in(err)}: training diverged: {err}", 1
    if isinstance(err, LaunchError):
        return f"pipeline {pipeline!r} stopped{where_in(err)}: {err}", 1
    return unexpected(pipeline, err), 1


def fail_with(pipeline: str, err: BaseException) -> None:
    """Exit with the report of `err`; for several errors (SeveralErrors), every one's report, one paragraph
    each in pipeline order, led by the stage it happened in where a stage's note says so, and the first
    one's exit code."""
    from flows.config import SeveralErrors

    errors = err.errors if isinstance(err, SeveralErrors) else [err]  # (not any .errors: pydantic's is a method)
    reports = [report(pipeline, e) for e in errors]
    if len(errors) > 1:
        typer.secho(f"pipeline {pipeline!r}: {len(errors)} problems", err=True, fg="red")
        reports = [(f"{e.__notes__[0]}: {text}" if getattr(e, "__notes__", None) and where_in(e) not in text else text, code)
                   for e, (text, code) in zip(errors, reports)]
    fail("\n\n".join(text for text, _ in reports), reports[0][1])


HEADLINE = ("eval/kl", "eval/gold_win_rate", "eval/rm_win_rate", "eval/implicit_accuracy", "eval/pref_accuracy",
            "eval/banned_word_rate", "eval/accuracy", "eval/gold_accuracy")
"""The evaluation metrics the run summary shows a stage by (all of them are in MLflow and metrics.json)."""


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="Pipeline name in pipelines.yaml, e.g. quickstart."),
    set_: list[str] = typer.Option([], "--set", help="Override a param: STAGE.PARAM=VALUE (dots reach nested params) or settings.KEY=VALUE. Repeatable."),
    only: str = typer.Option(None, "--only", help="Re-run just this stage ..."),
    from_run: str = typer.Option(None, "--from-run", help="... on the upstream outputs of this earlier pipeline run id."),
    config: Path = ConfigOpt,
) -> None:
    """Run a pipeline end to end (finished, unchanged stages are reused from the cache).

    Examples:

      alignflow run quickstart

      alignflow run quickstart --set dpo.dpo.beta=0.3 --set settings.seed=1

      alignflow run quickstart --only dpo --from-run 3f2a...
    """
    cfg, raw = load_or_exit(config, pipeline, set_)  # a mistake in the file is reported before anything heavy loads
    if only and not from_run:
        fail("--only needs --from-run RUN_ID (see `alignflow runs list`)")
    from alignment.rewards import RewardFunctionError
    from flows.config import SeveralErrors, preflight
    from tasks.data import DataError

    try:
        preflight(cfg.pipelines[pipeline], only, cfg.settings.workdir)  # bad data fails before Prefect, MLflow or any file
    except (DataError, RewardFunctionError, SeveralErrors) as err:
        fail_with(pipeline, err)
    from flows import server

    temporary = server.start()  # boots on the other core while the libraries below import
    from flows.pipeline import pipeline_flow, resolved_yaml
    import alignment.models  # noqa: F401 - transformers' model code (about 6 s on 2 cores): now, not in the first stage
    quiet_output()
    try:
        if temporary is not None:
            temporary.wait_ready()
    except server.ServerError as err:
        fail(str(err), 1)
    except KeyboardInterrupt:
        fail("interrupted before the pipeline began: nothing was run", 130)
    try:
        result = pipeline_flow(cfg, pipeline, resolved_yaml(raw), only=only, from_run=from_run, overrides=set_)
    except KeyboardInterrupt:
        fail("interrupted: the running stage was marked KILLED; run the same command again to resume", 130)
    except Exception as err:  # noqa: BLE001 - the message, not a traceback, is what a user needs
        fail_with(pipeline, err)
    typer.echo(f"pipeline run {result['parent_run_id']}")
    failed_gates = []
    for name, out in result["stages"].items():
        metrics_file = Path(out["path"]) / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in HEADLINE if k in metrics)
        typer.echo(f"  {name:14s} {'cached ' if out['cached'] else ''}{out['path']}  {shown}")
        gates_file = Path(out["path"]) / "gates.json"
        if gates_file.is_file() and not json.loads(gates_file.read_text())["passed"]:
            failed_gates.append(f"{name}: " + "; ".join(json.loads(gates_file.read_text())["failed"]))
    run_id = result["parent_run_id"]
    typer.echo(f"every metric, curve and artifact: `alignflow ui`, run '{pipeline} {run_id}' of experiment "
               f"{cfg.settings.experiment!r}; against another run: `alignflow runs compare {run_id} OTHER_RUN`")
    if failed_gates:
        fail("EVALUATION GATES FAILED (the policy was not registered):\n  " + "\n  ".join(failed_gates), 3)


@app.command()
def validate(config: Path = typer.Argument(None, help="The pipelines.yaml to check (default: as for run).")) -> None:
    """Check a pipelines.yaml without running anything; prints its pipelines or every problem found.

    Example: alignflow validate pipelines.yaml
    """
    cfg, _ = load_or_exit(config)
    for name, spec in cfg.pipelines.items():
        typer.echo(f"{name}: {' -> '.join(s.name for s in spec.stages)}")
        if spec.description:
            typer.echo(f"  {spec.description}")


def tracker_for(config: Path | None):
    from flows.pipeline import make_tracker

    cfg, _ = load_or_exit(config)
    return make_tracker(cfg)


@runs_app.command("list")
def runs_list(config: Path = ConfigOpt, limit: int = typer.Option(20, help="How many pipeline runs to show.")) -> None:
    """Pipeline runs, newest first: id, status, pipeline, start time.

    Example: alignflow runs list --limit 5
    """
    from datetime import datetime

    tracker = tracker_for(config)
    for r in tracker.runs("tags.`alignflow.pipeline` != ''", max_results=limit):
        started = datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{r.info.run_id}  {r.info.status:9s} {r.data.tags.get('alignflow.pipeline', ''):14s} {started}  {r.info.run_name}")


@runs_app.command("compare")
def runs_compare(
    run_a: str = typer.Argument(..., help="A pipeline run id (`alignflow runs list`)."),
    run_b: str = typer.Argument(None, help="Another pipeline run id; without it, RUN_A's evaluated policies side by side."),
    all_params: bool = typer.Option(False, "--all", help="Also show the params that are equal."),
    config: Path = ConfigOpt,
) -> None:
    """Two pipeline runs side by side, as MLflow's compare view shows them: the params that differ
    (`<stage>.<param>`) and every result (`<stage>/<metric>`); differences are marked *. With one run: its
    evaluations side by side, a column per evaluate stage (e.g. the four methods of compare-methods).

    Examples: alignflow runs compare 3f2a... 9c1b...      alignflow runs compare 3f2a...
    """
    tracker = tracker_for(config)
    if run_b is None:
        _compare_evaluations(tracker, run_a)
        return
    try:
        a, b = tracker.client.get_run(run_a).data, tracker.client.get_run(run_b).data
    except Exception:  # noqa: BLE001 - MLflow's RestException for an unknown id
        fail(f"no run {run_a!r} or {run_b!r} in {tracker.uri}; `alignflow runs list` shows the pipeline runs")
    width = max([len(k) for k in (*a.params, *b.params, *a.metrics, *b.metrics)] + [10])
    typer.echo(f"  {'':{width}s} {run_a[:8]:>14s} {run_b[:8]:>14s}")
    for title, x, y in (("params", a.params, b.params), ("metrics", a.metrics, b.metrics)):
        keys = [k for k in sorted(set(x) | set(y)) if all_params or title == "metrics" or x.get(k) != y.get(k)]
        typer.secho(title + ("" if all_params or title == "metrics" else " that differ (--all: every param)"), bold=True)
        for k in keys:
            va, vb = _shown(x.get(k)), _shown(y.get(k))
            typer.echo(f"{'*' if va != vb else ' '} {k:{width}s} {va:>14s} {vb:>14s}")


def _compare_evaluations(tracker, run_id: str) -> None:
    try:
        metrics = tracker.client.get_run(run_id).data.metrics
    except Exception:  # noqa: BLE001 - MLflow's RestException for an unknown id
        fail(f"no run {run_id!r} in {tracker.uri}; `alignflow runs list` shows the pipeline runs")
    evals: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, metric = key.partition("/")
        if metric.startswith("eval/"):
            evals.setdefault(stage, {})[metric] = value
    evals = {stage: m for stage, m in evals.items() if "eval/kl" in m}  # policies' evaluations (not the reward model's)
    if not evals:
        fail(f"run {run_id} has no evaluations to compare; give a second run to compare two runs")
    names = sorted(evals)
    rows = sorted({m for e in evals.values() for m in e})
    width, col = max(len(m) for m in rows), max(14, *(len(n) + 1 for n in names))
    typer.echo(f"  {'':{width}s}" + "".join(f"{n:>{col}s}" for n in names))
    for m in rows:
        typer.echo(f"  {m:{width}s}" + "".join(f"{_shown(evals[n].get(m)):>{col}s}" for n in names))


def _shown(value) -> str:
    """A param as stored; a metric rounded as MLflow's UI rounds it (its Utils.formatMetric), so that the
    numbers here are the numbers in the compare view."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("-" if value < 0 else "") + "Infinity"
    if abs(value) < 1e-3:  # JavaScript's toExponential(3): 2.539e-9
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    rounded = math.floor(value * 10**digits + 0.5) / 10**digits  # Math.round: halves go up
    return f"{rounded:.{digits}f}".rstrip("0").rstrip(".")


@app.command()
def lineage(run_id: str = typer.Argument(..., help="A pipeline run id or a stage run id."), config: Path = ConfigOpt) -> None:
    """The tree of stages and data behind a run: which run's outputs fed which stage.

    Example: alignflow lineage 3f2a...
    """
    tracker = tracker_for(config)
    run = tracker.client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId", run_id)
    children = {r.data.tags.get("alignflow.stage"): r for r in tracker.runs(f"tags.mlflow.parentRunId = '{parent}'", max_results=500)}
    typer.echo(f"pipeline run {parent} ({tracker.client.get_run(parent).data.tags.get('alignflow.pipeline', '?')})")
    for stage, r in children.items():
        t = r.data.tags
        cache = " (cached: output of " + t["alignflow.reused_run_id"] + ")" if "alignflow.reused_run_id" in t else ""
        typer.echo(f"  {stage} [{t.get('alignflow.stage_type')}] run {r.info.run_id} {r.info.status}{cache}")
        typer.echo(f"      output sha256 {t.get('alignflow.content_hash', '-')[:16]}")
        for key in sorted(k for k in t if k.startswith("lineage.") and k.endswith(".stage")):
            slot = key.split(".")[1]
            typer.echo(f"      <- {slot}: {t[key]} (run {t.get(f'lineage.{slot}.run_id')}, sha256 {t.get(f'lineage.{slot}.content_hash', '')[:16]})")


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port of the MLflow UI."),
    prefect: bool = typer.Option(False, "--prefect", help="Also start a local Prefect server and its UI (flow runs, schedules)."),
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server with --prefect."),
    config: Path = ConfigOpt,
) -> None:
    """Start the MLflow UI on the pipeline's tracking store (Ctrl-C stops it).

    With --prefect, a local Prefect server starts too; point runs at it with
    `export PREFECT_API_URL=http://127.0.0.1:4200/api` so flow runs and deployments show there.

    Example: alignflow ui --port 5000 --prefect
    """
    import subprocess
    import time

    from tasks.tracking import DEFAULT_TRACKING_URI

    cfg, _ = load_or_exit(config)
    uri = cfg.settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    # one person's UI: 2 workers instead of MLflow's 4 (each a full interpreter; they start in half the time)
    mlflow_cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "2"]
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} for {uri}\n"
               f"  'Model training' (top left) lists the experiment's runs; to compare two pipeline runs, search\n"
               f"  tags.alignflow.pipeline = 'quickstart', tick two runs, press Compare, switch on 'Show diff only'")
    if not prefect:
        os.execv(sys.executable, mlflow_cmd)
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    typer.echo(f"Prefect UI on http://127.0.0.1:{prefect_port} (export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api)")
    procs = [subprocess.Popen(prefect_cmd), subprocess.Popen(mlflow_cmd)]
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def deployment_parameters(pipeline: str, config: Path | None, set_: list[str]) -> tuple[dict, str]:
    """The flow's parameters for a deployment (the resolved config, validated now) and its description."""
    from flows.pipeline import resolved_yaml

    cfg, raw = load_or_exit(config, pipeline, set_)
    params = {"cfg": cfg.model_dump(mode="json"), "pipeline": pipeline, "resolved_yaml": resolved_yaml(raw), "overrides": list(set_)}
    return params, cfg.pipelines[pipeline].description or f"alignflow pipeline {pipeline}"


def build_deployment(pipeline: str, cron: str | None, config: Path | None, set_: list[str], interval: float | None = None):
    """A Prefect deployment of pipeline_flow with the resolved config as its parameters (served here)."""
    from flows.pipeline import pipeline_flow

    parameters, description = deployment_parameters(pipeline, config, set_)
    return pipeline_flow.to_deployment(name=f"alignflow-{pipeline}", cron=cron, interval=interval, parameters=parameters,
                                       description=description, tags=["alignflow", pipeline])


def deploy_to_pool(pipeline: str, pool: str, cron: str | None, source: str | None, config: Path | None, set_: list[str],
                   interval: float | None = None):
    """Register a deployment whose runs a work pool's workers pick up (returns its id)."""
    from flows.pipeline import pipeline_flow

    parameters, description = deployment_parameters(pipeline, config, set_)
    remote = pipeline_flow.from_source(source=source or str(Path(__file__).resolve().parents[1]),
                                       entrypoint="flows/pipeline.py:pipeline_flow")
    return remote.deploy(name=f"alignflow-{pipeline}", work_pool_name=pool, cron=cron, interval=interval, parameters=parameters,
                         description=description, tags=["alignflow", pipeline], build=False, push=False,
                         print_next_steps=False)


@app.command()
def deploy(
    pipeline: str = typer.Argument(..., help="Pipeline name in pipelines.yaml."),
    cron: str = typer.Option(None, "--cron", help='Schedule, e.g. "0 3 * * *" (every day at 03:00); without it, runs start on demand.'),
    interval: float = typer.Option(None, "--interval", min=1, help="Or a run every this many seconds (e.g. 21600: every 6 hours)."),
    pool: str = typer.Option(None, "--pool", help="A Prefect work pool: its workers (process, Docker, Kubernetes) run the pipeline."),
    source: str = typer.Option(None, "--source", help="With --pool: where workers get this code, a git URL or a folder they "
                                                       "can read (default: this checkout's folder)."),
    set_: list[str] = typer.Option([], "--set", help="Param overrides baked into the deployment (as for `run`)."),
    config: Path = ConfigOpt,
) -> None:
    """Deploy a pipeline to Prefect: served from this process on a schedule, or to a work pool's workers.

    Point it at a Prefect server first (`prefect server start`, then
    `export PREFECT_API_URL=http://127.0.0.1:4200/api`); deployments, schedules and runs show in the
    Prefect UI. Finished stages are reused between runs, as with `run`.

    \b
    alignflow deploy quickstart --cron "0 3 * * *"      serve here (runs until Ctrl-C)
    alignflow deploy quickstart --interval 21600        the same, every 6 hours
    alignflow deploy quickstart --pool gpus             register; workers on the GPU hosts run it:
        prefect work-pool create gpus --type process    (once)
        prefect worker start --pool gpus                (on each host)
        prefect deployment run alignflow-pipeline/alignflow-quickstart
    """
    if cron is not None and interval is not None:
        fail("give --cron or --interval, not both")
    schedule = f" on schedule {cron!r}" if cron else f" every {interval:g} s" if interval else ""
    if pool is not None:
        deployment_id = deploy_to_pool(pipeline, pool, cron, source, config, set_, interval)
        typer.echo(f"deployment alignflow-pipeline/alignflow-{pipeline} ({deployment_id}) in work pool {pool!r}{schedule}")
        typer.echo(f"start a worker on each host: prefect worker start --pool {pool}")
        typer.echo(f"start a run now: prefect deployment run alignflow-pipeline/alignflow-{pipeline}")
        return
    if not schedule:
        fail("give --cron or --interval to serve the pipeline here on a schedule, or --pool to deploy it to a work pool's workers")
    from prefect import serve

    deployment = build_deployment(pipeline, cron, config, set_, interval)
    typer.echo(f"serving deployment alignflow-pipeline/{deployment.name}{schedule} (Ctrl-C stops)")
    serve(deployment)


@app.command()
def version() -> None:
    """Print the version."""
    from alignment import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
