"""pandera contracts of every dataset that crosses a stage boundary, and readable errors for them.

Errors name the file, the 1-based row, the column and the reason, all of them in one pass.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa


from tasks.data import DataError  # noqa: F401 - re-exported: every data error is one type


def _non_blank(series: pd.Series) -> pd.Series:
    return series.str.strip().str.len() > 0


TEXT = [pa.Check(_non_blank, element_wise=False, error="empty or whitespace-only text")]

MESSAGES = pa.Column(str)  # a conversation prompt as JSON [{role, content}, ...]; "" for a plain-text prompt

SAMPLES = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, TEXT),
        "messages": MESSAGES,
        "answer": pa.Column(str),  # a model may answer with nothing but EOS
        "prompt_index": pa.Column(int, pa.Check.ge(0)),  # which prompt: the same text may be asked twice
        "sample": pa.Column(int, pa.Check.ge(0)),
    },
    name="samples",
)

PREFERENCES = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, TEXT),
        "messages": MESSAGES,
        "chosen": pa.Column(str, TEXT),
        "rejected": pa.Column(str, TEXT),
        "split": pa.Column(str, pa.Check.isin(["train", "test"])),
    },
    checks=[pa.Check(lambda df: df["chosen"] != df["rejected"], error="chosen == rejected")],
    name="preference pairs",
)

DEMONSTRATIONS = pa.DataFrameSchema(
    {"prompt": pa.Column(str, TEXT), "messages": MESSAGES, "completion": pa.Column(str, TEXT),
     # an answer that is a tool call: its assistant message as JSON (the chat template writes its text), else ""
     "completion_message": pa.Column(str, required=False)},
    name="demonstrations",
)

PROMPTS = pa.DataFrameSchema(
    {"prompt": pa.Column(str, TEXT), "messages": MESSAGES, "split": pa.Column(str, pa.Check.isin(["train", "test"]))},
    name="prompts",
)

EVALUATION = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, TEXT),
        "answer": pa.Column(str),
        "reference_answer": pa.Column(str),
        "kl": pa.Column(float, pa.Check.ge(0)),
    },
    name="evaluation rows",
)


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, source: str | Path) -> pd.DataFrame:
    """Validate df against schema; raise DataError listing every bad row (1-based, header not counted)."""
    missing = [c for c, column in schema.columns.items() if c not in df.columns and column.required]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {list(df.columns)}")
    problems: list[str] = []
    for name, column in schema.columns.items():  # nulls first: pandera's lazy mode reports them as one line
        if name not in df.columns:
            continue
        for i in df.index[df[name].isna()]:
            problems.append(f"{source}:row {i + 1}: column {name!r}: null value")
    if not problems:
        try:
            schema.validate(df, lazy=True)
        except pa.errors.SchemaErrors as err:
            for _, case in err.failure_cases.iterrows():
                row = "" if pd.isna(case["index"]) else f"row {int(case['index']) + 1}: "
                column = case["column"] if isinstance(case["column"], str) else "(row)"
                problems.append(f"{source}:{row}column {column!r}: {case['check']} (value {case['failure_case']!r})")
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {schema.name}:\n" + "\n".join(sorted(set(problems))))
    return df


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
