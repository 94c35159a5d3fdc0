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

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable


class DataError(ValueError):
    """Bad input data. The message lists every problem with its place (file and line or row) and what to do."""


PREFERENCE_FORMATS = ("auto", "standard", "conversational", "sharegpt", "hh", "ultrafeedback", "implicit", "openai",
                      "messages_pair")
DEMONSTRATION_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "prompt_completion")
# role names of the layouts in use -> ours: ShareGPT's human/gpt, Gemma's model, turbo-alignment's bot
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "tool": "tool", "observation": "tool", "function": "tool",
         "function_call": "assistant"}  # (ShareGPT's function_call / observation: a tool call and its result)
TOOLS = "tools"  # the role of the message that carries a conversation's tool definitions (first, if any)
# other projects' column names -> ours, suggested when a file's layout is not recognised
SYNONYMS = {"context": "prompt", "question": "prompt", "query": "prompt", "input": "prompt", "answer_w": "chosen",
            "answer_l": "rejected", "chosen_response": "chosen", "rejected_response": "rejected", "response_j": "chosen",
            "response_k": "rejected", "preferred": "chosen", "dispreferred": "rejected", "response": "completion",
            "answer": "completion"}


def read_once(fn: Callable) -> Callable:
    """fn(source-holding params or path, ...) computed once per process for the same arguments and the same
    file (its size and modification time): the CLI's pre-flight, the flow's and the stage read a file once
    in a run. The last few results are kept; a DataError is raised again each time, not kept."""
    kept: dict = {}

    def stamp(value) -> Any:
        source = getattr(value, "path", None) or getattr(value, "data", None) or getattr(value, "prompts_file", None) or value
        try:
            st = Path(str(source)).stat()
            return (st.st_size, st.st_mtime_ns)
        except OSError:
            return None

    def wrapper(*args):
        key = tuple((a.model_dump_json() if hasattr(a, "model_dump_json") else repr(a), stamp(a)) for a in args)
        if key not in kept:
            if len(kept) >= 8:
                kept.pop(next(iter(kept)))
            kept[key] = fn(*args)
        return kept[key]

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = fn.__doc__, fn.__name__, fn
    wrapper.forget = kept.clear  # (a new process, for tests)
    return wrapper


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
    head = text.lstrip()[:200].lower()
    if head.startswith("<") and ("<html" in head or "<!doctype" in head or "<?xml" in head):
        return [], [f"{path}: this is an HTML or XML page, not JSON (a web page saved under a .json/.jsonl name?); "
                    f"download the raw file (on GitHub: the Raw button) and point the stage at it"]
    if text.lstrip().startswith("{") and "\n" in text.strip() and _one_object(text):
        return [(1 + len(text) - len(text.lstrip("\n")), json.loads(text))], []  # one object over many lines: one row
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


def _one_object(text: str) -> bool:
    """The whole text is one JSON object (JSON Lines never is, once it has two lines)."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _load(builder: str, path: Path, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


def read_rows(source: str | Path) -> tuple[Iterable[tuple[str, str | None, dict]], list[str]]:
    """((where, split or None, row) for each row, problems) of a file, a `datasets` folder or a hub id; the
    rows of a JSON Lines file come a batch at a time (iterate them once)."""
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
    if suffix != ".csv" and (fast := _json_lines(path)) is not None:
        return fast, []
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
            table = _load("json", path).to_list()
        except Exception:  # noqa: BLE001 - rows Arrow cannot hold in one table: the per-row checks say which
            table = None
        if table is not None and len(table) == len(parsed):  # (one object: datasets reads its keys as columns)
            parsed = list(zip([i for i, _ in parsed], table))
    return [(f"{path}:line {i}", None, r) for i, r in parsed], problems


def _json_lines(path: Path) -> Iterable[tuple[str, str | None, dict]] | None:
    """A JSON Lines file read by `datasets` alone (Arrow's reader: the file is not parsed again in Python),
    each row placed on the line it came from; None when `datasets` cannot read it (a JSON array, invalid
    UTF-8 or JSON, rows of different types): the line-by-line reading then says where and why."""
    numbers, first = [], None
    with open(path, "rb") as fh:
        for i, line in enumerate(fh, start=1):
            if line.strip():
                numbers.append(i)
                first = line if first is None else first
    try:  # JSON Lines: its first line is a whole object (a JSON array, or one object over many lines, is not)
        if first is None or not isinstance(json.loads(first), dict):
            return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    try:
        data = _load("json", path)
    except Exception:  # noqa: BLE001 - whatever Arrow's JSON reader rejects, the line-by-line reading explains
        return None
    if len(data) != len(numbers):  # one object over many lines: datasets reads its keys as columns
        return None
    return _rows_of(data, path, numbers)


def _rows_of(data, path: Path, numbers: list[int]):
    """The rows of a `datasets` table a batch at a time (the Python dicts of a whole large file at once
    would hold several times its size), each with the line it came from."""
    lines = iter(numbers)
    for batch in data.iter(batch_size=2000):
        for values in zip(*batch.values()):
            yield f"{path}:line {next(lines)}", None, dict(zip(batch.keys(), values))


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


def _content(value: Any, what: str) -> str:
    """A message's text: a string, or a list of parts ({"type": "text", "text" | "value": ...}, OpenAI's and
    LLaMA-Factory v1's layouts) joined in order."""
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value, start=1):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text":
                raise RowError(f"{what}: part {k} is {kind or _kind(part)!r}, not text; alignflow trains on text only, "
                               f"so leave such rows out (or drop_invalid: true)")
            texts.append(_text(part.get("text") if part.get("text") is not None else part.get("value"), f"{what}, part {k}"))
        value = "".join(texts)
    return _text(value, what)


def _tool_calls(value: Any, what: str) -> list[dict]:
    """OpenAI's tool_calls ([{"type": "function", "function": {"name", "arguments"}}]) or ShareGPT's
    function_call value ({"name", "arguments"} or a list of them, maybe as JSON text), as
    [{"type": "function", "function": {"name": str, "arguments": dict}}] (what chat templates read)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{what}: a tool call must be JSON {{\"name\": ..., \"arguments\": {{...}}}}") from None
    calls = []
    for k, call in enumerate(value if isinstance(value, list) else [value], start=1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(f"{what}: tool call {k} has no function name")
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise RowError(f"{what}: tool call {k} ({function['name']}): its arguments are not JSON") from None
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return calls


def messages_of(value: Any, column: str) -> list[dict]:
    """[{role, content}] from role/content or ShareGPT from/value messages, roles normalised; content may be
    a list of text parts. Tool calls (OpenAI's tool_calls, content absent; ShareGPT's function_call turn)
    are assistant messages with `tool_calls`; tool results (OpenAI's tool role, ShareGPT's observation) are
    `tool` messages."""
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
        what = f"column {column!r}: message {n}"
        if role is None:
            raise RowError(f"{what} has no 'role' (or ShareGPT 'from'); keys: {sorted(m)}")
        if role not in ROLES:
            raise RowError(f"{what} has role {role!r}; use system, user, assistant or tool "
                           f"(ShareGPT: system, human, gpt, function_call, observation)")
        if role == "function_call":
            out.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(content, what)})
        elif m.get("tool_calls"):
            text = _content(content, f"{what} content") if content not in (None, "", []) else ""
            out.append({"role": "assistant", "content": text, "tool_calls": _tool_calls(m["tool_calls"], what)})
        else:
            message = {"role": ROLES[role], "content": _content(content, f"{what} content")}
            message.update({k: m[k] for k in ("tool_call_id", "name") if ROLES[role] == "tool" and m.get(k) is not None})
            out.append(message)
    return out


def with_tools(prompt, row: dict):
    """A `tools` column (OpenAI's list, LLaMA-Factory's JSON text) as the conversation's first message,
    {"role": "tools", "content": "", "tools": [...]}: rendered through the template's tools= argument."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == [] or isinstance(prompt, str):
        return prompt
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("column 'tools': not JSON (a list of function definitions)") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError(f"column 'tools': expected a list of function definitions, found {_kind(tools)}")
    return [{"role": TOOLS, "content": "", "tools": tools}, *prompt]


def with_system(prompt, row: dict):
    """A top-level `system` column (LLaMA-Factory's ShareGPT and Alpaca layouts) as the conversation's first
    turn; a text prompt with a system prompt becomes a conversation. A conversation that has a system turn
    of its own keeps it."""
    system = row.get("system")
    if not isinstance(system, str) or not system.strip():
        return prompt
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return turns if turns[0]["role"] == "system" else [{"role": "system", "content": system}, *turns]


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


def readable_message(m: dict) -> str:
    calls = " ".join(f"[calls {c['function']['name']}({json.dumps(c['function']['arguments'], ensure_ascii=False)})]"
                     for c in m.get("tool_calls", []))
    return f"{m['role']}: {m['content']}{' ' if m['content'] and calls else ''}{calls}"


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
