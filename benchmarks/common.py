"""Shared pieces of the benchmarks: the workload (model, tokenizer, data), timers and the report line."""

from __future__ import annotations

import os
import random
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

os.environ.setdefault("TQDM_DISABLE", "1")


@dataclass(frozen=True)
class Workload:
    vocab: int = 8000  # vocabulary size
    hidden: int = 256  # about 5M parameters at 4 layers with vocab 8000
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    pairs: int = 8  # preference pairs per step
    prompt_tokens: int = 64
    answer_tokens: int = 96
    steps: int = 12  # timed steps (after warm-up)
    warmup: int = 3
    kv_heads: int | None = None  # grouped-query attention: key/value heads (None: as many as heads)

    @classmethod
    def gpu(cls) -> "Workload":
        """Qwen2-0.5B-shaped: 24 layers, hidden 896, vocab 32000; 8 pairs x (128 + 384) tokens."""
        return cls(vocab=32000, hidden=896, layers=24, heads=14, intermediate=4864, pairs=8,
                   prompt_tokens=128, answer_tokens=384, steps=20, warmup=5)

    @classmethod
    def gpu_1_5b(cls) -> "Workload":
        """Qwen2-1.5B-shaped (28 layers, hidden 1536, 12 heads, 2 key/value heads), vocab 32000 as gpu(); the
        same 8 pairs x (128 + 384) tokens."""
        return cls(vocab=32000, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, pairs=8,
                   prompt_tokens=128, answer_tokens=384, steps=8, warmup=3)

    @classmethod
    def gpu_7b(cls) -> "Workload":
        """Qwen2-7B-shaped (28 layers, hidden 3584, 28 heads, 4 key/value heads) with its real vocabulary (152,064),
        for memory: 4 pairs x (128 + 384) tokens, 2 steps after 1."""
        return cls(vocab=152_064, hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, pairs=4,
                   prompt_tokens=128, answer_tokens=384, steps=2, warmup=1)


def tokenizer(w: Workload) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(w.vocab - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def config(w: Workload, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
                       num_attention_heads=w.heads, num_key_value_heads=w.kv_heads or w.heads, max_position_embeddings=1024,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **kw)


def checkpoint_dtype(device: str) -> torch.dtype:
    """The weights a user's checkpoint loads with on this device: bf16 on a GPU (today's chat models are saved
    in bf16; transformers 5, TRL and alignflow's dtype auto load them so), fp32 on a CPU (alignflow's auto)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def causal_lm(w: Workload, device: str, dtype=torch.float32) -> LlamaForCausalLM:
    """Random weights (seed 0). On a GPU they are drawn there, in `dtype`: a 7B model's on a CPU take minutes."""
    torch.manual_seed(0)
    if device.startswith("cuda"):
        with torch.device(device):
            return LlamaForCausalLM._from_config(config(w), dtype=dtype)
    return LlamaForCausalLM(config(w)).to(device=device, dtype=dtype)


def seq_classifier(w: Workload, device: str, dtype=torch.float32) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config(w, num_labels=1)).to(device=device, dtype=dtype)


def texts(w: Workload, n: int, seed: int = 0) -> list[dict]:
    """Preference rows of random words with the workload's exact token lengths (1 word = 1 token)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(w.vocab - 4)}" for _ in range(k))  # noqa: E731
    # the answer has answer_tokens - 1 words + EOS; its leading space keeps a word boundary where TRL joins
    # prompt and answer as text (without it the prompt's last word and the answer's first merge into one)
    return [{"prompt": words(w.prompt_tokens - 1), "chosen": " " + words(w.answer_tokens - 1), "rejected": " " + words(w.answer_tokens - 1)}
            for _ in range(n)]


def reset_peak(device: str) -> None:
    """Start a new peak of torch's allocations on a GPU: each run's row reports its own. (A CPU process's peak
    resident memory cannot be reset: bench_memory runs each row in a process of its own.)"""
    if device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StepTimer:
    """Wall time per step, excluding the first `warmup` steps: the median step, so that one step slowed by a
    neighbour on a shared machine does not move the figure."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.times, self._t = warmup, device, [], None

    def start(self) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._t)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times[self.warmup:] or self.times)


def mfu(params: int, tokens_per_s: float, device: str, passes: float = 3.0) -> float | None:
    """Model FLOPs utilisation in % against the GPU's bf16 dense peak (2 * passes * N flops per trained
    token: forward + backward = 3 passes); None on a CPU."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    peak = 989e12 if "H100" in name or "H200" in name else 312e12
    return 100 * 2 * passes * params * tokens_per_s / peak


def report(name: str, tokens_per_step: int, step_s: float, device: str, params: int, extra: str = "") -> dict:
    """Print one line and return it as a record: tokens/s, ms/step, peak memory and MFU."""
    tps, util, mem = tokens_per_step / step_s, mfu(params, tokens_per_step / step_s, device), peak_memory_mb(device)
    shown = "n/a (CPU)" if util is None else f"{util:.1f}%"
    print(f"{name:34s} {tps:12.0f} tok/s {1000 * step_s:9.1f} ms/step  peak {mem:8.0f} MB  MFU {shown}  {extra}")
    return {"name": name, "tokens_per_s": tps, "step_ms": 1000 * step_s, "peak_mb": mem, "mfu_pct": util, "note": extra}


def alternating(runs: dict[str, Callable[[], dict]], rounds: int) -> dict[str, dict]:
    """Each run `rounds` times, taking turns (a, b, a, b, ...), each time a fresh trainer: load from the machine's
    other users, which comes and goes over minutes, then falls on every run alike instead of on whichever ran
    during it. Each run's record is that of its median round (by tokens/s)."""
    records: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(rounds):
        if rounds > 1:
            print(f"round {r + 1} of {rounds}")
        for name, run in runs.items():
            records[name].append(run())
    return {name: sorted(recs, key=lambda rec: rec["tokens_per_s"])[(len(recs) - 1) // 2] for name, recs in records.items()}


def rounds_label(rounds: int) -> str:
    return f"median of {rounds} alternating rounds" if rounds > 1 else "one round"


def trl_timing_callback(timer: StepTimer):
    """A transformers TrainerCallback that times each optimizer step of a TRL trainer."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.start()

        def on_step_end(self, args, state, control, **kw):
            timer.stop()

    return Timing()
