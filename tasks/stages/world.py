"""The `world` stage: the sandbox world as a data source, and the evaluator of its gold reward.

This module is the only one outside alignment/sandbox/ that imports the sandbox. The stage writes what
other stages read as plain data: a tiny Llama with its word-level tokenizer (`model/`, a policy to
fine-tune), SFT demonstrations (`demonstrations.parquet`), prompts (`prompts.parquet`, splits train and
test) and the world's config (`world.json`). The simulated labeler and the gold metrics read that config
through `load_world`; only stages that name the world among their inputs ever see it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal


from alignment.sandbox.assets import TinyModelConfig
from alignment.sandbox.world import World, WorldConfig
from tasks.stage import StageParams, StageSpec, save_model

INPUTS: dict[str, str] = {}
OUTPUT = ("world", "policy", "demonstrations", "prompts")


class Params(StageParams):
    world: WorldConfig = WorldConfig()  # the world: banned words, answer mixture, labeler noise, seed
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

    world = World(p.world)
    corpus = world.sft_corpus(p.demonstrations, seed=p.seed)
    tokenizer = build_tokenizer(world_texts(world) + [q + " " + a for q, a in corpus])
    save_model(build_model(tokenizer, p.model, seed=p.seed), tokenizer, out)
    demos = pd.DataFrame({"prompt": [q for q, _ in corpus], "messages": "", "completion": [a for _, a in corpus]})
    schemas.write_parquet(schemas.validate(demos, schemas.DEMONSTRATIONS, "world demonstrations"), out / "demonstrations.parquet")
    train, test = world.prompts(p.train_prompts, seed=p.seed + 20), world.prompts(p.test_prompts, seed=p.seed + 999)
    prompts = pd.DataFrame({"prompt": train + test, "messages": "", "split": ["train"] * len(train) + ["test"] * len(test)})
    schemas.write_parquet(schemas.validate(prompts, schemas.PROMPTS, "world prompts"), out / "prompts.parquet")
    (out / "world.json").write_text(json.dumps(dataclasses.asdict(p.world), indent=2))
    return {"demonstrations": float(len(demos)), "vocab_size": float(len(tokenizer))}


# -- the gold reward, for the stages that take a world input ----------------------------------------


def load_world(inputs) -> World:
    cfg = json.loads((Path(inputs["world"].path) / "world.json").read_text())
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


def has_banned_word(world: World):
    return lambda answer: world.banned_count(answer) > 0


def gold_ordered(world: World, pairs: list[dict]) -> list[dict]:
    """The pairs ordered by the NOISELESS gold reward (pairs of equal gold left out): RM gold accuracy."""
    out = []
    for p in pairs:
        ga, gb = world.gold_reward(p["prompt"], p["chosen"]), world.gold_reward(p["prompt"], p["rejected"])
        if ga != gb:
            out.append({**p, "chosen": p["chosen"] if ga > gb else p["rejected"], "rejected": p["rejected"] if ga > gb else p["chosen"]})
    return out
