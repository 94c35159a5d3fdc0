"""Per-token and per-sequence log-probabilities of answer tokens under a causal LM."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


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


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of the answer tokens and their sum per sequence.

    log pi(y|x) = sum over ANSWER tokens t of log pi(y_t | x, y_<t). The logits at position t predict the
    token at position t + 1, so logits[:, :-1] are scored against labels[:, 1:].

    logits: [B, T, V] from the model on the full prompt+answer ids; labels: [B, T] those ids;
    mask: [B, T] 1 on answer tokens, 0 on prompt and padding (aligned with labels).
    Returns (token_logps [B, T] aligned with labels, 0 where mask is 0 and at t = 0;
             seq_logps [B] = token_logps.sum(-1)).
    """
    shifted = selective_log_softmax(logits[:, :-1], labels[:, 1:])  # [B, T-1]
    token_mask = mask[:, 1:].to(shifted.dtype)
    token_logps = torch.zeros(labels.shape, dtype=shifted.dtype, device=shifted.device)  # [B, T]
    token_logps[:, 1:] = shifted * token_mask
    return token_logps, token_logps.sum(-1)
