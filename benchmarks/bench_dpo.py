"""DPO training throughput: alignflow's DPOTrainer against TRL's DPOTrainer on the same model, data
and batch, in one invocation.

    .venv/bin/python benchmarks/bench_dpo.py [--peer trl] [--device cuda] [--gpu-shape] [--rounds 3]

Prints policy tokens/s (chosen + rejected, prompt included), step time, peak memory and, on GPU, MFU.
alignflow runs twice: with reference log-probs precomputed once (its default; the one-off pass is
timed separately) and with the reference forward in every step, as TRL does by default. Each trainer runs
--rounds times, the trainers taking turns, and the ratio is of their median rounds (a step's time is the median
of its run's steps): on a shared machine a neighbour's load then falls on both sides alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import StepTimer, alternating, rounds_label, trl_timing_callback, Workload, causal_lm, checkpoint_dtype, report, reset_peak, texts, tokenizer


def ours(w: Workload, device: str, precompute: bool, shared_prefix: bool = True, attention: str | None = None,
         lora: bool = False, budget: int = 0) -> dict:
    """alignflow's DPOTrainer. attention: the model's attn_implementation ("flex_attention": shared-prefix rows
    through a block mask instead of a dense one; "alignflow_sdpa": as segments, alignment.prefix); lora: LoRA
    adapters (r 16 on every linear layer, the reference is the base model); budget: micro_batch_tokens (packing
    under a token budget, one row of that many tokens a micro-batch)."""
    from alignment.config import LoRAConfig
    from alignment.data import tokenize_pairs
    from alignment.lora import add_lora
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.dpo import DPOConfig, DPOTrainer

    reset_peak(device)
    tok = tokenizer(w)
    rows = texts(w, w.pairs * (w.steps + w.warmup))
    examples = tokenize_pairs(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows],
                              w.prompt_tokens + w.answer_tokens)
    model = causal_lm(w, device, checkpoint_dtype(device))  # as our dpo stage loads a checkpoint (dtype auto)
    if attention:
        from alignment.prefix import register_segment_attention

        register_segment_attention()  # "alignflow_sdpa": shared-prefix rows as segments
        model.set_attn_implementation(attention)
    if lora:
        model = add_lora(model, LoRAConfig())
    cfg = DPOConfig(TrainConfig(max_steps=w.steps + w.warmup, batch_size=w.pairs, lr=1e-5, lr_schedule="constant",
                                mixed_precision="no"),
                    beta=0.1, max_length=w.prompt_tokens + w.answer_tokens, precompute_ref_logps=precompute,
                    shared_prefix=shared_prefix, packing=budget > 0, micro_batch_tokens=budget)
    t = time.perf_counter()
    trainer = DPOTrainer(model, examples, tok.pad_token_id, cfg)
    setup_s = time.perf_counter() - t
    timer = StepTimer(w.warmup, device)
    timer.start()

    def tick(step, metrics):
        timer.stop()
        timer.start()

    trainer.callback = tick
    trainer.train()
    tokens = 2 * w.pairs * (w.prompt_tokens + w.answer_tokens)
    extra = f"(reference pass once: {setup_s:.1f} s for {len(examples)} pairs)" if precompute else ""
    name = (f"alignflow DPO ({'ref precomputed' if precompute else 'ref every step'}{'' if shared_prefix else ', no prefix sharing'}"
            f"{f', {attention}' if attention else ''}{', LoRA' if lora else ''}{f', micro_batch_tokens {budget}' if budget else ''})")
    return report(name, tokens, timer.step_s, device, sum(p.numel() for p in model.parameters()), extra)


def trl(w: Workload, device: str, precompute: bool = False) -> dict:
    """TRL's DPOTrainer as its users run it: bf16 weights on a GPU; the reference every step (TRL's default) or,
    with precompute, its log-probs computed once before training (`precompute_ref_log_probs`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    reset_peak(device)
    timer = StepTimer(w.warmup, device)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=w.pairs, max_steps=w.steps + w.warmup,
                         learning_rate=1e-5, lr_scheduler_type="constant", beta=0.1, report_to="none", save_strategy="no",
                         logging_steps=10_000, use_cpu=not device.startswith("cuda"), bf16=device.startswith("cuda"),
                         max_length=w.prompt_tokens + w.answer_tokens + 2, dataloader_num_workers=0, seed=0,
                         precompute_ref_log_probs=precompute)
        # the same starting weights as the policy; TRL would otherwise reload the reference by model id
        trainer = DPOTrainer(causal_lm(w, device, checkpoint_dtype(device)), ref_model=causal_lm(w, device, checkpoint_dtype(device)), args=args, train_dataset=Dataset.from_list(texts(w, w.pairs * (w.steps + w.warmup))),
                             processing_class=tokenizer(w), callbacks=[trl_timing_callback(timer)])
        trainer.train()
    tokens = 2 * w.pairs * (w.prompt_tokens + w.answer_tokens)
    name = "TRL DPOTrainer (" + ("ref precomputed" if precompute else "defaults: ref every step") + ")"
    return report(name, tokens, timer.step_s, device, sum(p.numel() for p in trainer.model.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["trl"], help="also run the peer on the same work and print the ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-shape", action="store_true", help="the Qwen2-0.5B-shaped workload of the GPU target")
    parser.add_argument("--rounds", type=int, default=3, help="each trainer this many times, taking turns; its median round counts")
    args = parser.parse_args()
    w = Workload.gpu() if args.gpu_shape else Workload()
    torch.set_num_threads(torch.get_num_threads())
    print(f"DPO: {w.pairs} pairs x ({w.prompt_tokens} + {w.answer_tokens}) tokens, vocab {w.vocab}, hidden {w.hidden}, "
          f"{w.layers} layers; device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    ours(w, args.device, precompute=True, shared_prefix=False)
    runs = {"pre": lambda: ours(w, args.device, precompute=True), "fly": lambda: ours(w, args.device, precompute=False)}
    if args.peer == "trl":
        runs["trl"] = lambda: trl(w, args.device)
    med = alternating(runs, args.rounds)
    if args.peer == "trl":
        print(f"ratio alignflow / TRL tokens/s ({rounds_label(args.rounds)}): "
              f"{med['pre']['tokens_per_s'] / med['trl']['tokens_per_s']:.2f}x (ref precomputed), "
              f"{med['fly']['tokens_per_s'] / med['trl']['tokens_per_s']:.2f}x (ref every step)")

if __name__ == "__main__":
    main()
