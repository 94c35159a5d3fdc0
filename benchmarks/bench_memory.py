"""Peak memory at a real vocabulary: one DPO step and one reward-model step, alignflow against TRL, each run in
a fresh process of this invocation so that one's peak does not hide the other's.

    .venv/bin/python benchmarks/bench_memory.py [--device cpu]

Workload: a tiny Llama (hidden 64, 2 layers) with Qwen2's vocabulary (151,936 rows, tied embeddings), 4 pairs a
step of 1,024 tokens a sequence (64 prompt + 960 answer). `alignflow-ppo-update` is PPO's scoring of 4 rollout
answers of that length (policy, values, reference) and one update on them (policy, value and entropy terms), no TRL
peer: TRL's PPOTrainer forms whole logits in both. Peak = the process's peak resident memory (CPU) or
torch's peak allocation (CUDA), the interpreter and libraries included (the `baseline` row: the same imports
and model, no step). Goal (issue 29): alignflow's DPO peak at most half of TRL's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RUNS = ("baseline", "alignflow-dpo", "alignflow-dpo-ref-every-step", "trl-dpo", "alignflow-reward", "trl-reward",
        "alignflow-ppo-update")


def workload():
    from common import Workload

    return Workload(vocab=151_936, hidden=64, layers=2, heads=4, intermediate=128, pairs=4, prompt_tokens=64,
                    answer_tokens=960, steps=1, warmup=0)


def ppo_update(w, device: str) -> dict:
    """PPO's work on 4 answers of 960 tokens after 64-token prompts: the rollout's scoring pass (log-probs and
    values of the policy, the reference's log-probs) and one update with an entropy bonus."""
    from common import checkpoint_dtype, peak_memory_mb, tokenizer

    from alignment.config import PPOConfig, SamplingParams
    from alignment.models import PolicyWithValueHead
    from alignment.trainers.ppo import PPOTrainer

    import common

    policy = common.causal_lm(w, device, checkpoint_dtype(device))
    rows, length = w.pairs, w.prompt_tokens + w.answer_tokens
    cfg = PPOConfig(iterations=1, rollout_batch_size=rows, minibatch_size=rows, ppo_epochs=1, ent_coef=0.01,
                    sampling=SamplingParams(max_new_tokens=w.answer_tokens))
    trainer = PPOTrainer(PolicyWithValueHead(policy), tokenizer(w), ["w1"] * rows, lambda p, a: torch.zeros(len(a)), cfg)
    g = torch.Generator().manual_seed(0)
    sequences = torch.randint(4, w.vocab, (rows, length), generator=g).to(device)
    attention_mask = torch.ones_like(sequences)
    mask = torch.zeros_like(sequences)
    mask[:, w.prompt_tokens :] = 1
    with torch.no_grad():
        logps, values, _ = trainer.model(sequences, attention_mask, mask)
        trainer.reference_logps(sequences, attention_mask, mask)
    advantages = torch.randn(rows, length, generator=g).to(device) * mask
    batch = {"sequences": sequences, "attention_mask": attention_mask, "mask": mask, "logps": logps,
             "values": values * mask, "advantages": advantages, "returns": (values + advantages) * mask}
    metrics = trainer.update(batch, list(range(rows)))
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values())
    return {"name": "alignflow PPO (scoring pass + one update)", "peak_mb": peak_memory_mb(device)}


def one(run: str, device: str) -> dict:
    import bench_dpo
    import bench_reward
    from common import causal_lm, peak_memory_mb

    w = workload()
    if run == "baseline":
        causal_lm(w, device)
        return {"name": "baseline (imports and model, no step)", "peak_mb": peak_memory_mb(device)}
    return {
        "alignflow-dpo": lambda: bench_dpo.ours(w, device, precompute=True),
        "alignflow-dpo-ref-every-step": lambda: bench_dpo.ours(w, device, precompute=False),
        "trl-dpo": lambda: bench_dpo.trl(w, device),
        "alignflow-reward": lambda: bench_reward.ours(w, device),
        "trl-reward": lambda: bench_reward.trl(w, device),
        "alignflow-ppo-update": lambda: ppo_update(w, device),
    }[run]()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", choices=RUNS, help=argparse.SUPPRESS)  # a child process: one run, JSON out
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.device)), flush=True)
        return
    w = workload()
    print(f"vocab {w.vocab}, {w.pairs} pairs x ({w.prompt_tokens} + {w.answer_tokens}) tokens, hidden {w.hidden}, "
          f"{w.layers} layers; device {args.device}; torch {torch.__version__}")
    rows = {}
    for run in RUNS:
        out = subprocess.run([sys.executable, __file__, "--one", run, "--device", args.device], cwd=HERE,
                             capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"{run:30s} failed (exit {out.returncode}): {tail[0][:200]}")
            continue
        rows[run] = json.loads(line[len("RESULT "):])
        print(f"{rows[run]['name']:44s} peak {rows[run]['peak_mb']:8.0f} MB", flush=True)
    for ours, peer in (("alignflow-dpo", "trl-dpo"), ("alignflow-dpo-ref-every-step", "trl-dpo"), ("alignflow-reward", "trl-reward")):
        if ours in rows and peer in rows:
            base = rows.get("baseline", {}).get("peak_mb", 0.0)
            print(f"{ours} / {peer}: {rows[ours]['peak_mb'] / rows[peer]['peak_mb']:.2f} of TRL's peak "
                  f"({(rows[ours]['peak_mb'] - base) / max(1.0, rows[peer]['peak_mb'] - base):.2f} above the baseline)")


if __name__ == "__main__":
    main()
