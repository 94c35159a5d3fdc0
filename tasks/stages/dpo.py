"""The `dpo` stage: Direct Preference Optimization of a policy on the train split of preference pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


from alignment.config import DPOConfig, LoRAConfig
from tasks.stage import ModelStageParams, StageSpec, load_policy, metrics_logger, read_preferences, training_history, save_model, token_preflight, write_first_sequence, write_rejects
from tasks.store import stage_key

INPUTS = {"preferences": "preferences", "policy": "policy"}
LAUNCHABLE = True  # resources.processes > 1 runs it under torchrun / accelerate launch (tasks/launch.py)
OUTPUT = ("policy",)
TRAINED_WITH = "dpo.json"  # the beta of the implicit reward the policy learned, for its evaluation


class Params(ModelStageParams):
    drop_invalid: bool = False  # leave out the pairs the chat template or the token checks reject (rejects.parquet)
    dpo: DPOConfig = DPOConfig()  # training (TRL's defaults: beta 0.1, lr 1e-6, max_length 1024)
    lora: LoRAConfig | None = None  # train LoRA adapters only; the reference is the model with them off


class Stage(StageSpec):
    type: Literal["dpo"]
    params: Params = Params()


def reference_key(p: Params, inputs) -> str:
    """The key of the reference log-probs, an artifact of their own: the policy's and the data's content, and what
    lays out their table (max_length, group_by_prompt, drop_invalid, and for prompt groups the token budget, which
    splits a prompt's group before its row passes it: another table). (A param only when set: keys made before it
    existed stay valid.)"""
    layout = {"max_length": p.dpo.max_length, "group_by_prompt": p.dpo.group_by_prompt,
              **({"drop_invalid": True} if p.drop_invalid else {}),
              **({"group_tokens": p.dpo.micro_batch_tokens} if p.dpo.group_by_prompt and p.dpo.micro_batch_tokens else {})}
    return stage_key("reference_logps", layout,
                     {"policy": inputs["policy"].content_hash, "preferences": inputs["preferences"].content_hash})


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from safetensors.torch import load_file, save_file

    from alignment.lora import add_lora, merged
    from alignment.trainers.common import set_seed
    from alignment.trainers.dpo import DPOTrainer

    train = read_preferences(inputs, "train")
    policy, tokenizer = load_policy(inputs, dtype=p.dtype)
    examples, rejects = token_preflight(tokenizer, train, p.dpo.max_length, f"{inputs['preferences'].name} (train split)",
                                        p.drop_invalid, ctx.log)
    write_rejects(out, rejects)
    write_first_sequence(out, tokenizer, examples[0].prompt_ids, examples[0].chosen_ids)
    ref_key = reference_key(p, inputs)
    ref_file = ctx.store.final("reference_logps", ref_key) / "logps.safetensors"
    set_seed(p.dpo.train.seed)
    if p.lora is not None:
        policy = add_lora(policy, p.lora)
    with ctx.store.lock("reference_logps", ref_key):  # two DPO stages on the same policy and data compute them once
        stored = p.dpo.precompute_ref_logps and ctx.store.lookup("reference_logps", ref_key, log=ctx.log)
        reference_logps = load_file(str(ref_file))["logps"] if stored else None
        trainer = DPOTrainer(policy, examples, tokenizer.pad_token_id, p.dpo, reference_logps=reference_logps,
                             output_dir=out, callback=metrics_logger(ctx, run_id, out))
        if reference_logps is None and trainer.reference_logps is not None:  # (precompute_ref_logps: false: none)
            tmp = ctx.store.partial("reference_logps", ref_key)
            save_file({"logps": trainer.reference_logps.contiguous()}, str(tmp / "logps.safetensors"))
            ctx.store.publish("reference_logps", ref_key, {"run_id": run_id})
    ctx.tracker.set_tags(run_id, {"reference_logps.key": ref_key, "reference_logps.reused": reference_logps is not None})
    trainer.train()
    rows = training_history(out)
    save_model(merged(trainer.model), tokenizer, out)
    (out / TRAINED_WITH).write_text(json.dumps({"beta": p.dpo.beta, "loss_type": p.dpo.loss_type}, indent=1))
    return {"final_loss": rows[-1]["loss"], "pairs": float(len(examples))}


def trained_beta(policy_dir: str | Path) -> float | None:
    """The beta a DPO stage trained this policy with (None for a policy no DPO stage made)."""
    file = Path(policy_dir) / TRAINED_WITH
    return json.loads(file.read_text())["beta"] if file.is_file() else None
