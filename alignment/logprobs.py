"""Per-token and per-sequence log-probabilities of answer tokens under a causal LM.

Logits are [rows, tokens, vocabulary]: at a real vocabulary (128k-256k) and 1k-token rows, a batch's logits in
fp32 take tens of GB. Where they would exceed LOGITS_BUDGET elements, only the positions that predict answer
tokens go through the LM head, LOGITS_BUDGET logits at a time, each chunk recomputed in the backward pass
instead of kept (`head_logps`): memory is bounded by the budget, not by the batch. Below it the whole batch
goes through the model's own forward at once (one matmul: the fastest for small vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor

LOGITS_BUDGET = 1 << 26  # logits held at once (256 MB in fp32) before the LM head is applied in chunks
PLAIN_HEAD_FAMILIES = {"Llama", "Qwen2", "Qwen3", "Mistral", "GPT2", "Phi3", "SmolLM3"}


def unwrapped(model):
    """The transformers model inside a PEFT wrapper (its LoRA layers injected, so calling it runs them, and
    disabling the adapters disables them there too); any other model as it is."""
    return model.get_base_model() if type(model).__name__.startswith("PeftModel") else model


def plain_lm_head(model):
    """The LM head when logits are exactly lm_head(last hidden state) of model.base_model; None for models
    that scale or soft-cap their logits, or whose family is not known to (then the full forward is used).
    `model` is the transformers model itself (see unwrapped)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if type(model).__name__.split("For")[0].removesuffix("LMHeadModel") not in PLAIN_HEAD_FAMILIES:
        return None
    if getattr(model, "base_model", None) is None or model.base_model is model:
        return None
    return model.get_output_embeddings()


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last axis, in float32.

    H = -sum_a pi(a) log pi(a) = logsumexp(z) - sum_a softmax(z)_a z_a. logits z: [..., V]. Returns [...].
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)


def _head_chunk(hidden: Tensor, head, targets: Tensor, temperature: float, entropy: bool) -> Tensor:
    logits = head(hidden)  # [n, V]
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logps = selective_log_softmax(logits.unsqueeze(0), targets.unsqueeze(0)).squeeze(0)  # [n]
    return torch.stack([logps, token_entropy(logits)], dim=-1) if entropy else logps


def head_logps(hidden: Tensor, head, targets: Tensor, temperature: float = 1.0, budget: int | None = None,
               entropy: bool = False) -> Tensor:
    """log softmax(head(hidden) / tau)[target] at N positions, budget // V positions at a time.

    hidden: [N, H] the hidden states that predict the targets; targets: [N] token ids. Returns [N] (float32), or
    [N, 2] (log-prob, entropy of softmax(head(hidden) / tau)) with entropy=True.
    With gradients on, each chunk runs under activation checkpointing: its [n, V] logits are recomputed in the
    backward pass, so at most one chunk's logits (and their gradient) exist at once.
    """
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, (budget or LOGITS_BUDGET) // vocab)
    out = []
    for i in range(0, hidden.shape[0], rows):
        h, t = hidden[i : i + rows], targets[i : i + rows]
        if torch.is_grad_enabled():
            out.append(checkpoint(_head_chunk, h, head, t, temperature, entropy, use_reentrant=False))
        else:
            out.append(_head_chunk(h, head, t, temperature, entropy))
    if not out:
        return hidden.new_zeros((0, 2) if entropy else (0,), dtype=torch.float32)
    return torch.cat(out)


@dataclass
class AnswerPass:
    """What one forward pass gives about a batch's answer tokens, each aligned with the labels [B, T] (0 where
    the mask is 0): log-probs, entropies of the distributions that predicted them (when asked for), and the
    last hidden state [B, T, H] (when asked for: a value head reads it)."""

    logps: Tensor
    entropies: Tensor | None = None
    hidden: Tensor | None = None


def answer_pass(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, position_ids: Tensor | None = None,
                temperature: float = 1.0, budget: int | None = None, entropy: bool = False, hidden: bool = False
                ) -> AnswerPass:
    """Per-token log-probs [B, T] of the answer tokens (mask 1) under a causal LM, as sequence_logprobs of its
    logits, without [B, T, V] logits when those would exceed the budget (and the model's head is plain): then
    only the positions predicting answer tokens go through the head, in chunks (head_logps). entropy: also the
    entropy of softmax(logits / tau) at those positions; hidden: also the last hidden state."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  **({"position_ids": position_ids} if position_ids is not None else {}))
    inner = unwrapped(model)
    head = plain_lm_head(inner)
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None) or 0
    if head is None or input_ids.numel() * vocab <= (budget or LOGITS_BUDGET):
        out = model(**kwargs, **({"output_hidden_states": True} if hidden else {}))
        logits = out.logits
        result = AnswerPass(sequence_logprobs(logits, input_ids, mask, temperature)[0],
                            hidden=out.hidden_states[-1] if hidden else None)
        if entropy:
            scaled = logits[:, :-1] / temperature if temperature not in (0.0, 1.0) else logits[:, :-1]
            result.entropies = torch.zeros_like(result.logps)
            result.entropies[:, 1:] = token_entropy(scaled) * mask[:, 1:]
        return result
    states = inner.base_model(**kwargs).last_hidden_state  # [B, T, H]
    predicts = mask[:, 1:].bool()  # [B, T-1]: position t predicts answer token t + 1
    picked = head_logps(states[:, :-1][predicts], head, input_ids[:, 1:][predicts], temperature, budget, entropy)
    result = AnswerPass(torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device),
                        hidden=states if hidden else None)
    result.logps[:, 1:][predicts] = picked[:, 0] if entropy else picked
    if entropy:
        result.entropies = torch.zeros_like(result.logps)
        result.entropies[:, 1:][predicts] = picked[:, 1]
    return result


def answer_logprobs(model, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, position_ids: Tensor | None = None,
                    temperature: float = 1.0, budget: int | None = None) -> Tensor:
    """Per-token log-probs [B, T] of the answer tokens (mask 1): answer_pass's log-probs alone."""
    return answer_pass(model, input_ids, attention_mask, mask, position_ids, temperature, budget).logps


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[..., index] without materialising a float32 copy of the full [B, T, V] tensor.

    log pi(a) = z_a - logsumexp(z). float32/float64 inputs are handled in one pass (logsumexp does not
    keep a [B, T, V] result); half-precision inputs are upcast one row at a time, so only a [T, V]
    float32 buffer exists at once.
    logits: [B, T, V], index: [B, T] (int64). Returns [B, T] in float32 (or float64 for float64 inputs).
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)  # [B, T]
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_index in zip(logits, index):  # row_logits: [T, V]
        row = row_logits.float()
        rows.append(torch.gather(row, -1, row_index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, -1))
    return torch.stack(rows)  # [B, T]


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the answer tokens and their sum per sequence.

    log pi(y|x) = sum over ANSWER tokens t of log pi(y_t | x, y_<t). The logits at position t predict the
    token at position t + 1, so logits[:, :-1] are scored against labels[:, 1:].
    temperature tau: the log-probs of softmax(logits / tau), the distribution answers sampled at tau came from
    (what an RL update's ratios and KL must be measured in, as TRL does); 0 (greedy) and 1 leave them as they are.

    logits: [B, T, V] from the model on the full prompt+answer ids; labels: [B, T] those ids;
    mask: [B, T] 1 on answer tokens, 0 on prompt and padding (aligned with labels).
    Returns (token_logps [B, T] aligned with labels, 0 where mask is 0 and at t = 0;
             seq_logps [B] = token_logps.sum(-1)).
    """
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    shifted = selective_log_softmax(logits[:, :-1], labels[:, 1:])  # [B, T-1]
    token_mask = mask[:, 1:].to(shifted.dtype)
    token_logps = torch.zeros(labels.shape, dtype=shifted.dtype, device=shifted.device)  # [B, T]
    token_logps[:, 1:] = shifted * token_mask
    return token_logps, token_logps.sum(-1)
