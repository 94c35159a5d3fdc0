"""kill -9 in the middle of a stage, then the same command again: finished stages are reused, the
killed stage resumes from its last checkpoint, the result equals an uninterrupted run's, and no MLflow
run is left RUNNING. The pipeline runs as a real `alignflow` process so that it can be killed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CONFIG = {
    "settings": {"seed": 0, "experiment": "crash"},
    "pipelines": {
        "crash": {
            "stages": [
                {"name": "world", "type": "world", "params": {
                    "demonstrations": 64, "train_prompts": 64, "test_prompts": 8,
                    "model": {"hidden_size": 32, "num_layers": 1, "intermediate_size": 64}}},
                {"name": "sft", "type": "sft", "inputs": {"policy": "world", "demonstrations": "world"},
                 "params": {"sft": {"max_length": 128, "train": {"max_steps": 4, "batch_size": 16, "lr": 0.003}}}},
                {"name": "sample", "type": "sample", "inputs": {"policy": "sft", "prompts": "world"},
                 "params": {"prompts": 16, "samples_per_prompt": 2, "sampling": {"max_new_tokens": 10}}},
                {"name": "label", "type": "label", "inputs": {"samples": "sample", "world": "world"}, "params": {"labeler": "simulated"}},
                {"name": "reward_model", "type": "train_reward_model", "inputs": {"preferences": "label", "base": "sft"},
                 "params": {"reward": {"max_length": 128, "train": {"max_steps": 2, "batch_size": 8}}}},
                {"name": "ppo", "type": "ppo", "inputs": {"policy": "sft", "reward_model": "reward_model", "prompts": "world"},
                 "params": {"prompts": 64, "ppo": {"iterations": 20, "rollout_batch_size": 16, "minibatch_size": 8, "lr": 1e-5,
                                                   "ppo_epochs": 2, "checkpoint_every": 4, "sampling": {"max_new_tokens": 24}}}},
            ]
        }
    },
}
from conftest import WITH_CTRL_C  # noqa: E402

CLI = [str(Path(sys.executable).parent / "alignflow"), "run", "crash", "-c", "pipelines.yaml"]
HOLD_AT = 6  # PPO checkpoints every 4 of its 20 iterations


def setup_dir(d: Path) -> Path:
    d.mkdir()
    cfg = json.loads(json.dumps(CONFIG))
    cfg["settings"].update(workdir=str(d / "runs"), tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    (d / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    return d


def run_cli(d: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(CLI, cwd=d, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def ppo_output(d: Path) -> dict:
    [marker] = (d / "runs" / "stages" / "ppo").glob("*/_SUCCESS.json")
    return json.loads(marker.read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The pipeline uninterrupted, in this process (a flow run as the CLI's, minus its start-up): the
    reference of the resumed run, and the finished stages the other runs here start from."""
    from flows.config import load
    from flows.pipeline import pipeline_flow, resolved_yaml

    d = setup_dir(tmp_path_factory.mktemp("crash") / "straight")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg, raw = load(d / "pipelines.yaml", "crash")
    pipeline_flow(cfg, "crash", resolved_yaml(raw))
    return d


def upstream_of(straight: Path, d: Path) -> Path:
    """d's stage store holds the straight run's finished stages up to the reward model (not PPO): a run
    in d reuses them (its own MLflow store starts empty) and computes PPO."""
    for entry in (straight / "runs" / "stages").glob("*/*"):
        if entry.parent.name != "ppo" and entry.is_dir() and not entry.name.endswith(".partial"):
            shutil.copytree(entry, d / "runs" / "stages" / entry.parent.name / entry.name)
    return d


def held(d: Path) -> dict[str, str]:
    """The environment of an `alignflow run` whose PPO stage waits after iteration HOLD_AT (the checkpoint of
    iteration 4 written, 14 iterations to go) until it is signalled, and the file it writes when it gets there."""
    return {**os.environ, "TQDM_DISABLE": "1", "ALIGNFLOW_TEST_HOLD": f"{HOLD_AT}:{d / 'held'}"}


def wait_until_held(d: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not (d / "held").exists() and proc.poll() is None:
        time.sleep(0.1)
    assert (d / "held").exists(), f"PPO never reached iteration {HOLD_AT} (exit {proc.poll()})"


def test_kill_9_mid_stage_then_rerun_resumes(tmp_path, straight):
    crash = upstream_of(straight, setup_dir(tmp_path / "crash"))
    proc = subprocess.Popen(CLI, cwd=crash, env=held(crash), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_held(crash, proc)
    [state] = (crash / "runs" / "stages" / "ppo").glob("*.partial/checkpoints/checkpoint-*/trainer_state.json")
    assert json.loads(state.read_text())["iteration"] == 4
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((crash / "runs" / "stages" / "ppo").glob("*/_SUCCESS.json"))  # nothing half-published

    run_cli(crash)
    client = MlflowClient(f"sqlite:///{crash / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crash")
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
    killed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert {r.data.tags.get("alignflow.stage", "pipeline") for r in killed} >= {"ppo", "pipeline"}
    # the dead process's Prefect flow run is CRASHED, not RUNNING for ever in Prefect's UI
    [dead] = [r for r in killed if "alignflow.stage" not in r.data.tags]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(dead.data.tags["alignflow.prefect_flow_run"]).state.type.value == "CRASHED"
    [second] = client.search_runs([exp.experiment_id], "tags.`alignflow.pipeline` = 'crash' and attributes.status = 'FINISHED'")
    stages = {r.data.tags["alignflow.stage"]: r for r in client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{second.info.run_id}'")}
    assert {s for s, r in stages.items() if r.data.tags["alignflow.cache"] == "hit"} == {"world", "sft", "sample", "label", "reward_model"}
    steps = [m.step for m in client.get_metric_history(stages["ppo"].info.run_id, "train/reward")]
    assert steps[0] > 1 and steps[-1] == 20  # resumed after the checkpoint, not from iteration 1
    assert ppo_output(crash)["content_hash"] == ppo_output(straight)["content_hash"]
    # the ledger: the prompts of each of the 20 iterations, once each and the same as the straight run's
    # (it, the losses and every metric are in the content hash; spelled out here)
    [crash_dir], [straight_dir] = ((d / "runs" / "stages" / "ppo").glob("*[!l]") for d in (crash, straight))
    ledger = [json.loads(line) for line in (crash_dir / "ledger.jsonl").read_text().splitlines()]
    assert [row["step"] for row in ledger] == [step for step in range(1, 21) for _ in range(16)]  # a line a prompt
    assert all(len({row["id"] for row in ledger if row["step"] == step}) == 16 for step in range(1, 21))
    assert (crash_dir / "ledger.jsonl").read_text() == (straight_dir / "ledger.jsonl").read_text()
    assert (crash_dir / "train_metrics.jsonl").read_text() == (straight_dir / "train_metrics.jsonl").read_text()


def test_sigterm_and_ctrl_c_exit_130_and_mark_runs_killed(tmp_path, straight):
    """SIGTERM (a work pool cancelling, `kill`) and SIGINT (Ctrl-C) in the middle of PPO, each to its own
    `alignflow run` (the two run at once): exit 130, the stage and pipeline runs KILLED, none left RUNNING."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = upstream_of(straight, setup_dir(tmp_path / sig.name))
        procs[sig] = d, subprocess.Popen(WITH_CTRL_C + CLI, cwd=d, env=held(d), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)
    for sig, (d, proc) in procs.items():  # each gets its signal while its PPO waits after a checkpoint
        wait_until_held(d, proc)
        proc.send_signal(sig)
    for sig, (d, proc) in procs.items():
        out = proc.communicate(timeout=180)[0]
        assert proc.returncode == 130, (sig.name, out[-2000:])
        assert "run the same command again to resume" in out
        client = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
        exp = client.get_experiment_by_name("crash")
        assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
        killed = {r.data.tags.get("alignflow.stage", "pipeline") for r in client.search_runs([exp.experiment_id], "attributes.status = 'KILLED'")}
        assert killed == {"pipeline", "ppo"}, sig.name


def test_two_runs_at_once_compute_each_stage_once(tmp_path):
    """Two `alignflow run` processes started together on one working directory and store: both exit 0, each
    stage is computed by one of them while the other waits on its key's lock and reuses the output, and
    every published entry still has the content hash it was sealed with."""
    from tasks.store import dir_hash

    d = setup_dir(tmp_path / "twice")
    cfg = yaml.safe_load((d / "pipelines.yaml").read_text())
    cfg["pipelines"]["crash"]["stages"] = cfg["pipelines"]["crash"]["stages"][:5]  # up to the reward model
    (d / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen(CLI, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-2000:] for out in outs)
    assert not any("OperationalError" in out or "Traceback" in out for out in outs)
    client = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    exp = client.get_experiment_by_name("crash")
    stage_runs = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if "alignflow.stage" in r.data.tags]
    by_stage: dict[str, list[str]] = {}
    for r in stage_runs:
        by_stage.setdefault(r.data.tags["alignflow.stage"], []).append(r.data.tags["alignflow.cache"])
    assert {stage: sorted(caches) for stage, caches in by_stage.items()} == {
        stage: ["hit", "miss"] for stage in ("world", "sft", "sample", "label", "reward_model")}
    for marker in (d / "runs" / "stages").glob("*/*/_SUCCESS.json"):
        assert json.loads(marker.read_text())["content_hash"] == dir_hash(marker.parent), marker
