"""The sandbox quickstart in plain Python: SFT -> sample -> simulated labels -> reward model -> DPO and
PPO -> evaluate. Each stage is one function, so the Prefect tasks can wrap them one by one.

    python -m alignment.sandbox.quickstart --out runs/quickstart
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.data import PairExample, encode_answer, encode_prompt, fit_to_length, tokenize_pairs
from alignment.evaluation import evaluate_policy, generate_answers
from alignment.models import PolicyWithValueHead, RewardModel, frozen_copy
from alignment.sampling import SamplingParams
from alignment.sandbox.assets import TinyModelConfig, build_model, build_tokenizer, world_texts
from alignment.sandbox.world import World, WorldConfig
from alignment.trainers.common import TrainConfig, set_seed
from alignment.trainers.dpo import DPOConfig, DPOTrainer
from alignment.trainers.ppo import PPOConfig, PPOTrainer
from alignment.trainers.reward import RewardConfig, RewardTrainer
from alignment.trainers.sft import SFTConfig, SFTTrainer


@dataclass(frozen=True)
class QuickstartConfig:
    seed: int = 0  # seed of the world, the models and every stage
    world: WorldConfig = field(default_factory=WorldConfig)  # the sandbox world
    model: TinyModelConfig = field(default_factory=TinyModelConfig)  # size of the tiny policy
    sft_examples: int = 4000  # demonstrations in the SFT corpus
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(TrainConfig(max_steps=300, batch_size=32, lr=3e-3, warmup_steps=20)))
    sample_prompts: int = 500  # prompts sampled for preference labeling
    samples_per_prompt: int = 8  # answers per prompt; every two of them form a pair (28 pairs a prompt)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=48, temperature=1.0))
    # reward model and DPO: batches of 8 / 4 prompts with all their answers and labeled pairs
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(TrainConfig(max_steps=150, batch_size=8, lr=1e-3, warmup_steps=10), group_by_prompt=True))
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(TrainConfig(max_steps=130, batch_size=4, lr=5e-4, warmup_steps=10), beta=0.5, group_by_prompt=True))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(iterations=30, rollout_batch_size=128, minibatch_size=32, lr=3e-4, beta=0.3, missing_eos_penalty=2.0))
    # the value function on its own copy of the SFT backbone: with the value head on the policy's trunk,
    # value-loss gradients (returns of -100 on a few garbled answers) swamped the policy's and PPO
    # collapsed into word salad on some prompts (benchmarks/RESULTS.md)
    separate_value_model: bool = True
    eval_prompts: int = 400  # held-out prompts for the final evaluation
    curve_points: int = 3  # evaluations during DPO and PPO training, for the reward-KL plot
    curve_prompts: int = 100  # prompts per evaluation during training


def gold_scores(world: World):
    return lambda prompts, answers: torch.tensor([world.gold_reward(p, a) for p, a in zip(prompts, answers)])


def reward_scores(rm: RewardModel, tokenizer, max_length: int = 128):
    """reward_fn(prompts, answers) of a trained reward model (its own tokenizer, text in)."""
    from alignment.data import collate_answers

    @torch.no_grad()
    def fn(prompts, answers):
        rm.eval()
        enc = [fit_to_length(encode_prompt(tokenizer, p), [encode_answer(tokenizer, a)], max_length) for p, a in zip(prompts, answers)]
        ids, mask, _ = collate_answers([e[0] for e in enc], [e[1][0] for e in enc], tokenizer.pad_token_id)
        return rm(ids, mask)

    return fn


def sft_trainer(world: World, n_examples: int, model_cfg: TinyModelConfig, sft: SFTConfig, seed: int,
                output_dir: Path | None = None, callback=None) -> tuple[SFTTrainer, object]:
    """The sandbox SFT set-up: corpus, a tokenizer trained on it, a tiny Llama, and its trainer."""
    corpus = world.sft_corpus(n_examples, seed=seed)
    tokenizer = build_tokenizer(world_texts(world) + [p + " " + a for p, a in corpus])
    model = build_model(tokenizer, model_cfg, seed=seed)
    examples = [fit_to_length(encode_prompt(tokenizer, p), [encode_answer(tokenizer, a)], sft.max_length) for p, a in corpus]
    trainer = SFTTrainer(model, [(p, a[0]) for p, a in examples], tokenizer.pad_token_id, sft,
                         output_dir=output_dir, callback=callback)
    return trainer, tokenizer


def stage_sft(world: World, cfg: QuickstartConfig, out: Path):
    trainer, tokenizer = sft_trainer(world, cfg.sft_examples, cfg.model, cfg.sft, cfg.seed)
    history = trainer.train()
    trainer.model.save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    return trainer.model, tokenizer, history


def stage_sample(model, tokenizer, world: World, cfg: QuickstartConfig) -> list[dict]:
    prompts = world.prompts(cfg.sample_prompts, seed=cfg.seed + 10)
    rows = []
    for k in range(cfg.samples_per_prompt):
        answers, _ = generate_answers(model, tokenizer, prompts, cfg.sampling, seed=cfg.seed * 100 + k)
        rows += [{"prompt": p, "answer": a, "sample": k} for p, a in zip(prompts, answers)]
    return rows


def stage_label(samples: list[dict], world: World, seed: int) -> list[dict]:
    """Pairs every two answers of a prompt and asks the simulated labeler; identical answers are skipped."""
    by_prompt: dict[tuple[int, str], list[str]] = {}
    n_prompts = len(samples) // max(1, max(s["sample"] for s in samples) + 1)
    for i, s in enumerate(samples):
        by_prompt.setdefault((i % n_prompts, s["prompt"]), []).append(s["answer"])
    rng = random.Random(seed)
    pairs = []
    for (_, prompt), answers in by_prompt.items():
        for a, b in itertools.combinations(answers, 2):
            if a == b:
                continue
            choice = world.label(prompt, a, b, rng)
            chosen, rejected = (a, b) if choice == 0 else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def split_pairs(pairs: list[dict], held_out: float = 0.15) -> tuple[list[dict], list[dict]]:
    n = int(len(pairs) * (1 - held_out))
    return pairs[:n], pairs[n:]


def to_examples(tokenizer, pairs: list[dict], max_length: int) -> list[PairExample]:
    return tokenize_pairs(tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs], max_length)


def gold_pair_accuracy(rm_trainer: RewardTrainer, tokenizer, pairs: list[dict], world: World, max_length: int) -> float:
    """Held-out RM accuracy against the NOISELESS gold preference (pairs with equal gold left out)."""
    ordered = []
    for p in pairs:
        ga, gb = world.gold_reward(p["prompt"], p["chosen"]), world.gold_reward(p["prompt"], p["rejected"])
        if ga != gb:
            ordered.append({"prompt": p["prompt"], "chosen": p["chosen"] if ga > gb else p["rejected"],
                            "rejected": p["rejected"] if ga > gb else p["chosen"]})
    return rm_trainer.evaluate(to_examples(tokenizer, ordered, max_length))["accuracy"]


def stage_reward_model(sft_dir: Path, tokenizer, train_pairs, test_pairs, world: World, cfg: QuickstartConfig, out: Path):
    set_seed(cfg.seed)
    rm = RewardModel.from_pretrained(sft_dir)
    trainer = RewardTrainer(rm, to_examples(tokenizer, train_pairs, cfg.reward.max_length), tokenizer.pad_token_id, cfg.reward)
    history = trainer.train()
    metrics = trainer.evaluate(to_examples(tokenizer, test_pairs, cfg.reward.max_length))
    metrics["gold_accuracy"] = gold_pair_accuracy(trainer, tokenizer, test_pairs, world, cfg.reward.max_length)
    trainer.model.save_pretrained(out / "reward_model")
    return trainer.model, metrics, history


def curve_callback(get_model, every: int, eval_fn, curve: list):
    """A metrics callback that evaluates the policy every `every` steps (for the reward-KL plot)."""

    def callback(step, metrics):
        if eval_fn is not None and every and step % every == 0:
            curve.append({"step": step, **eval_fn(get_model())})
            get_model().train()

    return callback


def stage_dpo(sft_dir: Path, tokenizer, pairs, cfg: QuickstartConfig, out: Path, eval_fn=None, curve: list | None = None):
    set_seed(cfg.seed)
    from alignment.models import load_causal_lm

    every = cfg.dpo.train.max_steps // cfg.curve_points if cfg.curve_points else 0
    holder = {}
    callback = curve_callback(lambda: holder["t"].model, every, eval_fn, curve if curve is not None else [])
    trainer = holder["t"] = DPOTrainer(
        load_causal_lm(sft_dir), to_examples(tokenizer, pairs, cfg.dpo.max_length), tokenizer.pad_token_id, cfg.dpo, callback=callback
    )
    history = trainer.train()
    trainer.model.save_pretrained(out / "dpo")
    return trainer.model, history


def stage_ppo(
    sft_dir: Path, tokenizer, prompts, reward_fn, cfg: QuickstartConfig, out: Path,
    ppo: PPOConfig | None = None, eval_fn=None, curve: list | None = None,
):
    set_seed(cfg.seed)
    ppo = ppo or cfg.ppo
    model = PolicyWithValueHead.from_pretrained(sft_dir, separate_value_model=cfg.separate_value_model)
    every = ppo.iterations // cfg.curve_points if cfg.curve_points else 0
    holder = {}
    callback = curve_callback(lambda: holder["t"].model.policy, every, eval_fn, curve if curve is not None else [])
    trainer = holder["t"] = PPOTrainer(model, tokenizer, prompts, reward_fn, ppo, callback=callback)
    history = trainer.train()
    trainer.model.save_pretrained(out / "ppo")
    return trainer.model.policy, history


def run(cfg: QuickstartConfig, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world)
    timings, results = {}, {}
    t = time.perf_counter()
    policy, tokenizer, _ = stage_sft(world, cfg, out)
    timings["sft"] = time.perf_counter() - t
    reference = frozen_copy(policy)
    t = time.perf_counter()
    samples = stage_sample(policy, tokenizer, world, cfg)
    pairs = stage_label(samples, world, cfg.seed)
    train_pairs, test_pairs = split_pairs(pairs)
    timings["sample+label"] = time.perf_counter() - t
    t = time.perf_counter()
    rm, rm_metrics, _ = stage_reward_model(out / "sft", tokenizer, train_pairs, test_pairs, world, cfg, out)
    timings["reward_model"] = time.perf_counter() - t
    results["reward_model"] = rm_metrics
    log(f"reward model: {rm_metrics}")
    eval_prompts = world.prompts(cfg.eval_prompts, seed=cfg.seed + 999)
    # every policy is compared with the same reference answers: sampled once (the seed evaluate_policy uses)
    reference_answers, _ = generate_answers(reference, tokenizer, eval_prompts, cfg.sampling, seed=cfg.seed + 8)
    scores = dict(reward_fn=reward_scores(rm, tokenizer), gold_fn=gold_scores(world))
    evaluate = lambda model: evaluate_policy(  # noqa: E731
        model, reference, tokenizer, eval_prompts, cfg.sampling, seed=cfg.seed + 7, **scores,
        banned_fn=lambda a: world.banned_count(a) > 0, reference_answers=reference_answers,
    )[0]
    curve_prompts = eval_prompts[: cfg.curve_prompts]
    quick_eval = lambda model: evaluate_policy(  # noqa: E731
        model, reference, tokenizer, curve_prompts, cfg.sampling, seed=cfg.seed + 7, **scores,
        reference_answers=reference_answers[: cfg.curve_prompts],
    )[0]
    results["sft"] = evaluate(policy)
    log(f"sft: {results['sft']}")
    curves = {"dpo": [], "ppo": []}
    t = time.perf_counter()
    dpo_policy, _ = stage_dpo(out / "sft", tokenizer, train_pairs, cfg, out, quick_eval, curves["dpo"])
    timings["dpo"] = time.perf_counter() - t
    results["dpo"] = evaluate(dpo_policy)
    log(f"dpo: {results['dpo']}")
    t = time.perf_counter()
    ppo_prompts = world.prompts(2000, seed=cfg.seed + 20)
    ppo_policy, _ = stage_ppo(out / "sft", tokenizer, ppo_prompts, reward_scores(rm, tokenizer), cfg, out,
                              eval_fn=quick_eval, curve=curves["ppo"])
    timings["ppo"] = time.perf_counter() - t
    results["ppo"] = evaluate(ppo_policy)
    log(f"ppo: {results['ppo']}")
    results["timings_s"] = timings
    results["curves"] = curves
    plot_reward_kl(results, out / "reward_kl.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output directory")
    args = parser.parse_args()
    t = time.perf_counter()
    run(QuickstartConfig(), Path(args.out))
    print(f"total {time.perf_counter() - t:.1f}s")



def plot_reward_kl(results: dict, path: Path) -> None:
    """Gold and RM reward against KL to the reference, over the evaluations during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("dpo", "tab:blue"), ("ppo", "tab:orange")):
        points = [{"eval/kl": 0.0, **{k: results["sft"][k] for k in ("eval/gold_reward_mean", "eval/rm_reward_mean")}}]
        points += results["curves"][method] + [results[method]]
        kl = [p["eval/kl"] for p in points]
        ax.plot(kl, [p["eval/gold_reward_mean"] for p in points], "o-", color=color, label=f"{method} gold reward")
        ax.plot(kl, [p["eval/rm_reward_mean"] for p in points], "s--", color=color, alpha=0.6, label=f"{method} RM reward")
    ax.set_xlabel("KL(policy || SFT reference), nats per answer")
    ax.set_ylabel("mean reward")
    ax.set_title("Reward against KL over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def report(results: dict) -> str:
    """A small table of the evaluation metrics per policy."""
    policies = [k for k in ("sft", "dpo", "ppo") if k in results]
    keys = sorted({k for p in policies for k in results[p]})
    lines = [f"{'metric':28s}" + "".join(f"{p:>10s}" for p in policies)]
    lines += [f"{k:28s}" + "".join(f"{results[p].get(k, float('nan')):10.3f}" for p in policies) for k in keys]
    if "reward_model" in results:
        lines.append("reward model: " + ", ".join(f"{k}={v:.3f}" for k, v in results["reward_model"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
