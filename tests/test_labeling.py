"""Human labeling: the transactional store, the web page driven by keyboard in real headless
Chromium (Playwright), a server killed mid-session, the terminal mode, and the pipeline's label stage."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from browser import browser_page, free_port, keep, need_chromium
from tasks.labeling import LabelStore

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

SAMPLES = pd.DataFrame({
    "prompt": ["how do i cook rice ?"] * 3 + ["how can i sleep better ?"] * 2,
    "answer": ["rinse it .", "boil it .", "rinse it .", "keep it dark .", "stay up ."],
    "sample": [0, 1, 2, 0, 1],
})


def store(tmp_path) -> LabelStore:
    s = LabelStore(tmp_path / "labels.db")
    assert s.add_batch(SAMPLES, "b1") == 2  # rice: 2 distinct answers -> 1 pair; sleep: 1 pair
    assert s.add_batch(SAMPLES, "b1") == 0  # idempotent
    return s


def test_label_create_makes_one_pair_a_prompt_unless_told(tmp_path):
    """500 prompts x 8 answers made 180,443 items before the cap (every two answers of a prompt); now one
    pair a prompt, drawn by the seed, and the command says how many items from how many prompts."""
    samples = pd.DataFrame({"prompt": [f"question {i} ?" for i in range(6) for _ in range(8)],
                            "answer": [f"answer {i} {k} ." for i in range(6) for k in range(8)], "sample": list(range(8)) * 6,
                            "messages": "", "prompt_index": [i for i in range(6) for _ in range(8)]})
    path = tmp_path / "samples.parquet"
    samples.to_parquet(path)
    cli = [sys.executable, "-m", "flows.cli", "label", "create", str(path)]
    run = lambda *args: subprocess.run(cli + list(args), capture_output=True, text=True, timeout=120)  # noqa: E731
    one = run("--db", str(tmp_path / "one.db"))
    assert one.returncode == 0, one.stderr
    assert "6 new item(s) from 6 prompt(s)" in one.stdout
    items = LabelStore(tmp_path / "one.db").connect
    with items() as con:
        first = sorted(tuple(r) for r in con.execute("SELECT prompt, answer_a, answer_b FROM items"))
    assert len({prompt for prompt, _, _ in first}) == 6  # one a prompt, each of two different answers
    assert all(a != b for _, a, b in first)
    assert LabelStore(tmp_path / "two.db").add_batch(samples, "b", 2) == 12
    assert LabelStore(tmp_path / "all.db").add_batch(samples, "b", None) == 168  # 6 x 28: what `--pairs-per-prompt 0` asks
    again = LabelStore(tmp_path / "again.db")
    again.add_batch(samples, "b", 1, seed=0)
    with again.connect() as con:  # the same seed draws the same pairs
        assert sorted(tuple(r) for r in con.execute("SELECT prompt, answer_a, answer_b FROM items")) == first
    other = LabelStore(tmp_path / "other.db")
    other.add_batch(samples, "b", 1, seed=1)
    with other.connect() as con:
        assert sorted(tuple(r) for r in con.execute("SELECT prompt, answer_a, answer_b FROM items")) != first


def test_judgements_map_display_order_and_are_stored_once(tmp_path):
    s = store(tmp_path)
    item = s.next_item("alice")
    assert item["prompt"] == "how do i cook rice ?"
    assert s.record(item["id"], "alice", "1") is True
    assert s.record(item["id"], "alice", "2") is False  # a second key press changes nothing
    df = s.judgements()
    assert len(df) == 1
    shown_left = item["left_text"]
    chosen_letter = df.iloc[0]["choice"]
    assert (df.iloc[0]["answer_a"] if chosen_letter == "a" else df.iloc[0]["answer_b"]) == shown_left
    assert s.next_item("alice")["prompt"] == "how can i sleep better ?"
    assert s.progress("alice") == {"done": 1, "total": 2}
    with pytest.raises(ValueError, match="The key 'x' is not a judgement: use 1"):
        s.record(item["id"], "bob", "x")


def test_fleiss_kappa_by_hand():
    from tasks.labeling import fleiss_kappa

    # two items, two raters each, both agree on each: P = 1; ratings a, a, b, b -> P_e = 0.5 -> kappa 1
    assert fleiss_kappa([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    # always split a/b: P = 0, P_e = 0.5 -> kappa = -1
    assert fleiss_kappa([["a", "b"], ["b", "a"]]) == pytest.approx(-1.0)
    # Fleiss (1971)-style check, 3 raters: [a,a,a], [a,a,b], [b,b,b], [a,b,b]: P_i = 1, 1/3, 1, 1/3 -> P = 2/3;
    # 12 ratings, 6 a, 6 b -> P_e = 0.5 -> kappa = (2/3 - 1/2) / (1/2) = 1/3
    assert fleiss_kappa([list("aaa"), list("aab"), list("bbb"), list("abb")]) == pytest.approx(1 / 3)
    assert math.isnan(fleiss_kappa([["a"]])) and math.isnan(fleiss_kappa([["a", "a"]]))  # one rater; one category only


def test_agreement_and_majority_export_by_hand(tmp_path):
    s = store(tmp_path)
    rice, sleep = [s.next_item("zed")["id"]] + [None]
    s.record(rice, "zed", "s")
    sleep = s.next_item("zed")["id"]
    # force choices through the display order: find the key that means "a" for each annotator
    def key_for(item_id, annotator, letter):
        return "1" if LabelStore.left_answer(item_id, annotator) == letter else "2"
    s.record(rice, "alice", key_for(rice, "alice", "a"))
    s.record(rice, "bob", key_for(rice, "bob", "a"))
    s.record(rice, "carol", key_for(rice, "carol", "b"))
    s.record(sleep, "alice", key_for(sleep, "alice", "a"))
    s.record(sleep, "bob", "t")
    # rice: a, a, b -> pairs (a,a) agree, (a,b) x2 disagree -> 1/3; sleep: a vs tie -> disagree -> 1/4
    # Fleiss' kappa: P_rice = (2^2 + 1^2 - 3) / (3 * 2) = 1/3, P_sleep = (1 + 1 - 2) / 2 = 0, P = 1/6;
    # 5 ratings: a 3/5, b 1/5, tie 1/5 -> P_e = 0.36 + 0.04 + 0.04 = 0.44; kappa = (1/6 - 0.44) / 0.56 = -0.4880952
    assert s.agreement() == {"items_with_2plus": 2, "agreement": pytest.approx(1 / 4),
                             "fleiss_kappa": pytest.approx(-0.4880952, abs=1e-6)}
    out = s.export()
    rice_row = out[out["prompt"] == "how do i cook rice ?"].iloc[0]
    assert (rice_row["chosen"], rice_row["rejected"]) == ("rinse it .", "boil it .")  # answer_a won 2-1
    assert len(out) == 2


def test_terminal_mode_resumes(tmp_path):
    from flows.label_server import terminal_session

    s = store(tmp_path)
    answers = iter(["x", "1", "q"])
    shown = []
    assert terminal_session(s, "dan", read=lambda _: next(answers), write=shown.append) == 1
    assert any("please answer" in line for line in shown)
    assert terminal_session(s, "dan", read=lambda _: "t", write=shown.append) == 1
    assert s.progress("dan") == {"done": 2, "total": 2}


def test_label_stage_takes_human_judgements(tmp_path):
    from tasks.stages.label import Params as LabelParams, human_labels

    s = store(tmp_path)
    for annotator in ("alice",):
        while (item := s.next_item(annotator)) is not None:
            s.record(item["id"], annotator, "1")
    ctx = types.SimpleNamespace(log=lambda m: None)
    pairs = human_labels(ctx, LabelParams(labeler="human", db=str(tmp_path / "labels.db"), min_judgements=2), SAMPLES, "b1")
    assert len(pairs) == 2 and set(pairs["annotators"]) == {"alice"}
    with pytest.raises(TimeoutError):
        human_labels(ctx, LabelParams(labeler="human", db=str(tmp_path / "labels.db"), min_judgements=5, wait_timeout_s=0.1), SAMPLES, "b1")


# -- the page in a real browser -------------------------------------------------------------------


def serve(db: Path, port: int, host: str = "127.0.0.1") -> subprocess.Popen:
    cli = str(Path(sys.executable).parent / "alignflow")
    proc = subprocess.Popen([cli, "label", "serve", "--db", str(db), "--port", str(port), "--host", host], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            assert time.time() < deadline, "the labeling server did not start"
            time.sleep(0.2)


def test_judge_api_refuses_bad_requests_with_sentences_and_writes_nothing(tmp_path):
    """The page's API on a real server: an unknown item, a bad key, an empty annotator, a body that is not
    JSON, a judgement with a missing field, and an oversized body are each answered 400 with a sentence
    (no Python repr), and no judgement is written; a good one is stored."""
    db = tmp_path / "labels.db"
    s = store(tmp_path)
    item = s.next_item("alice")["id"]
    port = free_port()
    server = serve(db, port)

    def post(body: bytes) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/judge", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]

    judge = lambda **kw: post(json.dumps({"item_id": item, "annotator": "alice", "key": "1", **kw}).encode())  # noqa: E731
    try:
        for (code, sentence), expected in (
            (judge(item_id="999999999"), "There is no labeling item 999999999: reload the page"),
            (judge(key="x"), "The key 'x' is not a judgement"),
            (judge(annotator="  "), "An annotator id is required"),
            (post(b"{not json"), "The request body is not JSON"),
            (post(json.dumps({"item_id": item, "key": "1"}).encode()), "A judgement needs item_id, annotator and key"),
            (post(json.dumps({"item_id": item, "annotator": "alice", "key": "1", "pad": "x" * 5000}).encode()),
             "a judgement is at most 4096"),
        ):
            assert code == 400 and expected in sentence, (code, sentence)
            assert sentence.endswith(".") and "Expecting value" not in sentence and "'no labeling" not in sentence
        assert LabelStore(db).judgements().empty  # nothing was written
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next?annotator=", timeout=10)
        assert err.value.code == 400
        assert judge() == (200, {"stored": True})
        assert len(LabelStore(db).judgements()) == 1
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_a_page_for_a_team_needs_invitations_and_records_the_invited_annotator(tmp_path):
    """Bound beyond loopback the page refuses to start without invitations; with them, a request without a
    token or with a wrong one is refused (403) and writes nothing, and a judgement is stored under the
    token's annotator whatever id the request claims, also from the page in Chromium."""
    need_chromium()
    db = tmp_path / "labels.db"
    store(tmp_path)
    cli = str(Path(sys.executable).parent / "alignflow")
    port = free_port()
    refused = subprocess.run([cli, "label", "serve", "--db", str(db), "--host", "0.0.0.0", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invite each annotator first with `alignflow label invite NAME" in refused.stderr
    assert subprocess.run([cli, "label", "invite", " ", "--db", str(db)], capture_output=True, text=True).returncode == 2
    invited = subprocess.run([cli, "label", "invite", "bob", "--db", str(db), "--url", f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
    assert invited.returncode == 0, invited.stderr
    link = invited.stdout.strip()
    token = link.split("token=")[1]
    server = serve(db, port, host="0.0.0.0")
    item = LabelStore(db).next_item("bob")["id"]

    def call(url: str, body: dict | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST" if body else "GET"), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    base = f"http://127.0.0.1:{port}"
    try:
        assert call(f"{base}/api/next?annotator=mallory") == 403
        assert call(f"{base}/api/next?token=wrong") == 403
        assert call(f"{base}/api/judge", {"item_id": item, "annotator": "mallory", "key": "1"}) == 403
        assert call(f"{base}/api/judge", {"item_id": item, "annotator": "mallory", "key": "1", "token": "wrong"}) == 403
        assert LabelStore(db).judgements().empty
        assert call(f"{base}/api/judge", {"item_id": item, "annotator": "mallory", "key": "1", "token": token}) == 200
        assert LabelStore(db).judgements()["annotator"].tolist() == ["bob"]  # the token's annotator, not the claimed one
        with browser_page(1200, 700) as page:
            page.goto(link)
            page.wait_for_selector("text=how can i sleep better ?")  # bob's next item
            assert page.inner_text("#annot") == "annotator: bob"
            page.screenshot(path=str(tmp_path / "label_page_invited.png"))
            page.keyboard.press("2")
            page.wait_for_selector("#done:visible")
            page.goto(f"{base}/?annotator=mallory")
            page.wait_for_selector("text=This page needs your invitation link")
        keep(tmp_path / "label_page_invited.png")
        assert sorted(LabelStore(db).judgements()["annotator"]) == ["bob", "bob"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)


def test_a_conversation_is_shown_as_its_turns(tmp_path):
    """A multi-turn prompt reaches the page as system, user and assistant turns, each with its role, not as
    one flattened text."""
    from tasks.data import prompt_columns

    need_chromium()
    db = tmp_path / "labels.db"
    turns = [{"role": "system", "content": "You are a terse cook."},
             {"role": "user", "content": "How do I cook rice?"},
             {"role": "assistant", "content": "Rinse it, then simmer it."},
             {"role": "user", "content": "For how long?"}]
    columns = prompt_columns(turns)
    LabelStore(db).add_batch(pd.DataFrame({**{k: [v] * 2 for k, v in columns.items()}, "answer": ["15 minutes.", "An hour."],
                                           "sample": [0, 1], "prompt_index": [0, 0]}), "chat")
    port = free_port()
    server = serve(db, port)
    try:
        with browser_page(1200, 700) as page:
            page.goto(f"http://127.0.0.1:{port}/?annotator=alice")
            page.wait_for_selector(".turn")
            shown = page.eval_on_selector_all(".turn", "ts => ts.map(t => [t.querySelector('.role').textContent, t.lastChild.textContent])")
            page.screenshot(path=str(tmp_path / "label_page_conversation.png"))
        keep(tmp_path / "label_page_conversation.png")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
    assert shown == [[m["role"], m["content"]] for m in turns]


def test_label_page_by_keyboard_survives_a_killed_server(tmp_path):
    need_chromium()
    db = tmp_path / "labels.db"
    many = pd.DataFrame({"prompt": [f"question {i} ?" for i in range(5) for _ in range(2)],
                         "answer": [f"answer {i}{k} ." for i in range(5) for k in "ab"], "sample": [0, 1] * 5})
    LabelStore(db).add_batch(many, "b")
    port = free_port()
    server = serve(db, port)
    with browser_page(1200, 700) as page:
        page.goto(f"http://127.0.0.1:{port}/?annotator=alice")
        page.wait_for_selector("text=question 0 ?")
        for key, expected in (("1", "1 / 5"), ("2", "2 / 5"), ("t", "3 / 5")):
            page.keyboard.press(key)
            page.wait_for_selector(f"#count:text('{expected}')")
        page.screenshot(path=str(tmp_path / "label_page.png"))
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-session
        server.wait()
        server = serve(db, port)
        page.reload()
        page.wait_for_selector("text=question 3 ?")  # resumes at the first unlabeled pair
        assert page.inner_text("#count") == "3 / 5"
        page.keyboard.press("s")
        page.wait_for_selector("#count:text('4 / 5')")
    os.killpg(server.pid, signal.SIGKILL)
    df = LabelStore(db).judgements()
    assert len(df) == 4 and df["item_id"].is_unique
    assert sorted(df["choice"].tolist()).count("tie") == 1 and sorted(df["choice"]).count("skip") == 1
    assert (tmp_path / "label_page.png").stat().st_size > 10_000
    keep(tmp_path / "label_page.png")


def test_rlhf_ppo_pipeline_waits_for_people_then_trains(tmp_path):
    """The shipped rlhf-ppo pipeline on a local model: it creates the labeling batch, waits until a
    person (here a loop over the label store) has given min_judgements, then trains RM and PPO."""
    import yaml

    from chat_model import build_chat_model
    from flows.cli import SHIPPED

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I cook rice?\nWhat is the capital of France?\nWrite a haiku about autumn.\nNo.\n")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in [("How do I cook rice?", "Rinse the rice."), ("What is the capital of France?", "Paris.")]))
    cfg = yaml.safe_load(SHIPPED.read_text())
    pipe = cfg["pipelines"]["rlhf-ppo"]
    db = tmp_path / "labels.db"
    tiny = {"max_new_tokens": 8}
    pipe["stages"][0]["params"]["name_or_path"] = str(build_chat_model(tmp_path / "chat-model"))
    pipe["stages"][1]["params"].update(data=str(demos), sft={"max_length": 64, "train": {"max_steps": 2, "batch_size": 2}})
    pipe["stages"][2]["params"].update(prompts_file=str(prompts), prompts=4, samples_per_prompt=2, sampling=tiny)
    pipe["stages"][3]["params"].update(db=str(db), min_judgements=3, held_out=0.34)
    pipe["stages"][4]["params"]["reward"] = {"max_length": 64, "train": {"max_steps": 2, "batch_size": 2}}
    pipe["stages"][5]["params"].update(prompts_file=str(prompts), ppo={
        "iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2, "sampling": tiny}, lora={"r": 4, "alpha": 8})
    pipe["stages"][6]["params"].update(prompts=2, max_length=64, sampling=tiny, gates={})
    cfg["pipelines"] = {"rlhf-ppo": pipe}
    cfg["settings"].update(workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    cli = str(Path(sys.executable).parent / "alignflow")
    proc = subprocess.Popen([cli, "run", "rlhf-ppo", "-c", str(tmp_path / "pipelines.yaml")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    labeled, deadline = 0, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if db.exists():
            s = LabelStore(db)
            while (item := s.next_item("person")) is not None:
                labeled += s.record(item["id"], "person", "1")
        time.sleep(0.5)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    assert labeled >= 3
    assert "evaluate" in out and "eval/kl=" in out
