"""The `rloo` stage: REINFORCE leave-one-out against reward functions, a reward model, or both (as grpo)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from alignment.config import RLOOConfig
from tasks.stage import StageSpec
from tasks.stages.grpo import INPUTS, LAUNCHABLE, OUTPUT, GroupParams, run_group, some_reward, sources  # noqa: F401 - the stage's contract
from tasks.stages.sample import one_prompt_source, whole_prompts_per_process


class Params(GroupParams):
    rloo: RLOOConfig = RLOOConfig()  # training (TRL's defaults: 2 answers a prompt, KL penalty 0.05 in the reward)


class Stage(StageSpec):
    type: Literal["rloo"]
    params: Params = Params()
    _one_source = model_validator(mode="after")(one_prompt_source)
    _some_reward = model_validator(mode="after")(some_reward)
    _split = model_validator(mode="after")(whole_prompts_per_process)


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    return run_group(ctx, p, p.rloo, inputs, out, run_id)
