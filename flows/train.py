"""`alignflow train`: one trainer on a preference file, without Prefect or MLflow, for `accelerate launch`.

Pipelines run their stages in one process. To spread one training stage over several GPUs (or CPU
processes), launch this command under accelerate with a config from configs/accelerate/:

    accelerate launch --config_file configs/accelerate/ddp.yaml -m flows.cli train dpo \\
        --model Qwen/Qwen2-0.5B-Instruct --data prefs.jsonl --out runs/dpo-ddp --batch-size 64

--batch-size is the GLOBAL batch: each of N processes takes batch_size / N pairs a step and the
gradients are averaged, so N processes follow the same trajectory as one. The main process writes
<out>/model (a Hugging Face folder, LoRA adapters merged) and <out>/history.jsonl (one line per step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from alignment.data import tokenize_pairs
from alignment.lora import LoRAConfig, add_lora, merged
from alignment.models import RewardModel, load_causal_lm, load_tokenizer
from alignment.trainers.common import TrainConfig, set_seed
from alignment.trainers.dpo import DPOConfig, DPOTrainer
from alignment.trainers.reward import RewardConfig, RewardTrainer
from tasks.preferences import ImportParams, import_preferences

KINDS = ("dpo", "reward")


def train(kind: str, model: str, data: str, out: Path, train_cfg: TrainConfig, max_length: int = 512,
          beta: float = 0.1, lora_r: int = 0, gradient_checkpointing: bool = False) -> list[dict]:
    """Train a DPO policy or a reward model on `data` (any format `import_preferences` reads)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trainer {kind!r}: use one of {KINDS}")
    pairs, _, _ = import_preferences(ImportParams(path=data))
    tokenizer = load_tokenizer(model)
    examples = tokenize_pairs(tokenizer, list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"]), max_length)
    set_seed(train_cfg.seed)
    train_cfg = dataclasses.replace(train_cfg, gradient_checkpointing=gradient_checkpointing)
    if kind == "dpo":
        policy = load_causal_lm(model)
        if lora_r:
            policy = add_lora(policy, LoRAConfig(r=lora_r, alpha=2 * lora_r))
        trainer = DPOTrainer(policy, examples, tokenizer.pad_token_id, DPOConfig(train_cfg, beta=beta, max_length=max_length))
    else:
        rm = RewardModel.from_pretrained(model)
        trainer = RewardTrainer(rm, examples, tokenizer.pad_token_id, RewardConfig(train_cfg, max_length=max_length))
    history = trainer.train()
    if trainer.opt.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".model.tmp-{os.getpid()}"
        (merged(trainer.model) if kind == "dpo" else trainer.model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        tmp.rename(out / "model")
        (out / "train.json").write_text(json.dumps({
            "kind": kind, "model": model, "data": data, "pairs": len(examples), "lora_r": lora_r,
            "processes": trainer.opt.accelerator.num_processes, "train": dataclasses.asdict(train_cfg),
        }, indent=2))
        (out / "history.jsonl").write_text("".join(json.dumps({"step": i + 1, **h}) + "\n" for i, h in enumerate(history)))
    trainer.opt.accelerator.wait_for_everyone()
    return history


def train_config(steps: int, batch_size: int, lr: float, seed: int, mixed_precision: str) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, seed=seed, mixed_precision=mixed_precision,
                       warmup_steps=min(10, steps // 10))
