"""The Prefect flow that runs a pipeline of pipelines.yaml as a DAG of stage tasks.

Stages start as soon as their inputs exist, so independent branches (PPO and DPO in the quickstart)
run concurrently where settings.concurrent_stages allows it (by default on 8 or more CPU cores), else
one after the other in file order. The flow only chains tasks; the work is in tasks/stages.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import PipelinesFile, SeveralErrors, preflight, raise_together
from flows import nodes  # noqa: F401 - the work-pool engine of resources.nodes
from tasks.stage import STOP, StageContext, execute
from tasks.stages import MODULES
from tasks.store import StageOutput, Store
from tasks.tracking import NOTE, Tracker, environment


class _ExplainedErrors(logging.Filter):
    """Errors whose message says what to do (bad data, a misbehaving reward function, divergence, a process of
    a launched stage that died) reach the user once, as the command line's sentence: Prefect's own ERROR lines
    about them (a repr of the exception, a traceback) and its "Finished in state Failed(...)" line, which
    quotes them again, are held back. The flow run's state in Prefect and the MLflow run's alignflow.error
    tag keep the message."""

    # (SeveralErrors: the flow's line quoting several stages' errors; each stage's own line is judged by itself)
    NAMES = ("DataError", "RewardFunctionError", "NonFiniteLossError", "LaunchError", "SeveralErrors")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and _explained(record.exc_info[1]):
            return False
        message = record.getMessage()
        return not ("exception" in message and any(f"{name}:" in message or f"{name}(" in message for name in self.NAMES))


def _explained(err: BaseException) -> bool:
    from alignment.rewards import RewardFunctionError
    from alignment.trainers.common import NonFiniteLossError
    from tasks.data import DataError
    from tasks.launch import LaunchError

    if isinstance(err, SeveralErrors):
        return all(_explained(e) for e in err.errors)
    return isinstance(err, (DataError, RewardFunctionError, NonFiniteLossError, LaunchError))


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_ExplainedErrors())


def run_stage(ctx: StageContext, stage, inputs: dict[str, StageOutput]) -> StageOutput:
    return execute(ctx, stage, MODULES[stage.type], inputs)


STAGE_TASK = task(run_stage, cache_policy=NO_CACHE, log_prints=True)  # training is never retried


def make_tracker(cfg: PipelinesFile) -> Tracker:
    workdir = Path(cfg.settings.workdir)
    return Tracker(cfg.settings.tracking_uri, cfg.settings.experiment, artifact_root=workdir / "mlartifacts",
                   description=experiment_description(cfg))


def experiment_description(cfg: PipelinesFile) -> str:
    """What MLflow's UI shows above the runs table: the pipelines, and how their runs are laid out."""
    lines = [
        "alignflow pipelines (pipelines.yaml). One parent run per pipeline run, named `<pipeline> <run id>`: its "
        "params are every stage's params as `<stage>.<param>` (e.g. `dpo.dpo.beta`), its metrics every stage's "
        "results as `<stage>/<metric>` (e.g. `evaluate_dpo/eval/gold_win_rate`), its tag `alignflow.overrides` "
        "the `--set` of the run, and its artifact `reward_vs_kl.png` the policies' reward against KL. "
        "Stages are nested runs with their per-step training curves. Select two parent runs and press Compare; "
        "filter one pipeline with `tags.alignflow.pipeline = 'quickstart'`.",
        "",
    ]
    lines += [f"- **{name}**: {spec.description or ' -> '.join(s.name for s in spec.stages)}" for name, spec in cfg.pipelines.items()]
    return "\n".join(lines)


def pipeline_params(cfg: PipelinesFile, stages: list) -> dict:
    """The parent run's params: settings and every stage's resolved params, `<stage>.<path>` once flattened."""
    return {"settings": cfg.settings.model_dump(mode="json"), **{s.name: s.params.model_dump(mode="json") for s in stages}}


def log_results(tracker: Tracker, parent: str, pipeline: str, stages: list, outputs: dict[str, StageOutput]) -> None:
    """On the parent run: every finished stage's final metrics as `<stage>/<metric>` and its duration (a
    cached stage's from when it was computed), the reward-KL figure of the evaluated policies and, when
    several were evaluated, their metrics side by side (comparison/methods.csv and .md)."""
    from tasks import plots
    from tasks.stage import HISTORY, stage_metrics

    finished = {name: stage_metrics(o.path) for name, o in outputs.items()}
    metrics = {}
    for name, o in outputs.items():
        metrics.update({f"{name}/{k}": v for k, v in finished[name].items()})
        if o.duration_s is not None:
            metrics[f"{name}/duration_s"] = o.duration_s
    tracker.log_metrics(parent, metrics, step=0)
    policies, references, trajectories, evaluations = [], {}, [], {}
    for stage in stages:
        if stage.type != "evaluate" or stage.name not in outputs:
            continue
        m = finished[stage.name]
        evaluations[stage.inputs["policy"]] = m
        rewards = {short: m[f"eval/{short}_reward_mean"] for short in plots.MEASURES if f"eval/{short}_reward_mean" in m}
        policies.append({"label": stage.inputs["policy"], "kl": m["eval/kl"], **rewards})
        references.setdefault(stage.inputs["reference"], {
            "label": stage.inputs["reference"], **{k: m[f"eval/ref_{k}_reward_mean"] for k in rewards}})
        source = outputs.get(stage.inputs["policy"])
        rows = plots.read_history(Path(source.path) / HISTORY) if source else []
        # a trainer that scored its own rollouts with the reward model and measured their KL (PPO; GRPO and
        # RLOO with a KL term, whose reward-model share is reward/reward_model)
        rm_key = "reward/reward_model" if rows and "reward/reward_model" in rows[0] else "reward" if source and source.type == "ppo" else None
        if rows and rm_key and all("kl" in r and rm_key in r for r in rows):
            trajectories.append({"label": f"{source.name} rollouts along training", "policy": stage.inputs["policy"],
                                 "kl": [r["kl"] for r in rows], "rm": [r[rm_key] for r in rows]})
    fig = plots.reward_kl_figure(policies, list(references.values()), trajectories, f"{pipeline} {parent[:8]}: reward against KL")
    if fig is not None:
        import matplotlib.pyplot as plt

        tracker.log_figure(parent, fig, "reward_vs_kl.png")
        plt.close(fig)
    if len(evaluations) > 1:  # several methods: one table of every evaluation metric, side by side
        import tempfile

        csv, md = plots.methods_table(evaluations)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "methods.csv").write_text(csv)
            (Path(tmp) / "methods.md").write_text(md)
            tracker.log_artifact(parent, tmp, "comparison")


def upstream_from_run(tracker: Tracker, from_run: str) -> dict[str, StageOutput]:
    """The stage outputs of an earlier pipeline run, by stage name, from its nested runs' tags."""
    outputs = {}
    for run in tracker.runs(f"tags.mlflow.parentRunId = '{from_run}'", max_results=500):
        t = run.data.tags
        if run.info.status != "FINISHED" or "alignflow.content_hash" not in t:
            continue
        stype, key = t["alignflow.stage_type"], t["alignflow.cache_key"]
        source_run = t.get("alignflow.reused_run_id", run.info.run_id)
        outputs[t["alignflow.stage"]] = StageOutput(
            t["alignflow.stage"], stype, "", key, t["alignflow.content_hash"], source_run, cached=True
        )
    return outputs


@flow(name="alignflow-pipeline", log_prints=True)
def pipeline_flow(cfg: PipelinesFile, pipeline: str, resolved_yaml: str, only: str | None = None, from_run: str | None = None,
                  overrides: list[str] | None = None) -> dict:
    """Run `pipeline`; with `only`, run that one stage on the outputs of the pipeline run `from_run`.
    `overrides` are the `--set` items already applied to `cfg`, recorded on the parent run."""
    if isinstance(cfg, dict):  # a deployment's parameters arrive as JSON: the dump of a validated config
        cfg = PipelinesFile.model_validate(cfg)
    spec = cfg.pipelines[pipeline]
    logger = get_run_logger()
    preflight(spec, only, cfg.settings.workdir)  # bad data fails here, before any run or file is written
    tracker = make_tracker(cfg)
    store = Store(cfg.settings.workdir)
    for run_id in tracker.fail_dead_runs():
        logger.warning(f"marked run {run_id} FAILED: its process died while it was RUNNING")
        crash_flow_run(tracker.client.get_run(run_id).data.tags.get(FLOW_RUN_TAG), logger)
    overrides = list(overrides or [])
    shown = " ".join(f"--set {o}" for o in overrides)
    from prefect.runtime import deployment, flow_run

    parent = tracker.start_run(pipeline, {
        "alignflow.pipeline": pipeline, "alignflow.overrides": "; ".join(overrides) or "none", FLOW_RUN_TAG: flow_run.id or "",
        **({"alignflow.deployment": deployment.name} if deployment.name else {}),
        NOTE: f"{spec.description}\n\n" + (f"Overrides: `{shown}`" if overrides else "No overrides: the pipeline as written.")
        + (f"\n\nOnly stage `{only}`, on the outputs of run {from_run}." if only else ""),
        **({"alignflow.only": only, "alignflow.from_run": from_run} if only else {})})
    tracker.rename_run(parent, f"{pipeline} {parent[:8]}" + (f" --only {only}" if only else ""))
    stages = [s for s in spec.stages if only in (None, s.name)]
    status = "FAILED"
    STOP.clear()
    futures = {}
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not None and hasattr(signal, "SIGTERM"):
        try:
            signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
    try:
        tracker.log_params(parent, {**pipeline_params(cfg, stages), **environment()})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pipelines.resolved.yaml"
            path.write_text(resolved_yaml)
            tracker.log_artifact(parent, path)
        ctx = StageContext(tracker, store, parent, log=logger.info)
        if only:
            results = _run_only(ctx, spec, only, tracker, from_run, store)
        else:
            concurrent = cfg.settings.concurrent_stages
            if concurrent is None:
                concurrent = (os.cpu_count() or 1) >= 8
            for stage in spec.stages:
                inputs = {slot: futures[src] for slot, src in stage.inputs.items()}
                futures[stage.name] = STAGE_TASK.with_options(name=stage.name).submit(ctx, stage, inputs)
                if not concurrent:
                    futures[stage.name].wait()
            results = stage_results(futures)
        tracker.set_tags(parent, {f"stage.{n}.run_id": o.run_id for n, o in results.items()})
        log_results(tracker, parent, pipeline, stages, results)
        status = "FINISHED"
        return {"parent_run_id": parent, "stages": {n: o.to_dict() for n, o in results.items()}}
    except KeyboardInterrupt:
        status = "KILLED"
        STOP.set()  # running stages stop at their next step and mark their runs KILLED
        for f in futures.values():
            f.wait(timeout=120)
        raise
    finally:
        if status != "FINISHED":  # failed or interrupted: the stages that finished still describe the run
            try:
                log_results(tracker, parent, pipeline, stages,
                            {n: f.result() for n, f in futures.items() if f.state.is_completed()})
            except Exception as err:  # noqa: BLE001 - the stage's own error is the one to report
                logger.warning(f"the finished stages' results could not be logged on the pipeline run: {err}")
        tracker.end_run(parent, status)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def stage_results(futures: dict) -> dict[str, StageOutput]:
    """Every stage's output, once all have ended. Where stages failed, their errors are raised together in
    pipeline order (one as itself, several as SeveralErrors); a stage that never ran because an input of it
    failed adds nothing (its input's error says it)."""
    for f in futures.values():
        f.wait()
    failed = [f.result(raise_on_failure=False) for f in futures.values() if f.state.is_failed() or f.state.is_crashed()]
    failed = [e for e in failed if isinstance(e, BaseException)]
    for e in failed:
        if isinstance(e, KeyboardInterrupt):  # a stopped stage: the run was interrupted, whatever else failed
            raise e
    raise_together(failed)
    return {name: f.result() for name, f in futures.items()}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_only(ctx: StageContext, spec, only: str, tracker: Tracker, from_run: str | None, store: Store) -> dict:
    stage = next((s for s in spec.stages if s.name == only), None)
    if stage is None:
        raise ValueError(f"no stage {only!r} in this pipeline; stages: {[s.name for s in spec.stages]}")
    if from_run is None:
        raise ValueError("--only needs --from-run RUN_ID: the pipeline run whose upstream outputs to use")
    upstream = upstream_from_run(tracker, from_run)
    inputs = {}
    for slot, src in stage.inputs.items():
        if src not in upstream:
            raise ValueError(f"run {from_run} has no finished stage {src!r} to feed {only}.{slot}")
        o = upstream[src]
        if store.lookup(o.type, o.key) is None:
            raise ValueError(f"the output of stage {src!r} of run {from_run} is not in {store.root} any more (or was "
                             "changed on disk since): run the whole pipeline to compute it again")
        inputs[slot] = dataclasses.replace(o, path=str(store.final(o.type, o.key)))
    result = STAGE_TASK.with_options(name=stage.name).submit(ctx, stage, inputs).result()
    return {only: result}


FLOW_RUN_TAG = "alignflow.prefect_flow_run"
"""The pipeline run's tag holding its Prefect flow run id: what to mark CRASHED if its process dies."""


def crash_flow_run(flow_run_id: str | None, logger) -> None:
    """Mark the Prefect flow run of a pipeline run whose process died (kill -9, a lost machine) CRASHED, as
    its MLflow runs are marked FAILED: Prefect cannot see the death of a process it does not supervise, and
    the flow run would show RUNNING in its UI for ever."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except Exception:  # noqa: BLE001 - ObjectNotFound: another Prefect server (or database) ran it
            return
        if state is not None and not state.is_final():
            client.set_flow_run_state(flow_run_id, Crashed(message="its process died while the flow was running"), force=True)
            logger.warning(f"marked Prefect flow run {flow_run_id} CRASHED: its process died while it was running")


def resolved_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False)
