"""Import preference data: JSONL, CSV, Parquet or a Hugging Face `datasets` folder (save_to_disk), in
the standard, conversational, Anthropic-HH or UltraFeedback-binarized format, or any columns mapped.

Validation finds every problem in one pass and names the file, the 1-based line (data row for CSV,
line for JSONL, row for Parquet/datasets), the column and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.schemas import DataError

FORMATS = ("auto", "standard", "conversational", "hh", "ultrafeedback")


@dataclass(frozen=True)
class ImportParams:
    path: str  # the preference file or `datasets` folder
    format: str = "auto"  # auto, standard, conversational, hh (Anthropic-HH), ultrafeedback
    columns: dict[str, str] = field(default_factory=dict)  # our name -> the file's, e.g. {prompt: question}
    drop_invalid: bool = False  # write the clean rows and a rejects file instead of failing
    max_chars: int = 20_000  # longest prompt + answer accepted, in characters
    held_out: float = 0.15  # fraction of pairs marked split=test


# -- reading ------------------------------------------------------------------------------------


def read_table(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Rows of a preference file, and the problems found while reading (bad UTF-8, bad JSON)."""
    if not path.exists():
        if len(path.parts) == 2 and not path.suffix:  # looks like a Hugging Face hub id: org/name
            return _read_hub(str(path)), []
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_datasets_dir(path), []
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path), []
    if suffix in (".jsonl", ".json", ".csv"):
        problems, lines = [], []
        for i, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            try:
                lines.append((i, raw.decode("utf-8")))
            except UnicodeDecodeError as err:
                problems.append(f"{path}:line {i}: invalid UTF-8 ({err.reason} at byte {err.start})")
                lines.append((i, None))
        if suffix == ".csv":
            return _read_csv(path, lines, problems), problems
        rows, index = [], []
        for i, text in lines:
            if text is None or not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:line {i}: not valid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:line {i}: expected a JSON object, found {type(row).__name__}")
                continue
            rows.append(row)
            index.append(i)
        return pd.DataFrame(rows, index=index), problems
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .csv, .parquet or a datasets folder")


def _read_csv(path: Path, lines: list[tuple[int, str | None]], problems: list[str]) -> pd.DataFrame:
    import io

    good = [text if text is not None else "" for _, text in lines]
    df = pd.read_csv(io.StringIO("\n".join(good)), dtype=str, keep_default_na=False, na_values=[])
    df.index = range(2, len(df) + 2)  # line numbers, header = line 1 (rows with embedded newlines shift)
    bad_lines = {i for i, text in lines if text is None}
    return df.drop(index=[i for i in df.index if i in bad_lines], errors="ignore")


def _read_hub(dataset_id: str) -> pd.DataFrame:
    """The train split of a Hugging Face hub data set (needs `datasets` and a network)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{dataset_id}: reading a hub data set needs `pip install datasets`") from None
    try:
        df = load_dataset(dataset_id, split="train").to_pandas()
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: the message says which
        raise DataError(f"{dataset_id}: could not load the hub data set: {type(err).__name__}: {err}") from None
    df.index = range(1, len(df) + 1)
    return df


def _read_datasets_dir(path: Path) -> pd.DataFrame:
    """A folder written by `datasets.Dataset.save_to_disk`: Arrow stream files, read with pyarrow."""
    import pyarrow as pa

    files = sorted(path.glob("*.arrow")) or sorted(path.glob("*/*.arrow"))
    if not files:
        raise DataError(f"{path}: not a `datasets` folder (no .arrow files)")
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            try:
                tables.append(pa.ipc.open_stream(source).read_all())
            except pa.ArrowInvalid:
                tables.append(pa.ipc.open_file(source).read_all())
    df = pa.concat_tables(tables).to_pandas()
    df.index = range(1, len(df) + 1)
    return df


# -- formats ------------------------------------------------------------------------------------


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray"


def detect_format(df: pd.DataFrame) -> str:
    """hh: chosen/rejected transcripts without a prompt column; conversational: message lists everywhere;
    ultrafeedback: a text prompt and message-list answers; standard: three texts."""
    if "prompt" not in df.columns:
        return "hh"
    first = df.dropna(subset=["prompt", "chosen"]).head(1)
    if first.empty or not _is_list(first["chosen"].iloc[0]):
        return "standard"
    return "conversational" if _is_list(first["prompt"].iloc[0]) else "ultrafeedback"


def render_messages(messages: Any, tokenizer=None, add_generation_prompt: bool = False) -> str:
    """A list of {role, content} as text: the tokenizer's chat template where it has one."""
    messages = [dict(m) for m in list(messages)]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic-HH: two transcripts that share everything up to the last assistant turn."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(marker)]):
        raise ValueError("the two transcripts do not share a prompt ending in '\\n\\nAssistant:'")
    prompt = chosen[: cut + len(marker)]
    return prompt, chosen[len(prompt):].strip(), rejected[len(prompt):].strip()


def to_standard(df: pd.DataFrame, fmt: str, source: Path, tokenizer=None) -> tuple[pd.DataFrame, list[str]]:
    """prompt/chosen/rejected strings from any supported format, with the rows that could not be converted."""
    if fmt == "standard":
        return df, []
    problems, rows = [], {}
    for i, r in df.iterrows():
        try:
            if fmt == "hh":
                rows[i] = dict(zip(("prompt", "chosen", "rejected"), split_hh(r["chosen"], r["rejected"])))
            elif fmt == "conversational":
                rows[i] = {"prompt": render_messages(r["prompt"], tokenizer, add_generation_prompt=True),
                           "chosen": list(r["chosen"])[-1]["content"], "rejected": list(r["rejected"])[-1]["content"]}
            elif fmt == "ultrafeedback":
                rows[i] = {"prompt": r["prompt"], "chosen": list(r["chosen"])[-1]["content"],
                           "rejected": list(r["rejected"])[-1]["content"]}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            problems.append(f"{source}:line {i}: cannot read as {fmt}: {err}")
    return pd.DataFrame.from_dict(rows, orient="index", columns=["prompt", "chosen", "rejected"]), problems


# -- validation ---------------------------------------------------------------------------------


def check_rows(df: pd.DataFrame, source: Path, max_chars: int) -> dict[Any, list[str]]:
    """Every problem of every row (vectorised): {row label: [column: reason, ...]}."""
    bad: dict[Any, list[str]] = {}

    def flag(mask: pd.Series, message: str) -> None:
        for i in mask[mask].index:
            bad.setdefault(i, []).append(message)

    for col in ("prompt", "chosen", "rejected"):
        s = df[col]
        null = s.isna()
        flag(null, f"column {col!r}: null value")
        wrong = ~null & ~s.map(lambda v: isinstance(v, str))
        flag(wrong, f"column {col!r}: expected text")
        text = s.where(~null & ~wrong, "x").astype(str)
        flag(~null & ~wrong & (text.str.strip() == ""), f"column {col!r}: empty or whitespace-only text")
    ok = df[["prompt", "chosen", "rejected"]].map(lambda v: isinstance(v, str)).all(axis=1)
    d = df[ok]
    flag(d["chosen"] == d["rejected"], "column 'rejected': chosen == rejected")
    flag((d["prompt"].str.len() + d[["chosen", "rejected"]].apply(lambda c: c.str.len()).max(axis=1)) > max_chars,
         f"column 'chosen': prompt + answer longer than max_chars={max_chars}")
    prompt_ok = d["prompt"].str.strip().str.len() >= 8  # short prompts ("hi") occur inside answers by chance
    for col in ("chosen", "rejected"):
        inside = [bool(p) and ok_ and p.strip() in a for p, a, ok_ in zip(d["prompt"], d[col], prompt_ok)]
        flag(pd.Series(inside, index=d.index), f"column {col!r}: repeats the prompt (the answer should not contain it)")
    dup = d.duplicated(subset=["prompt", "chosen", "rejected"], keep="first")
    for i in dup[dup].index:
        first = d.index[(d["prompt"] == d.at[i, "prompt"]) & (d["chosen"] == d.at[i, "chosen"]) & (d["rejected"] == d.at[i, "rejected"])][0]
        bad.setdefault(i, []).append(f"duplicate of the pair at line {first}")
    return bad


def import_preferences(p: ImportParams, tokenizer=None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """(clean pairs, rejected rows with their reasons, counts). Raises DataError listing every problem
    unless p.drop_invalid."""
    source = Path(p.path)
    df, problems = read_table(source)
    df = df.rename(columns={v: k for k, v in p.columns.items()})
    fmt = detect_format(df) if p.format == "auto" else p.format
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {fmt!r}; use one of {FORMATS}")
    needed = ("chosen", "rejected") if fmt == "hh" else ("prompt", "chosen", "rejected")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {list(df.columns)} "
                        f"(map yours with columns: {{prompt: ..., chosen: ..., rejected: ...}})")
    unreadable = len(problems)  # lines that never became rows (bad UTF-8 or JSON)
    std, convert_problems = to_standard(df, fmt, source, tokenizer)
    problems += convert_problems
    bad = check_rows(std, source, p.max_chars)
    problems += [f"{source}:line {i}: {reason}" for i, reasons in sorted(bad.items()) for reason in reasons]
    if problems and not p.drop_invalid:
        raise DataError(f"{len(problems)} problem(s) in {source} (nothing was written):\n" + "\n".join(problems))
    clean = std.drop(index=list(bad)).reset_index(drop=True)
    counts = {"rows_read": len(df) + unreadable, "rows_kept": len(clean),
              "rows_invalid": len(df) + unreadable - len(clean)}
    return clean, pd.DataFrame({"problem": problems}), counts
