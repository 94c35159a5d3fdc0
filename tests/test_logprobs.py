import math

import pytest
import torch

from alignment.logprobs import selective_log_softmax, sequence_logprobs


def test_sequence_logprobs_by_hand_with_shift_and_mask():
    # vocab 2; logits at position t predict token t + 1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])  # [1, 3, 2]
    labels = torch.tensor([[1, 0, 1]])
    mask = torch.tensor([[0, 1, 1]])  # token 0 is the prompt
    token_logps, seq = sequence_logprobs(logits, labels, mask)
    # token 1 (=0) scored by position 0: log 1/2; token 2 (=1) by position 1: log 1/4
    assert token_logps.tolist()[0] == pytest.approx([0.0, math.log(0.5), math.log(0.25)], abs=1e-6)
    assert seq.item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)


def test_masked_tokens_change_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    _, seq = sequence_logprobs(logits, labels, mask)
    changed = labels.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 7  # padding token
    changed[0, 1] = (changed[0, 1] + 3) % 7  # prompt token
    logits2 = logits.clone()
    logits2[0, 4] += 100.0  # logits at the last position predict nothing
    _, seq2 = sequence_logprobs(logits2, changed, mask)
    assert torch.allclose(seq, seq2)


def test_selective_log_softmax_matches_log_softmax_in_half_precision():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g).to(torch.bfloat16)
    index = torch.randint(0, 50, (3, 4), generator=g)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)
