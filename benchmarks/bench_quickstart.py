"""Wall time of the shipped quickstart pipeline (target: <= 3 minutes of stage work on 2 CPU cores), its
evaluation figures, and PPO with the KL penalty switched off (beta = 0) against the pipeline's beta on the
same reward model (the second run reuses every cached stage but PPO and its evaluation).

    .venv/bin/python benchmarks/bench_quickstart.py [--workdir runs/bench-quickstart] [--skip-beta0] [--cli]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from flows.config import load  # noqa: E402
from flows.pipeline import make_tracker, pipeline_flow, resolved_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("eval/kl", "eval/kl_k1", "eval/gold_win_rate", "eval/gold_reward_mean", "eval/rm_win_rate", "eval/banned_word_rate",
        "eval/implicit_accuracy", "eval/answer_len_mean")


def run(workdir: Path, overrides: list[str], cli: bool = False) -> tuple[dict, float]:
    """Run the quickstart in this process (the flow's wall time) or as `alignflow run` (the command's wall
    time: interpreter start, imports, Prefect's server and all); returns the stage runs and the wall time."""
    overrides = [f"settings.workdir={workdir}", f"settings.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", *overrides]
    cfg, raw = load(ROOT / "pipelines.yaml", "quickstart", overrides)
    t = time.perf_counter()
    if cli:
        workdir.mkdir(parents=True, exist_ok=True)  # the command runs in it
        sets = [a for o in overrides for a in ("--set", o)]
        subprocess.run([str(Path(sys.executable).parent / "alignflow"), "run", "quickstart", "-c", str(ROOT / "pipelines.yaml"), *sets],
                       cwd=workdir, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    else:
        pipeline_flow(cfg, "quickstart", resolved_yaml(raw))
    total = time.perf_counter() - t
    tracker = make_tracker(cfg)
    [parent] = tracker.runs("tags.`alignflow.pipeline` = 'quickstart'", max_results=1)  # the newest
    stages = {}
    for r in tracker.runs(f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100):
        stages[r.data.tags["alignflow.stage"]] = {"seconds": (r.info.end_time - r.info.start_time) / 1000,
                                                  "duration_s": r.data.metrics.get("duration_s", 0.0),
                                                  "cached": r.data.tags.get("alignflow.cache") == "hit", **r.data.metrics}
    return stages, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--skip-beta0", action="store_true", help="only time the quickstart")
    parser.add_argument("--cli", action="store_true", help="run `alignflow run quickstart` and time the whole command")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quickstart-")).resolve()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, workdir {workdir}, "
          f"PREFECT_API_URL {os.environ.get('PREFECT_API_URL') or 'unset (a temporary server)'}")
    stages, total = run(workdir, [], args.cli)
    work = sum(s["duration_s"] for s in stages.values() if not s["cached"])
    runs = sum(s["seconds"] for s in stages.values() if not s["cached"])
    print("stage work, seconds: " + ", ".join(f"{n}={s['duration_s']:.1f}" for n, s in stages.items()))
    print(f"stage work {work:.1f} s (target <= 180 s); stage runs {runs:.1f} s (with their MLflow runs and uploads); "
          f"{'command' if args.cli else 'flow'} wall {total:.1f} s: overhead {100 * (total / work - 1):.1f}% of the stage work "
          f"(target <= 10%)")
    print(f"reward model: gold accuracy {stages['reward_model']['eval/gold_accuracy']:.3f}, accuracy {stages['reward_model']['eval/accuracy']:.3f}")
    print(f"{'policy':8s}" + "".join(f"{k.split('/')[1]:>18s}" for k in KEYS))
    for name in ("evaluate_dpo", "evaluate_ppo"):
        print(f"{name[9:]:8s}" + "".join(f"{stages[name].get(k, float('nan')):18.3f}" for k in KEYS))
    print(f"{'sft':8s}" + "".join(f"{stages['evaluate_dpo'].get(k.replace('eval/', 'eval/ref_'), float('nan')):18.3f}" for k in KEYS))
    if args.skip_beta0:
        return
    beta0, _ = run(workdir, ["ppo.ppo.beta=0"])
    print(f"{'ppo beta=0':8s}" + "".join(f"{beta0['evaluate_ppo'].get(k, float('nan')):18.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
