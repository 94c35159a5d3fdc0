"""Online RL on several processes (`resources: {processes: 2}` on ppo, grpo and rloo; DDP over gloo on CPU).

Each process samples its block of a rollout's prompts with the whole batch's random draws, so the two
processes together sample what one process samples; statistics over the batch (PPO's advantage whitening
and KL controller, GRPO's token count and batch std, the logged metrics) are the whole batch's. The 2-process stages,
each killed with kill -9 once (one rank, the other rank, the whole launch) and resumed, must follow the
one-process run step by step and end at its weights, and their ledgers name the process of every prompt.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chat_model import TEXTS, build_chat_model

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CLI = str(Path(sys.executable).parent / "alignflow")
ITERATIONS, HOLD = 4, 3  # a checkpoint every 2 iterations: a stage killed at iteration 3 resumes from 2
SAMPLING = {"temperature": 1.0, "max_new_tokens": 8}
RL = ("ppo", "grpo", "rloo")


def config(root: Path, processes: int, model: Path, prefs: Path, prompts: Path) -> Path:
    two = {"resources": {"processes": processes}} if processes > 1 else {}
    common = {"prompts_file": str(prompts), "prompts": 12}
    stages = [
        {"name": "base", "type": "model", "params": {"name_or_path": str(model)}},
        {"name": "prefs", "type": "import_preferences", "params": {"path": str(prefs), "held_out": 0.0}},
        {"name": "reward_model", "type": "train_reward_model", "inputs": {"preferences": "prefs", "base": "base"},
         "params": {"reward": {"max_length": 64, "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3}}}},
        {"name": "ppo", "type": "ppo", "inputs": {"policy": "base", "reward_model": "reward_model"}, **two,
         "params": {**common, "ppo": {"iterations": ITERATIONS, "rollout_batch_size": 6, "minibatch_size": 3,
                                      "ppo_epochs": 2, "lr": 1e-3, "beta": 0.1, "target_kl": 1.0, "checkpoint_every": 2,
                                      "sampling": SAMPLING}}},
        {"name": "grpo", "type": "grpo", "inputs": {"policy": "base", "reward_model": "reward_model"}, **two,
         "params": {**common, "grpo": {"iterations": ITERATIONS, "prompts_per_batch": 4, "group_size": 3,
                                       "minibatch_size": 4, "lr": 1e-3, "beta": 0.1, "checkpoint_every": 2,
                                       "advantage": "batch_std",  # its std is the whole batch's, over processes
                                       "sampling": SAMPLING}}},
        {"name": "rloo", "type": "rloo", "inputs": {"policy": "base", "reward_model": "reward_model"}, **two,
         "params": {**common, "rloo": {"iterations": ITERATIONS, "prompts_per_batch": 4, "group_size": 2,
                                       "minibatch_size": 4, "lr": 1e-3, "beta": 0.1, "checkpoint_every": 2,
                                       "sampling": SAMPLING}}},
    ]
    cfg = {"settings": {"seed": 0, "workdir": str(root / "runs"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
           "pipelines": {"rl": {"stages": stages}}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    return root / "pipelines.yaml"


def output(root: Path, stage: str) -> Path:
    [success] = [s for s in (root / "runs" / "stages").glob("*/*/_SUCCESS.json") if json.loads(s.read_text()).get("stage") == stage]
    return success.parent


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def workers(root: Path) -> dict[int, str]:
    """Process id -> job file of the live launched workers of this test's pipeline (not torchrun)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode().split("\0")
        except OSError:
            continue
        if "tasks.worker" in args and "torch.distributed.run" not in args and args[-2].startswith(str(root)):
            found[int(cmdline.parent.name)] = args[-2]
    return found


def rank_of(pid: int) -> int:
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item)
    return int(env["RANK"])


def run_killing_each_stage(root: Path, kills: dict) -> str:
    """Run the pipeline; as each RL stage holds at iteration HOLD (after its checkpoint), kill -9 the ranks
    `kills[stage]` names. The pipeline goes on to the next stage, and fails (exit 1) at the end."""
    held = root / "held"
    env = {**os.environ, "TQDM_DISABLE": "1", "ALIGNFLOW_TEST_HOLD": f"{HOLD}:{held}"}
    log = root / "cli.log"  # a file, not a pipe that nobody reads while the stages are held
    with open(log, "w") as fh:
        proc = subprocess.Popen([CLI, "run", "rl", "-c", str(root / "pipelines.yaml")], cwd=root, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    for stage, kill in kills.items():
        deadline = time.time() + 300
        mine = {}
        while time.time() < deadline and proc.poll() is None:
            mine = {pid: job for pid, job in workers(root).items() if f"/stages/{stage}/" in job}
            if held.exists() and len(mine) == 2:
                break
            time.sleep(0.05)
        assert held.exists() and len(mine) == 2, f"{stage} never reached iteration {HOLD}: {log.read_text()[-3000:]}"
        time.sleep(1.0)  # both ranks write the marker in the same step: let the second one arrive
        held.unlink()
        ranks = {rank_of(pid): pid for pid in mine}
        for rank in kill:
            os.kill(ranks[rank], signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline and any(pid in workers(root) for pid in mine):
            time.sleep(0.1)
        assert not any(pid in workers(root) for pid in mine), f"a process of {stage} outlived its killed rank"
    proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    for stage in kills:
        assert not list((root / "runs" / "stages" / stage).glob("*/_SUCCESS.json"))  # nothing half-published
        [state] = (root / "runs" / "stages" / stage).glob("*.partial/checkpoints/checkpoint-*/trainer_state.json")
        assert json.loads(state.read_text())["iteration"] == HOLD - 1
    return text


@pytest.mark.slow
def test_two_process_ppo_grpo_and_rloo_match_one_process_and_resume_after_kill_9(tmp_path):
    model = build_chat_model(tmp_path / "model")
    questions = [t for t in TEXTS if t.endswith("?") or t.startswith(("Convert", "Write", "Summarise"))]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{q} ({i})\n" for i in range(2) for q in questions))  # 12 prompts of unlike lengths
    prefs = tmp_path / "prefs.jsonl"
    answers = ["The answer is 31.", "Rinse the rice and use two cups of water.", "Paris is the capital of France."]
    prefs.write_text("".join(json.dumps({"prompt": q, "chosen": answers[i % 3], "rejected": bad}) + "\n"
                             for i, q in enumerate(questions) for bad in ("No.", "Figure it out yourself.")))

    one = tmp_path / "one"  # one process: in this test's process (a flow run like the CLI's, without its start-up)
    from flows.config import load
    from flows.pipeline import pipeline_flow, resolved_yaml

    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg, raw = load(config(one, 1, model, prefs, prompts), "rl")
    pipeline_flow(cfg, "rl", resolved_yaml(raw))

    two = tmp_path / "two"
    config(two, 2, model, prefs, prompts)
    # one rank dies (torchrun stops the other), the other rank, both
    text = run_killing_each_stage(two, {"ppo": [1], "grpo": [0], "rloo": [0, 1]})
    # each said once, in a sentence: no traceback of torchrun's, Prefect's or a worker's
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-5000:]
    assert "process 1 was killed by SIGKILL, and the stage's other processes were stopped" in text, text[-5000:]
    assert "run the same command again to resume" in text
    result = subprocess.run([CLI, "run", "rl", "-c", str(two / "pipelines.yaml")], cwd=two, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for stage in RL:
        h1, h2 = lines(output(one, stage) / "train_metrics.jsonl"), lines(output(two, stage) / "train_metrics.jsonl")
        assert [h["step"] for h in h2] == [h["step"] for h in h1] == list(range(1, ITERATIONS + 1)), stage
        for a, b in zip(h1, h2):  # every metric is the whole batch's: rewards, KL, losses, gradient norms
            for key in ("loss", "grad_norm", "reward", "kl", "answer_len"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (stage, a["step"], key)
        assert len({a["reward"] for a in h1}) == ITERATIONS  # every rollout is new: not a comparison of replays
        w1 = load_file(output(one, stage) / "model" / "model.safetensors")
        w2 = load_file(output(two, stage) / "model" / "model.safetensors")
        base = load_file(model / "model.safetensors")
        assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1), stage
        assert any((w1[k] - base[k]).abs().max() > 1e-3 for k in base.keys() & w1.keys()), stage  # it trained
        # the ledger: a line a prompt, the same prompts as one process's; the first half of each batch on rank 0
        l1, l2 = lines(output(one, stage) / "ledger.jsonl"), lines(output(two, stage) / "ledger.jsonl")
        assert [(r["step"], r["id"]) for r in l2] == [(r["step"], r["id"]) for r in l1]
        per_batch = len(l1) // ITERATIONS
        assert {r["rank"] for r in l1} == {0}
        assert [r["rank"] for r in l2] == ([0] * (per_batch // 2) + [1] * (per_batch // 2)) * ITERATIONS

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{two / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name != "Default"]
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
    for stage in RL:
        [run] = client.search_runs([exp.experiment_id], f"tags.`alignflow.stage` = '{stage}' and attributes.status = 'FINISHED'")
        assert run.data.tags["alignflow.processes"] == "2"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/reward")]
        assert steps == list(range(HOLD, ITERATIONS + 1)), stage  # resumed from the checkpoint before the kill


def test_a_rollout_that_does_not_split_over_the_processes_is_refused(tmp_path):
    from flows.config import ConfigError, load

    stages = [{"name": "base", "type": "model", "params": {"name_or_path": "x"}},
              {"name": "grpo", "type": "grpo", "inputs": {"policy": "base"}, "resources": {"processes": 2},
               "params": {"prompts_file": "p.txt", "reward_functions": ["alignment.verifiable:exact_match"],
                          "grpo": {"prompts_per_batch": 3}}}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"pipelines": {"p": {"stages": stages}}}))
    with pytest.raises(ConfigError, match="prompts_per_batch 3 does not split evenly over resources.processes 2"):
        load(tmp_path / "p.yaml")
