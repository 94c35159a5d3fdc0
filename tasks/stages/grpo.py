"""The `grpo` stage: GRPO of a policy against reward functions, a trained reward model, or both.

Its scores are sum_k w_k f_k(prompt, answer) over the named reward functions (tasks/rewards.py) and the
`reward_model` input when there is one (weight `reward_weights.reward_model`, default 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from alignment.config import GRPOConfig, LoRAConfig
from tasks import rewards
from tasks.stage import ModelStageParams, StageSpec, load_policy, metrics_logger, save_model, template_preflight, training_history
from tasks.stages.sample import one_prompt_source, prompt_rows_for, whole_prompts_per_process

INPUTS = {"policy": "policy", "reward_model": "reward_model?", "prompts": "prompts?"}
OUTPUT = ("policy",)
LAUNCHABLE = True  # resources.processes > 1 runs it under torchrun / accelerate launch (tasks/launch.py)


class GroupParams(ModelStageParams):
    prompts: int = 2000  # how many prompts rollouts are drawn from
    prompts_file: str | None = None  # as for the sample stage; None: the prompts input (split train)
    columns: dict[str, str] = {}  # the prompts file's column -> ours, e.g. {question: prompt} (GSM8K)
    reward_functions: list[str] = []  # callables f(prompts, answers, **columns) -> floats, as module:function or file.py:function;
    # columns: the prompts file's other columns, one value an answer (TRL's way), those the function names or all with **kwargs
    reward_weights: dict[str, float] = {}  # weight of each reward function (and of "reward_model"); default 1
    lora: LoRAConfig | None = None  # LoRA adapters on the policy (reference = adapters off)

    @field_validator("reward_functions")
    @classmethod
    def _specs(cls, specs: list[str]) -> list[str]:
        return [rewards.check_spec(s) for s in specs]


class Params(GroupParams):
    grpo: GRPOConfig = GRPOConfig()  # training (TRL's defaults: 8 answers a prompt, lr 1e-6, beta 0, loss "dapo")


def some_reward(stage):
    """A stage of this family needs reward functions, a reward_model input, or both; weights name one of them."""
    names = set(stage.params.reward_functions) | ({rewards.REWARD_MODEL} if "reward_model" in stage.inputs else set())
    if not names:
        raise ValueError("give params.reward_functions, an inputs.reward_model, or both: there is nothing to score answers with")
    unknown = set(stage.params.reward_weights) - names
    if unknown:
        raise ValueError(f"reward_weights names {sorted(unknown)}, which score nothing here; use {sorted(names)}")
    return stage


class Stage(StageSpec):
    type: Literal["grpo"]
    params: Params = Params()
    _one_source = model_validator(mode="after")(one_prompt_source)
    _some_reward = model_validator(mode="after")(some_reward)
    _split = model_validator(mode="after")(whole_prompts_per_process)


def run_group(ctx, p: GroupParams, cfg, inputs, out: Path, run_id: str) -> dict[str, float]:
    """The body of the grpo and rloo stages: cfg is the GRPOConfig or RLOOConfig."""
    from alignment.lora import add_lora, merged
    from alignment.trainers.common import set_seed
    from alignment.trainers.group import GroupTrainer
    from tasks.stages.train_reward_model import load_reward_fn

    fns = {spec: rewards.load(spec) for spec in p.reward_functions}
    if "reward_model" in inputs:
        fns[rewards.REWARD_MODEL] = load_reward_fn(inputs, dtype=p.dtype)
    policy, tokenizer = load_policy(inputs, dtype=p.dtype)
    set_seed(cfg.seed)
    if p.lora is not None:
        policy = add_lora(policy, p.lora)
    prompts, extras = prompt_rows_for(p, inputs)
    template_preflight(tokenizer, prompts, p.prompts_file or inputs["prompts"].name, ctx.log)
    trainer = GroupTrainer(policy, tokenizer, prompts, fns, cfg, reward_weights=p.reward_weights, prompt_columns=extras,
                           output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    last = training_history(out)[-1]
    save_model(merged(trainer.model), tokenizer, out)
    return {"final_reward": last["reward"], "final_loss": last["loss"], **({"final_kl": last["kl"]} if "kl" in last else {})}


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    return run_group(ctx, p, p.grpo, inputs, out, run_id)


def sources(p) -> dict[str, str]:
    """A prompts file and the reward functions' source files are part of the cache key."""
    from tasks.stages.sample import sources as prompt_sources

    return {**prompt_sources(p), **rewards.source_hashes(p.reward_functions)}
