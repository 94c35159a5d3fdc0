"""The `train_reward_model` stage: the base LM + a scalar head trained with the Bradley-Terry loss.

Held-out metrics on the test split: accuracy and margin; with the sandbox world among the inputs, also
the accuracy against the world's noiseless gold preference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from alignment.config import RewardConfig
from tasks.data import prompt_of
from tasks.stage import ModelStageParams, StageSpec, metrics_logger, model_dir, read_preferences, training_history, save_model, token_preflight, write_first_sequence, write_rejects

INPUTS = {"preferences": "preferences", "base": "policy", "world": "world?"}
LAUNCHABLE = True  # resources.processes > 1 runs it under torchrun / accelerate launch (tasks/launch.py)
OUTPUT = ("reward_model",)
CONFIG_FILE = "reward_config.json"  # how the model reads text: later stages score answers the same way


class Params(ModelStageParams):
    drop_invalid: bool = False  # leave out the pairs the chat template or the token checks reject (rejects.parquet)
    reward: RewardConfig = RewardConfig()  # training (TRL's defaults: lr 1e-4, max_length 1024)


class Stage(StageSpec):
    type: Literal["train_reward_model"]
    params: Params = Params()


def examples(tokenizer, pairs: list[dict], max_length: int):
    from alignment.data import tokenize_pairs

    return tokenize_pairs(tokenizer, [prompt_of(p) for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs], max_length)


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.models import RewardModel, load_tokenizer
    from alignment.trainers.common import set_seed
    from alignment.trainers.reward import RewardTrainer

    train, test = read_preferences(inputs, "train"), read_preferences(inputs, "test")
    base = model_dir(inputs, "base")
    tokenizer = load_tokenizer(base)
    train_examples, rejects = token_preflight(tokenizer, train, p.reward.max_length, f"{inputs['preferences'].name} (train split)",
                                              p.drop_invalid, ctx.log)
    write_rejects(out, rejects)
    write_first_sequence(out, tokenizer, train_examples[0].prompt_ids, train_examples[0].chosen_ids)
    set_seed(p.reward.train.seed)
    trainer = RewardTrainer(RewardModel.from_pretrained(base, dtype=p.dtype), train_examples, tokenizer.pad_token_id, p.reward,
                            output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    rows = training_history(out)
    metrics = {"final_loss": rows[-1]["loss"]}
    metrics.update({f"eval/{k}": v for k, v in trainer.evaluate(examples(tokenizer, test, p.reward.max_length)).items()})
    if "world" in inputs:
        from tasks.stages.world import gold_ordered, load_world

        gold = examples(tokenizer, gold_ordered(load_world(inputs), test), p.reward.max_length)
        metrics["eval/gold_accuracy"] = trainer.evaluate(gold)["accuracy"]
    save_model(trainer.model, tokenizer, out)
    (out / "model" / CONFIG_FILE).write_text(json.dumps({"max_length": p.reward.max_length}))
    return metrics


def load_reward_fn(inputs, slot: str = "reward_model", dtype: str = "auto"):
    """reward_fn(prompts, answers) of a trained reward model, reading text as it was trained to."""
    from alignment.evaluation import reward_scores
    from alignment.models import RewardModel, load_tokenizer

    path = model_dir(inputs, slot)
    max_length = json.loads((path / CONFIG_FILE).read_text())["max_length"]
    return reward_scores(RewardModel.from_pretrained(path, dtype=dtype), load_tokenizer(path), max_length)
