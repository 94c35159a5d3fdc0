"""Packing and prefill-once, each against the layout it replaces, in one invocation.

    .venv/bin/python benchmarks/bench_packing.py [--device cpu] [--steps 6]

1. Packing (`packing: true`): SFT and DPO steps on the token lengths of real files (alpaca_en_demo.json and the
   ShareGPT pairs of dpo_zh_demo.json in ../shared/realworld, tokenized with Phi-3-mini's tokenizer, cut at 512),
   a tiny Llama at Phi-3's vocabulary (32,064), 16 examples a step, unpacked, packed, and under a token budget
   (`micro_batch_tokens`: max_length for SFT, 2 x max_length for DPO, or --budget), each from the same seed.
   Prints real (non-pad) tokens/s, rows a step and the padding share; the losses of the runs must agree.
2. Prefill once (GRPO/RLOO rollouts): 16 prompts x 8 answers, 32 new tokens, prompts of the alpaca prompts'
   lengths, the prompt pass over 128 repeated rows against 16 distinct prompts whose cache is repeated. Both draw
   the same answers from the same seed; prints completions/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from common import Workload, causal_lm, sync

REAL = Path(__file__).resolve().parents[2] / "shared" / "realworld"
MAX_LENGTH = 512


def real_lengths():
    """(prompt ids, answer ids) of the alpaca demonstrations and (prompt, chosen, rejected) of the DPO pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REAL / "tokenizers" / "phi-3-mini"))
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"] or [tok.unk_token_id]  # noqa: E731
    demos = []
    for r in json.loads((REAL / "sft" / "alpaca_en_demo.json").read_text()):
        prompt, answer = enc(r["instruction"] + "\n" + r["input"]), enc(r["output"]) + [tok.eos_token_id]
        demos.append((prompt[: MAX_LENGTH // 2], answer[: MAX_LENGTH - min(len(prompt), MAX_LENGTH // 2)]))
    pairs = []
    for r in json.loads((REAL / "preferences" / "dpo_zh_demo.json").read_text()):
        prompt = enc("\n".join(m["value"] for m in r["conversations"]))[: MAX_LENGTH // 2]
        room = MAX_LENGTH - len(prompt)
        pairs.append((prompt, (enc(r["chosen"]["value"]) + [tok.eos_token_id])[:room],
                      (enc(r["rejected"]["value"]) + [tok.eos_token_id])[:room]))
    return len(tok), demos, pairs


def timed_training(make, steps: int):
    """(seconds a step after the first, the losses, the trainer)."""
    trainer = make()
    times, last = [], [time.perf_counter()]

    def tick(step, metrics):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer.callback = tick
    losses = [h["loss"] for h in trainer.train()]
    return sum(times[1:]) / max(1, len(times) - 1), losses, trainer  # the first step warms up


def layout(rows, pack: bool | int) -> tuple[int, int, int]:
    """(rows, real tokens, padded slots) of one batch of (prompt, [answers]) groups."""
    from alignment.prefix import collate_answers_shared

    batch = collate_answers_shared(rows, 0, pack)
    real = sum(len(p) + sum(len(a) for a in answers) for p, answers in rows)
    return batch.input_ids.shape[0], real, batch.input_ids.numel() - real


def packing(device: str, steps: int, vocab: int, demos, pairs, budget: int = 0) -> list[dict]:
    from alignment.config import DPOConfig, SFTConfig, TrainConfig
    from alignment.data import PairExample
    from alignment.trainers.dpo import DPOTrainer
    from alignment.trainers.sft import SFTTrainer

    w = Workload(vocab=vocab)
    train = TrainConfig(max_steps=steps + 1, batch_size=16, lr=1e-4, lr_schedule="constant", group_by_length=False)
    examples = [PairExample(list(p), list(c), list(r)) for p, c, r in pairs]
    out = []
    # a token budget: SFT's examples are at most MAX_LENGTH tokens, a pair's row at most 2 x MAX_LENGTH
    budgets = {"sft": budget or MAX_LENGTH, "dpo": budget or 2 * MAX_LENGTH}
    for name, make, rows_of in (
        ("sft", lambda pack, tokens: SFTTrainer(causal_lm(w, device), demos, 0, SFTConfig(
            train, max_length=MAX_LENGTH, packing=pack, micro_batch_tokens=tokens)),
         lambda idx: [(demos[i][0], [demos[i][1]]) for i in idx]),
        ("dpo", lambda pack, tokens: DPOTrainer(causal_lm(w, device), examples, 0, DPOConfig(
            train, max_length=MAX_LENGTH, packing=pack, micro_batch_tokens=tokens)),
         lambda idx: [(examples[i].prompt_ids, [examples[i].chosen_ids, examples[i].rejected_ids]) for i in idx])):
        runs = {}
        for kind, pack, tokens in (("unpacked", False, 0), ("packed", True, 0), (f"budget {budgets[name]}", True, budgets[name])):
            torch.manual_seed(0)
            step_s, losses, trainer = timed_training(lambda: make(pack, tokens), steps)
            batches = [trainer.sampler.batch(s) for s in range(steps + 1)]  # the batches it trained on
            shapes = [layout(rows_of(m), tokens or pack) for b in batches for m in (trainer.opt.split(b) if tokens else [b])]
            rows, real, padded = (sum(x[i] for x in shapes) / len(batches) for i in range(3))
            runs[kind] = dict(step_s=step_s, losses=losses, rows=rows, real=real, pad_share=padded / (real + padded))
        for kind, r in runs.items():
            tps = r["real"] / r["step_s"]
            gap = max(abs(a - b) for a, b in zip(runs["unpacked"]["losses"], r["losses"]))
            print(f"{name} {kind:12s} {tps:9.0f} real tok/s {1000 * r['step_s']:8.1f} ms/step  rows {r['rows']:5.1f}  "
                  f"padding {100 * r['pad_share']:5.1f}%  {runs['unpacked']['step_s'] / r['step_s']:.2f}x unpacked  "
                  f"loss gap {gap:.1e}")
            out.append({"stage": name, "layout": kind, "real_tokens_per_s": tps, "step_ms": 1000 * r["step_s"],
                        "rows": r["rows"], "padding_share": r["pad_share"]})
    return out


def prefill(device: str, vocab: int, demos) -> list[dict]:
    from alignment.config import SamplingParams
    from alignment.data import pad
    from alignment.sampling import sample

    w, G = Workload(vocab=vocab), 8
    model = causal_lm(w, device).eval()
    rng = random.Random(0)
    prompts = [list(demos[i][0]) for i in rng.sample(range(len(demos)), 16)]
    ids, mask = (t.to(device) for t in pad(prompts, 0, side="left"))
    params = SamplingParams(max_new_tokens=32, temperature=1.0)
    out, answers = [], {}
    for once in (False, True):
        best = float("inf")
        for repeat in range(3):
            sync(device)
            t = time.perf_counter()
            g = torch.Generator(device=device).manual_seed(repeat)
            if once:
                res = sample(model, ids, mask, params, 0, g, answers_per_prompt=G)
            else:
                res = sample(model, ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), params, 0, g)
            sync(device)
            best = min(best, time.perf_counter() - t)
        answers[once] = res.answer_ids
        name = "prefill once, cache repeated" if once else "prefill per answer"
        print(f"rollout {name:30s} {len(prompts) * G / best:8.1f} completions/s  {best:6.2f} s/batch "
              f"(prompts {ids.shape[1]} tokens wide)")
        out.append({"prefill_once": once, "completions_per_s": len(prompts) * G / best, "s_per_batch": best})
    print(f"rollout speed-up {out[0]['s_per_batch'] / out[1]['s_per_batch']:.2f}x; "
          f"same answers: {bool(torch.equal(answers[False], answers[True]))}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each run (after one warm-up step)")
    parser.add_argument("--budget", type=int, default=0, help="micro_batch_tokens of the budget rows (default: the "
                        "least each stage allows: max_length for SFT, 2 x max_length for DPO)")
    args = parser.parse_args()
    vocab, demos, pairs = real_lengths()
    print(f"{len(demos)} demonstrations, {len(pairs)} pairs; vocabulary {vocab}; device {args.device}")
    packing(args.device, args.steps, vocab, demos, pairs, args.budget)
    prefill(args.device, vocab, demos)


if __name__ == "__main__":
    main()
