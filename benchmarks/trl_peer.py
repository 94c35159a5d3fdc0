"""TRL's GRPOTrainer and RLOOTrainer as a peer of the `compare-methods` pipeline's grpo and rloo stages.

The peer gets what our stage gets: the SFT policy folder, the reward model (scored by the same function our
stage uses), the same 2,000 train prompts (text, or conversations where
the data has them, as TRL's users pass them; the harness checks that TRL's prompt tokens equal ours) and the stage's settings mapped one to one:

    prompts_per_batch x group_size answers a generation   -> generation_batch_size, num_generations
    minibatch_size answers an optimizer step              -> per_device_train_batch_size (no accumulation)
    iterations                                            -> max_steps = iterations x steps_per_generation
    lr, constant schedule, beta, max_new_tokens, temperature -> learning_rate, lr_scheduler_type, beta, ...
    missing_eos_penalty                                   -> subtracted in the reward function (TRL has no option)

Everything else is TRL's default (loss "dapo" for GRPO; RLOO's sequence-level ratio), fp32 on the CPU as ours.
The trained policy is saved as a model folder; bench_methods.py evaluates it with our `evaluate` stage.
"""

from __future__ import annotations

import json
from pathlib import Path


def _text(completion) -> str:
    """A completion as TRL hands it to a reward function: a string, or [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def reward_function(rm, prompts: list, penalty: float, eos: int):
    """Our reward model as a TRL reward function: rm(prompts, answers) -> scores, minus `penalty` for an answer
    without EOS. TRL calls it with keyword arguments: its own `prompts` (the batch's, in TRL's form) and every
    dataset column per answer, so the prompt comes from our list through the `prompt_index` column."""

    def reward_model(completions, completion_ids, prompt_index, **_):
        scores = rm([prompts[i] for i in prompt_index], [_text(c) for c in completions])
        return [float(s) - penalty * (eos not in ids) for s, ids in zip(scores.tolist(), completion_ids)]

    return reward_model


def train(method: str, params: dict, inputs: dict, out: Path, seed: int) -> Path:
    """Train TRL's `method` ("grpo" or "rloo") with a stage's `params` (the pipeline's, as a dict) on the
    stage outputs `inputs` (policy, reward_model, prompts: StageOutput). Returns the saved model folder."""
    import torch
    from datasets import Dataset

    from alignment.data import encode_prompt
    from alignment.models import load_causal_lm, load_tokenizer
    from tasks.stage import model_dir, read_prompts
    from tasks.stages.train_reward_model import load_reward_fn

    cfg = params[method]
    torch.manual_seed(seed)
    policy_dir = model_dir(inputs, "policy")
    tokenizer = load_tokenizer(policy_dir)
    prompts = read_prompts(inputs, "train", params["prompts"])
    for p in prompts[:32]:  # what TRL feeds the model is what ours does (its _tokenize_prompts)
        trl_ids = (tokenizer(text=p)["input_ids"] if isinstance(p, str) else
                   tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        assert list(trl_ids) == encode_prompt(tokenizer, p), "TRL would tokenize the prompts differently"
    reward_model = reward_function(load_reward_fn(inputs), prompts, cfg.get("missing_eos_penalty") or 0.0,
                                   tokenizer.eos_token_id)
    data = Dataset.from_list([{"prompt": p, "prompt_index": i} for i, p in enumerate(prompts)])
    generation = cfg["prompts_per_batch"] * cfg["group_size"]
    minibatch = cfg.get("minibatch_size") or generation
    steps_per_generation = generation // minibatch
    common = dict(
        output_dir=str(out / "trl"), per_device_train_batch_size=minibatch, gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation, num_generations=cfg["group_size"],
        max_steps=cfg["iterations"] * steps_per_generation, learning_rate=cfg["lr"],
        lr_scheduler_type=cfg.get("lr_schedule", "constant"), beta=cfg["beta"],
        max_completion_length=cfg["sampling"]["max_new_tokens"], temperature=cfg["sampling"].get("temperature", 1.0),
        seed=seed, data_seed=seed, bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=steps_per_generation, disable_tqdm=True, dataloader_num_workers=0,
    )
    if method == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    model = load_causal_lm(policy_dir)
    trainer = Trainer(model=model, reward_funcs=[reward_model], args=Config(**common), train_dataset=data,
                      processing_class=tokenizer)
    trainer.train()
    folder = out / "model"
    trainer.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))
    return folder
