"""DPO, PPO, GRPO and RLOO on the sandbox, over seeds: the shipped `compare-methods` pipeline, one fresh
store per seed, every figure measured on the held-out phrasings (prompts of the test split).

    .venv/bin/python benchmarks/bench_methods.py [--seeds 0 1 2 3 4] [--out benchmarks/methods_seeds.json]

Targets (issue 14): each method gold win rate >= 0.80 against SFT at KL <= 6 nats, banned words <= 1/5 of
SFT's, reward model gold accuracy >= 0.80, as the mean over seeds 0-4; no seed below 0.75, none failing.
Prints a per-seed table, the means, and the stage work (the quickstart's stages, then what the
comparison adds), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from flows.config import load  # noqa: E402
from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dpo", "ppo", "grpo", "rloo")
QUICKSTART = ("world", "sft", "sample", "label", "reward_model", "dpo", "ppo", "evaluate_dpo", "evaluate_ppo")


def run_seed(seed: int, workdir: Path) -> dict:
    overrides = [f"settings.seed={seed}", f"settings.workdir={workdir}", f"settings.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    cfg, raw = load(ROOT / "pipelines.yaml", "compare-methods", overrides)
    t = time.perf_counter()
    pipeline_flow(cfg, "compare-methods", resolved_yaml(raw))
    wall = time.perf_counter() - t
    tracker = make_tracker(cfg)
    [parent] = tracker.runs("tags.`alignflow.pipeline` = 'compare-methods'", max_results=1)
    stages = {r.data.tags["alignflow.stage"]: r.data.metrics
              for r in tracker.runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)}
    row = {"seed": seed, "wall_s": wall, "rm_gold_accuracy": stages["reward_model"]["eval/gold_accuracy"],
           "sft_banned": stages["evaluate_dpo"]["eval/ref_banned_word_rate"],
           "quickstart_work_s": sum(stages[s]["duration_s"] for s in QUICKSTART),
           "extra_work_s": sum(m["duration_s"] for s, m in stages.items() if s not in QUICKSTART),
           "durations": {s: m["duration_s"] for s, m in stages.items()}}
    for method in METHODS:
        m = stages[f"evaluate_{method}"]
        row[method] = {"win": m["eval/gold_win_rate"], "kl": m["eval/kl"], "banned": m["eval/banned_word_rate"],
                       "gold": m["eval/gold_reward_mean"]}
    return row


def meets(row: dict, method: str) -> bool:
    m = row[method]
    return m["win"] >= 0.80 and m["kl"] <= 6.0 and m["banned"] <= row["sft_banned"] / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"methods-{seed}-") as tmp:
            rows.append(run_seed(seed, Path(tmp)))
        r = rows[-1]
        print(f"seed {seed}: RM gold acc {r['rm_gold_accuracy']:.3f}; " + "; ".join(
            f"{m} win {r[m]['win']:.3f} KL {r[m]['kl']:.2f} banned {r[m]['banned']:.3f}{'' if meets(r, m) else ' (MISSED)'}"
            for m in METHODS) + f"; SFT banned {r['sft_banned']:.3f}; quickstart stage work {r['quickstart_work_s']:.0f} s, "
            f"comparison adds {r['extra_work_s']:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    n = len(rows)
    print("\n| seed | RM gold acc. | " + " | ".join(f"{m} win / KL" for m in METHODS) + " | quickstart work s | extra s |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in METHODS) + " | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['rm_gold_accuracy']:.3f} | " + " | ".join(f"{r[m]['win']:.3f} / {r[m]['kl']:.2f}" for m in METHODS)
              + f" | {r['quickstart_work_s']:.0f} | {r['extra_work_s']:.0f} |")
    mean = lambda f: sum(f(r) for r in rows) / n  # noqa: E731
    print(f"| mean | {mean(lambda r: r['rm_gold_accuracy']):.3f} | " + " | ".join(
        f"{mean(lambda r: r[m]['win']):.3f} / {mean(lambda r: r[m]['kl']):.2f}" for m in METHODS)
        + f" | {mean(lambda r: r['quickstart_work_s']):.0f} | {mean(lambda r: r['extra_work_s']):.0f} |")
    for m in METHODS:
        worst = min(r[m]["win"] for r in rows)
        print(f"{m}: mean win {mean(lambda r: r[m]['win']):.3f}, worst seed {worst:.3f}, seeds meeting every target "
              f"{sum(meets(r, m) for r in rows)}/{n}")


if __name__ == "__main__":
    main()
