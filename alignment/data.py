"""Tokenisation and batching of prompts, answers and preference pairs into padded tensors.

A prompt is either plain text or a conversation (a list of {"role", "content"} messages). A conversation
is rendered with the tokenizer's chat template (`add_generation_prompt=True`), so a chat model is trained
and sampled on the format it is used with; plain text is tokenised as it is (TRL's standard format).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Tensor = torch.Tensor
Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, Sequence[Message]]
log = logging.getLogger(__name__)
_warned_no_template: set[str] = set()


@dataclass(frozen=True)
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer tokens of the preferred answer y_w, ending in EOS
    rejected_ids: list[int]  # answer tokens of the other answer y_l, ending in EOS

    @property
    def tokens(self) -> int:
        """Length of the shared-prefix row prompt ++ chosen ++ rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def render_prompt(tokenizer, prompt: Prompt) -> tuple[str, bool]:
    """(text, templated): a conversation through the tokenizer's chat template with the generation prompt
    appended; without a template (one warning per tokenizer) the turns as `role: content` lines."""
    if isinstance(prompt, str):
        return prompt, False
    messages, tools = split_tools(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True), True
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned_no_template:
        _warned_no_template.add(name)
        log.warning("tokenizer %s has no chat template: conversations are rendered as plain 'role: content' lines", name)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:", False


TOOLS = "tools"  # the role of a conversation's first message when it carries tool definitions ("tools": [...])
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


def split_tools(prompt: Sequence[Message]) -> tuple[list[dict], list[dict] | None]:
    """(the messages as a chat template reads them, the tool definitions or None)."""
    tools = prompt[0]["tools"] if prompt and prompt[0]["role"] == TOOLS else None
    messages = [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in prompt[1 if tools is not None else 0:]]
    return messages, tools


def render_answer(tokenizer, prompt: Sequence[Message], message: Message) -> str:
    """The text a chat template writes for an assistant message that `prompt` leads to (a tool call, whose
    format is the template's): the rendering of prompt + message after that of prompt with the generation
    prompt, up to the end of the turn. "" when the template writes nothing of the message there."""
    messages, tools = split_tools(prompt)
    head = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{k: message[k] for k in MESSAGE_KEYS if k in message}], tools=tools,
                                         tokenize=False)
    return full[len(head):].rstrip() if full.startswith(head) else ""


_SUFFIXES: dict[tuple, str] = {}  # (template, the special tokens it may write) -> turn_suffix


def turn_suffix(tokenizer) -> str:
    """What a chat template writes after an assistant message's text: ChatML's "<|im_end|>", Phi-3's
    "<|end|>\n<|endoftext|>", Gemma's "<end_of_turn>" ("" without a template, or for one that cannot render a
    plain exchange). A templated answer is learned with it, as TRL's conversational SFT and DPO learn it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    key = (template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    if key not in _SUFFIXES:
        marker = "Hi there."
        try:
            text = render_answer(tokenizer, [{"role": "user", "content": "Hello?"}], {"role": "assistant", "content": marker})
        except Exception:  # noqa: BLE001 - a template that cannot render this probe says so where it is used
            text = ""
        _SUFFIXES[key] = text[text.index(marker) + len(marker):] if marker in text else ""
    return _SUFFIXES[key]


def turn_end_ids(tokenizer) -> tuple[int, ...]:
    """The special token a chat template writes right after an assistant message's text (Phi-3's <|end|>, ChatML's
    <|im_end|>, Llama 3's <|eot_id|>, Gemma's <end_of_turn>): where a chat model's answer ends, before or instead of
    EOS. () without a template, or when the template ends a turn with no special token of the vocabulary."""
    suffix = turn_suffix(tokenizer)
    if not suffix:
        return ()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return next(((i,) for i in tokenizer(suffix, add_special_tokens=False)["input_ids"] if i in special), ())


# Jinja put in front of a chat template that rejects the system role (Gemma, Mistral v0.1): the system
# text folded into the first user turn (LLaMA-Factory's way for Gemma), or left out.
SYSTEM_TURN_PREAMBLES = {
    "merge": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages | length > 1 and messages[1]['role'] == 'user' -%}"
        "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}] + messages[2:] -%}"
        "{%- else -%}{%- set messages = [{'role': 'user', 'content': messages[0]['content']}] + messages[1:] -%}{%- endif -%}"
        "{%- endif -%}"),
    "drop": "{%- if messages and messages[0]['role'] == 'system' -%}{%- set messages = messages[1:] -%}{%- endif -%}",
}
PROBE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"},
         {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And now?"}]


def system_turn_complaint(tokenizer) -> str | None:
    """The template's own words when it renders a conversation without a system turn but raises on one
    with it (None: it takes system turns, or it has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
        return None
    except Exception as err:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
        complaint = str(err) or type(err).__name__
    tokenizer.apply_chat_template(PROBE[1:], tokenize=False, add_generation_prompt=True)  # raises: not about system
    return complaint


def adapt_system_turns(tokenizer, system_turns: str) -> str | None:
    """With system_turns merge or drop, a template that rejects the system role gets the preamble above
    (so every stage that loads this tokenizer renders alike, and the saved model too). Returns the
    template's complaint, or None when it takes system turns."""
    complaint = system_turn_complaint(tokenizer)
    if complaint is not None and system_turns in SYSTEM_TURN_PREAMBLES:
        tokenizer.chat_template = SYSTEM_TURN_PREAMBLES[system_turns] + tokenizer.chat_template
    return complaint


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt. A templated conversation already holds its special tokens (BOS among them),
    so the tokenizer adds none: BOS appears once."""
    text, templated = render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def templated(tokenizer, prompt: Prompt) -> bool:
    """Whether the prompt is a conversation the tokenizer's chat template renders (its answer ends a turn)."""
    return not isinstance(prompt, str) and bool(getattr(tokenizer, "chat_template", None))


def encode_answer(tokenizer, answer: str, chat: bool = False) -> list[int]:
    """Answer tokens followed by EOS once, so the model learns to stop (an answer that already ends in the
    EOS token, as text rendered by a chat template may, gets no second one). chat: the answer to a templated
    conversation ends its turn as the template writes it (turn_suffix: "<|im_end|>", "<|end|>\n<|endoftext|>"),
    so a chat model keeps ending its answers as it was trained and is used to, before the EOS."""
    suffix = turn_suffix(tokenizer) if chat else ""
    ids = tokenizer(answer if answer.endswith(suffix) else answer + suffix, add_special_tokens=False)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def fit_to_length(
    prompt_ids: list[int], answers: Sequence[list[int]], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Truncate so that prompt ++ each answer fits in max_length tokens.

    If the longest answer does not fit, the prompt keeps its last max_length // 2 tokens; answers then
    keep their first tokens. Returns (prompt_ids, answers).
    """
    if len(prompt_ids) + max(len(a) for a in answers) > max_length:
        prompt_ids = prompt_ids[-max(1, max_length // 2) :]
    room = max_length - len(prompt_ids)
    return prompt_ids, [list(a[:room]) for a in answers]


def _prompt_key(prompt: Prompt) -> str:
    """What render_prompt reads of a prompt (a message's content may be a list of parts: repr, not hash)."""
    return prompt if isinstance(prompt, str) else repr([sorted(m.items()) for m in prompt])


def tokenize_pairs(
    tokenizer, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str], max_length: int
) -> list[PairExample]:
    """Each distinct prompt and answer is tokenised once: pairs share them (a prompt with k answers makes
    up to k(k-1)/2 pairs), and the tokenizer's Python overhead, not its work, is what a call costs."""
    prompt_ids: dict = {}
    answer_ids: dict[tuple[str, bool], list[int]] = {}
    out = []
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        key = _prompt_key(p)
        if key not in prompt_ids:
            prompt_ids[key] = encode_prompt(tokenizer, p)
        chat = templated(tokenizer, p)
        for a in (c, r):
            if (a, chat) not in answer_ids:
                answer_ids[a, chat] = encode_answer(tokenizer, a, chat)
        fitted, (c_ids, r_ids) = fit_to_length(prompt_ids[key], [answer_ids[c, chat], answer_ids[r, chat]], max_length)
        out.append(PairExample(list(fitted), c_ids, r_ids))
    return out


def tokenize_demonstrations(tokenizer, prompts: Sequence[Prompt], completions: Sequence[str], max_length: int
                            ) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) per demonstration, truncated to max_length tokens; the SFT loss covers
    the completion (the assistant's answer) only."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        prompt_ids, (answer_ids,) = fit_to_length(encode_prompt(tokenizer, p), [encode_answer(tokenizer, c, templated(tokenizer, p))],
                                                  max_length)
        out.append((prompt_ids, answer_ids))
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad to the longest sequence, or to `width`. Returns (ids [B, T], mask [B, T])."""
    T = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids, mask


def collate_answers(
    prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt ++ answer rows. Returns (input_ids, attention_mask, answer_mask), each [B, T]."""
    ids, attention_mask = pad([list(p) + list(a) for p, a in zip(prompt_ids, answer_ids)], pad_id)
    answer_mask = torch.zeros_like(attention_mask)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        answer_mask[i, len(p) : len(p) + len(a)] = 1
    return ids, attention_mask, answer_mask


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen rows then rejected rows in one batch, for one concatenated forward pass.

    Returns (input_ids, attention_mask, answer_mask), each [2B, T]: rows 0..B-1 are prompt ++ chosen,
    rows B..2B-1 prompt ++ rejected.
    """
    prompts = [e.prompt_ids for e in examples] * 2
    answers = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    return collate_answers(prompts, answers, pad_id)
