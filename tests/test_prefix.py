"""Shared-prefix pair batches give the same rewards and log-probs as scoring each answer in its own row."""

import pytest
import torch
from transformers import (
    GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM, LlamaForSequenceClassification,
    Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification,
)

from alignment.data import PairExample
from alignment.models import RewardModel
from alignment.prefix import collate_shared_prefix, shared_prefix_logps
from conftest import tiny_llama_config

PAIRS = [
    PairExample([1, 5, 6], [7, 8, 2], [9, 2]),
    PairExample([1, 10], [11, 12, 13, 14, 2], [15, 16, 17, 2]),
    PairExample([1, 3, 4, 5, 6, 7], [8, 2], [8, 9, 2]),  # answers share their first token
]


def tiny_gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **kw)


def tiny_qwen2_config(**kw) -> Qwen2Config:
    return Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


LMS = {"llama": lambda: LlamaForCausalLM(tiny_llama_config()), "gpt2": lambda: GPT2LMHeadModel(tiny_gpt2_config()),
       "qwen2": lambda: Qwen2ForCausalLM(tiny_qwen2_config())}
CLASSIFIERS = {"llama": lambda: LlamaForSequenceClassification(tiny_llama_config(num_labels=1)),
               "gpt2": lambda: GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=1)),
               "qwen2": lambda: Qwen2ForSequenceClassification(tiny_qwen2_config(num_labels=1))}


def alone_logp(model, prompt, answer) -> float:
    """Independent: one unpadded row, plain log_softmax over the full logits, sum over answer tokens."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(answer)))


def alone_reward(rm, prompt, answer) -> float:
    ids = torch.tensor([prompt + answer])
    return float(rm(ids, torch.ones_like(ids)))


@pytest.mark.parametrize("family", sorted(LMS))
def test_shared_prefix_logps_equal_separate_rows(family):
    torch.manual_seed(0)
    model = LMS[family]().eval()
    with torch.no_grad():
        chosen, rejected = shared_prefix_logps(model, collate_shared_prefix(PAIRS, pad_id=0))
        for i, e in enumerate(PAIRS):
            assert chosen[i].item() == pytest.approx(alone_logp(model, e.prompt_ids, e.chosen_ids), abs=1e-4)
            assert rejected[i].item() == pytest.approx(alone_logp(model, e.prompt_ids, e.rejected_ids), abs=1e-4)
    # answers of different content get different log-probs: the check is not vacuous
    assert abs(chosen[0] - rejected[0]) > 1e-3


@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_shared_prefix_rewards_equal_separate_rows(family):
    torch.manual_seed(0)
    rm = RewardModel(CLASSIFIERS[family]()).eval()
    with torch.no_grad():
        chosen, rejected = rm(pairs=collate_shared_prefix(PAIRS, pad_id=0))
        for i, e in enumerate(PAIRS):
            assert chosen[i].item() == pytest.approx(alone_reward(rm, e.prompt_ids, e.chosen_ids), abs=1e-5)
            assert rejected[i].item() == pytest.approx(alone_reward(rm, e.prompt_ids, e.rejected_ids), abs=1e-5)
    assert abs(chosen[1] - rejected[1]) > 1e-4


def test_shared_prefix_layout_and_mask():
    batch = collate_shared_prefix(PAIRS[:1], pad_id=0)  # prompt [1,5,6], chosen [7,8,2], rejected [9,2]
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 2, 9, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    mask = batch.attention_mask[0, 0].int()
    assert mask[6].tolist() == [1, 1, 1, 0, 0, 0, 1, 0]  # first rejected token: prompt and itself, no chosen
    assert mask[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]  # last chosen token: causal
    assert batch.source[0].tolist() == [[2, 3, 4], [2, 6, 0]]  # the last prompt position predicts both first tokens
    assert batch.chosen_last.tolist() == [5] and batch.rejected_last.tolist() == [7]
