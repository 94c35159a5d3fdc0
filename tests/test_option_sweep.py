"""Every documented option runs: each field of every stage's Params (and of the configs inside them) is set
to a value other than its default at least once, through `alignflow run` of one tiny pipeline.

The options are found by walking the Params models, not listed by hand: an option added without a sweep
value (or a reason it cannot run here) fails `test_every_option_has_a_sweep_value_or_a_reason`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from chat_model import build_chat_model

CLI = str(Path(sys.executable).parent / "alignflow")
TRAIN = {"max_steps": 2, "batch_size": 4, "grad_accum_steps": 2, "lr": 5e-4, "weight_decay": 0.01, "warmup_steps": 1,
         "lr_schedule": "constant", "max_grad_norm": 0.5, "seed": 3, "checkpoint_every": 1, "mixed_precision": "bf16",
         "group_by_length": False, "gradient_checkpointing": True}
SAMPLING = {"max_new_tokens": 6, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "stop_token_ids": [5], "batch_size": 4,
            "cache": "static"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
ONLINE = {"iterations": 2, "lr": 1e-4, "max_grad_norm": 0.5, "beta": 0.1, "missing_eos_penalty": 1.0, "seed": 1,
          "checkpoint_every": 1, "mixed_precision": "bf16", "gradient_checkpointing": True, "sampling": SAMPLING}
GROUP = {**ONLINE, "prompts_per_batch": 2, "group_size": 3, "minibatch_size": 3, "epochs": 2, "lr_schedule": "constant",
         "warmup_steps": 1, "clip_eps_low": 0.1, "clip_eps_high": 0.28}

# Options a tiny pipeline on 2 CPU cores cannot run, and where they are run instead.
NOT_SWEPT = {
    "TrainConfig.compile": "torch.compile of a pipeline's models: minutes of compilation on a CPU (tests/test_prefix.py "
                           "compiles a tiny model's SFT under a token budget)",
    "SamplingParams.compile": "a compiled decode step: minutes of compilation on a CPU (the GPU check runs it)",
    "RLOOConfig.advantage": "the leave-one-out baseline is RLOO's only advantage",
    "RLOOConfig.unbiased_kl": "RLOO's KL is in the reward, so its loss has no KL term to weight: refused (test_trainers; GRPO's is swept)",
    "label.labeler": "the human labeler: tests/test_labeling.py runs it through the labeling page",
    "label.db": "the human labeler's store: tests/test_labeling.py",
    "label.min_judgements": "the human labeler: tests/test_labeling.py",
    "label.pairs_per_prompt": "the human labeler: tests/test_labeling.py",
    "label.wait_timeout_s": "the human labeler: tests/test_labeling.py",
}


def world_params() -> dict:
    return {"demonstrations": 32, "train_prompts": 32, "test_prompts": 8, "seed": 1,
            "world": {"seed": 1, "banned_words": ["stupid", "dumb"], "p_polite": 0.4, "p_rude": 0.25, "p_off_topic": 0.25,
                      "p_banned": 0.2, "labeler_tau": 0.7},
            "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 64}}


def stages(files: dict[str, Path]) -> list[dict]:
    """One pipeline in which every swept option is set at least once."""
    prompts = {"prompts_file": str(files["prompts"]), "columns": {"question": "prompt"}}
    return [
        {"name": "world", "type": "world", "params": world_params()},
        {"name": "reverse", "type": "world", "params": {
            "task": "reverse", "demonstrations": 16, "train_prompts": 16, "test_prompts": 4,
            "reverse": {"seed": 1, "letters": "abcdef", "demo_lengths": [2, 3], "rl_lengths": [2, 3], "test_lengths": [3],
                        "p_careless": 0.5, "labeler_tau": 0.6},
            "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 32}}},
        {"name": "chat", "type": "model", "params": {"name_or_path": str(files["model"]), "trust_remote_code": True,
                                                      "system_turns": "drop"}},
        {"name": "sft", "type": "sft", "inputs": {"policy": "world", "demonstrations": "world"},
         "params": {"dtype": "float32", "sft": {"max_length": 64, "packing": True, "train": TRAIN}}},
        {"name": "sft_file", "type": "sft", "inputs": {"policy": "chat"},
         "params": {"data": str(files["demos"]), "format": "alpaca", "columns": {"task": "instruction"}, "drop_invalid": True,
                    "sft": {"max_length": 64, "packing": True, "micro_batch_tokens": 96, "train": {"max_steps": 1, "batch_size": 2}}}},
        {"name": "sample", "type": "sample", "inputs": {"policy": "sft"},
         "params": {"dtype": "float32", **prompts, "prompts": 4, "samples_per_prompt": 3, "seed": 1, "sampling": SAMPLING}},
        {"name": "label", "type": "label", "inputs": {"samples": "sample", "world": "world"},
         "params": {"labeler": "simulated", "held_out": 0.3, "seed": 1}},
        {"name": "prefs", "type": "import_preferences",
         "params": {"path": str(files["prefs"]), "format": "standard", "columns": {"question": "prompt"}, "drop_invalid": True,
                    "max_chars": 5000, "held_out": 0.3}},
        {"name": "reward_model", "type": "train_reward_model", "inputs": {"preferences": "prefs", "base": "sft"},
         "params": {"dtype": "float32", "drop_invalid": True, "reward": {"margin": 0.1, "center_coef": 0.01, "max_length": 64, "shared_prefix": False,
                                                     "group_by_prompt": True, "packing": True, "micro_batch_tokens": 160,
                                                     "train": {**TRAIN, "grad_accum_steps": 1}}}},
        {"name": "dpo", "type": "dpo", "inputs": {"preferences": "prefs", "policy": "sft"},
         "params": {"dtype": "float32", "drop_invalid": True, "lora": LORA,
                    "dpo": {"beta": 0.2, "loss_type": "ipo", "label_smoothing": 0.1, "max_length": 64, "precompute_ref_logps": False,
                            "shared_prefix": False, "group_by_prompt": True, "packing": True, "micro_batch_tokens": 128,
                            "train": {**TRAIN, "grad_accum_steps": 1}}}},
        {"name": "ppo", "type": "ppo", "inputs": {"policy": "sft", "reward_model": "reward_model"},
         "params": {"dtype": "float32", **prompts, "prompts": 8, "lora": LORA, "ppo": {
             **ONLINE, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 2, "clip_eps": 0.3, "value_clip_eps": None,
             "vf_coef": 0.2, "ent_coef": 0.01, "gamma": 0.99, "lam": 0.9, "kl_estimator": "k3", "target_kl": 6.0,
             "kl_horizon": 100, "whiten_advantages": False, "value_model": "policy"}}},
        {"name": "grpo", "type": "grpo", "inputs": {"policy": "sft", "reward_model": "reward_model"},
         "params": {"dtype": "float32", **prompts, "prompts": 8, "lora": LORA, "reward_functions": ["sweep_rewards.py:short"],
                    "reward_weights": {"sweep_rewards.py:short": 0.5, "reward_model": 2.0},
                    "grpo": {**GROUP, "advantage": "dr_grpo", "loss_type": "grpo", "unbiased_kl": False}}},
        {"name": "rloo", "type": "rloo", "inputs": {"policy": "sft"},
         "params": {"dtype": "float32", **prompts, "prompts": 8, "lora": LORA, "reward_functions": ["sweep_rewards.py:short"],
                    "reward_weights": {"sweep_rewards.py:short": 0.5}, "rloo": {**GROUP, "loss_type": "dapo"}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"policy": "dpo", "reference": "sft", "preferences": "prefs"},
         "params": {"dtype": "float32", **prompts, "prompts": 4, "sampling": SAMPLING, "max_length": 64, "beta": 0.2, "seed": 1,
                    "reward_functions": ["sweep_rewards.py:short"], "gates": {"eval/kl": "<= 1000"}, "register_as": "sweep"}},
    ]


# -- the options, found by walking the Params models ------------------------------------------------


def _fields(model) -> list[tuple[str, typing.Any]]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [(n, f.annotation) for n, f in model.model_fields.items()]
    hints = typing.get_type_hints(model)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(model)]


def _nested(annotation) -> type | None:
    """The config class an annotation holds (LoRAConfig | None -> LoRAConfig), or None for a plain value."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and (issubclass(t, BaseModel) or dataclasses.is_dataclass(t)):
            return t
    return None


def options(owner: str, model) -> dict[str, list[str]]:
    """'Owner.field' -> the paths (from the stage's params) where it appears; a stage's own Params is named by
    the stage type, nested configs by their class."""
    out: dict[str, list[str]] = {}

    def walk(owner_name: str, cls, path: str) -> None:
        for name, annotation in _fields(cls):
            inner = _nested(annotation)
            if inner is not None:
                walk(inner.__name__, inner, f"{path}{name}.")
            else:
                out.setdefault(f"{owner_name}.{name}", []).append(f"{path}{name}")

    walk(owner, model, "")
    return out


def all_options() -> dict[str, list[tuple[str, str]]]:
    from tasks.stages import MODULES

    found: dict[str, list[tuple[str, str]]] = {}
    for stage_type, module in MODULES.items():
        for option, paths in options(stage_type, module.Params).items():
            found.setdefault(option, []).extend((stage_type, p) for p in paths)
    return found


def set_options(pipeline: list[dict]) -> set[str]:
    """The options this pipeline sets to a value other than their default."""
    from tasks.stages import MODULES

    swept = set()
    for stage in pipeline:
        module = MODULES[stage["type"]]
        required = {n for n, f in module.Params.model_fields.items() if f.is_required()}
        swept |= {f"{stage['type']}.{n}" for n in required}  # (no default: every stage that has it sets it)
        defaults = module.Params.model_validate({k: v for k, v in stage["params"].items() if k in required}).model_dump(mode="json")
        given = stage["params"]
        for option, paths in options(stage["type"], module.Params).items():
            for path in paths:
                value, default, ok = given, defaults, True
                for key in path.split("."):
                    if not isinstance(value, dict) or key not in value:
                        ok = False
                        break
                    value, default = value[key], (default or {}).get(key) if isinstance(default, dict) else None
                if ok and json.loads(json.dumps(value)) != default:
                    swept.add(option)
    return swept


def test_every_option_has_a_sweep_value_or_a_reason(tmp_path):
    found = set(all_options())
    swept = set_options(stages({"model": tmp_path, "demos": tmp_path, "prefs": tmp_path, "prompts": tmp_path}))
    missing = sorted(found - swept - set(NOT_SWEPT))
    assert not missing, f"options no sweep stage sets to a non-default value (add one to stages(), or a reason to NOT_SWEPT): {missing}"
    assert not set(NOT_SWEPT) - found, "NOT_SWEPT names options that no longer exist"


@pytest.mark.usefixtures("prefect_server")
def test_every_option_runs_through_alignflow_run(tmp_path):
    files = {"model": build_chat_model(tmp_path / "chat-model")}
    files["demos"] = tmp_path / "demos.json"
    files["demos"].write_text(json.dumps([{"task": "How do I cook rice?", "input": "", "output": "Rinse the rice."},
                                          {"task": "Say hi.", "input": "", "output": "Hi."}, {"task": "", "output": "x"}]))
    files["prefs"] = tmp_path / "prefs.jsonl"
    files["prefs"].write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": f"user : how do i cook rice ? {i} assistant :", "chosen": "rinse the rice first .", "rejected": "figure it out ."}
        for i in range(12)] + [{"question": "hi", "chosen": "same", "rejected": "same"}]))
    files["prompts"] = tmp_path / "prompts.jsonl"
    files["prompts"].write_text("".join(json.dumps({"question": q, "answer": "rice"}) + "\n"
                                        for q in ["how do i cook rice ?", "how can i sleep better ?"] * 4))
    (tmp_path / "sweep_rewards.py").write_text("def short(prompts, answers, answer=None):\n"
                                               "    return [-len(a.split()) / 10 for a in answers]\n")
    cfg = {"settings": {"seed": 0, "workdir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
           "pipelines": {"sweep": {"stages": stages(files)}}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run([CLI, "run", "sweep"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "Traceback" not in out
    done = {line.split("]")[0].split("[")[-1] for line in out.splitlines() if "] done: " in line}
    assert done == {s["name"] for s in stages(files)}, out[-3000:]  # every stage computed
