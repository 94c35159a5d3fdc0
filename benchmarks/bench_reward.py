"""Reward-model training throughput: alignflow's RewardTrainer against TRL's RewardTrainer on the same
model, data and batch, in one invocation.

    .venv/bin/python benchmarks/bench_reward.py [--peer trl] [--device cuda] [--gpu-shape] [--rounds 3]

Tokens/s counts chosen + rejected tokens (prompt included) per step: the same work for both, however
each trainer lays it out (alignflow reads the shared prompt once, see alignment/prefix.py). Each trainer runs
--rounds times, the two taking turns, and the ratio is of their median rounds (as in bench_dpo.py).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import StepTimer, alternating, rounds_label, trl_timing_callback, Workload, checkpoint_dtype, report, reset_peak, seq_classifier, texts, tokenizer


def ours(w: Workload, device: str, shared_prefix: bool = True) -> dict:
    from alignment.data import tokenize_pairs
    from alignment.models import RewardModel
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.reward import RewardConfig, RewardTrainer

    reset_peak(device)
    tok = tokenizer(w)
    rows = texts(w, w.pairs * (w.steps + w.warmup))
    examples = tokenize_pairs(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                              w.prompt_tokens + w.answer_tokens)
    model = RewardModel(seq_classifier(w, device, checkpoint_dtype(device)))  # as the stage loads a checkpoint
    cfg = RewardConfig(TrainConfig(max_steps=w.steps + w.warmup, batch_size=w.pairs, lr=1e-5, lr_schedule="constant",
                                   mixed_precision="no"),
                       max_length=w.prompt_tokens + w.answer_tokens, shared_prefix=shared_prefix)
    timer = StepTimer(w.warmup, device)

    def tick(step, metrics):
        timer.stop()
        timer.start()

    trainer = RewardTrainer(model, examples, tok.pad_token_id, cfg, callback=tick)
    timer.start()
    trainer.train()
    tokens = 2 * w.pairs * (w.prompt_tokens + w.answer_tokens)
    name = "alignflow RewardTrainer" + ("" if shared_prefix else " (no prefix sharing)")
    return report(name, tokens, timer.step_s, device, sum(p.numel() for p in model.parameters()))


def trl(w: Workload, device: str) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    reset_peak(device)
    timer = StepTimer(w.warmup, device)

    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in texts(w, w.pairs * (w.steps + w.warmup))]
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, per_device_train_batch_size=w.pairs, max_steps=w.steps + w.warmup,
                            learning_rate=1e-5, lr_scheduler_type="constant", report_to="none", save_strategy="no",
                            logging_steps=10_000, use_cpu=not device.startswith("cuda"), bf16=device.startswith("cuda"),
                            max_length=w.prompt_tokens + w.answer_tokens + 2, dataloader_num_workers=0, seed=0)
        model = seq_classifier(w, device, checkpoint_dtype(device))  # a user's bf16 checkpoint
        trainer = RewardTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer(w), callbacks=[trl_timing_callback(timer)])
        trainer.train()
    tokens = 2 * w.pairs * (w.prompt_tokens + w.answer_tokens)
    return report("TRL RewardTrainer (defaults)", tokens, timer.step_s, device, sum(p.numel() for p in model.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["trl"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-shape", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="each trainer this many times, taking turns; its median round counts")
    args = parser.parse_args()
    w = Workload.gpu() if args.gpu_shape else Workload()
    print(f"reward model: {w.pairs} pairs x ({w.prompt_tokens} + {w.answer_tokens}) tokens, vocab {w.vocab}, hidden {w.hidden}, "
          f"{w.layers} layers; device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    ours(w, args.device, shared_prefix=False)
    runs = {"ours": lambda: ours(w, args.device)}
    if args.peer == "trl":
        runs["trl"] = lambda: trl(w, args.device)
    med = alternating(runs, args.rounds)
    if args.peer == "trl":
        print(f"ratio alignflow / TRL tokens/s ({rounds_label(args.rounds)}): "
              f"{med['ours']['tokens_per_s'] / med['trl']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
