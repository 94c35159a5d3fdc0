"""A user's own data on a local chat model, through `alignflow run`, with no hand conversion:

  1. SFT on Alpaca demonstrations -> import ShareGPT preferences -> reward model -> PPO -> evaluate
  2. import TRL conversational preferences -> DPO -> evaluate

The model is built here (byte-level BPE + ChatML template + small Llama, tests/chat_model.py). Every
training sequence must be rendered with the template, and the evaluation must say whether the policy
moved and whether it prefers the chosen answers.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chat_model import build_chat_model
from told import told

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CLI = str(Path(sys.executable).parent / "alignflow")
SHIPPED = Path(__file__).resolve().parents[1] / "pipelines.yaml"
SYSTEM = {"from": "system", "value": "You are a helpful assistant."}
QUESTIONS = ["How do I cook rice?", "What is the capital of France?", "Write a haiku about autumn.",
             "Convert this hexadecimal number to decimal: 0x1F", "Summarise the text in one sentence."]
GOOD = ["Rinse the rice and use two cups of water.", "Paris is the capital of France.",
        "Leaves fall, the air cools, the year sighs.", "The answer is 31.", "Thanks! Anything else?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    model = build_chat_model(root / "chat-model")
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in zip(QUESTIONS, GOOD)] * 4
    (root / "demos.json").write_text(json.dumps(alpaca, indent=2))
    sharegpt = []
    for i, (q, a) in enumerate(zip(QUESTIONS * 4, GOOD * 4)):
        turns = [SYSTEM, {"from": "human", "value": q}] if i % 2 else [{"from": "human", "value": "Hello."},
                                                                      {"from": "gpt", "value": "Thanks! Anything else?"},
                                                                      {"from": "human", "value": q}]
        sharegpt.append({"conversations": turns, "chosen": {"from": "gpt", "value": a},
                         "rejected": {"from": "gpt", "value": "No." + " " * 0 + ("!" * (i % 3))}})
    sharegpt.append(sharegpt[3])  # a duplicate pair, as public sets have
    (root / "sharegpt.json").write_text(json.dumps(sharegpt, indent=2))
    trl = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": "Figure it out yourself." + "!" * i}]}
           for i, (q, a) in enumerate(zip(QUESTIONS * 4, GOOD * 4))]
    (root / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return root, model


def run_pipeline(root: Path, name: str, stages: list[dict]) -> tuple[subprocess.CompletedProcess, dict]:
    cfg = {"settings": {"seed": 0, "workdir": str(root / f"runs-{name}"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
           "pipelines": {name: {"stages": stages}}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([CLI, "run", name, "-c", str(root / f"{name}.yaml")], cwd=root, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    outputs = {}
    for success in (root / f"runs-{name}").glob("stages/*/*/_SUCCESS.json"):
        record = json.loads(success.read_text())
        if "stage" in record:  # (DPO's reference log-probs are an entry of their own)
            outputs[record["stage"]] = success.parent
    return result, outputs


def assert_templated(out: Path) -> None:
    first = json.loads((out / "first_sequence.json").read_text())
    assert first["text"].startswith("<|im_start|>"), first["text"]  # the chat template, not "user: ..."
    assert first["text"].endswith("<|im_end|>") and first["text"].count("<|im_end|>") >= 2
    assert "<|im_start|>assistant\n" in first["text"][: len(first["text"]) - 5]


def test_sft_sharegpt_preferences_reward_model_ppo_evaluate(files):
    root, model = files
    tiny = {"max_new_tokens": 12}
    result, out = run_pipeline(root, "rlhf", [
        {"name": "base", "type": "model", "params": {"name_or_path": str(model)}},
        {"name": "sft", "type": "sft", "inputs": {"policy": "base"},
         "params": {"data": str(root / "demos.json"), "sft": {"max_length": 128, "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3}}}},
        {"name": "preferences", "type": "import_preferences", "params": {"path": str(root / "sharegpt.json"), "held_out": 0.25}},
        {"name": "reward_model", "type": "train_reward_model", "inputs": {"preferences": "preferences", "base": "sft"},
         "params": {"reward": {"max_length": 128, "train": {"max_steps": 4, "batch_size": 4, "lr": 3e-3}}}},
        {"name": "ppo", "type": "ppo", "inputs": {"policy": "sft", "reward_model": "reward_model"},
         "params": {"prompts_file": str(root / "prompts.jsonl"), "ppo": {"iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2,
                                                                         "lr": 1e-3, "sampling": tiny}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"policy": "ppo", "reference": "sft", "reward_model": "reward_model",
                                                            "preferences": "preferences"},
         "params": {"prompts": 5, "max_length": 128, "sampling": tiny, "gates": {"eval/kl": "<= 1000"}}},
    ])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_templated(out["sft"])
    assert_templated(out["reward_model"])
    counts = json.loads((out["preferences"] / "metrics.json").read_text())
    assert counts["rows_duplicate"] == 1 and counts["rows_kept"] == 20
    metrics = json.loads((out["evaluate"] / "metrics.json").read_text())
    assert metrics["eval/kl"] >= 0  # k3: never negative
    for key in ("eval/kl_k1", "eval/rm_win_rate", "eval/rm_reward_mean", "eval/ref_rm_reward_mean", "eval/rm_accuracy",
                "eval/pref_accuracy", "eval/implicit_accuracy", "eval/implicit_margin", "eval/distinct_2", "eval/answer_len_mean"):
        assert key in metrics, key
    assert "eval/gold_win_rate" not in metrics  # no world among the inputs: no gold metric
    assert "eval/rm_win_rate=" in result.stdout


def test_trl_conversational_preferences_dpo_evaluate(files):
    root, model = files
    result, out = run_pipeline(root, "dpo", [
        {"name": "base", "type": "model", "params": {"name_or_path": str(model)}},
        {"name": "preferences", "type": "import_preferences", "params": {"path": str(root / "trl.jsonl"), "held_out": 0.25}},
        {"name": "dpo", "type": "dpo", "inputs": {"preferences": "preferences", "policy": "base"},
         "params": {"dpo": {"beta": 0.1, "max_length": 128, "train": {"max_steps": 30, "batch_size": 5, "lr": 3e-3}}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"policy": "dpo", "reference": "base", "preferences": "preferences"},
         "params": {"prompts": 5, "max_length": 128, "sampling": {"max_new_tokens": 12},
                    "gates": {"eval/implicit_accuracy": ">= 0.8"}}},
    ])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_templated(out["dpo"])
    metrics = json.loads((out["evaluate"] / "metrics.json").read_text())
    # held-out pairs (same questions, unseen rejected answers): DPO learned to prefer the chosen answers
    assert metrics["eval/implicit_accuracy"] >= 0.8 and metrics["eval/implicit_margin"] > 0
    assert metrics["eval/pref_accuracy"] >= 0.8
    assert metrics["eval/kl"] > 0.01  # the policy moved away from the reference
    assert json.loads((out["evaluate"] / "gates.json").read_text())["passed"]


REWARDS = '''
def brevity(prompts, answers):
    """Shorter answers score higher; the prompts are chat messages."""
    assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
    return [-len(a.split()) / 10 for a in answers]


def broken(prompts, answers):
    return [float("nan")] * len(answers)
'''


def test_grpo_with_the_users_reward_function_on_a_chat_model(files):
    """GRPO fed by a function in the user's my_rewards.py (no reward model): it runs on chat prompts; editing
    the function changes the stage's cache key (its source is in it); a function that returns NaN or cannot
    be imported stops the run with its name, exit 2, and nothing written."""
    from mlflow.tracking import MlflowClient

    root, model = files
    (root / "my_rewards.py").write_text(REWARDS)

    def grpo(function: str):
        return run_pipeline(root, "grpo", [
            {"name": "base", "type": "model", "params": {"name_or_path": str(model)}},
            {"name": "grpo", "type": "grpo", "inputs": {"policy": "base"},
             "params": {"prompts_file": str(root / "prompts.jsonl"), "reward_functions": [function],
                        "grpo": {"iterations": 2, "prompts_per_batch": 2, "group_size": 4, "lr": 1e-3,
                                 "sampling": {"max_new_tokens": 12}}}},
        ])

    result, out = grpo("my_rewards:brevity")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = [json.loads(line) for line in (out["grpo"] / "train_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(h["reward"] <= 0 and h["answer_len"] > 0 for h in history)
    first = out["grpo"]

    # the function's source file is in the stage's key: an edit computes the stage again (the key, in-process)
    from tasks.stages import grpo as grpo_stage

    params = grpo_stage.Params(prompts_file=str(root / "prompts.jsonl"), reward_functions=[f"{root / 'my_rewards.py'}:brevity"])
    before = grpo_stage.sources(params)
    (root / "my_rewards.py").write_text(REWARDS + "\n# tuned\n")
    assert grpo_stage.sources(params) != before
    assert [p for p in (root / "runs-grpo" / "stages" / "grpo").iterdir()] == [first]

    entries = set((root / "runs-grpo" / "stages" / "grpo").iterdir())
    result, _ = grpo("my_rewards:broken")
    told(result, "my_rewards:broken returned nan for answer 0", report="bad reward function")
    published = {p for p in (root / "runs-grpo" / "stages" / "grpo").iterdir() if not p.name.endswith(".partial")}
    assert published == entries  # nothing published (the failed run's temporary folder is never renamed)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    failed = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id],
                                "tags.`alignflow.stage` = 'grpo'", order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert failed.info.status == "FAILED" and "returned nan" in failed.data.tags["alignflow.error"]

    result, _ = grpo("no_such_module:score")
    told(result, "reward function no_such_module:score: no module 'no_such_module'", report="bad reward function")


def test_the_shipped_gsm8k_pipeline_runs_sft_grpo_and_held_out_exact_match_on_a_gsm8k_shaped_file(tmp_path):
    """The shipped gsm8k-grpo pipeline on a GSM8K-shaped file written here (question / answer ending in
    '#### N'): SFT reads it through columns, GRPO's exact match sees each prompt's gold `answer`, and the
    evaluation reports held-out exact match for the policy and the reference."""
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            for a in range(1, 7) for b in range(1, 5)]
    (tmp_path / "data").mkdir()
    for name, part in (("gsm8k_train.jsonl", rows[:18]), ("gsm8k_test.jsonl", rows[18:])):
        (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = yaml.safe_load(SHIPPED.read_text())
    pipe = cfg["pipelines"]["gsm8k-grpo"]
    stage = {s["name"]: s for s in pipe["stages"]}
    stage["base"]["params"]["name_or_path"] = str(build_chat_model(tmp_path / "chat-model"))
    stage["sft"]["params"]["sft"] = {"max_length": 64, "train": {"max_steps": 2, "batch_size": 4}}
    stage["grpo"]["params"]["grpo"].update(iterations=2, prompts_per_batch=2, group_size=2, sampling={"max_new_tokens": 8})
    stage["evaluate"]["params"].update(prompts=6, sampling={"max_new_tokens": 8})
    cfg["pipelines"] = {"gsm8k-grpo": pipe}
    cfg["settings"].update(workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([CLI, "run", "gsm8k-grpo"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [evaluation] = [json.loads((s.parent / "metrics.json").read_text()) for s in (tmp_path / "runs").glob("stages/evaluate/*/_SUCCESS.json")]
    assert 0 <= evaluation["eval/reward/exact_match"] <= 1 and 0 <= evaluation["eval/ref_reward/exact_match"] <= 1
    [grpo] = [s.parent for s in (tmp_path / "runs").glob("stages/grpo/*/_SUCCESS.json")]
    history = [json.loads(line) for line in (grpo / "train_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all("reward/alignment.verifiable:exact_match" in h for h in history), history[0]
