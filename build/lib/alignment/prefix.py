"""Shared-prefix batches: the answers to one prompt read their common prompt from ONE copy of it.

A prompt x with answers y_1 .. y_K becomes one row  x ++ y_1 ++ ... ++ y_K  with a 4D attention mask in
which every token attends causally to its own answer and to the prompt, and never to another answer.
Positions of each answer restart where the prompt ends, so each answer sees exactly the context it
would see in its own row x ++ y_k: hidden states, rewards and log-probs equal those of K separate rows,
while the prompt is computed once instead of K times.

A preference pair (x, y_w, y_l) is the case K = 2 (`collate_shared_prefix`). `group_by_prompt` goes
further: all pairs that share a prompt become one group, each distinct answer is scored once and every
comparison among them is read off those scores (InstructGPT trains its reward model on all K-choose-2
comparisons of a prompt as one batch element). A prompt with 8 answers and 28 labeled pairs costs one
row of 8 answers instead of 28 rows of 2.

Rows are right-padded; a pad token attends only to itself (so no attention row is empty).
Needs a model whose attention accepts a custom 4D mask (transformers' Llama, Qwen2, Mistral, GPT-2, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from alignment.data import PairExample
from alignment.logprobs import LOGITS_BUDGET, head_logps, plain_lm_head, selective_log_softmax

Tensor = torch.Tensor


@dataclass(frozen=True)
class PromptGroup:
    """One prompt, its distinct answers, and the labeled comparisons among them."""

    prompt_ids: tuple[int, ...]
    answers: tuple[tuple[int, ...], ...]  # token ids of each distinct answer, ending in EOS
    pairs: tuple[tuple[int, int], ...]  # (preferred, other) as indices into answers, one per labeled pair

    @property
    def tokens(self) -> int:
        """Length of the shared-prefix row prompt ++ answer_1 ++ ... ++ answer_K."""
        return len(self.prompt_ids) + sum(len(a) for a in self.answers)


def group_by_prompt(examples: Sequence[PairExample], max_answers: int = 16) -> list[PromptGroup]:
    """The pairs gathered per prompt; identical answers are scored once.

    A prompt whose pairs name more than `max_answers` distinct answers is split into several groups, so
    no row grows beyond max_answers answers. Every pair lands in exactly one group. Order: groups closed
    by that cap first, then the others in the order their prompts first appear.
    """
    if max_answers < 2:
        raise ValueError("max_answers must be at least 2")
    open_groups: dict[tuple[int, ...], tuple[dict, list]] = {}  # prompt -> (answer -> index, pairs)
    closed: list[tuple[tuple[int, ...], dict, list]] = []
    for e in examples:
        prompt = tuple(e.prompt_ids)
        answers, pairs = open_groups.get(prompt, ({}, []))
        new = {tuple(e.chosen_ids), tuple(e.rejected_ids)} - answers.keys()
        if len(answers) + len(new) > max_answers:
            closed.append((prompt, answers, pairs))
            answers, pairs = {}, []
        for a in (tuple(e.chosen_ids), tuple(e.rejected_ids)):
            answers.setdefault(a, len(answers))
        pairs.append((answers[tuple(e.chosen_ids)], answers[tuple(e.rejected_ids)]))
        open_groups[prompt] = (answers, pairs)
    closed += [(prompt, answers, pairs) for prompt, (answers, pairs) in open_groups.items()]
    return [PromptGroup(prompt, tuple(answers), tuple(pairs)) for prompt, answers, pairs in closed]


@dataclass
class SharedPrefixBatch:
    input_ids: Tensor  # [B, L] prompt ++ answer_1 ++ ... ++ answer_K, right-padded
    position_ids: Tensor  # [B, L] the positions of every answer restart after the prompt
    attention_mask: Tensor  # [B, 1, L, L] bool, True = may attend
    answer_last: Tensor  # [B, K] index of the last token of each answer (0 where a row has fewer answers)
    source: Tensor  # [B, K, A] position whose logits predict answer token a (0 where padded)
    target: Tensor  # [B, K, A] answer token ids
    target_mask: Tensor  # [B, K, A] 1 on real answer tokens

    def to(self, device) -> "SharedPrefixBatch":
        return SharedPrefixBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate_answers_shared(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> SharedPrefixBatch:
    """Build the shared-prefix batch of rows (prompt_ids, [answer_ids, ...]) (see the module docstring)."""
    B = len(rows)
    L = max(len(p) + sum(len(a) for a in answers) for p, answers in rows)
    K = max(len(answers) for _, answers in rows)
    A = max(len(a) for _, answers in rows for a in answers)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    seg = torch.zeros((B, L), dtype=torch.long)  # segment: 0 pad, 1 prompt, 2 + k answer k
    answer_last = torch.zeros((B, K), dtype=torch.long)
    source = torch.zeros((B, K, A), dtype=torch.long)
    target = torch.full((B, K, A), pad_id, dtype=torch.long)
    target_mask = torch.zeros((B, K, A), dtype=torch.long)
    for i, (prompt, answers) in enumerate(rows):
        P = len(prompt)
        if P == 0 or any(len(a) == 0 for a in answers):
            raise ValueError(f"row {i}: the prompt and every answer must have at least one token")
        ids[i, :P], seg[i, :P], pos[i, :P] = torch.tensor(list(prompt)), 1, torch.arange(P)
        start = P
        for k, answer in enumerate(answers):
            n = len(answer)
            ids[i, start : start + n] = torch.tensor(list(answer))
            pos[i, start : start + n] = torch.arange(P, P + n)
            seg[i, start : start + n] = 2 + k
            answer_last[i, k] = start + n - 1
            # logits at position s predict the token at s + 1; the last prompt position predicts the first
            # token of every answer
            source[i, k, 0] = P - 1
            source[i, k, 1:n] = torch.arange(start, start + n - 1)
            target[i, k, :n], target_mask[i, k, :n] = torch.tensor(list(answer)), 1
            start += n
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)  # [B, L, 1], [B, 1, L]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    visible = (k == 1) | (q == k)  # the prompt, and tokens of one's own segment
    mask = causal & visible & (q != 0) & (k != 0)
    mask |= torch.eye(L, dtype=torch.bool)  # pads see themselves: no empty softmax row
    return SharedPrefixBatch(ids, pos, mask.unsqueeze(1), answer_last, source, target, target_mask)


def collate_shared_prefix(examples: Sequence[PairExample], pad_id: int) -> SharedPrefixBatch:
    """One row prompt ++ chosen ++ rejected per pair: answer 0 is the chosen one, answer 1 the rejected."""
    return collate_answers_shared([(e.prompt_ids, (e.chosen_ids, e.rejected_ids)) for e in examples], pad_id)


def collate_groups(groups: Sequence[PromptGroup], pad_id: int) -> SharedPrefixBatch:
    """One row prompt ++ all answers per group."""
    return collate_answers_shared([(g.prompt_ids, g.answers) for g in groups], pad_id)


def pair_values(values: Tensor, groups: Sequence[PromptGroup]) -> tuple[Tensor, Tensor]:
    """Per-answer values [B, K] of a batch of groups -> (preferred [N], other [N]) over all N pairs."""
    rows = torch.tensor([b for b, g in enumerate(groups) for _ in g.pairs], device=values.device)
    index = torch.tensor([p for g in groups for p in g.pairs], device=values.device).view(-1, 2)  # [N, 2]
    return values[rows, index[:, 0]], values[rows, index[:, 1]]


def pair_count(groups: Sequence[PromptGroup] | None, indices: Sequence[int]) -> int:
    """How many pairs the rows `indices` hold: a prompt group holds several, a plain pair row one."""
    return sum(len(groups[i].pairs) for i in indices) if groups is not None else len(indices)


def shared_prefix_hidden(backbone, batch: SharedPrefixBatch) -> Tensor:
    """Last hidden states [B, L, H] of a transformers base model on a shared-prefix batch."""
    return backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).last_hidden_state


def shared_prefix_logps(model, batch: SharedPrefixBatch) -> Tensor:
    """Summed log pi(answer_k | prompt) of a causal LM for every answer of every row: [B, K]
    (0 where a row has fewer answers).

    Only the positions that predict answer tokens go through the LM head (for the families in
    alignment.logprobs.PLAIN_HEAD_FAMILIES; others run their own head on every position and are gathered
    after), so the prompt and the padding cost no vocabulary projection and no full [B, L, V] tensor is
    built; past LOGITS_BUDGET logits the head runs in chunks (alignment.logprobs.head_logps).
    """
    B, K, A = batch.source.shape
    source = batch.source.view(B, K * A)
    head = plain_lm_head(model)
    if head is not None:
        hidden = shared_prefix_hidden(model.base_model, batch)  # [B, L, H]
        picked = hidden.gather(1, source.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, KA, H]
        if picked.shape[0] * picked.shape[1] * model.config.vocab_size > LOGITS_BUDGET:  # a real vocabulary: in chunks
            flat = head_logps(picked.reshape(B * K * A, -1), head, batch.target.view(-1))
            return (flat.view(B, K, A) * batch.target_mask).sum(-1)  # [B, K]
        picked = head(picked)  # [B, KA, V]
    else:
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits  # [B, L, V]
        picked = logits.gather(1, source.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # [B, KA, V]
    token_logps = selective_log_softmax(picked, batch.target.view(B, K * A)).view(B, K, A)
    return (token_logps * batch.target_mask).sum(-1)  # [B, K]
