"""The `ppo` stage: PPO of a policy against a trained reward model, with a KL penalty to the start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from alignment.config import LoRAConfig, PPOConfig
from tasks.data import DataError
from tasks.stage import ModelStageParams, StageSpec, metrics_logger, model_dir, template_preflight, training_history
from tasks.stages.sample import one_prompt_source, prompts_for, sources, whole_prompts_per_process  # noqa: F401 - sources: a prompts file is in the key

INPUTS = {"policy": "policy", "reward_model": "reward_model", "prompts": "prompts?"}
OUTPUT = ("policy",)
LAUNCHABLE = True  # resources.processes > 1 runs it under torchrun / accelerate launch (tasks/launch.py)


class Params(ModelStageParams):
    prompts: int = 2000  # how many prompts rollouts are drawn from
    prompts_file: str | None = None  # as for the sample stage; None: the prompts input (split train)
    columns: dict[str, str] = {}  # the prompts file's column -> ours, e.g. {question: prompt} (GSM8K)
    ppo: PPOConfig = PPOConfig()  # training (TRL's defaults: lr 3e-6, 4 epochs, KL coefficient 0.05, the value
    # model initialised from the reward model)
    lora: LoRAConfig | None = None  # LoRA adapters on the policy (reference = adapters off); the value model or head trains in full


class Stage(StageSpec):
    type: Literal["ppo"]
    params: Params = Params()
    _one_source = model_validator(mode="after")(one_prompt_source)
    _split = model_validator(mode="after")(whole_prompts_per_process)


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.lora import add_lora, merged
    from alignment.models import PolicyWithValueHead, load_tokenizer
    from alignment.sampling import declare_stop_tokens
    from alignment.trainers.common import set_seed
    from alignment.trainers.ppo import PPOTrainer
    from tasks.stages.train_reward_model import load_reward_fn

    path = model_dir(inputs, "policy")
    tokenizer = load_tokenizer(path)
    prompts = prompts_for(p, inputs)
    template_preflight(tokenizer, prompts, p.prompts_file or inputs["prompts"].name, ctx.log)
    reward_fn = load_reward_fn(inputs, dtype=p.dtype)
    set_seed(p.ppo.seed)
    if p.ppo.value_model == "reward_model":
        same_tokens(tokenizer, load_tokenizer(model_dir(inputs, "reward_model")), inputs)
    model = PolicyWithValueHead.from_pretrained(path, value_model=p.ppo.value_model, reward_model=model_dir(inputs, "reward_model"),
                                               dtype=p.dtype)
    if p.lora is not None:
        model.policy = add_lora(model.policy, p.lora)
    trainer = PPOTrainer(model, tokenizer, prompts, reward_fn, p.ppo,
                         output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    rows = training_history(out)
    trainer.model.policy = merged(trainer.model.policy)
    declare_stop_tokens(trainer.model.policy, tokenizer)
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    last = rows[-1]
    return {"final_reward": last["reward"], "final_kl": last["kl"], "final_policy_loss": last["policy_loss"],
            "final_value_loss": last["value_loss"]}


def same_tokens(tokenizer, rm_tokenizer, inputs) -> None:
    """A value model initialised from the reward model reads the policy's token ids: both must share one
    vocabulary, or every id would mean another token to it."""
    if tokenizer.get_vocab() != rm_tokenizer.get_vocab():
        raise DataError(
            f"ppo.value_model 'reward_model' reads the policy's tokens, but reward model {inputs['reward_model'].name} has "
            f"another tokenizer ({len(rm_tokenizer)} tokens, the policy {inputs['policy'].name} {len(tokenizer)}): set "
            f"ppo.value_model: policy (a copy of the policy's backbone) or shared (a head on the policy)")
