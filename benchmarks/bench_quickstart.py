"""Wall time of the sandbox quickstart (target: <= 3 minutes on 2 CPU cores), its evaluation figures,
and PPO with the KL penalty switched off (beta = 0) against the default beta on the same reward model.

    .venv/bin/python benchmarks/bench_quickstart.py [--out runs/bench-quickstart] [--skip-beta0]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from alignment.evaluation import evaluate_policy  # noqa: E402
from alignment.models import RewardModel, frozen_copy, load_causal_lm, load_tokenizer  # noqa: E402
from alignment.sandbox.quickstart import (  # noqa: E402
    QuickstartConfig, gold_scores, report, reward_scores, run, stage_ppo,
)
from alignment.sandbox.world import World  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-quickstart")
    parser.add_argument("--skip-beta0", action="store_true", help="only time the quickstart")
    args = parser.parse_args()
    out = Path(args.out)
    cfg = QuickstartConfig()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}")
    t = time.perf_counter()
    results = run(cfg, out, log=lambda s: None)
    total = time.perf_counter() - t
    print(report(results))
    print("stage timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in results["timings_s"].items()))
    print(f"quickstart total: {total:.1f} s (target <= 180 s)")
    if args.skip_beta0:
        return
    world = World(cfg.world)
    tokenizer = load_tokenizer(out / "sft")
    reference = frozen_copy(load_causal_lm(out / "sft"))
    rm = RewardModel.from_pretrained(out / "reward_model")
    prompts = world.prompts(cfg.eval_prompts, seed=cfg.seed + 999)
    print(f"{'ppo beta':>9s} {'eval/kl':>8s} {'gold':>7s} {'rm':>7s} {'win':>6s} {'banned':>7s} {'len':>6s}")
    for beta in (cfg.ppo.beta, 0.0):
        ppo = dataclasses.replace(cfg.ppo, beta=beta)
        policy, _ = stage_ppo(out / "sft", tokenizer, world.prompts(2000, seed=cfg.seed + 20), reward_scores(rm, tokenizer), cfg, out / f"beta{beta}", ppo)
        m, _ = evaluate_policy(policy, reference, tokenizer, prompts, cfg.sampling, seed=cfg.seed + 7,
                               reward_fn=reward_scores(rm, tokenizer), gold_fn=gold_scores(world),
                               banned_fn=lambda a: world.banned_count(a) > 0)
        print(f"{beta:9.2f} {m['eval/kl']:8.2f} {m['eval/gold_reward_mean']:7.3f} {m['eval/rm_reward_mean']:7.3f} "
              f"{m['eval/gold_win_rate']:6.3f} {m['eval/banned_word_rate']:7.3f} {m['eval/answer_len_mean']:6.1f}")


if __name__ == "__main__":
    main()
