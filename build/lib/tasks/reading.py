"""Reading the files users have, with Hugging Face `datasets`: a JSON array or JSON Lines (`.json`,
`.jsonl`), CSV, Parquet, a `save_to_disk` folder (the splits of a DatasetDict kept apart) or a hub id
(when online). Each row comes with its place (`file:line N`, for JSON syntax errors `line N, column C`;
Parquet and `datasets` folders: `row N`); tasks/data.py converts the rows by their layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable


class DataError(ValueError):
    """Bad input data. The message lists every problem with its place (file and line or row) and what to do."""


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


def _kind(value: Any) -> str:
    return {type(None): "null", dict: "an object", list: "a list", bool: "true/false", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)



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
