"""The `label` stage: preference pairs from sampled answers, by people (the labeling page) or by the
sandbox world's simulated labeler (which needs the world among the inputs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.data import DataError
from tasks.stage import StageParams, StageSpec, read_table

INPUTS = {"samples": "samples", "world": "world?"}
OUTPUT = ("preferences",)


class Params(StageParams):
    labeler: Literal["human", "simulated"] = "human"  # people on the labeling page, or the sandbox world's labeler
    held_out: float = 0.15  # fraction of pairs marked split=test
    db: str = "labels.db"  # human: the label store that `alignflow label serve` writes to
    min_judgements: int = 0  # human: wait until this many judgements of this batch exist
    pairs_per_prompt: int | None = Field(1, ge=1)  # human: items a prompt (pairs of its answers, drawn at random); None: all
    wait_timeout_s: float = 86_400.0  # human: give up waiting after this long (the stage fails)
    seed: int = 0  # simulated: the labeler's noise; human: the draw of pairs


class Stage(StageSpec):
    type: Literal["label"]
    params: Params = Params()

    @model_validator(mode="after")
    def _world_for_simulated(self):
        if (self.params.labeler == "simulated") != ("world" in self.inputs):
            raise ValueError("labeler: simulated needs the sandbox world as inputs.world (and only it takes one)")
        return self


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    import pandas as pd

    from tasks import schemas

    samples = read_table(inputs, "samples", "samples.parquet", schemas.SAMPLES)
    metrics = {}
    if p.labeler == "simulated":
        from tasks.stages.world import load_world, simulated_pairs

        rows, empty = simulated_pairs(load_world(inputs), samples, p.seed)
        pairs, metrics["pairs_with_empty_answer"] = pd.DataFrame(rows), float(empty)
    else:
        pairs = human_labels(ctx, p, samples, inputs["samples"].content_hash[:16]).drop(columns="annotators")
        messages = dict(zip(samples["prompt"], samples["messages"]))
        pairs["messages"] = pairs["prompt"].map(messages).fillna("")
    n_train = int(len(pairs) * (1 - p.held_out))
    pairs["split"] = ["train"] * n_train + ["test"] * (len(pairs) - n_train)
    pairs = schemas.validate(pairs, schemas.PREFERENCES, "preferences")
    schemas.write_parquet(pairs, out / "preferences.parquet")
    return {**metrics, "pairs": float(len(pairs)), "train_pairs": float(n_train)}


def human_labels(ctx, p: Params, samples, batch: str):
    """Create the labeling batch, wait for min_judgements if asked, and take the judgements present."""
    from tasks.labeling import LabelStore

    store = LabelStore(p.db)
    added = store.add_batch(samples, batch, p.pairs_per_prompt, p.seed)
    ctx.log(f"[label] {added} new item(s) in {p.db}; label them with `alignflow label serve --db {p.db}`")
    deadline = time.time() + p.wait_timeout_s
    while len(store.judgements(batch)) < p.min_judgements:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(store.judgements(batch))} of {p.min_judgements} judgements after {p.wait_timeout_s} s")
        time.sleep(5.0)
    pairs = store.export(batch)
    if pairs.empty:
        raise DataError(f"{p.db}: no usable judgements yet for batch {batch} (ties and skips do not count)")
    return pairs


def sources(p: Params) -> dict[str, str]:
    """Human labels change without any input changing: the judgements are part of the key."""
    from tasks.labeling import LabelStore

    return {"judgements": LabelStore(p.db).fingerprint()} if p.labeler == "human" else {}
