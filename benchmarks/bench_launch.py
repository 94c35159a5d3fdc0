"""What a stage on several processes costs and gives: the shipped `verifiable-reward` pipeline's GRPO stage
(16 prompts x 8 answers an iteration, exact-match reward) on 1 process and on `resources: {processes: 2}`.

    .venv/bin/python benchmarks/bench_launch.py [--iterations 30]

Each GRPO stage runs twice per process count, for 1 iteration and for --iterations, through `alignflow run`
(the world and SFT stages are computed once and reused from the cache). A stage's time is the duration_s
the lifecycle records (its body: for 2 processes, torchrun's start, both processes' imports and model loads,
the process group, and the training). Launch overhead = T(2 processes, 1 iteration) - T(1 process, 1
iteration); per iteration = (T(K) - T(1)) / (K - 1). The two runs of K iterations are compared iteration by
iteration: the processes sample what one process samples, so they agree to rounding (DDP sums gradients in
another order) until a rounding difference flips a sampled token, after which they are two runs alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "alignflow")


def grpo_seconds(work: Path, stages: list[dict], processes: int, iterations: int) -> tuple[float, dict]:
    """Run the pipeline with its GRPO stage at `processes` and `iterations`; (the stage's duration_s, its metrics)."""
    grpo = next(s for s in stages if s["type"] == "grpo")
    grpo = {**grpo, "params": {**grpo["params"], "grpo": {**grpo["params"]["grpo"], "iterations": iterations}}}
    if processes > 1:
        grpo["resources"] = {"processes": processes}
    kept = [s if s["type"] != "grpo" else grpo for s in stages]
    cfg = {"settings": {"seed": 0, "workdir": str(work / "runs"), "tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
           "pipelines": {"launch": {"stages": kept}}}
    (work / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    shutil.rmtree(work / "runs" / "stages" / "grpo", ignore_errors=True)  # processes are not in the key: computed again
    result = subprocess.run([CLI, "run", "launch", "-c", str(work / "pipelines.yaml")], cwd=work, capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        sys.exit(result.stdout[-3000:] + result.stderr[-3000:])
    [done] = (work / "runs" / "stages" / "grpo").glob("*/_SUCCESS.json")
    history = [json.loads(line) for line in (done.parent / "train_metrics.jsonl").read_text().splitlines()]
    return json.loads(done.read_text())["duration_s"], {**json.loads((done.parent / "metrics.json").read_text()), "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    pipeline = yaml.safe_load((ROOT / "pipelines.yaml").read_text())["pipelines"]["verifiable-reward"]["stages"]
    stages = [s for s in pipeline if s["type"] in ("world", "sft", "grpo")]
    times, metrics = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for iterations in (1, args.iterations):
            for processes in (1, 2):
                times[processes, iterations], metrics[processes, iterations] = grpo_seconds(Path(tmp), stages, processes, iterations)
                print(f"grpo, {processes} process(es), {iterations:3d} iteration(s): {times[processes, iterations]:6.1f} s", flush=True)
    k = args.iterations
    per = {n: (times[n, k] - times[n, 1]) / (k - 1) for n in (1, 2)}
    print(f"launch overhead of 2 processes: {times[2, 1] - times[1, 1]:.1f} s a stage "
          f"(1 iteration: {times[1, 1]:.1f} s in the pipeline's process, {times[2, 1]:.1f} s launched)")
    print(f"per iteration (16 prompts x 8 answers): 1 process {per[1]:.2f} s, 2 processes {per[2]:.2f} s "
          f"({per[1] / per[2]:.2f}x on {os.cpu_count()} CPU cores)")
    print(f"final reward after {k} iterations: 1 process {metrics[1, k]['final_reward']:.6f}, "
          f"2 processes {metrics[2, k]['final_reward']:.6f}")
    for key in ("reward", "loss", "grad_norm"):
        gaps = [abs(a[key] - b[key]) for a, b in zip(metrics[1, k]["history"], metrics[2, k]["history"])]
        print(f"  {key:9s} |1 process - 2 processes| by iteration: " + " ".join(f"{g:.1e}" for g in gaps))


if __name__ == "__main__":
    main()
