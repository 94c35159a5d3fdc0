"""Preference import: every layout users have and every source, hostile files, all errors in one pass
with file and line, duplicates dropped and counted, no Python exception text in any message."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks.schemas import DataError
from tasks.stages.import_preferences import Params as ImportParams, import_preferences
from told import told

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

GOOD = [
    {"prompt": "how do i cook rice ?", "chosen": "rinse it first .", "rejected": "figure it out ."},
    {"prompt": "how can i sleep better ?", "chosen": "keep the room dark .", "rejected": "stay up late ."},
]
LEAKS = ("object has no attribute", "KeyError", "TypeError", "'role'\n", "Traceback", "NoneType")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(clean: pd.DataFrame) -> list[dict]:
    return clean[["prompt", "chosen", "rejected"]].to_dict("records")


def conversation(clean: pd.DataFrame, i: int = 0) -> list[dict]:
    return json.loads(clean.iloc[i]["messages"])


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_standard_format_from_each_file_type(tmp_path, suffix):
    path = tmp_path / f"prefs.{suffix}"
    df = pd.DataFrame(GOOD)
    {"jsonl": lambda: jsonl(path, GOOD), "json": lambda: path.write_text(json.dumps(GOOD, indent=2)),
     "csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path)}[suffix]()
    clean, rejects, counts = import_preferences(ImportParams(path=str(path)))
    assert pairs(clean) == GOOD and list(clean["messages"]) == ["", ""]
    assert counts == {"rows_read": 2, "rows_kept": 2, "rows_duplicate": 0, "rows_invalid": 0}


def test_datasets_folder_keeps_its_splits(tmp_path):
    import datasets

    more = [{"prompt": f"question {i} ?", "chosen": f"good {i} .", "rejected": f"bad {i} ."} for i in range(3)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(more), "test": datasets.Dataset.from_list(GOOD)}).save_to_disk(tmp_path / "dd")
    clean, _, _ = import_preferences(ImportParams(path=str(tmp_path / "dd"), held_out=0.9))
    assert list(clean["split"]) == ["train"] * 3 + ["test"] * 2  # the folder's own split, not held_out
    assert pairs(clean[clean["split"] == "test"]) == GOOD
    datasets.Dataset.from_list(GOOD).save_to_disk(tmp_path / "one")
    assert pairs(import_preferences(ImportParams(path=str(tmp_path / "one")))[0]) == GOOD


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in GOOD]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "m.jsonl", rows)),
                                                  columns={"question": "prompt", "good": "chosen", "bad": "rejected"}))
    assert pairs(clean) == GOOD


def test_sharegpt_json_array_with_system_turn_multi_turn_and_a_duplicate(tmp_path):
    """The layout of the public file from the issue: one JSON array, from/value messages, multi-turn
    prompts, a system turn, chosen/rejected as one message (or a list), and a duplicate pair."""
    def row(i, chosen_as_list=False):
        chosen = {"from": "gpt", "value": f"The answer is {i}."}
        return {"conversations": [{"from": "system", "value": "You are a helpful assistant."},
                                  {"from": "human", "value": f"What is {i} + 0?"},
                                  {"from": "gpt", "value": "Do you want the working?"},
                                  {"from": "human", "value": "Just the number."}],
                "chosen": [chosen] if chosen_as_list else chosen, "rejected": {"from": "gpt", "value": "No."}}
    data = [row(1), row(2, chosen_as_list=True), row(3), row(1)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data, indent=2))
    clean, rejects, counts = import_preferences(ImportParams(path=str(path)))
    assert counts == {"rows_read": 4, "rows_kept": 3, "rows_duplicate": 1, "rows_invalid": 0}
    assert conversation(clean) == [{"role": "system", "content": "You are a helpful assistant."},
                                   {"role": "user", "content": "What is 1 + 0?"},
                                   {"role": "assistant", "content": "Do you want the working?"},
                                   {"role": "user", "content": "Just the number."}]
    assert list(clean["chosen"]) == ["The answer is 1.", "The answer is 2.", "The answer is 3."]
    # the duplicate is named with the line where its object starts in the JSON array
    starts = [i for i, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"]
    assert rejects["problem"].tolist() == [f"{path}:line {starts[3]}: duplicate of the pair at line {starts[0]}"]


def test_trl_conversational_hh_ultrafeedback_and_implicit_prompt(tmp_path):
    user = {"role": "user", "content": "how do i cook rice ?"}
    conv = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "rinse it ."}],
             "rejected": [{"role": "assistant", "content": "no ."}]}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "c.jsonl", conv))))
    assert conversation(clean) == [user] and pairs(clean)[0]["chosen"] == "rinse it ."
    uf = [{"prompt": "how do i cook rice ?", "chosen": [user, {"role": "assistant", "content": "rinse it ."}],
           "rejected": [user, {"role": "assistant", "content": "no ."}]}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "uf.jsonl", uf))))
    assert pairs(clean) == [{"prompt": "how do i cook rice ?", "chosen": "rinse it .", "rejected": "no ."}]
    implicit = [{"chosen": [user, {"role": "assistant", "content": "rinse it ."}], "rejected": [user, {"role": "assistant", "content": "no ."}]}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "i.jsonl", implicit))))
    assert conversation(clean) == [user] and (clean.iloc[0]["chosen"], clean.iloc[0]["rejected"]) == ("rinse it .", "no .")
    prompt = "\n\nHuman: how do i cook rice ?\n\nAssistant: what kind ?\n\nHuman: white rice\n\nAssistant:"
    hh = [{"chosen": prompt + " rinse it .", "rejected": prompt + " no ."}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "hh.jsonl", hh))))
    assert conversation(clean) == [user, {"role": "assistant", "content": "what kind ?"}, {"role": "user", "content": "white rice"}]
    assert (clean.iloc[0]["chosen"], clean.iloc[0]["rejected"]) == ("rinse it .", "no .")


def test_unknown_and_malformed_rows_get_plain_messages(tmp_path):
    """What the issue's user met (`'dict' object has no attribute 'rfind'`, a bare `'role'`): every row
    says, in words, what is wrong and what is expected."""
    def problems(name, rows):
        with pytest.raises(DataError) as err:
            import_preferences(ImportParams(path=str(jsonl(tmp_path / name, rows))))
        assert not any(leak in str(err.value) for leak in LEAKS), str(err.value)
        return str(err.value)

    path = tmp_path / "unknown.jsonl"
    assert (f"{path}:line 1: not a known format (no row of the file is); keys: ['answer', 'question']; known formats: "
            "standard, conversational, ultrafeedback, sharegpt, hh, implicit, openai, messages_pair; this looks like "
            "columns: {question: prompt}") in problems("unknown.jsonl", [{"question": "q", "answer": "a"}])
    answer = {"from": "gpt", "value": "a"}
    msg = problems("sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": answer, "rejected": {"from": "gpt", "value": "b"}},
        {"conversations": [{"speaker": "human", "text": "hi"}], "chosen": answer, "rejected": {"from": "gpt", "value": "b"}},
        {"conversations": [{"from": "narrator", "value": "hi"}], "chosen": answer, "rejected": {"from": "gpt", "value": "b"}},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "a"}, "rejected": answer},
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": None, "rejected": answer},
    ])
    path = tmp_path / "sharegpt.jsonl"
    assert f"{path}:line 2: column 'conversations': message 1 has no 'role' (or ShareGPT 'from'); keys: ['speaker', 'text']" in msg
    assert f"{path}:line 3: column 'conversations': message 1 has role 'narrator'; use system, user, assistant or tool" in msg
    assert f"{path}:line 4: column 'chosen': the last message is from 'user'; it must be the assistant's answer" in msg
    assert f"{path}:line 5: column 'chosen': null value" in msg and "line 1:" not in msg
    msg = problems("hh.jsonl", [{"chosen": "no transcript here", "rejected": "nor here"}])
    assert "hh.jsonl:line 1: column 'chosen': not an Anthropic-HH transcript" in msg


def test_json_syntax_errors_name_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a" "chosen": "b"}\n]\n')
    with pytest.raises(DataError, match=r"broken.json:line 3, column 18: not valid JSON \(Expecting ',' delimiter\)"):
        import_preferences(ImportParams(path=str(path)))


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
        f"{path}:line 6, column 2: not valid JSON",
        f"{path}:line 8: column 'chosen': repeats the prompt",
        f"{path}:line 9: column 'chosen': prompt + answer longer than max_chars=120",
        f"{path}:line 10: invalid UTF-8",
    ]
    for e in expected:
        assert e in msg, e
    assert "line 1:" not in msg and "line 7:" not in msg  # an exact duplicate is dropped, not an error
    assert "nothing was written" in msg
    assert not any(leak in msg for leak in LEAKS), msg


def test_drop_invalid_keeps_the_clean_rows(tmp_path):
    clean, rejects, counts = import_preferences(ImportParams(path=str(hostile(tmp_path)), max_chars=120, drop_invalid=True))
    assert pairs(clean) == [GOOD[0]]
    assert counts == {"rows_read": 10, "rows_kept": 1, "rows_duplicate": 1, "rows_invalid": 8}
    assert len(rejects) == 9


def test_missing_columns_named(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"line 1: not a known format \(no row of the file is\); keys: \['chosen', 'prompt'\]"):
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




def test_bad_preference_file_exits_2_and_writes_nothing(tmp_path):
    import yaml

    data = hostile(tmp_path)
    cfg = {"settings": {"workdir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
           "pipelines": {"p": {"stages": [{"name": "prefs", "type": "import_preferences", "params": {"path": str(data)}}]}}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in tmp_path.iterdir())
    cli = str(Path(sys.executable).parent / "alignflow")
    result = subprocess.run([cli, "run", "p", "-c", str(tmp_path / "pipelines.yaml")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    told(result, f"{data}:line 3: column 'rejected': chosen == rejected")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no mlflow.db, no runs/


def test_token_preflight_finds_pairs_equal_after_truncation():
    from alignment.sandbox.assets import build_tokenizer, world_texts
    from alignment.sandbox.world import World
    from tasks.stage import token_preflight

    tok = build_tokenizer(world_texts(World()))
    prompt = "user : how do i cook rice ? assistant :"  # 9 tokens + <bos>
    shared = "rinse the rice and use two cups of water ."  # 10 tokens
    pairs = [{"prompt": prompt, "chosen": shared + " good luck !", "rejected": shared + " not my problem ."},
             {"prompt": prompt, "chosen": "good luck !", "rejected": "not my problem ."}]
    examples, rejects = token_preflight(tok, pairs, max_length=64, source="prefs")  # all differ: passes
    assert rejects == []
    assert [e.chosen_ids for e in examples] == [tok(p["chosen"])["input_ids"][1:] + [tok.eos_token_id] for p in pairs]
    with pytest.raises(DataError, match=r"1 pair\(s\) have chosen == rejected after truncation with max_length=14 tokens \(rows \[1\]\)"):
        token_preflight(tok, pairs, max_length=14, source="prefs")  # prompt cut to 7, answers to their shared 7


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # the variables are read when the libraries are imported (earlier tests did): set what they were read into,
    # else the hub is tried over the network and the test waits for its timeouts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-org/no-such-set: could not load this hub data set") as err:
        import_preferences(ImportParams(path="no-such-org/no-such-set"))
    assert not any(leak in str(err.value) for leak in LEAKS)


def test_openai_preference_format_and_content_parts(tmp_path):
    """OpenAI's preference fine-tuning rows, one with its user turn as a list of text parts: the prompt
    is the input's messages, the answers the preferred and non-preferred assistant messages' text."""
    rows = [{"input": {"messages": [{"role": "user", "content": "how do i cook rice ?"}]},
             "preferred_output": [{"role": "assistant", "content": "rinse it first ."}],
             "non_preferred_output": [{"role": "assistant", "content": "figure it out ."}]},
            {"input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "how can i "},
                                                                 {"type": "text", "text": "sleep better ?"}]}]},
             "preferred_output": [{"role": "assistant", "content": "keep the room dark ."}],
             "non_preferred_output": [{"role": "assistant", "content": "stay up late ."}]}]
    clean, _, counts = import_preferences(ImportParams(path=str(jsonl(tmp_path / "openai.jsonl", rows)), held_out=0.0))
    assert counts["rows_kept"] == 2
    assert [json.loads(m) for m in clean["messages"]] == [[{"role": "user", "content": "how do i cook rice ?"}],
                                                          [{"role": "user", "content": "how can i sleep better ?"}]]
    assert list(clean["chosen"]) == ["rinse it first .", "keep the room dark ."]


def test_a_top_level_system_column_becomes_the_first_turn(tmp_path):
    """LLaMA-Factory's ShareGPT layout keeps the system prompt in a column of its own: it is the
    conversation's first turn (a conversation with a system turn of its own keeps that one)."""
    answer = {"from": "gpt", "value": "rinse it ."}
    rows = [{"system": "Be brief.", "conversations": [{"from": "human", "value": "how do i cook rice ?"}],
             "chosen": answer, "rejected": {"from": "gpt", "value": "no ."}},
            {"system": "Be brief.", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"}],
             "chosen": answer, "rejected": {"from": "gpt", "value": "no ."}}]
    clean, _, _ = import_preferences(ImportParams(path=str(jsonl(tmp_path / "sys.jsonl", rows)), held_out=0.0))
    assert [json.loads(m)[0] for m in clean["messages"]] == [{"role": "system", "content": "Be brief."},
                                                             {"role": "system", "content": "Be kind."}]


def test_unpaired_feedback_and_other_column_names_are_told_once(tmp_path):
    kto = jsonl(tmp_path / "kto.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "completion": "hello", "label": True}] * 3)
    with pytest.raises(DataError) as err:
        import_preferences(ImportParams(path=str(kto)))
    assert str(err.value).count("unpaired feedback (the KTO layout") == 1 and "'label'" in str(err.value)
    other = jsonl(tmp_path / "other.jsonl", [{"context": "hi", "answer_w": "hello", "answer_l": "go away"}])
    with pytest.raises(DataError, match=r"this looks like columns: \{answer_l: rejected, answer_w: chosen, context: prompt\}"):
        import_preferences(ImportParams(path=str(other)))
    clean, _, _ = import_preferences(ImportParams(path=str(other), held_out=0.0,
                                                  columns={"context": "prompt", "answer_w": "chosen", "answer_l": "rejected"}))
    assert (clean.iloc[0]["prompt"], clean.iloc[0]["chosen"], clean.iloc[0]["rejected"]) == ("hi", "hello", "go away")


def test_an_html_page_saved_as_jsonl_is_one_sentence(tmp_path):
    page = tmp_path / "prefs.jsonl"
    page.write_text("<!DOCTYPE html>\n<html>\n<head><title>prefs.jsonl - Jupyter</title></head>\n</html>\n")
    with pytest.raises(DataError) as err:
        import_preferences(ImportParams(path=str(page)))
    assert str(err.value).count("\n") == 1 and "HTML or XML page, not JSON" in str(err.value)


def test_a_file_is_read_once_a_run_and_not_at_all_when_its_import_is_stored(tmp_path, monkeypatch):
    """The CLI's pre-flight, the flow's and the stage read a preference file once in a process; a pre-flight
    whose import is already in the stage store does not read it."""
    import tasks.data
    from flows.config import load, preflight
    from flows.pipeline import pipeline_flow, resolved_yaml

    reads = []
    real_read_rows = tasks.data.read_rows
    monkeypatch.setattr(tasks.data, "read_rows", lambda source: reads.append(source) or real_read_rows(source))
    path = jsonl(tmp_path / "prefs.jsonl", GOOD * 3 + [{"prompt": "hi there", "chosen": "hello .", "rejected": "go ."}])
    import yaml

    cfg = {"settings": {"seed": 0, "workdir": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
           "pipelines": {"p": {"stages": [{"name": "prefs", "type": "import_preferences", "params": {"path": str(path)}}]}}}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    cfg, raw = load(tmp_path / "pipelines.yaml", "p")
    preflight(cfg.pipelines["p"], None, cfg.settings.workdir)  # as the CLI does, then the flow and its stage
    pipeline_flow(cfg, "p", resolved_yaml(raw))
    assert reads == [str(path)]
    import_preferences.forget()  # as a new `alignflow run` would start
    preflight(cfg.pipelines["p"], None, cfg.settings.workdir)  # stored now: not read again
    assert reads == [str(path)]
    import_preferences.forget()
    preflight(cfg.pipelines["p"], None, None)  # (without the store it is read)
    assert reads == [str(path)] * 2
