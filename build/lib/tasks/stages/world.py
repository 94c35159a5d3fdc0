"""The `world` stage: the sandbox world as a data source, and the evaluator of its gold reward.

This module is the only one outside alignment/sandbox/ that imports the sandbox. The stage writes what
other stages read as plain data: a tiny Llama with its word-level tokenizer (`model/`, a policy to
fine-tune), SFT demonstrations (`demonstrations.parquet`), prompts (`prompts.parquet`, splits train and
test: phrasings or sequences that training never sees) and the world's config (`world.json`). The
simulated labeler and the gold metrics read that config through `load_world`; only stages that name the
world among their inputs ever see it. Two tasks: the friendly assistant (a hidden gold reward) and
reversing letter sequences (alignment/sandbox/reverse.py: the gold reward is an exact-match check).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal


from alignment.sandbox.assets import TinyModelConfig
from alignment.sandbox.reverse import ReverseConfig, ReverseWorld
from alignment.sandbox.world import World, WorldConfig
from tasks.stage import StageParams, StageSpec, save_model

INPUTS: dict[str, str] = {}
OUTPUT = ("world", "policy", "demonstrations", "prompts")


class Params(StageParams):
    task: Literal["assistant", "reverse"] = "assistant"  # the friendly assistant (gold: a hidden reward), or
    # reversing letter sequences (gold: exact match, a verifiable reward)
    world: WorldConfig = WorldConfig()  # the assistant world: banned words, answer mixture, labeler noise, seed
    reverse: ReverseConfig = ReverseConfig()  # the reverse task: lengths, the teacher's carelessness
    model: TinyModelConfig = TinyModelConfig()  # size of the tiny Llama built from scratch (random weights)
    demonstrations: int = 4000  # SFT demonstrations drawn from the world's corpus
    train_prompts: int = 2000  # prompts for sampling and RL (split "train")
    test_prompts: int = 400  # held-out prompts for evaluation (split "test")
    seed: int = 0  # draws of the corpus, the prompts and the model's initial weights


class Stage(StageSpec):
    type: Literal["world"]
    params: Params


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    import pandas as pd

    from alignment.sandbox.assets import build_model, build_tokenizer, world_texts
    from tasks import schemas

    world = World(p.world) if p.task == "assistant" else ReverseWorld(p.reverse)
    corpus = world.sft_corpus(p.demonstrations, seed=p.seed)
    texts = world_texts(world) if p.task == "assistant" else world.texts()
    tokenizer = build_tokenizer(texts + [q + " " + a for q, a in corpus])
    save_model(build_model(tokenizer, p.model, seed=p.seed), tokenizer, out)
    demos = pd.DataFrame({"prompt": [q for q, _ in corpus], "messages": "", "completion": [a for _, a in corpus]})
    schemas.write_parquet(schemas.validate(demos, schemas.DEMONSTRATIONS, "world demonstrations"), out / "demonstrations.parquet")
    # the test split asks in phrasings (frames) that no training prompt or demonstration uses
    train, test = world.prompts(p.train_prompts, seed=p.seed + 20), world.prompts(p.test_prompts, seed=p.seed + 999, split="test")
    prompts = pd.DataFrame({"prompt": train + test, "messages": "", "split": ["train"] * len(train) + ["test"] * len(test)})
    schemas.write_parquet(schemas.validate(prompts, schemas.PROMPTS, "world prompts"), out / "prompts.parquet")
    cfg = p.world if p.task == "assistant" else p.reverse
    (out / "world.json").write_text(json.dumps({"task": p.task, **dataclasses.asdict(cfg)}, indent=2))
    return {"demonstrations": float(len(demos)), "vocab_size": float(len(tokenizer))}


# -- the gold reward, for the stages that take a world input ----------------------------------------


def load_world(inputs) -> World | ReverseWorld:
    cfg = json.loads((Path(inputs["world"].path) / "world.json").read_text())
    if cfg.pop("task", "assistant") == "reverse":
        return ReverseWorld(ReverseConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}))
    return World(WorldConfig(**{**cfg, "banned_words": tuple(cfg["banned_words"])}))


def simulated_pairs(world: World, samples, seed: int) -> tuple[list[dict], int]:
    """Every two different answers of a prompt, labeled by sigma((g_a - g_b) / tau); pairs with an empty
    answer are left out and counted (World.preference_pairs)."""
    groups = [(g["prompt"].iloc[0], g["messages"].iloc[0], g.sort_values("sample")["answer"].tolist())
              for _, g in samples.groupby("prompt_index", sort=True)]
    labeled, empty = world.preference_pairs([(prompt, answers) for prompt, _, answers in groups], seed)
    return [{"prompt": groups[i][0], "messages": groups[i][1], "chosen": c, "rejected": r} for i, c, r in labeled], empty


def gold_scores(world: World):
    import torch

    return lambda prompts, answers: torch.tensor([world.gold_reward(q, a) for q, a in zip(prompts, answers)])


def has_banned_word(world: World | ReverseWorld):
    """Whether an answer holds a banned word; None for a world without banned words."""
    return (lambda answer: world.banned_count(answer) > 0) if isinstance(world, World) else None


def gold_ordered(world: World, pairs: list[dict]) -> list[dict]:
    """The pairs ordered by the NOISELESS gold reward (pairs of equal gold left out): RM gold accuracy."""
    out = []
    for p in pairs:
        ga, gb = world.gold_reward(p["prompt"], p["chosen"]), world.gold_reward(p["prompt"], p["rejected"])
        if ga != gb:
            out.append({**p, "chosen": p["chosen"] if ga > gb else p["rejected"], "rejected": p["rejected"] if ga > gb else p["chosen"]})
    return out
