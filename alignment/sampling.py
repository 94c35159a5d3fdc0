"""Batched sampling from a causal LM with a KV cache: temperature, top-k, top-p, stop tokens."""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from alignment.config import SamplingParams  # noqa: F401 - re-exported
from alignment.data import turn_end_ids
from alignment.logprobs import unwrapped
from alignment.models import position_ids_from_mask

Tensor = torch.Tensor
STOP_CHECK_EVERY = 16  # on an accelerator, tokens decoded between two looks at whether every row has stopped
STATIC_WIDTH_STEP = 64  # a static cache's prompts are left-padded to a multiple of this: few shapes to compile
log = logging.getLogger(__name__)


def stop_token_ids(params: SamplingParams, tokenizer, model=None) -> tuple[int, ...]:
    """params.stop_token_ids when given; else every token a chat model ends its answer with: the tokenizer's EOS,
    the chat template's end of turn (Phi-3's <|end|>, ChatML's <|im_end|>: turn_end_ids) and the EOS ids of the
    model's generation_config (what transformers' generate, TRL and vLLM stop on)."""
    if params.stop_token_ids:
        return tuple(params.stop_token_ids)
    config = getattr(unwrapped(model), "generation_config", None) if model is not None else None
    saved = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *turn_end_ids(tokenizer), *(saved if isinstance(saved, (list, tuple)) else [saved])]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def declare_stop_tokens(model, tokenizer) -> None:
    """Every token an answer ends with (stop_token_ids: EOS, the template's end of turn, the ids the config
    already lists) as the eos_token_id of `model`'s generation_config, before it is saved: transformers'
    generate, vLLM and TRL, loading the folder, then stop where our sampler stops. (A base model given a chat
    template, as Phi-3's <|end|> or ChatML's <|im_end|> beside <|endoftext|>, would otherwise run on past the
    end of its turn.) Models that do not generate (a reward model) are left as they are."""
    config = getattr(model, "generation_config", None)
    if config is None or not model.can_generate():
        return
    ids = stop_token_ids(SamplingParams(), tokenizer, model)
    config.eos_token_id = ids[0] if len(ids) == 1 else list(ids)


def cache_mode(params: SamplingParams, device: torch.device) -> tuple[bool, bool]:
    """(static cache, compiled decoding step) for these params on this device. "auto": both on CUDA, where a
    compiled step with CUDA graphs decodes several times faster, and neither elsewhere (compiling costs more than
    it saves on short CPU runs); compile=True asks for both on any device."""
    if params.compile:
        return True, True
    if params.cache == "auto":
        return (device.type == "cuda",) * 2
    return params.cache == "static", False


@dataclass
class SampleOutput:
    sequences: Tensor  # [B, P + N] left-padded prompts followed by right-padded answers
    attention_mask: Tensor  # [B, P + N] 1 on real prompt and answer tokens
    answer_ids: Tensor  # [B, N] sampled tokens, pad after the stop token
    answer_mask: Tensor  # [B, N] 1 on answer tokens up to and including the stop token
    answer_logps: Tensor  # [B, N] log pi(token) under the temperature-scaled policy, 0 where masked
    prompt_length: int  # P


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V]. Returns [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)  # [B, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keeps the token crossing p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: Tensor, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None) -> Tensor:
    """One token per row from probs [B, V] by the inverse CDF: index of the first cumulative probability
    above u * total, u ~ U[0, 1). Exactly the categorical distribution, with one uniform per row instead
    of the V exponentials that torch.multinomial draws (those dominated a CPU decoding step). Returns [B].
    rows (first, total): these B rows are rows first .. first + B - 1 of a batch of `total`; the uniforms
    drawn are the whole batch's, so each row gets the one it would get in the whole batch."""
    cdf = probs.cumsum(-1)  # [B, V]
    first, total = rows or (0, probs.shape[0])
    u = torch.rand(total, 1, device=probs.device, dtype=cdf.dtype, generator=generator)[first : first + probs.shape[0]]  # [B, 1]
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # [B]
    return index.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    params: SamplingParams,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
    answers_per_prompt: int = 1,
) -> SampleOutput:
    """Sample answers_per_prompt (G) answers to each prompt. Prompts must be LEFT-padded (input_ids,
    attention_mask: [B0, P]); the output has B = B0 * G rows, a prompt's G answers next to each other.

    One forward over the distinct prompts fills the KV cache (with G > 1 it is then repeated G times, so a
    prompt is computed once for its G answers: GRPO and RLOO groups), then one token per step for all rows
    at once. Rows that hit a stop token keep running on padding (masked) until all rows stop or N tokens exist.
    rows (first, total): the B output rows are one process's share of a batch of `total` rows sampled with
    the same generator (online RL on several processes); every row draws what it would draw in the whole batch.
    """
    G = answers_per_prompt
    if G < 1:
        raise ValueError(f"answers_per_prompt must be at least 1, not {G}")
    static, compiled = cache_mode(params, input_ids.device)
    width = input_ids.shape[1]
    if static:  # a few prompt widths, so the compiled step sees a few cache shapes; trimmed off the output
        extra = -width % STATIC_WIDTH_STEP
        input_ids, attention_mask = F.pad(input_ids, (extra, 0), value=pad_token_id), F.pad(attention_mask, (extra, 0))
    prompts = (input_ids, attention_mask)
    if G > 1:  # the answers' rows; the prompt pass below reads the distinct prompts
        input_ids, attention_mask = input_ids.repeat_interleave(G, 0), attention_mask.repeat_interleave(G, 0)
    B, P = input_ids.shape
    device = input_ids.device
    if static:  # mask and cache span prompt + every new token from the start; positions not yet written are 0
        cache = StaticCache(config=model.config, max_cache_len=P + params.max_new_tokens)
        mask = torch.cat([attention_mask.long(), attention_mask.new_zeros(B, params.max_new_tokens, dtype=torch.long)], dim=1)
    else:
        cache = DynamicCache(config=model.config)
        mask = attention_mask.long()
    decode = _compiled_step(model) if compiled else model
    cache_arg = cache_kwarg(model)
    position_ids = position_ids_from_mask(attention_mask.long())
    step_ids = input_ids
    step_positions = position_ids
    cache_position = torch.arange(P, device=device)
    stop = torch.tensor(params.stop_token_ids, device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for t in range(params.max_new_tokens):
        if t == 0 and G > 1:
            logits = _prompt_pass_once(model, *prompts, cache, cache_arg, G)  # [B, V]
        else:
            inputs = dict(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                          logits_to_keep=1, **{cache_arg: cache}, **({"cache_position": cache_position} if static else {}))
            if t == 0 or decode is model:  # the prompt pass has its own shape: not compiled
                out = model(**inputs)
            else:
                out, decode = _decode(decode, model, inputs)
            logits = out.logits[:, -1].float()  # [B, V]
        if t == 0 and cache.get_seq_length() == 0:  # a forward that swallows an unknown keyword silently drops the cache
            raise RuntimeError(f"{type(model).__name__}.forward did not fill the KV cache passed as `{cache_arg}`: every "
                               f"token would be drawn without its context. Is this transformers version supported (>= 5.0)?")
        if params.temperature > 0:
            logits = logits / params.temperature
        probs = torch.softmax(logits, dim=-1)  # [B, V], one pass over the vocabulary when nothing is filtered
        if params.temperature == 0:
            next_token = logits.argmax(-1)  # [B]
        else:
            filtered = params.top_k or params.top_p < 1.0
            sample_probs = torch.softmax(filter_logits(logits, params.top_k, params.top_p), dim=-1) if filtered else probs
            next_token = draw(sample_probs, generator, rows)  # [B]
        next_token = next_token.masked_fill(done, pad_token_id)
        tokens.append(next_token)
        # log pi(token) = log of its probability; a token drawn from probs (or from a top-k/p subset) has p > 0
        logps.append(probs.gather(-1, next_token.unsqueeze(-1)).squeeze(-1).log().masked_fill(done, 0.0))
        alive.append(~done)
        if len(stop):
            done = done | torch.isin(next_token, stop)
        if (device.type == "cpu" or (t + 1) % STOP_CHECK_EVERY == 0) and bool(done.all()):
            break  # on an accelerator, reading `done` waits for the device: asked every STOP_CHECK_EVERY tokens
        step_ids = next_token.unsqueeze(-1)  # [B, 1]
        step_positions = step_positions[:, -1:] + 1  # [B, 1]
        cache_position = cache_position[-1:] + 1
        if static:
            mask = mask.clone()
            mask[:, P + t] = 1
        else:
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=-1)
    answer_ids = torch.stack(tokens, dim=1)  # [B, N]
    answer_mask = torch.stack(alive, dim=1).long()  # [B, N]
    return SampleOutput(
        sequences=torch.cat([input_ids[:, P - width :], answer_ids], dim=1),  # [B, width + N]
        attention_mask=torch.cat([attention_mask[:, P - width :].long(), answer_mask], dim=1),
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        answer_logps=torch.stack(logps, dim=1),
        prompt_length=width,
    )


def sample_within_memory(model, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams, pad_token_id: int,
                         seed: int, rows: tuple[int, int] | None = None, answers_per_prompt: int = 1) -> SampleOutput:
    """sample() of the whole batch at once where the accelerator's memory holds it (the fastest: every row of a
    rollout decodes together). Where it runs out, the prompts are split in halves, and halves of those, each part
    sampled with a generator seeded `seed` and its rows' place in the batch: every row draws the uniforms it would
    draw in the whole batch, so the answers are the same, from less memory at once. The number of prompts that fit
    is remembered for the model's later batches."""
    G, n = answers_per_prompt, input_ids.shape[0]
    first, total = rows or (0, n * G)
    device = input_ids.device

    def run(lo: int, hi: int) -> list[SampleOutput]:
        fits = model.__dict__.get("_alignflow_sample_prompts")
        if fits is not None and hi - lo > fits:
            mid = lo + fits
            return run(lo, mid) + run(mid, hi)
        generator = torch.Generator(device=device).manual_seed(seed)
        try:
            return [sample(model, input_ids[lo:hi], attention_mask[lo:hi], params, pad_token_id, generator,
                           rows=(first + lo * G, total), answers_per_prompt=G)]
        except torch.OutOfMemoryError:
            if hi - lo == 1:
                raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model.__dict__["_alignflow_sample_prompts"] = (hi - lo) // 2
        log.info("sampling %d prompts at once ran out of memory: %d at a time from now on", hi - lo, (hi - lo) // 2)
        return run(lo, hi)

    return joined(run(0, n), pad_token_id)


def joined(parts: list[SampleOutput], pad_token_id: int) -> SampleOutput:
    """Consecutive rows sampled in parts as one output: answers right-padded to the longest part's length."""
    if len(parts) == 1:
        return parts[0]
    N, P = max(p.answer_ids.shape[1] for p in parts), parts[0].prompt_length
    grow = lambda t, value: F.pad(t, (0, N - t.shape[1]), value=value)  # noqa: E731 - [b, n] -> [b, N]
    answer_ids = torch.cat([grow(p.answer_ids, pad_token_id) for p in parts])
    answer_mask = torch.cat([grow(p.answer_mask, 0) for p in parts])
    prompts = torch.cat([p.sequences[:, :P] for p in parts])
    prompt_mask = torch.cat([p.attention_mask[:, :P] for p in parts])
    return SampleOutput(sequences=torch.cat([prompts, answer_ids], 1), attention_mask=torch.cat([prompt_mask, answer_mask], 1),
                        answer_ids=answer_ids, answer_mask=answer_mask,
                        answer_logps=torch.cat([grow(p.answer_logps, 0.0) for p in parts]), prompt_length=P)


def _prompt_pass_once(model, input_ids: Tensor, attention_mask: Tensor, cache, cache_arg: str, G: int) -> Tensor:
    """The prompt pass over B0 distinct prompts [B0, P]; fills `cache` (dynamic or static, sized for B0 * G rows)
    with each prompt's keys and values repeated G times. Returns the last position's logits [B0 * G, V]."""
    once = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=True, logits_to_keep=1, **{cache_arg: once})
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    if once.get_seq_length() > 0:  # (if the forward kept no cache, the caller names it)
        for layer, kv in enumerate(once.layers):  # Cache.update: the call a model's attention makes on every cache type
            cache.update(kv.keys.repeat_interleave(G, 0), kv.values.repeat_interleave(G, 0), layer, {"cache_position": positions})
    return out.logits[:, -1].float().repeat_interleave(G, 0)


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: transformers 5.0-5.2x call it `past_key_values`, later versions
    `cache` (the old name deprecated). Passing the wrong one is silently swallowed by **kwargs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg(type(base))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    names = inspect.signature(cls.forward).parameters
    return "past_key_values" if "past_key_values" in names and "cache" not in names else "cache"


def _compiled_step(model):
    """The model under torch.compile, built once per model (CUDA graphs on a GPU). Kept in the model's
    __dict__, not as an attribute nn.Module would register (that would add its weights to state_dict). The
    model itself where compiling it failed before."""
    if "_alignflow_compiled" not in model.__dict__:
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        model.__dict__["_alignflow_compiled"] = torch.compile(model, mode=mode)
    return model.__dict__["_alignflow_compiled"]


def _decode(decode, model, inputs: dict):
    """One decoding step through the compiled model; (output, the step to use from now on). torch.compile builds
    its graph on the first call: where that fails (a model it cannot trace), the step and every later one run
    uncompiled, with one warning, instead of the rollout failing. Once a graph was built, errors are raised."""
    if model.__dict__.get("_alignflow_compiled_ran"):
        return decode(**inputs), decode
    try:
        out = decode(**inputs)
    except Exception as e:  # torch._dynamo and inductor raise many types; a real error shows again uncompiled
        log.debug("compiling the decoding step failed", exc_info=e)
        log.warning("torch.compile could not compile %s's decoding step; sampling goes on without compiling "
                    "(sampling `cache: dynamic` skips the attempt)", type(model).__name__)
        model.__dict__["_alignflow_compiled"] = model
        return model(**inputs), model
    model.__dict__["_alignflow_compiled_ran"] = True
    return out, decode
