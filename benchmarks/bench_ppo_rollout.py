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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=["hf"], help="also run transformers' generate and print the ratio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu-shape", action="store_true", help="Qwen2-0.5B shape, 256 new tokens")
    parser.add_argument("--batch", type=int, default=32, help="prompts sampled together")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache of our sampler")
    parser.add_argument("--compile", action="store_true", help="torch.compile our decoding step (the warm-up compiles)")
    args = parser.parse_args()
    w = Workload.gpu() if args.gpu_shape else Workload()
    new = args.new_tokens or (256 if args.gpu_shape else 64)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = causal_lm(w, args.device, dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, w.vocab, (args.batch, w.prompt_tokens), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    print(f"rollouts: {args.batch} prompts x {w.prompt_tokens} tokens -> {new} new tokens; vocab {w.vocab}, hidden {w.hidden}, "
          f"{w.layers} layers; device {args.device}, {dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    from alignment.sampling import SamplingParams, sample

    params = SamplingParams(max_new_tokens=new, temperature=1.0, cache=args.cache, compile=args.compile)

    def ours():
        sample(model, ids, mask, params, pad_token_id=0, generator=torch.Generator(device=args.device).manual_seed(1))

    def hf():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)

    results = {}
    label = f"alignflow sample ({args.cache}{', compiled' if args.compile else ''})"
    for name, fn in [(label, ours)] + ([("HF generate", hf)] if args.peer else []):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            times.append(time.perf_counter() - t)
        best = min(times)
        results[name] = args.batch / best
        print(f"{name:30s} {args.batch / best:8.2f} completions/s  {args.batch * new / best:9.0f} new tok/s  "
              f"{best:6.2f} s/batch  peak {peak_memory_mb(args.device):6.0f} MB")
    if args.peer:
        a, b = results.values()
        print(f"ratio alignflow / HF generate: {a / b:.2f}x")


if __name__ == "__main__":
    main()
