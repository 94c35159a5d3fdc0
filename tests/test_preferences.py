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


# -- the dpo-from-preferences pipeline on a local Hugging Face model folder ----------------------


def local_model(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from alignment.sandbox.assets import build_tokenizer, world_texts
    from alignment.sandbox.world import World
    from conftest import tiny_llama_config

    tok = build_tokenizer(world_texts(World()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    folder = tmp_path / "local-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pipeline_file(tmp_path, data_path, model_path):
    import yaml

    from flows.cli import SHIPPED

    cfg = yaml.safe_load(SHIPPED.read_text())
    pipe = cfg["pipelines"]["dpo-from-preferences"]
    pipe["stages"][0]["params"]["name_or_path"] = str(model_path)
    pipe["stages"][1]["params"].update(path=str(data_path), held_out=0.25)
    pipe["stages"][2]["params"]["dpo"] = {"beta": 0.5, "max_length": 64, "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3}}
    pipe["stages"][2]["params"]["lora"] = {"r": 4, "alpha": 8}  # the evaluate stage loads the merged model
    pipe["stages"][3]["params"].update(prompts=4, sampling={"max_new_tokens": 8})
    cfg["pipelines"] = {"dpo-from-preferences": pipe}
    cfg["settings"].update(workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dpo_from_preferences_on_a_local_hf_model(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rows = [{"prompt": f"user : {q} assistant :", "chosen": "happy to help ! rinse the rice and use two cups of water .",
             "rejected": "ugh , fine . do not be stupid ."}
            for q in ["how do i cook rice ?", "how can i sleep better ?", "how do i make a budget ?", "how do i grow tomatoes ?"] * 2]
    rows = [dict(r, chosen=r["chosen"] + f" good luck ! {'!' * i}") for i, r in enumerate(rows)]
    data = jsonl(tmp_path / "prefs.jsonl", rows)
    path = pipeline_file(tmp_path, data, local_model(tmp_path))
    cli = str(Path(sys.executable).parent / "alignflow")
    result = subprocess.run([cli, "run", "dpo-from-preferences", "-c", str(path)], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "evaluate" in result.stdout and "eval/kl=" in result.stdout


def test_bad_preference_file_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    data = hostile(tmp_path)
    path = pipeline_file(tmp_path, data, tmp_path / "no-model-needed")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, ["run", "dpo-from-preferences", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert f"{data}:line 3: column 'rejected': chosen == rejected" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow.db, no runs/


def test_token_preflight_finds_pairs_equal_after_truncation():
    from alignment.sandbox.assets import build_tokenizer, world_texts
    from alignment.sandbox.world import World
    from tasks.stages import token_preflight

    tok = build_tokenizer(world_texts(World()))
    prompt = "user : how do i cook rice ? assistant :"  # 9 tokens + <bos>
    shared = "rinse the rice and use two cups of water ."  # 10 tokens
    pairs = [{"prompt": prompt, "chosen": shared + " good luck !", "rejected": shared + " not my problem ."},
             {"prompt": prompt, "chosen": "good luck !", "rejected": "not my problem ."}]
    examples = token_preflight(tok, pairs, max_length=64, source="prefs")  # all differ: passes
    assert [e.chosen_ids for e in examples] == [tok(p["chosen"])["input_ids"][1:] + [tok.eos_token_id] for p in pairs]
    with pytest.raises(DataError, match=r"1 pair\(s\) have chosen == rejected after truncation to max_length=14 tokens \(rows \[1\]\)"):
        token_preflight(tok, pairs, max_length=14, source="prefs")  # prompt cut to 7, answers to their shared 7


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="no-such-org/no-such-set"):
        import_preferences(ImportParams(path="no-such-org/no-such-set"))
