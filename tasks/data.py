"""Data in: preference pairs, demonstrations and prompts from the files and layouts users have.

Files are read with Hugging Face `datasets`: a JSON array or JSONL (`.json`, `.jsonl`), CSV, Parquet, a
`save_to_disk` folder (the splits of a DatasetDict kept apart) or a hub id (when online). Each row is
converted by its layout, detected row by row unless `format` names one. Every problem of a file is
reported in one pass with its place (`file:line N`, for JSON syntax errors `line N, column C`; Parquet
and `datasets` folders: `row N`) and what to do; nothing is written while a problem stands.

A prompt is plain text or a list of {role, content} messages; the `messages` column holds the latter as
JSON (empty for plain text), and `prompt` a readable rendering. Stages render conversations with the
tokenizer's chat template (alignment.data.encode_prompt).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable


class DataError(ValueError):
    """Bad input data. The message lists every problem with its place (file and line or row) and what to do."""


PREFERENCE_FORMATS = ("auto", "standard", "conversational", "sharegpt", "hh", "ultrafeedback", "implicit")
DEMONSTRATION_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion")
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class RowError(ValueError):
    """One row cannot be read; the message is meant for the user as it is."""


# -- reading ------------------------------------------------------------------------------------


def _lines(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """(line number, text) of every line that is valid UTF-8, and a problem for each other line."""
    lines, problems = [], []
    for i, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            lines.append((i, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            problems.append(f"{path}:line {i}: invalid UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8")
    return lines, problems


def _json_rows(path: Path, lines: list[tuple[int, str]]) -> tuple[list[tuple[int, Any]], list[str]]:
    """(line where each row starts, row) parsed with Python's json, and syntax problems with line and column."""
    text = "\n".join(t for _, t in lines)
    if text.lstrip().startswith("["):  # one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            return [], [f"{path}:line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"]
        decoder, pos, rows = json.JSONDecoder(), text.index("[") + 1, []
        for item in items:
            while text[pos] in " \t\r\n,":
                pos += 1
            rows.append((text.count("\n", 0, pos) + 1, item))
            pos = decoder.raw_decode(text, pos)[1]
        return rows, []
    rows, problems = [], []
    for i, line in lines:  # JSON lines
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"{path}:line {i}, column {err.colno}: not valid JSON ({err.msg})")
    return rows, problems


def _load(builder: str, path: Path, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def read_rows(source: str | Path) -> tuple[list[tuple[str, str | None, dict]], list[str]]:
    """([(where, split or None, row)], problems) of a file, a `datasets` folder or a hub id."""
    path = Path(source)
    if not path.exists():
        if len(path.parts) == 2 and not path.suffix:  # org/name: a hub data set
            return _read_hub(str(source)), []
        raise DataError(f"{path}: no such file or folder (a relative path is read from the working directory "
                        f"{Path.cwd()}); give the right path in pipelines.yaml or with --set STAGE.PARAM=PATH")
    if path.is_dir():
        return _read_saved(path), []
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(f"{path}:row {i}", None, r) for i, r in enumerate(_load("parquet", path).to_list(), start=1)], []
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(f"{path}: unknown file type {suffix!r}; use .json, .jsonl, .csv, .parquet or a `datasets` folder")
    lines, problems = _lines(path)
    if suffix == ".csv":
        if problems:
            return [], problems
        import csv

        import datasets

        header = next(csv.reader([lines[0][1]])) if lines else []
        text = datasets.Features({c: datasets.Value("string") for c in header})  # every cell as text, as written
        rows = _load("csv", path, features=text, keep_default_na=False).to_list()
        return [(f"{path}:line {i}", None, r) for i, r in enumerate(rows, start=2)], []  # line 1: the header
    parsed, syntax = _json_rows(path, lines)
    problems += syntax
    problems += [f"{path}:line {i}: expected a JSON object (a row), found {_kind(r)}" for i, r in parsed if not isinstance(r, dict)]
    parsed = [(i, r) for i, r in parsed if isinstance(r, dict)]
    if not problems and parsed:
        try:
            parsed = list(zip([i for i, _ in parsed], _load("json", path).to_list()))
        except Exception:  # noqa: BLE001 - rows Arrow cannot hold in one table: the per-row checks say which
            pass
    return [(f"{path}:line {i}", None, r) for i, r in parsed], problems


def _read_saved(path: Path) -> list[tuple[str, str | None, dict]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: not a `datasets` folder (written by save_to_disk); give a file or such a folder") from None
    if isinstance(data, datasets.DatasetDict):
        return [(f"{path}[{split}]:row {i}", split, r) for split, d in data.items() for i, r in enumerate(d.to_list(), start=1)]
    return [(f"{path}:row {i}", None, r) for i, r in enumerate(data.to_list(), start=1)]


def _read_hub(dataset_id: str) -> list[tuple[str, str | None, dict]]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id)
    except Exception:  # noqa: BLE001 - offline, unknown id or gated: the same advice for each
        raise DataError(f"{dataset_id}: could not load this hub data set (offline, unknown id or gated); download it "
                        f"where you have a network and give the local file or folder") from None
    return [(f"{dataset_id}[{split}]:row {i}", split, r) for split, d in data.items() for i, r in enumerate(d.to_list(), start=1)]


# -- layouts ------------------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"{what}: expected text, found {_kind(value)}")
    if not value.strip():
        raise RowError(f"{what}: empty or whitespace-only text")
    return value


def _kind(value: Any) -> str:
    return {type(None): "null", dict: "an object", list: "a list", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def messages_of(value: Any, column: str) -> list[dict]:
    """[{role, content}] from role/content or ShareGPT from/value messages, roles normalised."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"column {column!r}: expected a list of messages, found {_kind(value)}")
    out = []
    for n, m in enumerate(value, start=1):
        if not isinstance(m, dict):
            raise RowError(f"column {column!r}: message {n} is {_kind(m)}, not an object with role and content")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None:
            raise RowError(f"column {column!r}: message {n} has no 'role' (or ShareGPT 'from'); keys: {sorted(m)}")
        if role not in ROLES:
            raise RowError(f"column {column!r}: message {n} has role {role!r}; use system, user or assistant "
                           f"(ShareGPT: system, human, gpt)")
        out.append({"role": ROLES[role], "content": _text(content, f"column {column!r}: message {n} content")})
    return out


def _answer(value: Any, column: str) -> str:
    """An answer: text, one assistant message, or a list of messages ending in the assistant's."""
    if not isinstance(value, (list, dict)):
        return _text(value, f"column {column!r}")
    last = messages_of(value, column)[-1]
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


PAIR_LAYOUTS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "standard": (("prompt", "chosen", "rejected"), _standard),
    "conversational": (("prompt", "chosen", "rejected"), _conversational),
    "ultrafeedback": (("prompt", "chosen", "rejected"), _standard),  # text prompt, message-list answers
    "sharegpt": (("conversations", "chosen", "rejected"), _sharegpt),
    "hh": (("chosen", "rejected"), _hh),
    "implicit": (("chosen", "rejected"), _implicit),
}


def detect_pair_layout(row: dict) -> str | None:
    keys = set(row)
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
    system = [{"role": "system", "content": r["system"]}] if isinstance(r.get("system"), str) and r["system"].strip() else []
    return [(system + [{"role": "user", "content": user}], _text(r["output"], "column 'output'"))]


def _demo_conversation(column: str):
    def convert(r):
        """Every assistant turn is an answer to learn, its conversation so far the prompt (TRL's
        assistant-only loss): one demonstration per assistant turn."""
        messages = messages_of(r[column], column)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowError(f"column {column!r}: must end with the assistant's answer, after at least one user turn")
        return [(_conversation_prompt(messages[:t], column), m["content"])
                for t, m in enumerate(messages) if m["role"] == "assistant" and t > 0 and messages[t - 1]["role"] != "assistant"]

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


def convert_rows(source, layouts: dict, detect: Callable, fmt: str, columns: dict[str, str]):
    """(converted [(where, split, values)], problems). Every row is read by one layout: `fmt`, or with
    `auto` the one most rows show (a file has one layout; `datasets` gives absent keys as null, so a row
    with a null field is still read by its file's layout and told which field is null)."""
    rows, problems = read_rows(source)
    names = ", ".join(layouts)
    if fmt != "auto" and fmt not in layouts:
        raise DataError(f"{source}: unknown format {fmt!r}; use auto or one of: {names}")
    rows = [(where, split, {columns.get(k, k): v for k, v in row.items()}) for where, split, row in rows]
    layout = fmt
    if fmt == "auto":
        found = Counter(detect({k: v for k, v in row.items() if v is not None}) for _, _, row in rows)
        found.pop(None, None)
        layout = found.most_common(1)[0][0] if found else None
    out = []
    for where, split, row in rows:
        keys = sorted(k for k, v in row.items() if v is not None)
        if layout is None:
            problems.append(f"{where}: not a known format; keys: {keys}; known formats: {names} "
                            f"(map other names with columns: {{your_name: prompt, ...}})")
            continue
        needed = layouts[layout][0]
        missing = [c for c in needed if c not in row]
        if missing:
            problems.append(f"{where}: missing column(s) {missing} for the {layout} format; found {keys}")
            continue
        null = [c for c in needed if row[c] is None]
        if null:
            problems += [f"{where}: column {c!r}: null value" for c in null]
            continue
        try:
            out.append((where, split, layouts[layout][1](row)))
        except RowError as err:
            problems.append(f"{where}: {err}")
    return out, problems


def prompt_columns(prompt) -> dict[str, str]:
    """`prompt` (readable text) and `messages` (JSON of a conversation, '' for plain text)."""
    if isinstance(prompt, str):
        return {"prompt": prompt, "messages": ""}
    return {"prompt": "\n".join(f"{m['role']}: {m['content']}" for m in prompt), "messages": json.dumps(prompt, ensure_ascii=False)}


def prompt_of(row) -> str | list[dict]:
    """The prompt a model reads: the conversation where the row has one, else the text."""
    messages = row.get("messages") if isinstance(row, dict) else row["messages"]
    return json.loads(messages) if isinstance(messages, str) and messages else row["prompt"]


def read_prompt_file(source: str | Path) -> list:
    """Prompts from a file: `.txt`, one user question a line (a one-turn conversation); a table with a
    `prompt` column (text or messages) or a `messages` / ShareGPT `conversations` column."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        prompts = [[{"role": "user", "content": line.strip()}] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows, problems = read_rows(path)
        prompts = []
        for where, _, row in rows:
            column = next((c for c in ("prompt", "messages", "conversations") if row.get(c) is not None), None)
            try:
                if column is None:
                    raise RowError(f"no prompt: needs a 'prompt', 'messages' or 'conversations' column; keys: {sorted(row)}")
                value = row[column]
                prompts.append(_text(value, "column 'prompt'") if isinstance(value, str) else _conversation_prompt(messages_of(value, column), column))
            except RowError as err:
                problems.append(f"{where}: {err}")
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
