"""Data in: preference pairs, demonstrations and prompts from the files and layouts users have.

Files are read with Hugging Face `datasets` (tasks/reading.py: a JSON array or JSONL, CSV, Parquet, a
`save_to_disk` folder or a hub id), messages normalised by tasks/messages.py. Each row is converted by its
layout, detected row by row unless `format` names one. Every problem of a file is
reported in one pass with its place (`file:line N`, for JSON syntax errors `line N, column C`; Parquet
and `datasets` folders: `row N`) and what to do; nothing is written while a problem stands.

A prompt is plain text or a list of {role, content} messages; the `messages` column holds the latter as
JSON (empty for plain text), and `prompt` a readable rendering. Stages render conversations with the
tokenizer's chat template (alignment.data.encode_prompt).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from tasks.messages import RowError, TOOLS, _content, _text, messages_of, readable_message, with_system, with_tools  # noqa: F401
from tasks.reading import DataError, _kind, read_once, read_rows  # noqa: F401 - DataError, read_once: the one home to import from


PREFERENCE_FORMATS = ("auto", "standard", "conversational", "sharegpt", "hh", "ultrafeedback", "implicit", "openai",
                      "messages_pair")
DEMONSTRATION_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion")
# other projects' column names -> ours, suggested when a file's layout is not recognised
SYNONYMS = {"context": "prompt", "question": "prompt", "query": "prompt", "input": "prompt", "answer_w": "chosen",
            "answer_l": "rejected", "chosen_response": "chosen", "rejected_response": "rejected", "response_j": "chosen",
            "response_k": "rejected", "preferred": "chosen", "dispreferred": "rejected", "response": "completion",
            "answer": "completion"}


# -- layouts ------------------------------------------------------------------------------------


def _answer(value: Any, column: str) -> str:
    """An answer: text, one assistant message, or a list of messages ending in the assistant's."""
    if not isinstance(value, (list, dict)):
        return _text(value, f"column {column!r}")
    last = messages_of(value, column)[-1]
    if last.get("tool_calls"):
        raise RowError(f"column {column!r}: the answer is a tool call; preference pairs of tool calls are not "
                       f"supported yet (demonstrations are): leave such rows out (or drop_invalid: true)")
    if last["role"] != "assistant":
        raise RowError(f"column {column!r}: the last message is from {last['role']!r}; it must be the assistant's answer")
    return last["content"]


def _conversation_prompt(messages: list[dict], column: str) -> list[dict]:
    if messages[-1]["role"] == "assistant":
        raise RowError(f"column {column!r}: the prompt ends with an assistant turn; it must end with the user's")
    return messages


def _hh_turns(transcript: str, column: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + transcript.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"column {column!r}: not an Anthropic-HH transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2])]


def _split_shared(chosen: list[dict], rejected: list[dict], what: str) -> tuple[list[dict], str, str]:
    """Implicit prompt: the two conversations share every turn but the last (the assistant's answers)."""
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise RowError(f"{what}: chosen and rejected must share every turn but their last (the prompt)")
    for col, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise RowError(f"column {col!r}: the last turn must be the assistant's answer")
    return _conversation_prompt(chosen[:-1], "chosen"), chosen[-1]["content"], rejected[-1]["content"]


def _standard(r):
    return _text(r["prompt"], "column 'prompt'"), _answer(r["chosen"], "chosen"), _answer(r["rejected"], "rejected")


def _conversational(r):
    return (_conversation_prompt(messages_of(r["prompt"], "prompt"), "prompt"), _answer(r["chosen"], "chosen"),
            _answer(r["rejected"], "rejected"))


def _sharegpt(r):
    return (_conversation_prompt(messages_of(r["conversations"], "conversations"), "conversations"),
            _answer(r["chosen"], "chosen"), _answer(r["rejected"], "rejected"))


def _hh(r):
    return _split_shared(_hh_turns(_text(r["chosen"], "column 'chosen'"), "chosen"),
                         _hh_turns(_text(r["rejected"], "column 'rejected'"), "rejected"), "hh")


def _implicit(r):
    return _split_shared(messages_of(r["chosen"], "chosen"), messages_of(r["rejected"], "rejected"), "implicit prompt")


def _messages_pair(r):
    """LLaMA-Factory v1: chosen_messages / rejected_messages, two whole conversations (loss_weight ignored:
    the answer is the last turn)."""
    return _split_shared(messages_of(r["chosen_messages"], "chosen_messages"),
                         messages_of(r["rejected_messages"], "rejected_messages"), "chosen_messages/rejected_messages")


def _openai(r):
    """OpenAI's preference fine-tuning format: {"input": {"messages": [...]}, "preferred_output": [...],
    "non_preferred_output": [...]} (each output a list holding the assistant's message)."""
    if not isinstance(r["input"], dict) or "messages" not in r["input"]:
        raise RowError(f"column 'input': expected an object with 'messages', found {_kind(r['input'])}")
    prompt = _conversation_prompt(messages_of(r["input"]["messages"], "input.messages"), "input.messages")
    return prompt, _answer(r["preferred_output"], "preferred_output"), _answer(r["non_preferred_output"], "non_preferred_output")


PAIR_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "standard": (("prompt", "chosen", "rejected"), _standard),
    "conversational": (("prompt", "chosen", "rejected"), _conversational),
    "ultrafeedback": (("prompt", "chosen", "rejected"), _standard),  # text prompt, message-list answers
    "sharegpt": (("conversations", "chosen", "rejected"), _sharegpt),
    "hh": (("chosen", "rejected"), _hh),
    "implicit": (("chosen", "rejected"), _implicit),
    "openai": (("input", "preferred_output", "non_preferred_output"), _openai),
    "messages_pair": (("chosen_messages", "rejected_messages"), _messages_pair),
}


def detect_pair_layout(row: dict) -> str | None:
    keys = set(row)
    if {"preferred_output", "non_preferred_output"} <= keys:
        return "openai"
    if {"chosen_messages", "rejected_messages"} <= keys:
        return "messages_pair"
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"prompt", "chosen", "rejected"} <= keys:
        if isinstance(row["prompt"], list):
            return "conversational"
        return "ultrafeedback" if isinstance(row["chosen"], (list, dict)) else "standard"
    if {"chosen", "rejected"} <= keys:
        return "implicit" if isinstance(row["chosen"], (list, dict)) else "hh"
    return None


def _alpaca(r):
    """One demonstration: [(prompt, completion)], as every demonstration layout returns a list."""
    user = _text(r["instruction"], "column 'instruction'")
    if isinstance(r.get("input"), str) and r["input"].strip():
        user += "\n\n" + r["input"]
    return [([{"role": "user", "content": user}], _text(r["output"], "column 'output'"))]


def _demo_conversation(column: str):
    def convert(r):
        """Every assistant turn is an answer to learn, its conversation so far the prompt (TRL's
        assistant-only loss): one demonstration per assistant turn."""
        messages = messages_of(r[column], column)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowError(f"column {column!r}: must end with the assistant's answer, after at least one user turn")
        weights = [m.get("loss_weight") if isinstance(m, dict) else None for m in
                   (r[column] if isinstance(r[column], list) else [r[column]])]  # LLaMA-Factory v1: 0 = not trained
        demos = [(_conversation_prompt(messages[:t], column), m if m.get("tool_calls") else m["content"])
                 for t, m in enumerate(messages)
                 if m["role"] == "assistant" and t > 0 and messages[t - 1]["role"] != "assistant" and weights[t] != 0]
        if not demos:
            raise RowError(f"column {column!r}: no assistant turn to learn (each follows another assistant turn or has loss_weight 0)")
        return demos

    return convert


def _prompt_completion(r):
    prompt = r["prompt"] if isinstance(r["prompt"], str) else _conversation_prompt(messages_of(r["prompt"], "prompt"), "prompt")
    if isinstance(prompt, str):
        _text(prompt, "column 'prompt'")
    return [(prompt, _answer(r["completion"], "completion"))]


DEMO_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "alpaca": (("instruction", "output"), _alpaca),
    "sharegpt": (("conversations",), _demo_conversation("conversations")),
    "messages": (("messages",), _demo_conversation("messages")),
    "prompt_completion": (("prompt", "completion"), _prompt_completion),
}


def detect_demo_layout(row: dict) -> str | None:
    keys = set(row)
    return next((name for name, (needed, _) in DEMO_LAYOUTS.items() if set(needed) <= keys), None)


DETECT_ROWS = 5000  # rows that vote on a file's layout


def convert_rows(source, layouts: dict, detect: Callable, fmt: str, columns: dict[str, str]):
    """(converted [(where, split, values)], problems): iter_converted's rows, all of them."""
    problems: list[str] = []
    return list(iter_converted(source, layouts, detect, fmt, columns, problems)), problems


def iter_converted(source, layouts: dict, detect: Callable, fmt: str, columns: dict[str, str], problems: list[str]):
    """The converted rows (where, split, values) of a file, one at a time (a large file's rows are never
    all held as Python objects), appending each problem to `problems`. Every row is read by one layout:
    `fmt`, or with `auto` the one most of the first DETECT_ROWS rows show (a file has one layout;
    `datasets` gives absent keys as null, so a row with a null field is still read by its file's layout
    and told which field is null)."""
    rows, found_problems = read_rows(source)
    problems += found_problems
    if fmt != "auto" and fmt not in layouts:
        raise DataError(f"{source}: unknown format {fmt!r}; use auto or one of: {', '.join(layouts)}")
    if columns:
        rows = ((where, split, {columns.get(k, k): v for k, v in row.items()}) for where, split, row in rows)
    rows = iter(rows)
    first = list(itertools.islice(rows, DETECT_ROWS))  # (a JSON Lines file comes a batch of rows at a time)
    layout = fmt
    if fmt == "auto":
        found = Counter(detect({k: v for k, v in row.items() if v is not None}) for _, _, row in first)
        found.pop(None, None)
        layout = found.most_common(1)[0][0] if found else None
    if layout is None:
        if first:
            problems.append(unknown_layout(first[0][0], first[0][2], layouts))
        return
    needed, convert = layouts[layout]
    for where, split, row in itertools.chain(first, rows):
        missing = [c for c in needed if c not in row]
        if missing:
            keys = sorted(k for k, v in row.items() if v is not None)
            problems.append(f"{where}: missing column(s) {missing} for the {layout} format; found {keys}")
            continue
        null = [c for c in needed if row[c] is None]
        if null:
            problems += [f"{where}: column {c!r}: null value" for c in null]
            continue
        try:
            value = convert(row)
        except RowError as err:
            problems.append(f"{where}: {err}")
            continue
        try:
            if isinstance(value, list):  # demonstrations: [(prompt, completion)]
                value = [(with_tools(with_system(prompt, row), row), completion) for prompt, completion in value]
            else:  # a pair: (prompt, chosen, rejected)
                value = (with_tools(with_system(value[0], row), row), *value[1:])
        except RowError as err:
            problems.append(f"{where}: {err}")
            continue
        yield where, split, value


FEEDBACK_LABELS = ("label", "is_desirable", "kto_tag", "desirable", "thumbs_up")


def unknown_layout(where: str, row: dict, layouts: dict) -> str:
    """Why no row of a file was recognised, said once: unpaired feedback (KTO) named as such, and a
    `columns:` mapping suggested from other projects' column names."""
    keys = sorted(k for k, v in row.items() if v is not None)
    if any(k in keys for k in FEEDBACK_LABELS) and "chosen" not in keys:
        label = next(k for k in FEEDBACK_LABELS if k in keys)
        return (f"{where}: unpaired feedback (the KTO layout: one answer a row with a good/bad {label!r}), not preference "
                f"pairs; keys: {keys}. alignflow trains on pairs: put a desirable and an undesirable answer to the same "
                f"prompt into one row (prompt, chosen, rejected), or train an sft stage on the desirable answers alone")
    ours = {c for needed, _ in layouts.values() for c in needed}
    mapping = {k: SYNONYMS[k] for k in keys if SYNONYMS.get(k) in ours and SYNONYMS[k] not in keys}
    hint = ("; this looks like columns: {" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}" if mapping else
            "; map other names with columns: {your_name: prompt, ...}")
    return f"{where}: not a known format (no row of the file is); keys: {keys}; known formats: {', '.join(layouts)}{hint}"


def prompt_columns(prompt) -> dict[str, str]:
    """`prompt` (readable text) and `messages` (JSON of a conversation, '' for plain text)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "messages": ""}
    return {"prompt": "\n".join(readable_message(m) for m in prompt if m["role"] != TOOLS), "messages": json.dumps(prompt, ensure_ascii=False)}


def prompt_of(row) -> str | list[dict]:
    """The prompt a model reads: the conversation where the row has one, else the text."""
    messages = row.get("messages") if isinstance(row, dict) else row["messages"]
    return json.loads(messages) if isinstance(messages, str) and messages else row["prompt"]


PROMPT_COLUMNS = ("prompt", "messages", "conversations", "turns")


def _prompt_value(row: dict, column: str):
    value = row[column]
    if isinstance(value, str):
        return _text(value, f"column {column!r}")
    if column == "turns" or (isinstance(value, list) and value and all(isinstance(t, str) for t in value)):
        # MT-Bench's turns: the user's questions, each after the model's answer to the one before; the first
        # is the prompt (a later one needs the model's own answer in front of it)
        if not isinstance(value, list) or not value:
            raise RowError(f"column {column!r}: expected a list of the user's turns, found {_kind(value)}")
        return [{"role": "user", "content": _content(value[0], f"column {column!r}: turn 1")}]
    return _conversation_prompt(messages_of(value, column), column)


@read_once
def read_prompt_rows(source: str | Path, columns: dict[str, str] | None = None) -> tuple[list, list[dict]]:
    """(prompts, the other columns of each prompt's row) of a prompts file: `.txt`, one user question a
    line (a one-turn conversation); a table with a `prompt` column (text or messages), a `messages` /
    ShareGPT `conversations` column, or MT-Bench's `turns` (the first turn is the prompt). `columns` maps
    the file's names to ours, e.g. {question: prompt} for GSM8K; a top-level `system` column is the
    conversation's first turn. The other columns (GSM8K's `answer`) go to reward functions."""
    path = Path(source)
    columns = columns or {}
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        prompts = [[{"role": "user", "content": line.strip()}] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        extras = [{} for _ in prompts]
    else:
        rows, problems = read_rows(path)
        prompts, extras = [], []
        for where, _, row in rows:
            row = {columns.get(k, k): v for k, v in row.items()}
            column = next((c for c in PROMPT_COLUMNS if row.get(c) is not None), None)
            try:
                if column is None:
                    found = sorted(k for k, v in row.items() if v is not None)
                    guess = next((k for k in found if SYNONYMS.get(k) == "prompt"), None)
                    raise RowError(f"no prompt: needs a 'prompt', 'messages', 'conversations' or 'turns' column; keys: {found}"
                                   + (f"; map yours with columns: {{{guess}: prompt}}" if guess else "; map yours with columns: {your_name: prompt}"))
                prompts.append(with_system(_prompt_value(row, column), row))
                extras.append({k: v for k, v in row.items() if k not in (column, "system")})
            except RowError as err:
                problems.append(f"{where}: {err}")
        if problems:
            shown = problems if len(problems) <= 20 else problems[:20] + [f"... and {len(problems) - 20} more"]
            raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(shown))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts, extras


def read_prompt_file(source: str | Path, columns: dict[str, str] | None = None) -> list:
    """The prompts of a prompts file (read_prompt_rows)."""
    return read_prompt_rows(source, columns)[0]
