"""PPO rollout generation: alignflow's batched KV-cache sampler against Hugging Face `generate` on the
same model, prompts and batch (all prompts of an iteration together), in one invocation.

    .venv/bin/python benchmarks/bench_ppo_rollout.py [--peer hf] [--device cuda] [--gpu-shape]

Completions are forced to the full length (no stop token) so both produce the same number of tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import Workload, causal_lm, peak_memory_mb, sync


def logp_gap(model, out) -> float:
    """Largest |log pi(token)| difference between what the sampler recorded while decoding and a full forward
    over the finished sequences: near 0 (bf16 rounding) when the KV cache is used right, large when not."""
    from alignment.evaluation import answer_logps

    full = answer_logps(model, out)[:, out.prompt_length :]
    return float(((full - out.answer_logps).abs() * out.answer_mask).max())


def measure(w: Workload, device: str, batch: int, new: int, repeats: int, cache: str = "dynamic", compile: bool = False,
            peer: bool = False) -> dict:
    """Best-of-`repeats` completions/s of our sampler (and of HF `generate` with the same cache kind: a
    static cache makes transformers compile the decoding step on a GPU), after one warm-up call each."""
    from alignment.sampling import SamplingParams, sample

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = causal_lm(w, device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, w.vocab, (batch, w.prompt_tokens), generator=g).to(device)
    mask = torch.ones_like(ids)
    print(f"rollouts: {batch} prompts x {w.prompt_tokens} tokens -> {new} new tokens; vocab {w.vocab}, hidden {w.hidden}, "
          f"{w.layers} layers; device {device}, {dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    params = SamplingParams(max_new_tokens=new, temperature=1.0, cache=cache, compile=compile)

    def ours():
        sample(model, ids, mask, params, pad_token_id=0, generator=torch.Generator(device=device).manual_seed(1))

    def hf():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None,
                           **({"cache_implementation": "static"} if cache == "static" else {}))

    results = {}
    suffix = f"{cache} cache{', compiled' if compile else ''}"
    for name, fn in [(f"alignflow sample ({suffix})", ours)] + ([(f"HF generate ({cache} cache)", hf)] if peer else []):
        t = time.perf_counter()
        fn()  # warm-up (compiles, where asked)
        warmup_s = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        best = min(times)
        results["ours" if fn is ours else "peer"] = {"name": name, "completions_per_s": batch / best, "new_tokens_per_s": batch * new / best,
                                                     "batch_s": best, "warmup_s": warmup_s, "peak_mb": peak_memory_mb(device)}
        print(f"{name:40s} {batch / best:8.2f} completions/s  {batch * new / best:9.0f} new tok/s  "
              f"{best:6.2f} s/batch  peak {peak_memory_mb(device):6.0f} MB  (warm-up {warmup_s:.1f} s)")
    results["ours"]["logp_gap"] = logp_gap(model, sample(model, ids, mask, params, 0, torch.Generator(device=device).manual_seed(2)))
    print(f"sampler log-probs against a full forward over the samples: max |difference| {results['ours']['logp_gap']:.4f} nats")
    if peer:
        results["ratio"] = results["ours"]["completions_per_s"] / results["peer"]["completions_per_s"]
        print(f"ratio alignflow / HF generate: {results['ratio']:.2f}x")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["hf"], help="also run transformers' generate and print the ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-shape", action="store_true", help="Qwen2-0.5B shape, 256 new tokens")
    parser.add_argument("--batch", type=int, default=32, help="prompts sampled together")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache of our sampler (and of HF's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our decoding step (the warm-up compiles)")
    args = parser.parse_args()
    w = Workload.gpu() if args.gpu_shape else Workload()
    measure(w, args.device, args.batch, args.new_tokens or (256 if args.gpu_shape else 64), args.repeats, args.cache,
            args.compile, bool(args.peer))


if __name__ == "__main__":
    main()
