"""The `sample` stage: answers of a policy to prompts, several per prompt, for labeling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from alignment.config import SamplingParams
from tasks.data import prompt_columns, read_prompt_rows
from tasks.stage import ModelStageParams, StageSpec, load_policy, read_prompts, template_preflight
from tasks.store import file_hash

INPUTS = {"policy": "policy", "prompts": "prompts?"}
OUTPUT = ("samples",)


class Params(ModelStageParams):
    prompts: int = 500  # how many prompts to answer (the first ones)
    prompts_file: str | None = None  # .txt (a question a line) or a table with a prompt / messages column; None: the prompts input
    columns: dict[str, str] = {}  # the prompts file's column -> ours, e.g. {question: prompt} (GSM8K)
    samples_per_prompt: int = 2  # answers per prompt
    sampling: SamplingParams = SamplingParams()  # temperature, top-p, top-k, max new tokens
    seed: int = 0  # sampling noise


def one_prompt_source(stage):
    """A stage that reads prompts takes them from params.prompts_file or from inputs.prompts."""
    if (stage.params.prompts_file is None) == ("prompts" not in stage.inputs):
        raise ValueError("give prompts either as params.prompts_file or as inputs.prompts, not both or neither")
    return stage


def whole_prompts_per_process(stage):
    """Online RL on several processes (ppo, grpo, rloo): each process samples an equal share of a rollout's
    prompts, with all of a prompt's answers."""
    cfg = getattr(stage.params, stage.type)
    per_batch, field = ((cfg.rollout_batch_size, "rollout_batch_size") if stage.type == "ppo" else
                        (cfg.prompts_per_batch, "prompts_per_batch"))
    res = stage.resources
    n = res.processes * res.nodes
    if per_batch % n:
        over = f"resources.processes {n}" if res.nodes == 1 else f"the {n} processes of resources.nodes x processes"
        raise ValueError(f"{stage.type}.{field} {per_batch} does not split evenly over {over}: "
                         f"every process samples the same number of prompts; use a multiple of {n}")
    return stage


class Stage(StageSpec):
    type: Literal["sample"]
    params: Params = Params()
    _one_source = model_validator(mode="after")(one_prompt_source)


def prompts_for(p, inputs, split: str = "train") -> list:
    """The first p.prompts prompts of p.prompts_file, or of the given split of the `prompts` input."""
    return prompt_rows_for(p, inputs, split)[0]


def prompt_rows_for(p, inputs, split: str = "train") -> tuple[list, list[dict]]:
    """(prompts, the other columns of each prompt's row: what reward functions receive as keyword arguments)."""
    if p.prompts_file:
        prompts, extras = read_prompt_rows(p.prompts_file, p.columns)
        return prompts[: p.prompts], extras[: p.prompts]
    prompts = read_prompts(inputs, split, p.prompts)
    return prompts, [{} for _ in prompts]


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    import pandas as pd

    from alignment.evaluation import generate_answers
    from tasks import schemas

    model, tokenizer = load_policy(inputs, dtype=p.dtype)
    prompts = prompts_for(p, inputs)
    template_preflight(tokenizer, prompts, p.prompts_file or inputs["prompts"].name, ctx.log)
    rows = []
    for k in range(p.samples_per_prompt):
        answers, _ = generate_answers(model, tokenizer, prompts, p.sampling, seed=p.seed * 100 + k)
        rows += [{**prompt_columns(q), "answer": a, "prompt_index": i, "sample": k} for i, (q, a) in enumerate(zip(prompts, answers))]
    df = schemas.validate(pd.DataFrame(rows), schemas.SAMPLES, "samples")
    schemas.write_parquet(df, out / "samples.parquet")
    return {"samples": float(len(df)), "empty_answers": float((df["answer"].str.strip() == "").sum()),
            "answer_words_mean": float(df["answer"].str.split().str.len().mean())}


def sources(p) -> dict[str, str]:
    return {"prompts": file_hash(Path(p.prompts_file))} if p.prompts_file and Path(p.prompts_file).is_file() else {}
