"""DPO, PPO, GRPO and RLOO on the sandbox, over seeds: the shipped `compare-methods` pipeline, one fresh
store per seed, every figure measured on the held-out phrasings (prompts of the test split).

    .venv/bin/python benchmarks/bench_methods.py [--seeds 0 1 2 3 4] [--out benchmarks/methods_seeds.json]
    .venv/bin/python benchmarks/bench_methods.py --methods grpo rloo --peer trl [--out benchmarks/trl_seeds.json]

--methods runs only the stages those methods need (the same stages, so the same figures). --peer trl also trains
TRL's GRPOTrainer / RLOOTrainer on the same SFT model, reward model, prompts and settings (benchmarks/trl_peer.py)
and evaluates its policy with the same `evaluate` stage; the table then shows both, and TRL's training time.

Targets (issue 14): each method gold win rate >= 0.80 against SFT at KL <= 6 nats, banned words <= 1/5 of
SFT's, reward model gold accuracy >= 0.80, as the mean over seeds 0-4; no seed below 0.75, none failing.
Prints a per-seed table, the means, and the stage work (the quickstart's stages, then what the
comparison adds), and writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flows.config import PipelinesFile, load  # noqa: E402
from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dpo", "ppo", "grpo", "rloo")
QUICKSTART = ("world", "sft", "sample", "label", "reward_model", "dpo", "ppo", "evaluate_dpo", "evaluate_ppo")


def needed(stages: list[dict], names: set[str]) -> list[dict]:
    """The stages `names` and everything they read, in pipeline order."""
    by_name, keep, todo = {s["name"]: s for s in stages}, set(), list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += list(by_name[name].get("inputs", {}).values())
    return [s for s in stages if s["name"] in keep]


def stage_runs(cfg, pipeline: str) -> tuple:
    """(tracker, {stage name: its MLflow run}) of the latest run of `pipeline`."""
    tracker = make_tracker(cfg)
    [parent] = tracker.runs(f"tags.`alignflow.pipeline` = '{pipeline}'", max_results=1)
    return tracker, {r.data.tags["alignflow.stage"]: r
                     for r in tracker.runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)}


def stage_metrics(cfg, pipeline: str) -> dict[str, dict]:
    return {name: r.data.metrics for name, r in stage_runs(cfg, pipeline)[1].items()}


def answer_lengths(cfg, pipeline: str, stage: str) -> list[float]:
    """A GRPO/RLOO stage's mean sampled answer length (tokens), generation by generation."""
    tracker, runs = stage_runs(cfg, pipeline)
    history = tracker.client.get_metric_history(runs[stage].info.run_id, "train/answer_len")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def run_pipeline(raw: dict, name: str) -> tuple[PipelinesFile, dict]:
    cfg = PipelinesFile.model_validate(raw, context={"seed": raw["settings"]["seed"]})
    result = pipeline_flow(cfg, name, resolved_yaml(raw))
    return cfg, result["stages"]


def evaluation(m: dict) -> dict:
    return {"win": m["eval/gold_win_rate"], "kl": m["eval/kl"], "banned": m["eval/banned_word_rate"],
            "gold": m["eval/gold_reward_mean"], "len": m["eval/answer_len_mean"]}


def run_peer(raw: dict, method: str, outputs: dict, workdir: Path, seed: int) -> dict:
    """TRL's trainer for `method` on the pipeline stage's inputs and settings, evaluated by our evaluate stage."""
    import trl_peer
    from tasks.store import StageOutput

    stages = {s["name"]: s for s in raw["pipelines"]["compare-methods"]["stages"]}
    spec = stages[method]
    inputs = {slot: StageOutput(**outputs[src]) for slot, src in spec["inputs"].items()}
    t = time.perf_counter()
    folder = trl_peer.train(method, spec["params"], inputs, workdir / f"trl-{method}", seed)
    train_s = time.perf_counter() - t
    evaluate = copy.deepcopy(stages[f"evaluate_{method}"])
    evaluate["name"], evaluate["inputs"]["policy"] = f"evaluate_trl_{method}", f"trl_{method}"
    model = {"name": f"trl_{method}", "type": "model", "params": {"name_or_path": str(folder)}}
    upstream = needed(list(stages.values()), set(evaluate["inputs"].values()) - {model["name"]})
    peer = {**raw, "pipelines": {"trl-peer": {"description": f"TRL {method} evaluated", "stages": [*upstream, model, evaluate]}}}
    cfg, _ = run_pipeline(peer, "trl-peer")
    log = json.loads((workdir / f"trl-{method}" / "log_history.json").read_text())
    return {**evaluation(stage_metrics(cfg, "trl-peer")[evaluate["name"]]), "train_s": train_s,
            "train_len": [h["completions/mean_length"] for h in log if "completions/mean_length" in h]}


def run_seed(seed: int, workdir: Path, methods: tuple[str, ...] = METHODS, peer: str | None = None,
             extra: list[str] | None = None) -> dict:
    overrides = [f"settings.seed={seed}", f"settings.workdir={workdir}", f"settings.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                 *(extra or [])]
    _, raw = load(ROOT / "pipelines.yaml", "compare-methods", overrides)
    full = raw["pipelines"]["compare-methods"]["stages"]
    ours = {**raw, "pipelines": {"compare-methods": {**raw["pipelines"]["compare-methods"],
                                                     "stages": needed(full, {f"evaluate_{m}" for m in methods})}}}
    t = time.perf_counter()
    cfg, outputs = run_pipeline(ours, "compare-methods")
    wall = time.perf_counter() - t
    stages = stage_metrics(cfg, "compare-methods")
    row = {"seed": seed, "wall_s": wall, "rm_gold_accuracy": stages["reward_model"]["eval/gold_accuracy"],
           "sft_banned": stages[f"evaluate_{methods[0]}"]["eval/ref_banned_word_rate"],
           # a stage reused from the store (a --set trial on a kept workdir) did no work in this run
           "quickstart_work_s": sum(stages[s].get("duration_s", 0.0) for s in QUICKSTART if s in stages),
           "extra_work_s": sum(m.get("duration_s", 0.0) for s, m in stages.items() if s not in QUICKSTART),
           "durations": {s: m.get("duration_s", 0.0) for s, m in stages.items()}}
    for method in methods:
        row[method] = evaluation(stages[f"evaluate_{method}"])
        if method in ("grpo", "rloo"):
            row[method]["train_len"] = answer_lengths(cfg, "compare-methods", method)
        if peer == "trl" and method in ("grpo", "rloo"):
            row[f"trl_{method}"] = run_peer(raw, method, outputs, workdir, seed)
    return row


def meets(row: dict, method: str) -> bool:
    m = row[method]
    return m["win"] >= 0.80 and m["kl"] <= 6.0 and m["banned"] <= row["sft_banned"] / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--peer", choices=["trl"], default=None, help="also train TRL's GRPO / RLOO and evaluate them alike")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--set", action="append", default=[], help="a pipeline override, as `alignflow run --set` (trials only)")
    args = parser.parse_args()
    methods = tuple(m for m in METHODS if m in args.methods)
    shown = [c for m in methods for c in ([m, f"trl_{m}"] if args.peer and m in ("grpo", "rloo") else [m])]
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"methods-{seed}-") as tmp:
            rows.append(run_seed(seed, Path(tmp), methods, args.peer, args.set))
        r = rows[-1]
        print(f"seed {seed}: RM gold acc {r['rm_gold_accuracy']:.3f}; " + "; ".join(
            f"{m} win {r[m]['win']:.3f} KL {r[m]['kl']:.2f} banned {r[m]['banned']:.3f}{'' if meets(r, m) else ' (MISSED)'}"
            for m in shown) + f"; SFT banned {r['sft_banned']:.3f}; quickstart stage work {r['quickstart_work_s']:.0f} s, "
            f"comparison adds {r['extra_work_s']:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    n = len(rows)
    print("\n| seed | RM gold acc. | " + " | ".join(f"{m} win / KL" for m in shown) + " | quickstart work s | extra s |")
    print("| ---: | ---: | " + " | ".join("---:" for _ in shown) + " | ---: | ---: |")
    for r in rows:
        print(f"| {r['seed']} | {r['rm_gold_accuracy']:.3f} | " + " | ".join(f"{r[m]['win']:.3f} / {r[m]['kl']:.2f}" for m in shown)
              + f" | {r['quickstart_work_s']:.0f} | {r['extra_work_s']:.0f} |")
    mean = lambda f: sum(f(r) for r in rows) / n  # noqa: E731
    print(f"| mean | {mean(lambda r: r['rm_gold_accuracy']):.3f} | " + " | ".join(
        f"{mean(lambda r: r[m]['win']):.3f} / {mean(lambda r: r[m]['kl']):.2f}" for m in shown)
        + f" | {mean(lambda r: r['quickstart_work_s']):.0f} | {mean(lambda r: r['extra_work_s']):.0f} |")
    for m in shown:
        worst = min(r[m]["win"] for r in rows)
        print(f"{m}: mean win {mean(lambda r: r[m]['win']):.3f}, worst seed {worst:.3f}, seeds meeting every target "
              f"{sum(meets(r, m) for r in rows)}/{n}")
    for m in methods:
        if args.peer and m in ("grpo", "rloo"):
            ours_s, trl_s = mean(lambda r: r["durations"][m]), mean(lambda r: r[f"trl_{m}"]["train_s"])
            print(f"{m} vs TRL: gold win {mean(lambda r: r[m]['win'] - r[f'trl_{m}']['win']):+.3f}, "
                  f"KL {mean(lambda r: r[m]['kl'] - r[f'trl_{m}']['kl']):+.2f}; training {ours_s:.0f} s vs {trl_s:.0f} s "
                  f"({trl_s / ours_s:.2f}x faster)")
            for side in (m, f"trl_{m}"):  # answer length: the evaluated policy's, and the rollouts' first -> last
                traced = [r[side]["train_len"] for r in rows if r[side]["train_len"]]  # (none for a reused stage)
                rollouts = (f"; rollouts {sum(t[0] for t in traced) / len(traced):.1f} -> "
                            f"{sum(t[-1] for t in traced) / len(traced):.1f} tokens" if traced else "")
                print(f"  {side}: evaluated answers {mean(lambda r: r[side]['len']):.1f} tokens{rollouts}")


if __name__ == "__main__":
    main()
