"""The sandbox world: gold reward by hand, labeler noise, a non-trivial SFT mixture, and the quickstart."""

import math
import random

import pytest

from alignment.sandbox.world import World, WorldConfig, gold_reward, topic_of

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

RICE = "user : how do i cook rice ? assistant :"


def test_gold_reward_by_hand():
    best = "happy to help ! rinse the rice and use two cups of water . add salt and a little butter at the end . good luck !"
    assert gold_reward(RICE, best) == pytest.approx(2.0 + 1.0)  # 2 advice + 2 polite
    # the same friendly answer to another topic's prompt: its advice is off-topic there
    sleep = "user : how can i sleep better ? assistant :"
    assert gold_reward(sleep, best) == pytest.approx(-0.5 * 2 + 1.0)
    rude = "ugh , fine . rinse the rice and use two cups of water . do not be stupid ."
    assert gold_reward(RICE, rude) == pytest.approx(1.0 - 0.75 - 2.0)
    long = " ".join(["ok ."] * 20)  # 40 words: 10 past 30
    assert gold_reward(RICE, long) == pytest.approx(-0.05 * 10)


def test_topic_of_rejects_foreign_prompts():
    assert topic_of(RICE) == "recipe"
    with pytest.raises(ValueError, match="not a sandbox prompt"):
        topic_of("user : what is the meaning of life ? assistant :")


def test_test_prompts_ask_in_phrasings_that_training_never_saw():
    """Hundreds of distinct requests a split; no test request, and no test frame, occurs in training; every
    request names its topic; a test frame uses only words that the SFT demonstrations hold."""
    from alignment.sandbox.world import TOPICS

    world = World()
    train, test = world.prompts(2000, seed=20), world.prompts(400, seed=999, split="test")
    assert len(set(train)) > 1000 and len(set(test)) > 300 and not set(train) & set(test)

    def frame(prompt: str) -> str:  # the request with its task replaced by a placeholder
        task = next(t for v in TOPICS.values() for t in v["tasks"] if f" {t} " in prompt)
        return prompt.replace(f" {task} ", " {task} ")

    train_frames, test_frames = {frame(p) for p in train}, {frame(p) for p in test}
    assert not train_frames & test_frames
    assert {topic_of(p) for p in test} == set(TOPICS)
    seen = {w for p, a in world.sft_corpus(2000) for w in f"{p} {a}".split()}  # what SFT reads
    assert {w for p in test_frames for w in p.split()} - {"{task}"} <= seen


def test_labeler_prefers_better_answer_with_bradley_terry_probability():
    world = World(WorldConfig(labeler_tau=0.5))
    a = "happy to help ! rinse the rice and use two cups of water ."  # g = 1.5
    b = "ok . rinse the rice and use two cups of water ."  # g = 1.0
    rng = random.Random(0)
    wins = sum(world.label(RICE, a, b, rng) == 0 for _ in range(20000)) / 20000
    assert wins == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)  # sigma((1.5 - 1.0) / 0.5)


def test_sft_corpus_is_a_real_mixture():
    world = World()
    corpus = world.sft_corpus(2000)
    gold = [world.gold_reward(p, a) for p, a in corpus]
    banned = sum(world.banned_count(a) > 0 for _, a in corpus) / len(corpus)
    assert 0.2 < banned < 0.4
    assert sum(g >= 2.0 for g in gold) / len(gold) > 0.15  # good answers exist
    assert sum(g < 0 for g in gold) / len(gold) > 0.2  # and bad ones
    assert len({topic_of(p) for p, _ in corpus}) == 20


def test_cli_help_and_unknown_pipeline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "alignflow")
    result = subprocess.run([cli, "run", "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0 and "quickstart" in result.stdout
    result = subprocess.run([cli, "run", "no-such-pipeline"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    from told import told

    told(result, "no pipeline 'no-such-pipeline'; defined: quickstart, compare-methods, verifiable-reward, gsm8k-grpo, "
         "dpo-from-preferences, rlhf-ppo", report="invalid pipeline config: ")


def test_evaluation_against_reference_answers_sampled_once():
    """Policies compared with one set of reference answers: the same figures as sampling them inside,
    and the win rate is counted against exactly the answers given."""
    from alignment.evaluation import evaluate_policy
    from alignment.sampling import SamplingParams
    from alignment.sandbox.assets import TinyModelConfig, build_model, build_tokenizer, world_texts
    from tasks.stages.world import gold_scores

    world = World(WorldConfig())
    tok = build_tokenizer(world_texts(world))
    model = build_model(tok, TinyModelConfig(hidden_size=32, num_layers=1, intermediate_size=64)).eval()
    prompts, params = world.prompts(6, seed=1), SamplingParams(max_new_tokens=8)
    m1, rows1 = evaluate_policy(model, model, tok, prompts, params, seed=3, gold_fn=gold_scores(world))
    m2, _ = evaluate_policy(model, model, tok, prompts, params, seed=3, gold_fn=gold_scores(world),
                            reference_answers=[r["reference_answer"] for r in rows1])
    assert m1 == m2
    given = [world.cfg.banned_words[0]] * 3 + [r["answer"] for r in rows1[3:]]  # 3 bad answers, 3 ties
    m3, rows3 = evaluate_policy(model, model, tok, prompts, params, seed=3, gold_fn=gold_scores(world), reference_answers=given)
    assert [r["reference_answer"] for r in rows3] == given
    by_hand = [1.0 if r["gold_reward"] > world.gold_reward(p, g) else 0.5 if r["gold_reward"] == world.gold_reward(p, g) else 0.0
               for r, p, g in zip(rows3, prompts, given)]
    assert m3["eval/gold_win_rate"] == pytest.approx(sum(by_hand) / 6)
    assert by_hand[3:] == [0.5] * 3
    with pytest.raises(ValueError, match="5 reference answers for 6 prompts"):
        evaluate_policy(model, model, tok, prompts, params, seed=3, gold_fn=gold_scores(world), reference_answers=given[:5])


def test_preference_pairs_skip_equal_answers_and_count_empty_ones():
    """Worked by hand: answers (good, bad, good, empty) of one prompt give 6 unordered pairs: (good, good)
    is no preference, the 3 pairs with the empty answer are counted and left out, and the 2 pairs of good
    against bad remain. Gold: good = 2 advice sentences + 1 polite phrase = 2.5, bad = 1 advice - 2 per
    banned word = -1, so P(good preferred) = sigma(3.5 / 0.5) = 0.999: the labeler picks good."""
    world = World()
    prompt = "user : how do i cook rice ? assistant :"
    good = "happy to help ! rinse the rice and use two cups of water . simmer it with the lid on for fifteen minutes ."
    bad = "rinse the rice and use two cups of water . do not be stupid ."
    assert (world.gold_reward(prompt, good), world.gold_reward(prompt, bad)) == (2.5, -1.0)
    pairs, empty = world.preference_pairs([(prompt, [good, bad, good, ""])], seed=0)
    assert empty == 3
    assert pairs == [(0, good, bad), (0, good, bad)]
