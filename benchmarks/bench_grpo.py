"""One GRPO step (sample G answers to each of P prompts, score them, one update): alignflow's GroupTrainer
against TRL's GRPOTrainer on the same model, prompts, reward function and settings, in one invocation.

    .venv/bin/python benchmarks/bench_grpo.py [--peer trl] [--device cuda]

Both: 8 prompts x 8 answers a step, prompts of 32 tokens, answers of up to 64 new tokens (the random
model rarely samples EOS: about 63 on average), temperature 1, beta 0 (no reference model, TRL's default), loss
"dapo", one optimisation pass a step, lr 1e-6 constant. Prints completions/s and s/step, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import torch

from common import StepTimer, Workload, causal_lm, checkpoint_dtype, peak_memory_mb, texts, tokenizer, trl_timing_callback

PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64


def reward_fn(prompts, completions, **kw) -> list[float]:
    """A cheap text reward both trainers call the same way: the share of words that end in an even digit."""
    return [sum(w[-1] in "02468" for w in c.split()) / max(1, len(c.split())) for c in completions]


def prompts(w: Workload) -> list[str]:
    return [r["prompt"] for r in texts(w, PROMPTS * (w.steps + w.warmup))]


def line(name: str, timer: StepTimer, device: str) -> dict:
    completions_s = PROMPTS * GROUP / timer.step_s
    print(f"{name:34s} {completions_s:8.1f} completions/s {timer.step_s:8.2f} s/step  peak {peak_memory_mb(device):8.0f} MB")
    return {"name": name, "completions_per_s": completions_s, "step_s": timer.step_s}


def ours(w: Workload, device: str) -> dict:
    from alignment.config import SamplingParams
    from alignment.trainers.group import GRPOConfig, GroupTrainer

    cfg = GRPOConfig(iterations=w.steps + w.warmup, prompts_per_batch=PROMPTS, group_size=GROUP, lr=1e-6, lr_schedule="constant",
                     beta=0.0, loss_type="dapo", sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0),
                     mixed_precision="no")  # bf16 weights on a GPU, as a bf16 checkpoint loads
    timer = StepTimer(w.warmup, device)
    trainer = GroupTrainer(causal_lm(w, device, checkpoint_dtype(device)), tokenizer(w), prompts(w), {"even": reward_fn}, cfg)

    lengths = []

    def tick(step, metrics):
        lengths.append(metrics["answer_len"])  # ~64: the random model rarely samples EOS (TRL stops there too)
        timer.stop()
        timer.start()

    trainer.callback = tick
    timer.start()
    trainer.train()
    return line(f"alignflow GRPO (mean answer {sum(lengths) / len(lengths):.1f} tokens)", timer, device)


def trl(w: Workload, device: str) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    timer = StepTimer(w.warmup, device)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                          max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0, loss_type="dapo", num_iterations=1,
                          learning_rate=1e-6, lr_scheduler_type="constant", max_steps=w.steps + w.warmup, report_to="none",
                          save_strategy="no", logging_steps=10_000, use_cpu=not device.startswith("cuda"),
                          bf16=device.startswith("cuda"), dataloader_num_workers=0, seed=0, shuffle_dataset=False)
        trainer = GRPOTrainer(model=causal_lm(w, device, checkpoint_dtype(device)), reward_funcs=reward_fn, args=args,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(w)]),
                              processing_class=tokenizer(w), callbacks=[trl_timing_callback(timer)])
        trainer.train()
    return line("TRL GRPOTrainer", timer, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["trl"], help="also run the peer on the same work and print the ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    args = parser.parse_args()
    w = replace(Workload(), prompt_tokens=32, steps=args.steps, warmup=1)
    print(f"GRPO step: {PROMPTS} prompts x {GROUP} answers x {NEW_TOKENS} new tokens, prompts of {w.prompt_tokens} tokens; "
          f"vocab {w.vocab}, hidden {w.hidden}, {w.layers} layers; device {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    mine = ours(w, args.device)
    if args.peer == "trl":
        peer = trl(w, args.device)
        print(f"ratio alignflow / TRL completions/s: {mine['completions_per_s'] / peer['completions_per_s']:.2f}x")


if __name__ == "__main__":
    main()
