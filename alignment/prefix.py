"""Shared-prefix pair batches: chosen and rejected read their common prompt from ONE copy of it.

A pair (x, y_w, y_l) becomes one row  x ++ y_w ++ y_l  with a 4D attention mask in which every token
attends causally to its own answer and to the prompt, and the tokens of y_l never see y_w. Positions of
y_l restart where the prompt ends, so each answer sees exactly the context it would see in its own row
x ++ y: the hidden states, rewards and log-probs equal those of the two-row batch, while the prompt is
computed once instead of twice and a batch has B rows instead of 2B.

Rows are right-padded; a pad token attends only to itself (so no attention row is empty).
Needs a model whose attention accepts a custom 4D mask (transformers' Llama, Qwen2, Mistral, GPT-2, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from alignment.data import PairExample
from alignment.logprobs import selective_log_softmax

Tensor = torch.Tensor


@dataclass
class SharedPrefixBatch:
    input_ids: Tensor  # [B, L] prompt ++ chosen ++ rejected, right-padded
    position_ids: Tensor  # [B, L] rejected positions restart after the prompt
    attention_mask: Tensor  # [B, 1, L, L] bool, True = may attend
    chosen_last: Tensor  # [B] index of the last chosen token
    rejected_last: Tensor  # [B] index of the last rejected token
    source: Tensor  # [B, 2, A] position whose logits predict answer token a (0 where padded)
    target: Tensor  # [B, 2, A] answer token ids (chosen row 0, rejected row 1)
    target_mask: Tensor  # [B, 2, A] 1 on real answer tokens

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate_shared_prefix(examples: Sequence[PairExample], pad_id: int) -> SharedPrefixBatch:
    """Build the shared-prefix batch of a list of pairs (see the module docstring)."""
    B = len(examples)
    L = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    A = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    # segment: 0 pad, 1 prompt, 2 chosen, 3 rejected
    seg = torch.zeros((B, L), dtype=torch.long)
    source = torch.zeros((B, 2, A), dtype=torch.long)
    target = torch.full((B, 2, A), pad_id, dtype=torch.long)
    target_mask = torch.zeros((B, 2, A), dtype=torch.long)
    chosen_last = torch.zeros(B, dtype=torch.long)
    rejected_last = torch.zeros(B, dtype=torch.long)
    for i, e in enumerate(examples):
        P, C, R = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        if P == 0 or C == 0 or R == 0:
            raise ValueError(f"pair {i}: prompt, chosen and rejected must each have at least one token")
        ids[i, : P + C + R] = torch.tensor(list(e.prompt_ids) + list(e.chosen_ids) + list(e.rejected_ids))
        pos[i, : P + C] = torch.arange(P + C)
        pos[i, P + C : P + C + R] = torch.arange(P, P + R)
        seg[i, :P], seg[i, P : P + C], seg[i, P + C : P + C + R] = 1, 2, 3
        chosen_last[i], rejected_last[i] = P + C - 1, P + C + R - 1
        # logits at position s predict the token at s + 1; the first answer token of both answers is
        # predicted by the last prompt position
        source[i, 0, :C] = torch.arange(P - 1, P + C - 1)
        source[i, 1, 0] = P - 1
        source[i, 1, 1:R] = torch.arange(P + C, P + C + R - 1)
        target[i, 0, :C], target[i, 1, :R] = torch.tensor(e.chosen_ids), torch.tensor(e.rejected_ids)
        target_mask[i, 0, :C], target_mask[i, 1, :R] = 1, 1
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # [B, L, 1], [B, 1, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    visible = (k == 1) | (q == k)  # the prompt, and tokens of one's own segment
    mask = causal & visible & (q != 0) & (k != 0)
    mask |= torch.eye(L, dtype=torch.bool)  # pads see themselves: no empty softmax row
    return SharedPrefixBatch(ids, pos, mask.unsqueeze(1), chosen_last, rejected_last, source, target, target_mask)


def shared_prefix_hidden(backbone, batch: SharedPrefixBatch) -> Tensor:
    """Last hidden states [B, L, H] of a transformers base model on a shared-prefix batch."""
    return backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state


def _plain_lm_head(model):
    """The LM head when logits are exactly lm_head(last hidden state); None for models that scale or
    soft-cap their logits (then the full forward is used)."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if type(model).__name__.split("For")[0].removesuffix("LMHeadModel") not in PLAIN_HEAD_FAMILIES:
        return None
    return model.get_output_embeddings()


PLAIN_HEAD_FAMILIES = {"Llama", "Qwen2", "Qwen3", "Mistral", "GPT2", "Phi3", "SmolLM3"}


def shared_prefix_logps(model, batch: SharedPrefixBatch) -> tuple[Tensor, Tensor]:
    """(chosen_logps [B], rejected_logps [B]): summed log pi(answer | prompt) of a causal LM.

    Only the positions that predict answer tokens go through the LM head (for the families in
    PLAIN_HEAD_FAMILIES; others run their own head on every position and are gathered after), so the
    prompt and the padding cost no vocabulary projection and no full [B, L, V] tensor is built.
    """
    B, _, A = batch.source.shape
    source = batch.source.view(B, 2 * A)
    head = _plain_lm_head(model)
    if head is not None:
        hidden = shared_prefix_hidden(model.base_model, batch)  # [B, L, H]
        picked = head(hidden.gather(1, source.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))  # [B, 2A, V]
    else:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits  # [B, L, V]
        picked = logits.gather(1, source.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, 2A, V]
    token_logps = selective_log_softmax(picked, batch.target.view(B, 2 * A)).view(B, 2, A)
    seq = (token_logps * batch.target_mask).sum(-1)  # [B, 2]
    return seq[:, 0], seq[:, 1]
