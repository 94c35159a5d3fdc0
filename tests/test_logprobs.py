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


def test_log_probs_at_a_sampling_temperature_by_hand():
    """Logits (0, ln 3): softmax (0.25, 0.75); at temperature 0.5 the logits double: (1, 9) / 10 = (0.1, 0.9).
    An RL update of answers sampled at 0.5 measures its ratios and KL in that distribution (TRL does too)."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # [1, 2, 2]
    labels, mask = torch.tensor([[0, 1]]), torch.tensor([[0, 1]])
    for temperature, p in ((1.0, 0.75), (0.5, 0.9), (0.0, 0.75)):  # 0: greedy, no distribution to rescale
        token_logps, total = sequence_logprobs(logits, labels, mask, temperature)
        assert total.item() == pytest.approx(math.log(p), abs=1e-6)


def test_the_lm_head_in_chunks_gives_the_full_logits_log_probs_and_gradients(monkeypatch):
    """Past LOGITS_BUDGET only the answer-predicting positions go through the head, a few rows at a time (each
    chunk recomputed in the backward pass): the same log-probs and the same gradient of every parameter as the
    whole [B, T, V] logits. A budget of 3 rows of the 40-token vocabulary forces 5 chunks for 13 answer tokens."""
    from transformers import LlamaForCausalLM

    from alignment import logprobs
    from alignment.prefix import collate_shared_prefix, shared_prefix_logps
    from conftest import tiny_llama_config
    from test_prefix import PAIRS

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(3, 40, (3, 9))
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0  # a padded row
    mask = torch.zeros_like(ids)
    mask[0, 4:], mask[1, 3:8], mask[2, 5:7] = 1, 1, 1

    def run(budget):
        model.zero_grad()
        token_logps = logprobs.answer_logprobs(model, ids, attention, mask, temperature=0.7, budget=budget)
        token_logps.sum().backward()
        return token_logps.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = run(budget=None)  # 27 tokens x 40 < the default budget: the model's own forward
    chunked, chunked_grads = run(budget=3 * 40)
    assert torch.allclose(chunked, full, atol=1e-6) and (mask == 0).eq(chunked == 0).all()
    for a, b in zip(chunked_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)
    # the DPO path: a shared-prefix batch, whole and in chunks
    batch = collate_shared_prefix(PAIRS, pad_id=0)
    whole = shared_prefix_logps(model, batch)
    monkeypatch.setattr("alignment.prefix.LOGITS_BUDGET", 3 * 40)
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 3 * 40)
    assert torch.allclose(shared_prefix_logps(model, batch), whole, atol=1e-5)


def test_a_lora_model_goes_through_the_chunked_head_with_its_adapters_and_without_them():
    """A PEFT model is unwrapped to its transformers model (LoRA layers injected): chunked log-probs equal its
    own forward's with the adapters on, and with them off (the reference of DPO, GRPO and PPO with LoRA)."""
    from transformers import LlamaForCausalLM

    from alignment import logprobs
    from alignment.config import LoRAConfig
    from alignment.lora import add_lora, reference_mode
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(tiny_llama_config()), LoRAConfig(r=4))
    for name, p in model.named_parameters():  # LoRA's B starts at 0: move it, so adapters on and off differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.randint(3, 40, (2, 8))
    attention, mask = torch.ones_like(ids), torch.zeros_like(ids)
    mask[:, 3:] = 1
    with torch.no_grad():
        on = logprobs.answer_logprobs(model, ids, attention, mask, budget=2 * 40)
        assert torch.allclose(on, logprobs.answer_logprobs(model, ids, attention, mask), atol=1e-6)
        with reference_mode(model) as policy:
            off = logprobs.answer_logprobs(policy, ids, attention, mask, budget=2 * 40)
            assert torch.allclose(off, logprobs.answer_logprobs(policy, ids, attention, mask), atol=1e-6)
    assert (on - off).abs().max() > 1e-3  # the adapters were really on, then really off


def test_ppo_policy_with_value_in_chunks_gives_the_full_logits_numbers(monkeypatch, sandbox_tokenizer):
    """PPO's policy-with-value forward sends only answer positions through the LM head, in chunks, past the
    budget: log-probs, entropies (at the sampling temperature), values and every gradient equal the whole-logits
    pass, for a value head on the policy's trunk and for a separate value model. Two PPO iterations with a tiny
    budget then log the same metrics and leave the same weights."""
    import copy

    from transformers import LlamaForCausalLM, LlamaModel

    from alignment import logprobs
    from alignment.models import PolicyWithValueHead
    from alignment.trainers.ppo import PPOTrainer
    from conftest import tiny_llama_config
    from test_trainers import ppo_setup

    torch.manual_seed(0)
    ids = torch.randint(3, 40, (3, 9))
    attention = torch.ones_like(ids)
    attention[2, 7:] = 0
    mask = torch.zeros_like(ids)
    mask[0, 4:], mask[1, 3:8], mask[2, 5:7] = 1, 1, 1
    for value_model in (None, LlamaModel(tiny_llama_config())):
        model = PolicyWithValueHead(LlamaForCausalLM(tiny_llama_config()), value_model)
        torch.nn.init.normal_(model.value_head.weight)

        def run(budget):
            model.zero_grad()
            logps, values, entropies = model(ids, attention, mask, temperature=0.7, entropy=True, budget=budget)
            (logps.sum() + values.sum() + entropies.sum()).backward()
            return [t.detach() for t in (logps, values, entropies)], [p.grad.clone() for p in model.parameters()]

        full, full_grads = run(None)  # 27 x 40 logits: under the default budget, the model's own forward
        chunked, chunked_grads = run(3 * 40)  # 3 rows a chunk: 5 chunks
        for a, b in zip(chunked, full):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        assert (full[2][mask == 1] > 0).all() and (full[2][mask == 0] == 0).all()
        for a, b in zip(chunked_grads, full_grads):  # to float rounding of each tensor's scale (values' grads are large)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6, ((a - b).abs().max(), b.abs().max())

    def train(budget):
        if budget:
            monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
        model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=2, ent_coef=0.01)
        history = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg).train()
        monkeypatch.undo()
        return history, copy.deepcopy(model.state_dict())

    whole, whole_weights = train(None)
    parts, parts_weights = train(len(sandbox_tokenizer) * 5)  # 5 positions a chunk
    for a, b in zip(parts, whole):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    for k in whole_weights:
        assert torch.allclose(parts_weights[k], whole_weights[k], atol=1e-4), k


def test_under_ddp_grpo_and_sft_still_send_only_answer_positions_through_the_lm_head_in_chunks(monkeypatch, sandbox_tokenizer):
    """DDP wraps the trained module, and a wrapper has no LM head to find: answer_logprobs on DDP(policy) forms
    whole logits. The trained module of SFT, GRPO and RLOO is AnswerLogps(policy), whose forward runs inside the
    wrapper, so at a real vocabulary the head still runs in chunks, with the same log-probs; GRPO's two iterations
    with a tiny budget log the same metrics and leave the same weights as with whole logits."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaForCausalLM

    from alignment import logprobs
    from alignment.prefix import AnswerLogps
    from alignment.trainers.group import GroupTrainer
    from conftest import tiny_llama_config
    from test_group_rl import setup, shorter_is_better

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(3, 40, (2, 9))
    attention, mask = torch.ones_like(ids), torch.zeros_like(ids)
    mask[:, 4:] = 1
    full = logprobs.answer_logprobs(model, ids, attention, mask).detach()
    chunks = []
    real = logprobs.head_logps
    monkeypatch.setattr(logprobs, "head_logps", lambda *a, **k: chunks.append(1) or real(*a, **k))
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET", 3 * 40)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        bare = DistributedDataParallel(model)
        assert torch.allclose(logprobs.answer_logprobs(bare, ids, attention, mask), full, atol=1e-6) and chunks == []
        wrapped = DistributedDataParallel(AnswerLogps(model))
        assert torch.allclose(wrapped((ids, attention, mask)), full, atol=1e-6) and chunks == [1]
    finally:
        dist.destroy_process_group()
    monkeypatch.undo()

    def train(budget):
        if budget:
            monkeypatch.setattr(logprobs, "LOGITS_BUDGET", budget)
        policy, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig, iterations=2)
        trainer = GroupTrainer(policy, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg)
        assert isinstance(trainer.opt.model, AnswerLogps) and trainer.model is policy
        history = trainer.train()
        monkeypatch.undo()
        return history, copy.deepcopy(policy.state_dict())

    from alignment.trainers.group import GRPOConfig

    whole, whole_weights = train(None)
    parts, parts_weights = train(len(sandbox_tokenizer) * 5)
    for a, b in zip(parts, whole):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    for k in whole_weights:
        assert torch.allclose(parts_weights[k], whole_weights[k], atol=1e-4), k
