"""The sandbox quickstart's training chain through the core library alone, on the device accelerate picks: world -> SFT ->
sample -> simulated labels -> reward model -> DPO and PPO -> gold evaluation of both against SFT.

No Prefect, MLflow, pandas or datasets: this is what runs on a GPU machine whose image has only torch,
transformers, accelerate and peft. Every tuned value is read from the `quickstart` pipeline of
pipelines.yaml, so the chain trains what the shipped pipeline trains.

    .venv/bin/python benchmarks/sandbox_chain.py [--tiny]

`--tiny` cuts every count (steps, prompts, iterations) to a few, to check that the chain runs (CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import typing
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # --tiny: dotted path in a stage's params -> value
    "world": {"demonstrations": 64, "train_prompts": 32, "test_prompts": 16},
    "sft": {"sft.train.max_steps": 3, "sft.train.batch_size": 8, "sft.train.warmup_steps": 1},
    "sample": {"prompts": 8, "samples_per_prompt": 3, "sampling.max_new_tokens": 12},
    "reward_model": {"reward.train.max_steps": 2, "reward.train.batch_size": 2, "reward.train.warmup_steps": 1},
    "dpo": {"dpo.train.max_steps": 2, "dpo.train.batch_size": 2, "dpo.train.warmup_steps": 1},
    "ppo": {"ppo.iterations": 1, "ppo.rollout_batch_size": 8, "ppo.minibatch_size": 4, "ppo.sampling.max_new_tokens": 12},
    "evaluate_dpo": {"prompts": 16, "sampling.max_new_tokens": 12},
}


def merged(instance, values: dict):
    """A frozen dataclass `instance` with `values` (nested dicts for nested dataclasses) put in."""
    hints = typing.get_type_hints(type(instance))
    changes = {}
    for key, value in values.items():
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = merged(current, value)
        elif typing.get_origin(hints[key]) is tuple and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(instance, **changes)


def quickstart_params(tiny: bool) -> dict[str, dict]:
    """Each quickstart stage's params as written in pipelines.yaml (plus the --tiny cuts)."""
    stages = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]["quickstart"]["stages"]
    params = {s["name"]: s.get("params", {}) for s in stages}
    for stage, cuts in (TINY.items() if tiny else ()):
        for dotted, value in cuts.items():
            node, *path = params[stage], *dotted.split(".")
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    return params


class Clock:
    """Seconds per stage (the device synchronised at each stop)."""

    def __init__(self, device: str):
        self.device, self.seconds, self._t = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 2)
        self._t = now
        print(f"  {name:14s} {self.seconds[name]:7.1f} s", flush=True)


def run(tiny: bool = False) -> dict:
    """The chain on the device accelerate picks (CUDA when there is one); returns times and figures. Its
    checkpoints go to a temporary folder that goes with it."""
    with tempfile.TemporaryDirectory(prefix="sandbox-chain-") as work:
        return chain(tiny, Path(work))


def chain(tiny: bool, work: Path) -> dict:
    from alignment.config import DPOConfig, PPOConfig, RewardConfig, SamplingParams, SFTConfig
    from alignment.data import tokenize_demonstrations, tokenize_pairs
    from alignment.evaluation import evaluate_policy, generate_answers, reward_scores
    from alignment.models import PolicyWithValueHead, RewardModel, frozen_copy, load_causal_lm
    from alignment.sandbox.assets import TinyModelConfig, build_model, build_tokenizer, world_texts
    from alignment.sandbox.world import World, WorldConfig
    from alignment.trainers.common import set_seed
    from alignment.trainers.dpo import DPOTrainer
    from alignment.trainers.ppo import PPOTrainer
    from alignment.trainers.reward import RewardTrainer
    from alignment.trainers.sft import SFTTrainer

    from accelerate import PartialState

    device = str(PartialState().device)
    p = quickstart_params(tiny)
    clock, out = Clock(device), {}
    print(f"sandbox chain on {device} ({'tiny' if tiny else 'the quickstart'}), torch {torch.__version__}", flush=True)

    w = p["world"]
    world = World(merged(WorldConfig(), w.get("world", {})))
    corpus = world.sft_corpus(w["demonstrations"], seed=0)
    tokenizer = build_tokenizer(world_texts(world) + [q + " " + a for q, a in corpus])
    policy = build_model(tokenizer, merged(TinyModelConfig(), w["model"]), seed=0)
    train_prompts, test_prompts = world.prompts(w["train_prompts"], seed=20), world.prompts(w["test_prompts"], seed=999, split="test")
    clock.lap("world")

    sft_cfg = merged(SFTConfig(), p["sft"]["sft"])
    set_seed(sft_cfg.train.seed)
    examples = tokenize_demonstrations(tokenizer, [q for q, _ in corpus], [a for _, a in corpus], sft_cfg.max_length)
    sft = SFTTrainer(policy, examples, tokenizer.pad_token_id, sft_cfg)
    history = sft.train()
    sft_model = sft.model.to(device)
    out["sft_final_loss"] = history[-1]["loss"]
    sft_model.save_pretrained(work / "sft")
    tokenizer.save_pretrained(work / "sft")
    clock.lap("sft")

    s = p["sample"]
    sampling = merged(SamplingParams(), s["sampling"])
    prompts = train_prompts[: s["prompts"]]
    answers = [generate_answers(sft_model, tokenizer, prompts, sampling, seed=k)[0] for k in range(s["samples_per_prompt"])]
    by_prompt = [(q, [a[i] for a in answers]) for i, q in enumerate(prompts)]
    labeled, out["pairs_with_empty_answer"] = world.preference_pairs(by_prompt, seed=0)
    n_train = int(len(labeled) * 0.85)  # the label stage's held_out 0.15
    rm_cfg = merged(RewardConfig(), p["reward_model"]["reward"])
    pairs = tokenize_pairs(tokenizer, [prompts[i] for i, _, _ in labeled], [c for _, c, _ in labeled], [r for _, _, r in labeled],
                           rm_cfg.max_length)
    out["pairs"] = len(labeled)
    clock.lap("sample+label")

    set_seed(rm_cfg.train.seed)
    rm = RewardTrainer(RewardModel.from_pretrained(work / "sft"), pairs[:n_train], tokenizer.pad_token_id, rm_cfg)
    rm.train()
    rm.model.save_pretrained(work / "rm")  # PPO's value model starts from it
    out["rm_accuracy"] = rm.evaluate(pairs[n_train:] or pairs[:1])["accuracy"]
    clock.lap("reward_model")

    dpo_cfg = merged(DPOConfig(), p["dpo"]["dpo"])
    set_seed(dpo_cfg.train.seed)
    dpo = DPOTrainer(load_causal_lm(work / "sft"), pairs[:n_train], tokenizer.pad_token_id, dpo_cfg)
    out["dpo_final_loss"] = dpo.train()[-1]["loss"]
    clock.lap("dpo")

    ppo_cfg = merged(PPOConfig(), p["ppo"]["ppo"])
    set_seed(ppo_cfg.seed)
    reward_fn = reward_scores(rm.model, tokenizer, rm_cfg.max_length)
    ppo = PPOTrainer(PolicyWithValueHead.from_pretrained(work / "sft", ppo_cfg.value_model, work / "rm"),
                     tokenizer, train_prompts[: p["ppo"]["prompts"]], reward_fn, ppo_cfg)
    last = ppo.train()[-1]
    out["ppo_final_kl"] = last["kl"]
    clock.lap("ppo")

    e = p["evaluate_dpo"]
    eval_sampling = merged(SamplingParams(), e["sampling"])
    reference = frozen_copy(sft_model)
    gold = lambda qs, ans: torch.tensor([world.gold_reward(q, a) for q, a in zip(qs, ans)])  # noqa: E731
    banned = lambda a: world.banned_count(a) > 0  # noqa: E731
    ref_answers, _ = generate_answers(reference, tokenizer, test_prompts[: e["prompts"]], eval_sampling, seed=1)
    for name, model in (("dpo", dpo.model), ("ppo", ppo.model.policy)):
        metrics, _ = evaluate_policy(model, reference, tokenizer, test_prompts[: e["prompts"]], eval_sampling, seed=0,
                                     reward_fn=reward_fn, gold_fn=gold, banned_fn=banned, reference_answers=ref_answers)
        out.update({f"{name}_{k.split('/')[1]}": v for k, v in metrics.items()
                    if k in ("eval/kl", "eval/gold_win_rate", "eval/gold_reward_mean", "eval/banned_word_rate", "eval/ref_banned_word_rate")})
    clock.lap("evaluate")
    return {"device": device, "tiny": tiny, "seconds": clock.seconds, "total_s": round(sum(clock.seconds.values()), 2),
            **{k: round(float(v), 4) for k, v in out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few steps of each stage (does it run?)")
    args = parser.parse_args()
    print(json.dumps(run(args.tiny), indent=1))


if __name__ == "__main__":
    main()
