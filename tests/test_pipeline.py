"""Pipelines end to end on a real Prefect (temporary local server) and a real MLflow sqlite store:
metrics and lineage on every stage, the cache across runs, stage re-runs, bad config."""

import json
import os
import re
import signal
import urllib.request
import time
from pathlib import Path

import subprocess
import sys

import pytest
import yaml

from flows.config import ConfigError, load
from conftest import WITH_CTRL_C
from told import told

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
ALIGNFLOW = str(Path(sys.executable).parent / "alignflow")

TINY = {
    "settings": {"seed": 0, "workdir": "runs", "experiment": "test"},
    "pipelines": {
        "tiny": {
            "stages": [
                {"name": "world", "type": "world", "params": {
                    "demonstrations": 64, "train_prompts": 48, "test_prompts": 16,
                    "model": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64}}},
                {"name": "sft", "type": "sft", "inputs": {"policy": "world", "demonstrations": "world"},
                 "params": {"sft": {"max_length": 128, "train": {"max_steps": 4, "batch_size": 16, "lr": 0.003}}}},
                {"name": "sample", "type": "sample", "inputs": {"policy": "sft", "prompts": "world"},
                 "params": {"prompts": 24, "samples_per_prompt": 2, "sampling": {"max_new_tokens": 12}}},
                {"name": "label", "type": "label", "inputs": {"samples": "sample", "world": "world"},
                 "params": {"labeler": "simulated"}},
                {"name": "reward_model", "type": "train_reward_model", "inputs": {"preferences": "label", "base": "sft", "world": "world"},
                 "params": {"reward": {"max_length": 128, "train": {"max_steps": 3, "batch_size": 8}}}},
                {"name": "dpo", "type": "dpo", "inputs": {"preferences": "label", "policy": "sft"},
                 "params": {"dpo": {"max_length": 128, "train": {"max_steps": 3, "batch_size": 8}}}},
                {"name": "ppo", "type": "ppo", "inputs": {"policy": "sft", "reward_model": "reward_model", "prompts": "world"},
                 "params": {"prompts": 32, "ppo": {"iterations": 2, "rollout_batch_size": 8, "minibatch_size": 4,
                                                   "sampling": {"max_new_tokens": 12}}}},
                {"name": "evaluate_dpo", "type": "evaluate",
                 "inputs": {"policy": "dpo", "reference": "sft", "reward_model": "reward_model", "preferences": "label",
                            "prompts": "world", "world": "world"},
                 "params": {"prompts": 16, "sampling": {"max_new_tokens": 12}, "gates": {"eval/kl": "<= 100"}, "register_as": "tiny-dpo"}},
                {"name": "evaluate_ppo", "type": "evaluate",
                 "inputs": {"policy": "ppo", "reference": "sft", "reward_model": "reward_model", "prompts": "world", "world": "world"},
                 "params": {"prompts": 16, "sampling": {"max_new_tokens": 12}, "gates": {"eval/gold_win_rate": ">= 1.01"},
                            "register_as": "tiny-ppo"}},
            ]
        }
    },
}


def write_config(tmp: Path, data=TINY) -> Path:
    path = tmp / "pipelines.yaml"
    data = json.loads(json.dumps(data))
    data["settings"]["workdir"] = str(tmp / "runs")
    data["settings"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path.write_text(yaml.safe_dump(data))
    return path


# -- configuration -------------------------------------------------------------------------------


def bad(tmp_path, mutate) -> str:
    data = json.loads(json.dumps(TINY))
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load(write_config(tmp_path, data))
    return str(err.value)


def test_bad_param_names_its_key_path(tmp_path):
    def m(d):
        d["pipelines"]["tiny"]["stages"][1]["params"]["sft"]["train"]["lr"] = "fast"
    assert "pipelines.tiny.stages[1].params.sft.train.lr: Input should be a valid number" in bad(tmp_path, m)

    def value_model(d):
        d["pipelines"]["tiny"]["stages"][6]["params"]["ppo"]["value_model"] = "critic"
    assert ("pipelines.tiny.stages[6].params.ppo: value_model must be one of reward_model, policy, shared, not 'critic'"
            in bad(tmp_path, value_model))

    def packing(d):
        d["pipelines"]["tiny"]["stages"][5]["params"]["dpo"] = {"shared_prefix": False, "packing": True}
    assert "pipelines.tiny.stages[5].params.dpo: packing puts several shared-prefix rows into one: it needs shared_prefix" in bad(tmp_path, packing)

    def cache(d):
        d["pipelines"]["tiny"]["stages"][6]["params"]["ppo"]["sampling"] = {"cache": "paged"}
    assert ("pipelines.tiny.stages[6].params.ppo.sampling: cache must be one of auto, dynamic, static, not 'paged'"
            in bad(tmp_path, cache))

    def old_name(d):
        d["pipelines"]["tiny"]["stages"][6]["params"]["ppo"]["separate_value_model"] = True
    assert ("pipelines.tiny.stages[6].params.ppo.separate_value_model: unknown parameter (replaced by value_model: "
            "reward_model, policy or shared)" in bad(tmp_path, old_name))


def test_unknown_param_and_stage_type(tmp_path):
    def typo_type(d):
        d["pipelines"]["tiny"]["stages"][3]["type"] = "labell"

    msg = bad(tmp_path, typo_type)
    assert "pipelines.tiny.stages[3]: Input tag 'labell' found using 'type' does not match any of the expected tags" in msg
    assert "'world', 'model', 'sft'" in msg

    def typo_param(d):
        d["pipelines"]["tiny"]["stages"][5]["params"]["dpo"]["betta"] = 0.1

    assert "pipelines.tiny.stages[5].params.dpo.betta: unknown parameter" in bad(tmp_path, typo_param)

    def typo_stage_key(d):
        d["pipelines"]["tiny"]["stages"][5]["input"] = {}

    assert "pipelines.tiny.stages[5].input: unknown key" in bad(tmp_path, typo_stage_key)


def test_inputs_must_name_earlier_stages_of_the_right_kind(tmp_path):
    def m(d):
        d["pipelines"]["tiny"]["stages"][2]["inputs"] = {"policy": "label", "prompts": "world"}
        d["pipelines"]["tiny"]["stages"][5]["inputs"] = {"preferences": "label", "policy": "sample"}
    msg = bad(tmp_path, m)
    assert "stages[2].inputs.policy: 'label' is not an earlier stage" in msg
    assert "stages[5].inputs.policy: 'sample' gives samples; dpo needs a policy" in msg


def test_a_stage_that_needs_the_world_says_so(tmp_path):
    def m(d):
        del d["pipelines"]["tiny"]["stages"][3]["inputs"]["world"]
    assert "labeler: simulated needs the sandbox world as inputs.world" in bad(tmp_path, m)


def test_set_overrides_and_errors(tmp_path):
    cfg, raw = load(write_config(tmp_path), "tiny", ["dpo.dpo.beta=0.25", "settings.seed=3"])
    dpo = cfg.pipelines["tiny"].stages[5].params.dpo
    assert dpo.beta == 0.25
    assert cfg.settings.seed == 3 and dpo.train.seed == 3  # settings.seed reaches DPO's data order
    with pytest.raises(ConfigError, match="has no stage 'nope'"):
        load(write_config(tmp_path), "tiny", ["nope.x=1"])
    with pytest.raises(ConfigError, match="no pipeline 'other'"):
        load(write_config(tmp_path), "other")


def test_defaults_are_the_core_configs_and_a_partial_override_keeps_the_rest():
    """A stage that gives `dpo: {train: {max_steps: 5}}` keeps DPO's own learning rate (TRL's 1e-6), not
    TrainConfig's generic one; `--set ppo.ppo.seed=1` changes the seed and keeps the pipeline's PPO values;
    a stage's own seed beats settings.seed."""
    from alignment.trainers.dpo import DPOConfig

    cfg, _ = load(ROOT / "pipelines.yaml", "quickstart", ["ppo.ppo.seed=1", "dpo.dpo.train.lr=0.001", "settings.seed=4"])
    stages = {s.name: s.params for s in cfg.pipelines["quickstart"].stages}
    assert stages["ppo"].ppo.seed == 1 and stages["ppo"].ppo.iterations == 30 and stages["ppo"].ppo.beta == 0.3
    assert stages["dpo"].dpo.train.lr == 0.001 and stages["dpo"].dpo.train.max_steps == 130  # the yaml's own value stays
    assert stages["dpo"].dpo.train.seed == 4 and stages["world"].world.seed == 4 and stages["sample"].seed == 4
    real, _ = load(ROOT / "pipelines.yaml", "dpo-from-preferences")
    dpo = {s.name: s.params for s in real.pipelines["dpo-from-preferences"].stages}["dpo"].dpo
    assert dpo.beta == DPOConfig().beta == 0.1 and dpo.train.lr == DPOConfig().train.lr == 1e-6
    assert dpo.train.max_steps == 500 and dpo.group_by_prompt is False


def test_config_is_frozen_and_typed():
    cfg, _ = load(ROOT / "pipelines.yaml", "quickstart")
    stage = cfg.pipelines["quickstart"].stages[5]
    with pytest.raises(Exception):
        stage.params.dpo = None
    assert type(stage.params.dpo).__name__ == "DPOConfig"


def test_shipped_pipelines_file_is_valid_and_packaged():
    from flows.cli import SHIPPED

    cfg, _ = load(ROOT / "pipelines.yaml")
    assert {"quickstart", "dpo-from-preferences", "rlhf-ppo"} <= set(cfg.pipelines)
    assert SHIPPED.resolve() == (ROOT / "pipelines.yaml").resolve()


def test_cli_bad_yaml_exits_2_and_writes_nothing(tmp_path):
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("max_steps: 4", "max_steps: four"))
    result = subprocess.run([ALIGNFLOW, "run", "tiny", "-c", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    told(result, "stages[1].params.sft.train.max_steps: Input should be a valid integer", report="invalid pipeline config: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipelines.yaml"]


# -- running -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.setdefault("TQDM_DISABLE", "1")
    from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml

    tmp = tmp_path_factory.mktemp("pipeline")
    path = write_config(tmp)

    def run(overrides=(), **kw):
        cfg, raw = load(path, "tiny", list(overrides))
        return pipeline_flow(cfg, "tiny", resolved_yaml(raw), overrides=list(overrides), **kw)

    first = run()
    cfg, _ = load(path)
    return {"run": run, "first": first, "tracker": make_tracker(cfg), "tmp": tmp}


def children(tracker, parent):
    return {r.data.tags["alignflow.stage"]: r for r in tracker.runs(f"tags.mlflow.parentRunId = '{parent}'")}


def test_stages_run_one_at_a_time_on_small_machines(env):
    """settings.concurrent_stages null: below 8 CPU cores no two stage runs overlap in time (DPO and PPO
    would share the cores and both run slower)."""
    runs = sorted(children(env["tracker"], env["first"]["parent_run_id"]).values(), key=lambda r: r.info.start_time)
    if (os.cpu_count() or 1) >= 8:
        pytest.skip("8 or more cores: independent stages may run at once")
    for before, after in zip(runs, runs[1:]):
        assert before.info.end_time <= after.info.start_time, (before.data.tags["alignflow.stage"], after.data.tags["alignflow.stage"])


def test_concurrent_stages_overlap_and_give_a_serial_runs_outputs(env, tmp_path):
    """concurrent_stages: true, forced on this small machine: independent stages (DPO beside the reward model
    and PPO, the two evaluations) run at once, the store takes it without a lock error, and every output has
    the content hash of the serial run's."""
    from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml

    data = json.loads(json.dumps(TINY))
    data["settings"]["concurrent_stages"] = True
    cfg, raw = load(write_config(tmp_path, data), "tiny")
    result = pipeline_flow(cfg, "tiny", resolved_yaml(raw))
    assert {n: s["content_hash"] for n, s in result["stages"].items()} == {
        n: s["content_hash"] for n, s in env["first"]["stages"].items()}
    runs = children(make_tracker(cfg), result["parent_run_id"]).values()
    assert all(r.info.status == "FINISHED" for r in runs)
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two stages ran at once"


def test_every_stage_run_has_metrics_params_and_lineage(env):
    tracker, first = env["tracker"], env["first"]
    runs = children(tracker, first["parent_run_id"])
    assert set(runs) == {"world", "sft", "sample", "label", "reward_model", "dpo", "ppo", "evaluate_dpo", "evaluate_ppo"}
    for name, r in runs.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["alignflow.cache"] == "miss"
        assert len(r.data.tags["alignflow.content_hash"]) == 64
        seeds = {k: v for k, v in r.data.params.items() if k.endswith("seed")}
        assert all(v == "0" for v in seeds.values()), seeds  # settings.seed reached every seed of the stage
        assert seeds, name  # every stage has a random stream
        assert r.data.tags["git_commit"]
    assert "train/loss" in runs["sft"].data.metrics and "train/reward" in runs["ppo"].data.metrics
    assert "eval/gold_accuracy" in runs["reward_model"].data.metrics
    for key in ("eval/kl", "eval/gold_win_rate", "eval/banned_word_rate", "eval/rm_reward_mean"):
        assert key in runs["evaluate_dpo"].data.metrics
    # per-step metrics are logged with their step
    history = tracker.client.get_metric_history(runs["sft"].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    # lineage: dpo was fed by label and sft, with their run ids and content hashes
    t = runs["dpo"].data.tags
    assert t["lineage.preferences.run_id"] == runs["label"].info.run_id
    assert t["lineage.policy.content_hash"] == runs["sft"].data.tags["alignflow.content_hash"]
    assert t["lineage.policy.artifact_uri"].endswith("/output")
    # datasets are logged as inputs with their digest
    assert runs["dpo"].inputs.dataset_inputs[0].dataset.name == "label/preferences"
    # the resolved yaml and the reward-KL figure are artifacts of the parent run
    # (two policies evaluated: their metrics side by side as well)
    artifacts = [a.path for a in tracker.client.list_artifacts(first["parent_run_id"])]
    assert artifacts == ["comparison", "pipelines.resolved.yaml", "reward_vs_kl.png"]
    assert [a.path for a in tracker.client.list_artifacts(first["parent_run_id"], "comparison")] == [
        "comparison/methods.csv", "comparison/methods.md"]


def test_gates_register_only_passing_policies(env):
    tracker, first = env["tracker"], env["first"]
    runs = children(tracker, first["parent_run_id"])
    assert runs["evaluate_dpo"].data.tags["gates.passed"] == "True"
    assert runs["evaluate_dpo"].data.tags["registered"] == "tiny-dpo/1"
    assert runs["evaluate_ppo"].data.tags["gates.passed"] == "False"
    assert "eval/gold_win_rate" in runs["evaluate_ppo"].data.tags["gates.failed"]
    assert [m.name for m in tracker.client.search_registered_models()] == ["tiny-dpo"]


def test_cli_exit_codes_a_failed_gate_3_a_failed_stage_1(env):
    """`alignflow run` as a user runs it: a failed gate exits 3 and names the gate, and registers nothing
    new; a stage that raises (here it diverges) exits 1 with what to do, its stage and pipeline runs FAILED
    and the error tagged."""
    tracker, cfg = env["tracker"], str(Path(env["tmp"]) / "pipelines.yaml")
    cli = [ALIGNFLOW, "run", "tiny", "-c", cfg]
    gate = subprocess.run(cli, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert gate.returncode == 3, gate.stdout[-2000:] + gate.stderr[-2000:]
    assert "EVALUATION GATES FAILED" in gate.stderr and "evaluate_ppo: eval/gold_win_rate" in gate.stderr
    shown = gate.stdout + gate.stderr  # a clean run: a line a stage, no warnings, and where to look at the end
    assert "Warning" not in shown and "Traceback" not in shown, shown
    assert all(len([line for line in shown.splitlines() if f"[{s['name']}]" in line]) == 1 for s in TINY["pipelines"]["tiny"]["stages"])
    run_id = re.search(r"^pipeline run ([0-9a-f]{32})$", gate.stdout, re.M).group(1)
    assert f"`alignflow ui`, run 'tiny {run_id}'" in gate.stdout
    assert [m.name for m in tracker.client.search_registered_models()] == ["tiny-dpo"]
    assert [int(v.version) for v in tracker.client.search_model_versions("name = 'tiny-dpo'")] == [1]  # a cache hit registers nothing
    parent = env["first"]["parent_run_id"]
    diverged = subprocess.run(cli + ["--only", "sft", "--from-run", parent, "--set", "sft.sft.train.lr=1e15"],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert diverged.returncode == 1, diverged.stdout[-2000:] + diverged.stderr[-2000:]
    assert "training diverged" in diverged.stderr and "Lower the learning rate" in diverged.stderr
    assert "Traceback" not in diverged.stderr
    [failed] = tracker.runs("tags.alignflow.overrides = 'sft.sft.train.lr=1e15' and attributes.status = 'FAILED'")
    [stage] = children(tracker, failed.info.run_id).values()
    assert stage.info.status == "FAILED" and "NonFiniteLossError" in stage.data.tags["alignflow.error"]


def test_an_error_no_handler_knows_is_one_sentence_with_where_and_what_next():
    """The command line's last resort: the error's first line, the stage and MLflow run it happened in, and
    where the traceback is; no exception class; running out of memory (a GPU's or torch's CPU allocator's) says
    what to lower instead."""
    from flows.cli import unexpected

    err = KeyError("\nthe key 'x' is missing\n  details on another line")
    err.add_note("stage 'dpo' (MLflow run 0123)")
    assert unexpected("tiny", err) == ("pipeline 'tiny' failed in stage 'dpo' (MLflow run 0123): the key 'x' is missing "
                                       "(unexpected: the MLflow run's tag alignflow.traceback holds the traceback)")
    assert unexpected("tiny", RuntimeError()) == ("pipeline 'tiny' failed: an error without a message (unexpected: "
                                                  "this is a bug: please report it)")
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried ...")
    oom.add_note("stage 'dpo' (MLflow run 0123)")
    assert unexpected("tiny", oom) == ("pipeline 'tiny' stopped in stage 'dpo' (MLflow run 0123): it ran out of memory. "
                                       "Lower the stage's batch_size, micro_batch_tokens or max_length, or turn on "
                                       "gradient_checkpointing in its train params (or train LoRA adapters)")
    assert "ran out of memory" in unexpected("tiny", MemoryError())


def test_several_errors_are_each_reported_and_an_error_with_an_errors_method_is_one(capsys):
    """fail_with: SeveralErrors prints every error's sentence (a stage's led by the stage) with the first one's
    exit code; any other error is one report, even one whose .errors is a method (pydantic's ValidationError),
    which reading every `.errors` attribute as a list crashed on."""
    import pydantic
    import typer

    from flows.cli import fail_with
    from flows.config import SeveralErrors
    from tasks.data import DataError

    bad, broken = DataError("prefs.jsonl:line 3: no 'chosen' column"), RuntimeError("the head is missing")
    broken.add_note("stage 'ppo' (MLflow run 0123)")
    with pytest.raises(typer.Exit) as exit_:
        fail_with("tiny", SeveralErrors([bad, broken]))
    said = capsys.readouterr().err
    assert exit_.value.exit_code == 2 and said.startswith("pipeline 'tiny': 2 problems\n")
    assert "bad input data: prefs.jsonl:line 3: no 'chosen' column\n\npipeline 'tiny' failed in stage 'ppo'" in said
    try:
        pydantic.TypeAdapter(int).validate_python("x")
    except pydantic.ValidationError as err:
        with pytest.raises(typer.Exit) as exit_:
            fail_with("tiny", err)
    assert exit_.value.exit_code == 1 and "pipeline 'tiny' failed: 1 validation error" in capsys.readouterr().err


def test_dpo_reference_logps_are_keyed_by_what_lays_out_their_table():
    """A token budget splits prompt groups, so grouped DPO under one reads another reference table: its own key.
    For pairs, or with no budget, the key is the one it always was (tables computed before stay in use)."""
    from types import SimpleNamespace

    from tasks.stages.dpo import Params, reference_key

    inputs = {"policy": SimpleNamespace(content_hash="p"), "preferences": SimpleNamespace(content_hash="d")}
    key = lambda **dpo: reference_key(Params.model_validate({"dpo": {"max_length": 64, **dpo}}), inputs)  # noqa: E731
    assert key(group_by_prompt=True, packing=True, micro_batch_tokens=128) != key(group_by_prompt=True, packing=True)
    assert key(group_by_prompt=True, packing=True) == key(group_by_prompt=True) != key()
    assert key(packing=True, micro_batch_tokens=128) == key() == key(beta=0.3)
    assert key(max_length=32) != key()


def test_unchanged_rerun_recomputes_nothing(env):
    second = env["run"]()
    assert all(s["cached"] for s in second["stages"].values())
    runs = children(env["tracker"], second["parent_run_id"])
    first_runs = children(env["tracker"], env["first"]["parent_run_id"])
    for name, r in runs.items():
        assert r.data.tags["alignflow.cache"] == "hit"
        assert r.data.tags["alignflow.reused_run_id"] == first_runs[name].info.run_id


def test_changed_param_reruns_only_that_branch(env):
    third = env["run"](["dpo.dpo.beta=0.3"])
    ran = {n for n, s in third["stages"].items() if not s["cached"]}
    assert ran == {"dpo", "evaluate_dpo"}
    # the DPO reference log-probs were an artifact of the first run, reused here
    runs = children(env["tracker"], third["parent_run_id"])
    assert runs["dpo"].data.tags["reference_logps.reused"] == "True"
    # the evaluation reads DPO's implicit reward with the beta the policy was trained with
    first = children(env["tracker"], env["first"]["parent_run_id"])
    assert runs["evaluate_dpo"].data.tags["implicit_reward.beta"] == "0.3"
    assert first["evaluate_dpo"].data.tags["implicit_reward.beta"] == "0.1"  # DPO's default
    # what does not depend on the evaluated policy was computed by the first evaluation and read back here,
    # the same numbers: the reference's answers and pair log-probs, the reward model's accuracy
    for kind in ("reference_answers", "reference_pair_logps", "rm_accuracy"):
        assert first["evaluate_dpo"].data.tags[f"{kind}.reused"] == "False"
        assert runs["evaluate_dpo"].data.tags[f"{kind}.reused"] == "True"
    assert runs["evaluate_dpo"].data.metrics["eval/rm_accuracy"] == first["evaluate_dpo"].data.metrics["eval/rm_accuracy"]
    assert runs["evaluate_dpo"].data.metrics["eval/ref_gold_reward_mean"] == first["evaluate_dpo"].data.metrics["eval/ref_gold_reward_mean"]


def test_only_one_stage_on_an_earlier_runs_outputs(env):
    parent = env["first"]["parent_run_id"]
    result = env["run"](["dpo.dpo.beta=0.2"], only="dpo", from_run=parent)
    assert list(result["stages"]) == ["dpo"] and not result["stages"]["dpo"]["cached"]
    runs = children(env["tracker"], result["parent_run_id"])
    first_runs = children(env["tracker"], parent)
    assert runs["dpo"].data.tags["lineage.preferences.run_id"] == first_runs["label"].info.run_id
    assert runs["dpo"].data.tags["lineage.policy.run_id"] == first_runs["sft"].info.run_id
    assert env["tracker"].client.get_run(result["parent_run_id"]).data.tags["alignflow.from_run"] == parent


def test_a_diverging_stage_stops_within_a_step_and_fails_its_runs(env):
    """A learning rate of 1e12: the SFT loss is NaN at its second step; the stage stops before applying
    it, says what to do, marks its run and the pipeline run FAILED, and publishes nothing."""
    from alignment.trainers.common import NonFiniteLossError

    tracker, parent = env["tracker"], env["first"]["parent_run_id"]
    with pytest.raises(NonFiniteLossError, match="at step 1, so training stopped before that update") as err:
        env["run"](["sft.sft.train.lr=1e12"], only="sft", from_run=parent)
    assert "Lower the learning rate" in str(err.value)
    assert err.value.__notes__[0].startswith("stage 'sft' (MLflow run ")  # where, for the command line's message
    [failed] = tracker.runs("tags.alignflow.overrides = 'sft.sft.train.lr=1e12' and attributes.status = 'FAILED'")
    [stage] = children(tracker, failed.info.run_id).values()
    assert stage.info.status == "FAILED" and "NonFiniteLossError" in stage.data.tags["alignflow.error"]
    trace = stage.data.tags["alignflow.traceback"]  # for a bug report: the command line shows a sentence, not this
    assert trace.startswith("Traceback (most recent call last)") and "NonFiniteLossError: " in trace
    assert [m.step for m in tracker.client.get_metric_history(stage.info.run_id, "train/loss")] == [1]  # one step, then stop
    assert not (Path(env["tmp"]) / "runs" / "stages" / "sft" / stage.data.tags["alignflow.cache_key"]).exists()


def test_a_stored_output_changed_on_disk_is_reported_and_computed_again(env):
    """A cached output is checked against the content hash it was published with before any reuse: an
    edited preferences file is never read. The entry is moved aside and the label stage runs again; its
    output is the first run's, byte for byte, so its readers stay cache hits."""
    import pandas as pd

    first = env["first"]["stages"]["label"]
    label_dir = Path(first["path"])
    df = pd.read_parquet(label_dir / "preferences.parquet")
    df.loc[0, ["chosen", "rejected"]] = df.loc[0, ["rejected", "chosen"]].values
    df.to_parquet(label_dir / "preferences.parquet", index=False)
    result = env["run"]()
    assert {n for n, s in result["stages"].items() if not s["cached"]} == {"label"}
    assert result["stages"]["label"]["content_hash"] == first["content_hash"]
    [aside] = label_dir.parent.glob(f"{label_dir.name}.tampered-*")
    assert not pd.read_parquet(aside / "preferences.parquet").equals(pd.read_parquet(label_dir / "preferences.parquet"))


def test_a_stage_cache_kept_without_its_mlflow_store_is_reused(env, tmp_path):
    """A new MLflow store (mlflow.db deleted, another tracking URI) over a stage cache whose runs it does not
    hold: the cached stages are reused, lineage points at their folders in the stage store, and a policy is
    registered from there. (This raised `Run with id=... not found`.)"""
    import shutil

    from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml

    for entry in (env["tmp"] / "runs" / "stages").glob("*/*"):  # every finished stage but the DPO evaluation
        stage = json.loads((entry / "_SUCCESS.json").read_text()).get("stage") if (entry / "_SUCCESS.json").is_file() else None
        if stage and stage != "evaluate_dpo":
            shutil.copytree(entry, tmp_path / "runs" / "stages" / entry.parent.name / entry.name)
    cfg, raw = load(write_config(tmp_path), "tiny")
    result = pipeline_flow(cfg, "tiny", resolved_yaml(raw))
    assert {n for n, s in result["stages"].items() if not s["cached"]} == {"evaluate_dpo"}
    tracker = make_tracker(cfg)
    run = tracker.client.get_run(result["stages"]["evaluate_dpo"]["run_id"])
    dpo_dir = Path(result["stages"]["dpo"]["path"])
    assert run.data.tags["lineage.policy.artifact_uri"] == dpo_dir.resolve().as_uri()
    [version] = tracker.client.search_model_versions("name = 'tiny-dpo'")
    assert version.source == f"{dpo_dir.resolve().as_uri()}/model" and not version.run_id


def test_deploy_builds_a_scheduled_deployment(tmp_path):
    from flows.cli import build_deployment

    deployment = build_deployment("tiny", "0 3 * * *", write_config(tmp_path), ["dpo.dpo.beta=0.2"])
    assert deployment.name == "alignflow-tiny"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert deployment.parameters["pipeline"] == "tiny"
    assert deployment.parameters["cfg"]["pipelines"]["tiny"]["stages"][5]["params"]["dpo"]["beta"] == 0.2


def test_training_curves_are_mlflow_metric_histories_not_pictures(env):
    """Every training stage's per-step metrics are in MLflow (its own charts draw them) and in the history
    file; no stage writes a PNG that would duplicate those charts."""
    tracker, stages = env["tracker"], env["first"]["stages"]
    for name, metric in (("sft", "train/loss"), ("reward_model", "train/loss"), ("dpo", "train/loss"), ("ppo", "train/reward")):
        out = Path(stages[name]["path"])
        steps = [json.loads(line)["step"] for line in (out / "train_metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[0] == 1
        history = tracker.client.get_metric_history(stages[name]["run_id"], metric)
        assert [m.step for m in history] == steps, name
        assert not list(out.rglob("*.png")), name
    artifacts = [a.path for a in tracker.client.list_artifacts(stages["ppo"]["run_id"], "output")]
    assert "output/model" in artifacts and "output/train_metrics.jsonl" in artifacts


def test_parent_runs_carry_params_results_and_overrides(env):
    """What differs between two pipeline runs is on their parent runs, cached stages included: every stage's
    params as <stage>.<path>, every stage's results as <stage>/<metric>, the --set as a tag and in the
    description, a `<pipeline> <id>` name, and the runs table filters by tags.alignflow.pipeline."""
    tracker, first = env["tracker"], env["first"]
    changed = env["run"](["dpo.dpo.beta=0.25"])
    a, b = (tracker.client.get_run(r["parent_run_id"]) for r in (first, changed))
    assert a.data.params["dpo.dpo.beta"] == "0.1" and b.data.params["dpo.dpo.beta"] == "0.25"  # the default, then --set
    assert a.data.params["sft.sft.train.lr"] == b.data.params["sft.sft.train.lr"] == "0.003"
    assert a.data.params["settings.seed"] == "0" and a.data.params["evaluate_dpo.gates.eval/kl"] == "<= 100"
    assert {k for k in a.data.params if a.data.params[k] != b.data.params[k]} == {"dpo.dpo.beta"}
    assert a.data.tags["alignflow.overrides"] == "none" and b.data.tags["alignflow.overrides"] == "dpo.dpo.beta=0.25"
    # the environment capsule: what the run ran on, as params (so a difference shows in every comparison)
    import platform

    import torch
    import transformers

    assert a.data.params["env.python"] == platform.python_version()
    assert a.data.params["env.torch"] == torch.__version__ and a.data.params["env.transformers"] == transformers.__version__
    assert {"env.accelerate", "env.prefect", "env.mlflow", "env.alignflow", "env.git_commit"} <= a.data.params.keys()
    assert "--set dpo.dpo.beta=0.25" in b.data.tags["mlflow.note.content"]
    assert b.info.run_name == f"tiny {b.info.run_id[:8]}"
    # results: the same numbers as the stages wrote, for the stages that ran and for those reused from the cache
    for run, result in ((a, first), (b, changed)):
        for stage in ("sft", "dpo", "evaluate_dpo", "evaluate_ppo"):
            written = json.loads((Path(result["stages"][stage]["path"]) / "metrics.json").read_text())
            assert {k: run.data.metrics[f"{stage}/{k}"] for k in written} == pytest.approx(written), stage
            assert run.data.metrics[f"{stage}/duration_s"] > 0
    assert changed["stages"]["sft"]["cached"]  # sft was reused ...
    assert b.data.metrics["sft/duration_s"] == a.data.metrics["sft/duration_s"]  # ... with the duration it took then
    assert b.data.metrics["evaluate_ppo/eval/gold_win_rate"] == a.data.metrics["evaluate_ppo/eval/gold_win_rate"]
    assert "evaluate_dpo/eval/gold_win_rate" in b.data.metrics and "dpo/final_loss" in b.data.metrics
    # the runs table's filter on the pipeline tag finds the pipeline runs and no stage run
    listed = {r.info.run_id for r in tracker.runs("tags.alignflow.pipeline = 'tiny'")}
    assert {a.info.run_id, b.info.run_id} <= listed
    assert all("alignflow.stage" not in tracker.client.get_run(r).data.tags for r in listed)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert "`<stage>.<param>`" in experiment.tags["mlflow.note.content"] and "- **tiny**" in experiment.tags["mlflow.note.content"]


def test_another_torch_or_transformers_version_computes_every_stage_again(monkeypatch):
    from tasks import store

    key = store.stage_key("sft", {"lr": 0.1}, {"policy": "abc"})
    assert store.stage_key("sft", {"lr": 0.1}, {"policy": "abc"}) == key
    for name in ("torch", "transformers"):
        versions = {**store.runtime_versions(), name: "0.0.1"}
        monkeypatch.setattr(store, "runtime_versions", lambda versions=versions: versions)
        assert store.stage_key("sft", {"lr": 0.1}, {"policy": "abc"}) != key, name


def test_runs_compare_shows_where_two_runs_environments_differ(env, monkeypatch):
    """A run on another torch (here: the environment capsule of one, every stage reused) shows its version
    among the params that differ."""
    import flows.pipeline
    from typer.testing import CliRunner

    from flows.cli import app

    real = flows.pipeline.environment()
    monkeypatch.setattr(flows.pipeline, "environment", lambda: {**real, "env.torch": "9.9.9"})
    other = env["run"]()
    cfg = str(Path(env["tmp"]) / "pipelines.yaml")
    out = CliRunner().invoke(app, ["runs", "compare", env["first"]["parent_run_id"], other["parent_run_id"], "-c", cfg])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert next(line for line in lines if "env.torch" in line).split() == ["*", "env.torch", real["env.torch"], "9.9.9"]
    assert not [line for line in lines if "env.transformers" in line]  # equal: shown only with --all


def test_training_metrics_are_written_together_and_all_by_the_end_of_the_run(tmp_path):
    """Training steps' metrics reach MLflow in one write every `every_s` seconds (the first at once);
    ending the run, whatever its status, writes what was held back."""
    from tasks.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "buffered")
    run_id = tracker.start_run("stage", {})
    for step in range(1, 6):
        tracker.log_metrics(run_id, {"train/loss": 1.0 / step}, step, every_s=3600)
    assert [m.step for m in tracker.client.get_metric_history(run_id, "train/loss")] == [1]
    tracker.end_run(run_id, "KILLED")
    history = tracker.client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 6)]


def test_a_new_store_is_a_copy_of_an_empty_one_made_once(tmp_path, monkeypatch, caplog):
    """The first new sqlite store of an MLflow version is built by MLflow (its migrations) into the cache
    folder; later new stores are copies of it, with no migration run, and work as MLflow stores."""
    import logging
    import sqlite3

    import mlflow

    from tasks.tracking import Tracker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "first")
    template = tmp_path / "cache" / "alignflow" / f"mlflow-{mlflow.__version__}-empty.db"
    assert template.is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mlflow.store.db.utils"):
        tracker = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "second")
    assert "Creating initial MLflow database tables" not in caplog.text
    run_id = tracker.start_run("stage", {"alignflow.stage": "sft"})
    tracker.log_metrics(run_id, {"loss": 0.5}, 1)
    tracker.end_run(run_id)
    assert tracker.client.get_run(run_id).data.metrics == {"loss": 0.5}
    assert {e.name for e in tracker.client.search_experiments()} == {"Default", "second"}
    with sqlite3.connect(template) as a, sqlite3.connect(tmp_path / "b" / "mlflow.db") as b:  # the same schema version
        assert a.execute("select version_num from alembic_version").fetchall() == b.execute("select version_num from alembic_version").fetchall()


def test_a_param_longer_than_mlflow_allows_is_cut_with_a_marker():
    from tasks.tracking import CUT, param_value

    assert param_value(0.5) == "0.5" and param_value("x" * 6000) == "x" * 6000
    long = param_value("y" * 7000)
    assert len(long) == 6000 and long.endswith(CUT) and long.startswith("y" * (6000 - len(CUT)))


def test_reward_kl_figure_has_a_panel_per_measure():
    from tasks.plots import reward_kl_figure

    assert reward_kl_figure([{"label": "dpo", "kl": 2.0}], [], [], "no reward measured") is None
    fig = reward_kl_figure([{"label": "dpo", "kl": 2.4, "gold": 1.9, "rm": 2.8}, {"label": "ppo", "kl": 3.5, "rm": 3.3}],
                           [{"label": "sft", "gold": 0.1, "rm": 0.2}],
                           [{"label": "ppo rollouts", "policy": "ppo", "kl": [0.0, 1.0, 2.0], "rm": [0.2, 1.0, 2.0]}], "quickstart")
    gold, rm = fig.axes
    assert "gold" in gold.get_ylabel() and "reward-model" in rm.get_ylabel()
    assert [t.get_text() for t in gold.texts] == ["sft", "dpo"]  # ppo has no gold measure
    assert [t.get_text() for t in rm.texts] == ["sft", "dpo", "ppo"] and len(rm.lines) == 1
    ppo_point = [c for c in rm.collections if list(c.get_offsets()[0]) == [3.5, 3.3]][0]
    from matplotlib.colors import to_rgb

    assert to_rgb(rm.lines[0].get_color()) == tuple(ppo_point.get_facecolor()[0][:3])  # the curve in its method's colour


def test_methods_table_puts_every_evaluation_metric_side_by_side():
    from tasks.plots import methods_table

    csv, md = methods_table({"dpo": {"eval/kl": 2.4312, "eval/gold_win_rate": 0.85, "duration_s": 9.0},
                             "grpo": {"eval/kl": 6.0}})
    assert csv.splitlines() == ["metric,dpo,grpo", "eval/gold_win_rate,0.85,", "eval/kl,2.431,6"]
    assert md.splitlines()[0] == "| metric | dpo | grpo |" and md.splitlines()[2] == "| eval/gold_win_rate | 0.85 |  |"


def test_cli_runs_list_compare_and_lineage(env):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg = str(env["tmp"] / "pipelines.yaml")
    runner = CliRunner()
    first = env["first"]["parent_run_id"]
    listed = runner.invoke(app, ["runs", "list", "-c", cfg])
    assert listed.exit_code == 0 and first in listed.output and "FINISHED" in listed.output
    second = env["run"](["dpo.dpo.beta=0.35"])["parent_run_id"]
    compared = runner.invoke(app, ["runs", "compare", first, second, "-c", cfg])
    assert compared.exit_code == 0, compared.output
    lines = compared.output.splitlines()
    beta_line = next(line for line in lines if "dpo.dpo.beta" in line)
    assert beta_line.split() == ["*", "dpo.dpo.beta", "0.1", "0.35"]  # the default, then --set
    assert not [line for line in lines if "sft.sft.train.lr" in line]  # equal params only with --all
    everything = runner.invoke(app, ["runs", "compare", first, second, "--all", "-c", cfg]).output.splitlines()
    assert next(line for line in everything if "sft.sft.train.lr" in line).split() == ["sft.sft.train.lr", "0.003", "0.003"]
    tracker = env["tracker"]
    a, b = (tracker.client.get_run(r).data.metrics for r in (first, second))
    win = next(line for line in lines if "evaluate_dpo/eval/gold_win_rate" in line).split()
    assert win[-2:] == [f"{a['evaluate_dpo/eval/gold_win_rate']:.3f}".rstrip("0").rstrip("."),
                        f"{b['evaluate_dpo/eval/gold_win_rate']:.3f}".rstrip("0").rstrip(".")]
    unknown = runner.invoke(app, ["runs", "compare", first, "nope", "-c", cfg])
    assert unknown.exit_code == 2 and "runs list" in unknown.output
    lineage = runner.invoke(app, ["lineage", second, "-c", cfg])
    assert lineage.exit_code == 0, lineage.output
    assert "dpo [dpo]" in lineage.output and "<- preferences: label" in lineage.output
    assert "(cached: output of" in lineage.output  # sft, sample, label were reused from the first run


def test_metrics_are_shown_as_mlflow_rounds_them():
    from flows.cli import _shown

    # MLflow's formatMetric: exponent below 1e-3, 3 decimals below 10, 2 below 100, then 1; halves go up
    assert [_shown(v) for v in (0.40625, 0.0205517, 2.5394e-9, -3.8743e-6, 12.0, 0.0015, 63.456, 150.25, 0.0, float("nan"), "0.5", None)] == [
        "0.406", "0.021", "2.539e-9", "-3.874e-6", "12", "0.002", "63.46", "150.3", "0", "NaN", "0.5", "-"]


def test_a_pipeline_tracks_to_an_mlflow_server_with_artifacts_through_it(tmp_path):
    """`mlflow server` on loopback as the tracking URI: a pipeline runs twice (the second from the cache), the
    stage outputs are uploaded through the server (mlflow-artifacts:), and lineage and runs compare read
    everything back from it."""
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from browser import free_port
    from flows.cli import app
    from flows.pipeline import pipeline_flow, resolved_yaml

    os.environ.setdefault("TQDM_DISABLE", "1")
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts")],
                              cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        cfg = {"settings": {"seed": 0, "workdir": str(tmp_path / "runs"), "tracking_uri": uri, "experiment": "served"},
               "pipelines": {"tiny": {"stages": TINY["pipelines"]["tiny"]["stages"][:2]}}}
        (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
        pipelines, raw = load(tmp_path / "pipelines.yaml", "tiny")
        runs = [pipeline_flow(pipelines, "tiny", resolved_yaml(raw))["parent_run_id"] for _ in range(2)]
        client = MlflowClient(uri)
        [sft] = client.search_runs([client.get_experiment_by_name("served").experiment_id],
                                   f"tags.mlflow.parentRunId = '{runs[0]}' and tags.`alignflow.stage` = 'sft'")
        assert sft.info.artifact_uri.startswith("mlflow-artifacts:")
        assert any(f.path == "output/model" for f in client.list_artifacts(sft.info.run_id, "output"))
        assert list((tmp_path / "server-artifacts").rglob("model.safetensors"))  # stored by the server, not by us
        lineage = CliRunner().invoke(app, ["lineage", runs[1], "-c", str(tmp_path / "pipelines.yaml")])
        assert lineage.exit_code == 0 and "sft" in lineage.output and "world" in lineage.output, lineage.output
        compared = CliRunner().invoke(app, ["runs", "compare", *runs, "-c", str(tmp_path / "pipelines.yaml")])
        assert compared.exit_code == 0 and "sft/final_loss" in compared.output, compared.output
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_deployments_served_on_a_schedule_and_in_a_work_pool_run_and_name_their_deployment(tmp_path):
    """Both ways of `alignflow deploy`, against the session's Prefect server, at once (the suite's time):
    - served: `alignflow deploy nightly --interval 20` serves a scheduled deployment from its process; the
      server's scheduler creates the run, the served process runs it, it completes;
    - work pool: `alignflow deploy tiny --pool P` to a `process` work pool, one worker started here, a run
      started with `prefect deployment run`; it completes.
    Each run's MLflow parent run names its deployment (and the served one its Prefect flow run)."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    prefect = str(Path(sys.executable).parent / "prefect")
    # the session's server (sqlite) answers 503 while the other worker's pipelines write to it: Prefect's client
    # retries a 503, 5 times by default, which ran out once in a CI run (deploy --pool failed with a 503)
    env = {**os.environ, "TQDM_DISABLE": "1", "PREFECT_CLIENT_MAX_RETRIES": "20"}
    assert env.get("PREFECT_API_URL"), "the test session starts a Prefect server (tests/conftest.py)"
    stages = TINY["pipelines"]["tiny"]["stages"]
    for name, kept in (("nightly", stages[:1]), ("tiny", stages[:2])):
        (tmp_path / name).mkdir()
        cfg = {"settings": {"seed": 0, "workdir": str(tmp_path / name / "runs"), "tracking_uri": f"sqlite:///{tmp_path / name / 'mlflow.db'}",
                            "experiment": name}, "pipelines": {name: {"stages": kept}}}
        (tmp_path / name / "pipelines.yaml").write_text(yaml.safe_dump(cfg))

    served = subprocess.Popen([ALIGNFLOW, "deploy", "nightly", "-c", str(tmp_path / "nightly" / "pipelines.yaml"), "--interval", "20"],
                              cwd=tmp_path / "nightly", env={**env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},  # (every 10 s by default)
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker, deployment, completed = None, None, None
    try:
        pool = f"pool-{tmp_path.name[-12:]}".replace("_", "-")
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, check=True, capture_output=True, timeout=300)
        try:  # (once, in one of eight suite runs, this took over 120 s beside the other worker's pipelines)
            deployed = subprocess.run([ALIGNFLOW, "deploy", "tiny", "-c", str(tmp_path / "tiny" / "pipelines.yaml"), "--pool", pool],
                                      cwd=tmp_path / "tiny", env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as err:  # what it printed, to see where it waited
            pytest.fail(f"`alignflow deploy --pool` ran over 300 s; its output:\n{err.stdout}\n{err.stderr}")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert f"in work pool '{pool}'" in deployed.stdout and f"prefect worker start --pool {pool}" in deployed.stdout
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--limit", "1"], cwd=tmp_path / "tiny",
                                  env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},  # (every 10 s by default)
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = subprocess.run([prefect, "deployment", "run", "alignflow-pipeline/alignflow-tiny", "--watch", "--watch-timeout", "300"],
                             env=env, capture_output=True, text=True, timeout=360)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]

        with get_client(sync_client=True) as client:  # the served deployment's first scheduled run
            deadline = time.time() + 240
            while time.time() < deadline and completed is None and served.poll() is None:
                try:
                    deployment = client.read_deployment_by_name("alignflow-pipeline/alignflow-nightly")
                except Exception:  # not registered yet
                    time.sleep(1)
                    continue
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
                assert not [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()], runs
                completed = next((r for r in runs if r.state and r.state.is_completed()), None)
                time.sleep(0 if completed else 1)
    finally:  # serving never ends by itself, and a worker's graceful shutdown takes a minute: nothing to keep
        for proc in (served, worker):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
        output = served.communicate(timeout=60)[0]
        if worker is not None:
            worker.wait(timeout=60)
        if deployment is not None:
            with get_client(sync_client=True) as client:
                client.delete_deployment(deployment.id)  # and its scheduled runs: nothing left on the shared server
    assert completed is not None, output[-3000:]
    assert "serving deployment alignflow-pipeline/alignflow-nightly every 20 s" in output
    assert completed.auto_scheduled  # created by the server's scheduler, not by `prefect deployment run`
    for name, which in (("nightly", f"tags.`alignflow.prefect_flow_run` = '{completed.id}'"), ("tiny", "tags.`alignflow.pipeline` = 'tiny'")):
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")  # (the schedule may have fired again meanwhile)
        [parent] = client.search_runs([client.get_experiment_by_name(name).experiment_id], which)
        assert parent.info.status == "FINISHED" and parent.data.tags["alignflow.deployment"] == f"alignflow-{name}", name


def test_without_a_prefect_server_the_cli_starts_a_temporary_one_and_stops_it(tmp_path):
    """What a user on a fresh machine meets (the rest of the suite runs on the session's server): without
    PREFECT_API_URL `alignflow run` starts a temporary Prefect server (flows/server.py), runs the flow on it
    and stops it at exit. Ctrl-C in a terminal (SIGINT to the whole process group) stops the command, not the
    server first: with Prefect's own temporary server the command hung at exit. Bad data is reported before
    any server is started."""
    stages = TINY["pipelines"]["tiny"]["stages"][:2]
    path = write_config(tmp_path, {"settings": dict(TINY["settings"]), "pipelines": {"tiny": {"stages": stages}}})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh Prefect database, as on a new machine
    env["TMPDIR"] = str(tmp_path / "tmp")  # where the server's log folder goes, and must not stay
    (tmp_path / "tmp").mkdir()
    command = [ALIGNFLOW, "run", "tiny", "-c", str(path)]
    started = re.compile(r"Starting a temporary Prefect server on http://127\.0\.0\.1:(\d+)")

    def stopped(port: str) -> bool:  # within 10 s of the command's exit (it closes its connections first)
        for _ in range(20):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            except OSError:
                return True
            time.sleep(0.5)
        return False

    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert len(started.findall(out)) == 1 and "Beginning flow run" in out and "pipeline run " in out, out[-3000:]
    assert stopped(started.search(out).group(1))
    assert not list((tmp_path / "tmp").glob("alignflow-prefect-*")), "the stopped server's log folder was left behind"

    long_sft = json.loads(json.dumps(stages))
    long_sft[1]["params"]["sft"]["train"]["max_steps"] = 100_000
    path = write_config(tmp_path, {"settings": dict(TINY["settings"]), "pipelines": {"tiny": {"stages": long_sft}}})
    proc = subprocess.Popen(WITH_CTRL_C + command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:  # the sft stage is running once the world stage is done
        lines.append(line)
        if "[world]" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the interrupted command did not exit: " + "".join(lines)[-2000:])
    out = "".join(lines) + rest
    assert proc.returncode == 130 and "interrupted: the running stage was marked KILLED" in out, out[-3000:]
    assert stopped(started.search(out).group(1))
    assert not list((tmp_path / "tmp").glob("alignflow-prefect-*")), "the stopped server's log folder was left behind"

    bad_prompts = tmp_path / "prompts.jsonl"
    bad_prompts.write_text('{"prompt": "how do i fix a flat tire ?"}\n{"question": "no prompt here"}\n')
    sample = {"name": "sample", "type": "sample", "inputs": {"policy": "sft"},
              "params": {"prompts": 2, "prompts_file": str(bad_prompts), "sampling": {"max_new_tokens": 4}}}
    path = write_config(tmp_path, {"settings": dict(TINY["settings"]), "pipelines": {"tiny": {"stages": [*stages, sample]}}})
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    told(result, f"bad input data: 1 problem(s) in {bad_prompts}", "line 2")
    assert "temporary Prefect server" not in result.stdout + result.stderr
