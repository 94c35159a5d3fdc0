"""Preference import: every format and source, hostile files, all errors in one pass, speed budget."""

import json
import time

import pandas as pd
import pytest

from tasks.preferences import ImportParams, import_preferences, split_hh
from tasks.schemas import DataError

GOOD = [
    {"prompt": "how do i cook rice ?", "chosen": "rinse it first .", "rejected": "figure it out ."},
    {"prompt": "how can i sleep better ?", "chosen": "keep the room dark .", "rejected": "stay up late ."},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_standard_format_from_each_file_type(tmp_path, suffix):
    path = tmp_path / f"prefs.{suffix}"
    df = pd.DataFrame(GOOD)
    {"jsonl": lambda: jsonl(path, GOOD), "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[suffix]()
    clean, rejects, counts = import_preferences(ImportParams(path=str(path)))
    assert clean.to_dict("records") == GOOD
    assert counts == {"rows_read": 2, "rows_kept": 2, "rows_invalid": 0}


def test_datasets_save_to_disk_folder(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.Table.from_pandas(pd.DataFrame(GOOD), preserve_index=False)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    clean, _, _ = import_preferences(ImportParams(path=str(folder)))
    assert clean.to_dict("records") == GOOD


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in GOOD]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "m.jsonl", rows)),
                                                  columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert clean.to_dict("records") == GOOD


def test_anthropic_hh_splits_the_shared_prompt(tmp_path):
    prompt = "\n\nHuman: how do i cook rice ?\n\nAssistant: what kind ?\n\nHuman: white rice\n\nAssistant:"
    assert split_hh(prompt + " rinse it .", prompt + " no .") == (prompt, "rinse it .", "no .")
    rows = [{"chosen": prompt + " rinse it .", "rejected": prompt + " no ."}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "hh.jsonl", rows))))
    assert clean.iloc[0].to_dict() == {"prompt": prompt, "chosen": "rinse it .", "rejected": "no ."}


def test_ultrafeedback_and_conversational(tmp_path):
    uf = [{"prompt": "how do i cook rice ?",
           "chosen": [{"role": "user", "content": "how do i cook rice ?"}, {"role": "assistant", "content": "rinse it ."}],
           "rejected": [{"role": "user", "content": "how do i cook rice ?"}, {"role": "assistant", "content": "no ."}]}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "uf.jsonl", uf))))
    assert clean.iloc[0].to_dict() == {"prompt": "how do i cook rice ?", "chosen": "rinse it .", "rejected": "no ."}
    conv = [{"prompt": [{"role": "user", "content": "how do i cook rice ?"}],
             "chosen": [{"role": "assistant", "content": "rinse it ."}], "rejected": [{"role": "assistant", "content": "no ."}]}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "c.jsonl", conv))))
    assert clean.iloc[0].to_dict() == {"prompt": "user: how do i cook rice ?", "chosen": "rinse it .", "rejected": "no ."}


def hostile(tmp_path):
    lines = [
        json.dumps(GOOD[0]),                                                             # line 1 ok
        json.dumps({"prompt": "how do i cook rice ?", "chosen": "   ", "rejected": "x"}),  # 2 blank
        json.dumps({"prompt": "hello there friend", "chosen": "same", "rejected": "same"}),  # 3 equal
        json.dumps({"prompt": None, "chosen": "a", "rejected": "b"}),                      # 4 null
        json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}),                         # 5 wrong type
        "{not json",                                                                       # 6 bad JSON
        json.dumps(GOOD[0]),                                                               # 7 duplicate of 1
        json.dumps({"prompt": "how can i sleep better ?", "chosen": "how can i sleep better ? dark room", "rejected": "no"}),  # 8 prompt repeated
        json.dumps({"prompt": "q" * 50, "chosen": "a" * 100, "rejected": "b"}),            # 9 too long (max_chars 120)
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'  # 10 bad UTF-8
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(data)
    return path


def test_hostile_file_reports_every_problem_with_line_and_column(tmp_path):
    path = hostile(tmp_path)
    with pytest.raises(DataError) as err:
        import_preferences(ImportParams(path=str(path), max_chars=120))
    msg = str(err.value)
    expected = [
        f"{path}:line 2: column 'chosen': empty or whitespace-only text",
        f"{path}:line 3: column 'rejected': chosen == rejected",
        f"{path}:line 4: column 'prompt': null value",
        f"{path}:line 5: column 'chosen': expected text",
        f"{path}:line 6: not valid JSON",
        f"{path}:line 7: duplicate of the pair at line 1",
        f"{path}:line 8: column 'chosen': repeats the prompt",
        f"{path}:line 9: column 'chosen': prompt + answer longer than max_chars=120",
        f"{path}:line 10: invalid UTF-8",
    ]
    for e in expected:
        assert e in msg, e
    assert "line 1:" not in msg
    assert "nothing was written" in msg


def test_drop_invalid_keeps_the_clean_rows(tmp_path):
    clean, rejects, counts = import_preferences(ImportParams(path=str(hostile(tmp_path)), max_chars=120, drop_invalid=True))
    assert clean.to_dict("records") == [GOOD[0]]
    assert counts == {"rows_read": 10, "rows_kept": 1, "rows_invalid": 9}
    assert len(rejects) == 9


def test_missing_columns_named(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['rejected'\]"):
        import_preferences(ImportParams(path=str(path)))


def test_100k_rows_validate_quickly(tmp_path):
    n = 100_000
    df = pd.DataFrame({"prompt": [f"question number {i} ?" for i in range(n)],
                       "chosen": [f"a good answer {i} ." for i in range(n)],
                       "rejected": [f"a bad answer {i} ." for i in range(n)]})
    path = tmp_path / "big.parquet"
    df.to_parquet(path)
    t = time.perf_counter()
    clean, _, _ = import_preferences(ImportParams(path=str(path)))
    elapsed = time.perf_counter() - t
    assert len(clean) == n
    print(f"100k rows validated in {elapsed:.2f} s")  # the figure; the budget is 10 s (see benchmarks/RESULTS.md)
