"""The `import_preferences` stage: a preference file in the layout users have, as validated pairs.

Layouts (tasks/data.py), detected row by row: standard, conversational, ShareGPT, Anthropic HH,
UltraFeedback binarized, implicit prompt. Exact duplicate pairs are dropped and counted; every other bad
row is an error (all of them listed with file and line) unless `drop_invalid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal


from tasks.data import DataError, PAIR_LAYOUTS, PREFERENCE_FORMATS, detect_pair_layout, iter_converted, prompt_columns, read_once
from tasks.stage import StageParams, StageSpec
from tasks.store import dir_hash, file_hash

INPUTS: dict[str, str] = {}
OUTPUT = ("preferences",)
TEST_SPLITS = ("test", "validation", "valid", "eval", "test_prefs")


class Params(StageParams):
    path: str  # the preference file, `datasets` folder or hub id
    format: Literal[PREFERENCE_FORMATS] = "auto"  # auto, standard, conversational, sharegpt, hh, ultrafeedback, implicit
    columns: dict[str, str] = {}  # the file's column -> ours, e.g. {question: prompt}
    drop_invalid: bool = False  # keep the clean rows and write the others to rejects.parquet instead of failing
    max_chars: int = 20_000  # longest prompt + answer accepted, in characters
    held_out: float = 0.15  # fraction of pairs marked split=test (a DatasetDict's own test split is used instead)


class Stage(StageSpec):
    type: Literal["import_preferences"]
    params: Params


def check_pair(prompt: Any, chosen: str, rejected: str, max_chars: int) -> list[str]:
    problems = []
    if chosen == rejected:
        problems.append("column 'rejected': chosen == rejected")
    text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
    if len(text) + max(len(chosen), len(rejected)) > max_chars:
        problems.append(f"column 'chosen': prompt + answer longer than max_chars={max_chars}")
    if isinstance(prompt, str) and len(prompt.strip()) >= 8:  # short prompts ("hi") occur inside answers by chance
        problems += [f"column {c!r}: repeats the prompt (the answer should not contain it)"
                     for c, a in (("chosen", chosen), ("rejected", rejected)) if prompt.strip() in a]
    return problems


@read_once
def import_preferences(p: Params) -> tuple:
    """(clean pairs with their split, rejected rows with their reasons, counts). Raises DataError listing
    every problem unless p.drop_invalid."""
    import pandas as pd

    problems: list[str] = []
    clean, seen, duplicates, converted, pair_problems = [], {}, [], 0, []
    for where, split, (prompt, chosen, rejected) in iter_converted(p.path, PAIR_LAYOUTS, detect_pair_layout, p.format,
                                                                   p.columns, problems):
        converted += 1
        row_problems = check_pair(prompt, chosen, rejected, p.max_chars)
        if row_problems:
            pair_problems += [f"{where}: {m}" for m in row_problems]
            continue
        cols = prompt_columns(prompt)
        key = (cols["messages"] or cols["prompt"], chosen, rejected)
        if key in seen:
            duplicates.append(f"{where}: duplicate of the pair at {seen[key].rsplit(':', 1)[-1]}")
            continue
        seen[key] = where
        clean.append({**cols, "chosen": chosen, "rejected": rejected, "from_split": split})
    read = converted + len(problems)  # rows converted, and rows that could not be
    problems += pair_problems
    if problems and not p.drop_invalid:
        raise DataError(f"{len(problems)} problem(s) in {p.path} (nothing was written):\n" + "\n".join(problems))
    if not clean:
        raise DataError(f"{p.path}: no usable preference pairs")
    df = pd.DataFrame(clean)
    if df["from_split"].notna().any():
        df["split"] = ["test" if s in TEST_SPLITS else "train" for s in df["from_split"]]
    else:
        n_train = int(len(df) * (1 - p.held_out))
        df["split"] = ["train"] * n_train + ["test"] * (len(df) - n_train)
    counts = {"rows_read": float(read), "rows_kept": float(len(df)), "rows_duplicate": float(len(duplicates)),
              "rows_invalid": float(len(problems))}
    return df.drop(columns="from_split"), pd.DataFrame({"problem": problems + duplicates}), counts


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from tasks import schemas

    clean, rejects, counts = import_preferences(p)
    clean = schemas.validate(clean, schemas.PREFERENCES, p.path)
    schemas.write_parquet(clean, out / "preferences.parquet")
    if len(rejects):
        schemas.write_parquet(rejects, out / "rejects.parquet")
    if counts["rows_duplicate"]:
        ctx.log(f"[import] dropped {int(counts['rows_duplicate'])} exact duplicate pair(s); listed in rejects.parquet")
    if counts["rows_invalid"]:
        ctx.log(f"[import] dropped {int(counts['rows_invalid'])} invalid row(s); their reasons are in rejects.parquet")
    return counts


def sources(p: Params) -> dict[str, str]:
    path = Path(p.path)
    if not path.exists():
        return {"hub_id": p.path}
    return {"source": dir_hash(path) if path.is_dir() else file_hash(path)}
