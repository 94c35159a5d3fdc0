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
How a model reads that rule (prefix_forward):
- As the dense [R, 1, L, L] mask (SDPA, eager; on an accelerator the trainers' default): it needs a model whose
  attention accepts a custom 4D mask (transformers' Llama, Qwen2, Mistral, GPT-2, ...), boolean for SDPA and
  additive for eager (dense_mask). Flash-attention implementations take no 4D mask and are refused.
- A model loaded with attn_implementation="flex_attention" reads it as a FlexAttention BlockMask (`block_mask`):
  blocks nobody sees are skipped.
- A model set to attn_implementation="alignflow_sdpa" (SEGMENTS, by `use_segments(model)`) reads
  it as segments, with no [R, 1, L, L] mask (segment_layout): each group's prompt ++ first answer (its head) is
  attended causally (`is_causal`: on a GPU SDPA's flash kernels; a row that holds one group from its start is read
  in place, no gather), and each later answer (a tail) with its queries against its prompt ++ itself (a mask of
  answer x (prompt + answer), not row x row); every position then takes its own output. The linear layers and the
  attention's queries read each prompt once. Any call without segments is plain SDPA. Exact (tests/test_prefix.py).
  On a CPU it takes as long as the mask at the benchmark's 255-token rows and is 1.23x (reward model) and 1.26x
  (DPO) faster at rows of 1,280 tokens (256 + 2 x 512), so the DPO and reward-model trainers set an SDPA model to
  it there (segments_on_cpu); on a GPU, benchmarks/gpu_check.py measures it against the mask and flex.
  A batch of a fixed width (a token budget, for compiled static shapes) has no segments and reads the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from typing import Sequence

import torch
from torch import nn

from alignment.data import PairExample
from alignment.logprobs import LOGITS_BUDGET, answer_logprobs, head_logps, plain_lm_head, selective_log_softmax, unwrapped

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


def group_by_prompt(examples: Sequence[PairExample], max_answers: int = 16, max_tokens: int | None = None) -> list[PromptGroup]:
    """The pairs gathered per prompt; identical answers are scored once.

    A prompt whose pairs name more than `max_answers` distinct answers (or, with max_tokens, whose row
    prompt ++ answers would grow past max_tokens) is split into several groups, so no row grows beyond
    that: a group is never longer than its longest pair, or max_tokens. Every pair lands in exactly one group.
    Order: groups closed by a cap first, then the others in the order their prompts first appear.
    """
    if max_answers < 2:
        raise ValueError("max_answers must be at least 2")
    open_groups: dict[tuple[int, ...], tuple[dict, list]] = {}  # prompt -> (answer -> index, pairs)
    closed: list[tuple[tuple[int, ...], dict, list]] = []
    for e in examples:
        prompt = tuple(e.prompt_ids)
        answers, pairs = open_groups.get(prompt, ({}, []))
        new = {tuple(e.chosen_ids), tuple(e.rejected_ids)} - answers.keys()
        too_long = max_tokens is not None and len(prompt) + sum(len(a) for a in (*answers, *new)) > max_tokens
        if answers and (len(answers) + len(new) > max_answers or too_long):
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
    input_ids: Tensor  # [R, L] rows of prompt ++ answer_1 ++ ... ++ answer_K (several such groups when packed), right-padded
    position_ids: Tensor  # [R, L] the positions of every answer restart after its prompt; a packed group's start at 0
    group: Tensor  # [R, L] which group (prompt and its answers) a position belongs to; -1 on padding
    part: Tensor  # [R, L] 0 on a group's prompt, 1 + k on its answer k
    answer_last: Tensor  # [B, K] index into the R * L flattened positions of each answer's last token (0 where absent)
    source: Tensor  # [B, K, A] flattened position whose logits predict answer token a (0 where padded)
    target: Tensor  # [B, K, A] answer token ids
    target_mask: Tensor  # [B, K, A] 1 on real answer tokens
    # per answer (flattened start of its prompt, the prompt's length, flattened start of the answer, its length);
    # None for rows of a fixed width (a token budget: compiled static shapes), which read the mask
    spans: tuple[tuple[int, int, int, int], ...] | None = None

    def to(self, device) -> "SharedPrefixBatch":
        fields = (getattr(self, f) for f in self.__dataclass_fields__)
        return SharedPrefixBatch(*(t.to(device) if isinstance(t, Tensor) else t for t in fields))

    @cached_property
    def segments(self) -> "SegmentLayout":
        """The batch's segment_layout, built on demand: only a model set to SEGMENTS reads it."""
        return segment_layout(self.spans, *self.group.shape).to(self.group.device)

    @cached_property
    def attention_mask(self) -> Tensor:
        """[R, 1, L, L] bool, True = may attend (see visible). Built on demand, once a batch (DPO reads it for the
        policy and again for the reference): the block-mask path never forms it."""
        L = self.group.shape[1]
        q = torch.arange(L, device=self.group.device)
        g, p = self.group, self.part
        return visible(g[:, :, None], g[:, None, :], p[:, :, None], p[:, None, :], q[:, None], q[None, :]).unsqueeze(1)


def visible(group_q: Tensor, group_kv: Tensor, part_q: Tensor, part_kv: Tensor, q: Tensor, kv: Tensor) -> Tensor:
    """May the query at position q attend to the key at kv? Causally, within its own group, to the group's prompt
    (part 0) and to its own answer, never to padding (group -1); every position sees itself, so a pad's softmax row
    is not empty. The one rule of the dense mask (broadcast over [R, L, L]) and of the block mask (per index)."""
    return ((kv <= q) & (group_q == group_kv) & (group_kv >= 0) & ((part_kv == 0) | (part_kv == part_q))) | (q == kv)


def block_mask(batch: SharedPrefixBatch):
    """The batch's attention rule as a FlexAttention BlockMask: blocks of 128 x 128 positions that no query may see
    are skipped, and no [R, L, L] mask exists (a dense mask keeps SDPA off its fastest kernels on a GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    g, p = batch.group, batch.part
    R, L = g.shape
    return create_block_mask(lambda b, h, q, kv: visible(g[b, q], g[b, kv], p[b, q], p[b, kv], q, kv), R, None, L, L,
                             device=g.device)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most `capacity` (first fit, longest first); a row longer than
    the capacity gets a bin of its own. Each bin lists its rows in their given order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if b is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[b].append(i)
            room[b] -= lengths[i]
    return [sorted(b) for b in sorted(bins, key=min)]


def collate_answers_shared(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
                           pack: bool | int = False) -> SharedPrefixBatch:
    """Build the shared-prefix batch of groups (prompt_ids, [answer_ids, ...]) (see the module docstring).

    pack: several groups share a row, up to the longest group's length (pack_rows), so the batch holds far less
    padding when lengths differ; the mask keeps each group to itself and positions restart at 0 for each, so
    every answer's logits and hidden states are those of the unpacked batch (padding-free batches). A number
    of tokens instead of True: rows of exactly that width (a token budget: every batch the same shape; a group
    longer than it is refused).
    """
    B = len(rows)
    lengths = [len(p) + sum(len(a) for a in answers) for p, answers in rows]
    L = max(lengths)
    if pack is not True and pack:  # a width, not a flag (True == 1 in Python: test for it first)
        if L > pack:
            raise ValueError(f"a row of {L} tokens does not fit a packed width of {pack} tokens")
        L = int(pack)
    K = max(len(answers) for _, answers in rows)
    A = max(len(a) for _, answers in rows for a in answers)
    bins = pack_rows(lengths, L) if pack else [[i] for i in range(B)]
    R = len(bins)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    group = torch.full((R, L), -1, dtype=torch.long)  # which group a position belongs to; -1 pad
    part = torch.zeros((R, L), dtype=torch.long)  # 0 the group's prompt, 1 + k its answer k
    answer_last = torch.zeros((B, K), dtype=torch.long)
    source = torch.zeros((B, K, A), dtype=torch.long)
    target = torch.full((B, K, A), pad_id, dtype=torch.long)
    target_mask = torch.zeros((B, K, A), dtype=torch.long)
    spans = []  # (flattened start of the prompt, its length, flattened start of the answer, its length), per answer
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            prompt, answers = rows[i]
            P = len(prompt)
            if P == 0 or any(len(a) == 0 for a in answers):
                raise ValueError(f"row {i}: the prompt and every answer must have at least one token")
            base = r * L  # flattened index of the row's first position
            ids[r, start : start + P], pos[r, start : start + P] = torch.tensor(list(prompt)), torch.arange(P)
            group[r, start : start + lengths[i]] = i
            last_prompt = start + P - 1
            prompt_at = base + start
            start += P
            for k, answer in enumerate(answers):
                n = len(answer)
                spans.append((prompt_at, P, base + start, n))
                ids[r, start : start + n] = torch.tensor(list(answer))
                pos[r, start : start + n] = torch.arange(P, P + n)
                part[r, start : start + n] = 1 + k
                answer_last[i, k] = base + start + n - 1
                # logits at position s predict the token at s + 1; the last prompt position predicts the first
                # token of every answer
                source[i, k, 0] = base + last_prompt
                source[i, k, 1:n] = base + torch.arange(start, start + n - 1)
                target[i, k, :n], target_mask[i, k, :n] = torch.tensor(list(answer)), 1
                start += n
    return SharedPrefixBatch(ids, pos, group, part, answer_last, source, target, target_mask,
                             tuple(spans) if pack is True or not pack else None)  # a fixed width reads the mask


@dataclass(frozen=True)
class SegmentLayout:
    """Where segment_attention reads and writes (segment_layout). Heads: each group's prompt ++ first answer, a
    causal sequence of head_width positions; head_index [G, head_width] gathers them, or None when every row holds
    one group from its first position (unpacked rows): the heads are then the rows' first head_width positions, read
    in place. Tails: each later answer's queries (tail_q [T, Q]) against its prompt ++ itself (tail_kv [T, Kv]), with
    tail_mask [T, 1, Q, Kv]. owner [R * L]: each position's output among the heads' outputs then the tails'."""

    head_width: int
    head_index: Tensor | None
    tail_q: Tensor
    tail_kv: Tensor
    tail_mask: Tensor
    owner: Tensor

    def to(self, device) -> "SegmentLayout":
        moved = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return SegmentLayout(**{f: v.to(device) if isinstance(v, Tensor) else v for f, v in moved.items()})


def segment_layout(spans: Sequence[tuple[int, int, int, int]], rows: int, width: int) -> SegmentLayout:
    """The SegmentLayout of a batch of rows x width positions from its answers' spans (prompt start, prompt length,
    answer start, answer length; starts are flattened positions; a group's first answer follows its prompt).
    Padding positions take slot 0 (their output is never read by a real position)."""
    groups: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # prompt start -> (its length, its answers' spans)
    for p0, P, a0, n in spans:
        groups.setdefault(p0, (P, []))[1].append((a0, n))
    owner = torch.zeros(rows * width, dtype=torch.long)
    in_place = len(groups) == rows and all(p0 % width == 0 for p0 in groups)
    S = max(P + answers[0][1] for P, answers in groups.values())
    head_index = None if in_place else torch.zeros((len(groups), S), dtype=torch.long)
    tails = []
    for g, (p0, (P, answers)) in enumerate(groups.items()):
        (a0, n), rest = answers[0], answers[1:]
        assert a0 == p0 + P, "a group's first answer follows its prompt"
        slot = (p0 // width if in_place else g) * S  # the head's first output slot
        owner[p0 : p0 + P + n] = slot + torch.arange(P + n)
        if head_index is not None:
            head_index[g, : P + n] = torch.arange(p0, p0 + P + n)
        tails += [(p0, P, a, m) for a, m in rest]
    heads = (rows if in_place else len(groups)) * S
    Q, Kv = max((m for *_, m in tails), default=0), max((P + m for _, P, _, m in tails), default=0)
    tail_q = torch.zeros((len(tails), Q), dtype=torch.long)
    tail_kv = torch.zeros((len(tails), Kv), dtype=torch.long)
    prompt_len = torch.zeros(len(tails), dtype=torch.long)
    for t, (p0, P, a0, m) in enumerate(tails):
        tail_q[t, :m] = torch.arange(a0, a0 + m)
        tail_kv[t, :P], tail_kv[t, P : P + m] = torch.arange(p0, p0 + P), torch.arange(a0, a0 + m)
        prompt_len[t] = P
        owner[a0 : a0 + m] = heads + t * Q + torch.arange(m)
    # answer token j sees its prompt and its own tokens up to j (a padded query sees what token j would: unread)
    tail_mask = torch.arange(Kv)[None, None, :] <= prompt_len[:, None, None] + torch.arange(Q)[None, :, None]
    return SegmentLayout(S, head_index, tail_q, tail_kv, tail_mask.unsqueeze(1), owner)


def collate_shared_prefix(examples: Sequence[PairExample], pad_id: int, pack: bool | int = False) -> SharedPrefixBatch:
    """prompt ++ chosen ++ rejected per pair: answer 0 is the chosen one, answer 1 the rejected."""
    return collate_answers_shared([(e.prompt_ids, (e.chosen_ids, e.rejected_ids)) for e in examples], pad_id, pack)


def collate_groups(groups: Sequence[PromptGroup], pad_id: int, pack: bool | int = False) -> SharedPrefixBatch:
    """prompt ++ all answers per group."""
    return collate_answers_shared([(g.prompt_ids, g.answers) for g in groups], pad_id, pack)


def pair_values(values: Tensor, groups: Sequence[PromptGroup]) -> tuple[Tensor, Tensor]:
    """Per-answer values [B, K] of a batch of groups -> (preferred [N], other [N]) over all N pairs."""
    rows = torch.tensor([b for b, g in enumerate(groups) for _ in g.pairs], device=values.device)
    index = torch.tensor([p for g in groups for p in g.pairs], device=values.device).view(-1, 2)  # [N, 2]
    return values[rows, index[:, 0]], values[rows, index[:, 1]]


def pair_count(groups: Sequence[PromptGroup] | None, indices: Sequence[int]) -> int:
    """How many pairs the rows `indices` hold: a prompt group holds several, a plain pair row one."""
    return sum(len(groups[i].pairs) for i in indices) if groups is not None else len(indices)


SEGMENTS = "alignflow_sdpa"  # the attention implementation that reads segments: SDPA's own, when it is given none


def segment_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, alignflow_segments=None, **kwargs):
    """transformers' SDPA attention (query [R, H, L, D], key/value [R, Hkv, L, D] -> [R, L, H, D]); given
    alignflow_segments (a batch's SegmentLayout and the list of modules that read it), each group's prompt ++ first
    answer is attended causally (is_causal: no mask) and each later answer against its prompt ++ itself, and every
    position takes its own output (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if alignflow_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layout, seen = alignflow_segments
    seen.append(module)  # the model did call us: the forward that passed the segments checks it
    R, H, L, D = query.shape
    kwargs.pop("is_causal", None)

    def gather(t: Tensor, index: Tensor) -> Tensor:  # [R, h, L, D] -> [N, h, S, D] at index [N, S]
        flat = t.transpose(1, 2).reshape(R * L, t.shape[1], D)  # one row per position
        return flat.index_select(0, index.view(-1)).view(*index.shape, -1, D).transpose(1, 2)

    if layout.head_index is None:  # every row is one group from position 0: its head is the row's beginning
        heads = [t[:, :, : layout.head_width] for t in (query, key, value)]
    else:
        heads = [gather(t, layout.head_index) for t in (query, key, value)]
    out, _ = sdpa_attention_forward(module, *heads, None, is_causal=True, **kwargs)  # [N, S, H, D]
    outs = [out.reshape(-1, H, D)]
    if layout.tail_q.numel():
        tail, _ = sdpa_attention_forward(module, gather(query, layout.tail_q), gather(key, layout.tail_kv),
                                         gather(value, layout.tail_kv), layout.tail_mask, is_causal=False, **kwargs)
        outs.append(tail.reshape(-1, H, D))
    return torch.cat(outs).index_select(0, layout.owner).view(R, L, H, D), None


@cache
def register_segment_attention() -> None:
    """Make SEGMENTS a name transformers knows (on first use: importing its attention registry costs seconds)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SEGMENTS, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SEGMENTS, sdpa_mask)  # calls without segments get SDPA's masks, as before


def use_segments(model) -> None:
    """Set a transformers model to read shared-prefix batches as segments (see the module docstring)."""
    register_segment_attention()
    model.set_attn_implementation(SEGMENTS)


def attention_of(model) -> str | None:
    """A transformers model's attention implementation ("sdpa", "eager", "flex_attention", SEGMENTS, ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def segments_on_cpu(model, device, compiled: bool = False) -> None:
    """How shared-prefix training reads its rows by default: on a CPU, a model that attends with transformers' SDPA
    (its default) is set to SEGMENTS, which is level with the dense mask at short rows and faster at long ones (the
    module docstring). On an accelerator the mask stays until benchmarks/gpu_check.py has measured the two there;
    so does a model that will be compiled (torch 2.13's inductor fails on the heads' strided slices under dynamic
    shapes). A model set to another attention (eager, flex_attention) keeps it. `model`: a transformers model or a
    PEFT one."""
    inner = unwrapped(model)
    if torch.device(device).type == "cpu" and not compiled and attention_of(inner) == "sdpa":
        use_segments(inner)


def uses_flex_attention(model) -> bool:
    """Whether a transformers model attends through FlexAttention (attn_implementation="flex_attention")."""
    return attention_of(model) == "flex_attention"


def reads_segments(model) -> bool:
    """Whether a shared-prefix forward of `model` goes as segments: a model set to SEGMENTS, not found to drop them."""
    return attention_of(model) == SEGMENTS and not model.__dict__.get("_alignflow_no_segments")


def prefix_forward(model, batch: SharedPrefixBatch, inner=None):
    """model(input_ids, position_ids, attention as the model reads it: see the module docstring). inner: the
    transformers model inside a wrapper (a LoRA model), whose attention decides."""
    ids = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    inner = model if inner is None else inner
    if uses_flex_attention(inner):
        if torch.is_grad_enabled() and batch.input_ids.device.type == "cpu":
            raise ValueError("FlexAttention cannot train on a CPU (torch has no backward for it there): load the model "
                             "with attn_implementation 'sdpa' or 'eager'")
        return model(attention_mask=block_mask(batch), **ids)
    if batch.spans is not None and reads_segments(inner):
        seen = []  # the attention modules that read the segments
        out = model(attention_mask=torch.ones_like(batch.input_ids), alignflow_segments=(batch.segments, seen), **ids)
        if seen:
            return out
        inner.__dict__["_alignflow_no_segments"] = True  # its attention never saw them: it reads the mask from now on
    return model(attention_mask=dense_mask(inner, batch), **ids)


def dense_mask(model, batch: SharedPrefixBatch) -> Tensor:
    """The batch's [R, 1, L, L] mask in the form `model`'s attention reads it (transformers passes a 4D mask on as it
    is): SDPA's boolean (True: may attend), or the additive float mask (0 or the dtype's least value) that eager
    attention and the others add to their scores; a boolean one added there would mask nothing."""
    implementation = attention_of(model) or "sdpa"
    if implementation in ("sdpa", SEGMENTS):
        return batch.attention_mask
    if "flash" in implementation:
        raise ValueError(f"attention {implementation!r} takes no 4D mask, so it cannot read shared-prefix rows: load the "
                         f"model with attn_implementation 'sdpa' (or set shared_prefix: false)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    allowed = batch.attention_mask
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def shared_prefix_hidden(backbone, batch: SharedPrefixBatch) -> Tensor:
    """Last hidden states [R, L, H] of a transformers base model on a shared-prefix batch."""
    return prefix_forward(backbone, batch).last_hidden_state


def shared_prefix_logps(model, batch: SharedPrefixBatch) -> Tensor:
    """Summed log pi(answer_k | prompt) of a causal LM for every answer of every row: [B, K]
    (0 where a row has fewer answers).

    Only the positions that predict answer tokens go through the LM head (for the families in
    alignment.logprobs.PLAIN_HEAD_FAMILIES; others run their own head on every position and are gathered
    after), so the prompt and the padding cost no vocabulary projection and no full [B, L, V] tensor is
    built; past LOGITS_BUDGET logits the head runs in chunks (alignment.logprobs.head_logps).
    """
    B, K, A = batch.source.shape
    real = batch.target_mask.view(-1).bool()  # the answer slots that hold a token: only these meet the vocabulary
    source, target = batch.source.view(-1)[real], batch.target.view(-1)[real]  # [n] into the R * L flattened positions
    inner = unwrapped(model)  # a LoRA model's transformers model, adapters injected
    head = plain_lm_head(inner)
    if head is not None:
        hidden = shared_prefix_hidden(inner.base_model, batch)  # [R, L, H]
        picked = hidden.reshape(-1, hidden.shape[-1])[source]  # [n, H]
        if picked.shape[0] * inner.config.vocab_size > LOGITS_BUDGET:  # a real vocabulary: in chunks
            flat = head_logps(picked, head, target)
        else:
            flat = selective_log_softmax(head(picked).unsqueeze(0), target.unsqueeze(0)).squeeze(0)  # [n]
    else:
        logits = prefix_forward(model, batch, inner).logits  # [R, L, V]
        flat = selective_log_softmax(logits.reshape(-1, logits.shape[-1])[source].unsqueeze(0), target.unsqueeze(0)).squeeze(0)
    token_logps = flat.new_zeros(B * K * A).masked_scatter(real, flat)  # 0 on the empty slots
    return token_logps.view(B, K, A).sum(-1)  # [B, K]


class AnswerLogps(nn.Module):
    """The trained module of SFT, GRPO and RLOO: a policy whose forward gives answer log-probs, so DDP/FSDP wrappers
    see the call while the policy inside sends only answer positions through its LM head (alignment.logprobs: a
    wrapped policy would form whole logits, the wrapper having no LM head to find). Takes a packed batch (returns
    each example's summed log-prob [B, 1]) or the arguments of answer_logprobs after the model (input_ids,
    attention_mask, answer_mask[, position_ids, temperature]: returns per-token log-probs [B, T])."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: SharedPrefixBatch | tuple) -> Tensor:
        if isinstance(batch, SharedPrefixBatch):
            return shared_prefix_logps(self.policy, batch)
        return answer_logprobs(self.policy, *batch)
