"""Evaluation metrics against numbers worked by hand, and the gates."""

import math

import pytest
import torch

from alignment.evaluation import distinct_n, pair_metrics, win_rate


def test_pair_metrics_by_hand():
    # pair 1: policy logps (-1, -3), reference (-2, -2): implicit rewards beta*(1, -1) -> margin 2*beta, right
    # pair 2: policy (-4, -2), reference (-3, -3): rewards beta*(-1, 1) -> margin -2*beta, wrong; policy prefers rejected
    # pair 3: policy (-1, -2), reference (-0.5, -2.5): rewards beta*(-0.5, 0.5) -> wrong, though the policy prefers chosen
    policy = torch.tensor([[-1.0, -3.0], [-4.0, -2.0], [-1.0, -2.0]])
    reference = torch.tensor([[-2.0, -2.0], [-3.0, -3.0], [-0.5, -2.5]])
    m = pair_metrics(policy, reference, beta=0.5)
    assert m["eval/pref_accuracy"] == pytest.approx(2 / 3)
    assert m["eval/implicit_accuracy"] == pytest.approx(1 / 3)
    assert m["eval/implicit_margin"] == pytest.approx((1.0 - 1.0 - 0.5) / 3)  # 0.5 * (2, -2, -1) / 3
    assert m["eval/pairs"] == 3
    same = pair_metrics(policy, policy, beta=0.1)  # at the reference every implicit reward is 0
    assert same["eval/implicit_margin"] == 0.0 and same["eval/implicit_accuracy"] == 0.0


def test_distinct_n_and_win_rate_by_hand():
    answers = ["a b a", "a b c"]  # unigrams a b a a b c: 3 distinct of 6; bigrams ab ba ab bc: 3 of 4
    assert distinct_n(answers, 1) == pytest.approx(3 / 6)
    assert distinct_n(answers, 2) == pytest.approx(3 / 4)
    assert distinct_n(["", "one"], 2) == 0.0
    assert win_rate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx((1 + 0.5 + 0) / 3)


def test_kl_is_k3_zero_at_the_reference_and_never_negative(sandbox_tokenizer):
    from alignment.evaluation import evaluate_policy
    from alignment.sampling import SamplingParams
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(vocab_size=len(sandbox_tokenizer))).eval()
    torch.manual_seed(1)
    other = LlamaForCausalLM(tiny_llama_config(vocab_size=len(sandbox_tokenizer))).eval()
    prompts = ["user : how do i cook rice ? assistant :", "user : how can i sleep better ? assistant :"] * 4
    params = SamplingParams(max_new_tokens=6)
    m, rows = evaluate_policy(policy, policy, sandbox_tokenizer, prompts, params, seed=3)
    assert m["eval/kl"] == 0.0 and m["eval/kl_k1"] == 0.0
    m, rows = evaluate_policy(policy, other, sandbox_tokenizer, prompts, params, seed=3)
    assert m["eval/kl"] > 0 and all(r["kl"] >= 0 for r in rows)
    assert math.isfinite(m["eval/kl_k1"])


def test_gates_take_any_metric_with_a_bound():
    from tasks.stages.evaluate import Params, check_gates

    p = Params(gates={"eval/rm_win_rate": ">= 0.6", "eval/kl": "<= 6", "eval/x": "> 1e-3"})
    assert check_gates(p.gates, {"eval/rm_win_rate": 0.6, "eval/kl": 5.9, "eval/x": 0.01}) == []
    failed = check_gates(p.gates, {"eval/rm_win_rate": 0.59, "eval/kl": 6.5})
    assert failed == ["eval/rm_win_rate = 0.59, needs >= 0.6", "eval/kl = 6.5, needs <= 6",
                      "eval/x was not computed (computed: eval/kl, eval/rm_win_rate)"]
    with pytest.raises(ValueError, match='a gate is a comparison with a number, e.g. ">= 0.6"'):
        Params(gates={"eval/kl": "small"})


def test_rm_accuracy_scores_each_distinct_answer_once_and_counts_by_hand():
    from tasks.stages.evaluate import rm_accuracy

    calls = []

    def by_length(prompts, answers):  # a reward function: longer answers score higher
        calls.append(len(answers))
        return torch.tensor([float(len(a)) for a in answers])

    pairs = [{"prompt": "p", "messages": "", "chosen": "long answer", "rejected": "short"},     # right
             {"prompt": "p", "messages": "", "chosen": "short", "rejected": "long answer"},     # wrong
             {"prompt": "q", "messages": "", "chosen": "long answer", "rejected": "tiny"}]      # right
    assert rm_accuracy(by_length, pairs) == pytest.approx(2 / 3)
    assert sum(calls) == 4  # (p, long), (p, short), (q, long), (q, tiny)
