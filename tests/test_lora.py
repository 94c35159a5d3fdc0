"""LoRA: only the adapters train, and the reference is the same weights with the adapters disabled."""

import copy

import pytest
import torch

from alignment.logprobs import sequence_logprobs
from alignment.lora import LoRAConfig, add_lora, merged
from alignment.trainers.common import TrainConfig
from alignment.trainers.dpo import DPOConfig, DPOTrainer, pair_logps
from alignment.trainers.ppo import PPOTrainer
from test_trainers import PAIRS, lm, ppo_setup

pytest.importorskip("peft")


def base_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_dpo_with_lora_uses_the_base_model_as_reference():
    base = lm()
    original = copy.deepcopy(base).eval()  # an independent copy of the starting weights
    policy = add_lora(base, LoRAConfig(r=4, alpha=8))
    frozen = base_weights(policy)
    trainer = DPOTrainer(policy, PAIRS, 0, DPOConfig(TrainConfig(max_steps=25, batch_size=6, lr=1e-2), beta=0.5))
    assert trainer.ref_model is None  # no second copy of the weights
    with torch.no_grad():
        expected = torch.stack(pair_logps(original, PAIRS, 0, "cpu", shared_prefix=False), -1)
    assert torch.allclose(trainer.reference_logps, expected, atol=1e-5)

    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA's B starts at zero: policy == reference
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    after = base_weights(trainer.model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # base weights untouched, adapters learned
    # the reference (adapters off) is still the starting model after training
    fresh = trainer.ref_pair_logps(PAIRS)
    assert torch.allclose(torch.stack(fresh, -1), expected, atol=1e-5)
    # merged weights are a plain transformers model that scores like the adapted policy
    with torch.no_grad():
        adapted = torch.stack(pair_logps(trainer.model, PAIRS, 0, "cpu"), -1)
        plain = merged(trainer.model)
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert torch.allclose(torch.stack(pair_logps(plain, PAIRS, 0, "cpu"), -1), adapted, atol=1e-4)


def test_ppo_with_lora_reference_is_the_base_model(sandbox_tokenizer):
    model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=3)
    original = copy.deepcopy(model.policy).eval()
    model.policy = add_lora(model.policy, LoRAConfig(r=4, alpha=8))
    trainer = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg)
    assert trainer.ref_model is None  # no second copy of the weights
    history = trainer.train()
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapters start as a no-op
    assert history[-1]["kl"] != pytest.approx(0.0, abs=1e-3)  # then the policy moves away
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = sequence_logprobs(original(input_ids=ids).logits, ids, mask, cfg.sampling.temperature)[0]
        assert torch.allclose(trainer.reference_logps(ids, mask, mask), expected, atol=1e-5)
        assert not torch.allclose(model.policy(input_ids=ids).logits, original(input_ids=ids).logits, atol=1e-3)


def test_grpo_with_lora_reference_is_the_base_model(sandbox_tokenizer):
    from test_group_rl import setup, shorter_is_better

    from alignment.trainers.group import GRPOConfig, GroupTrainer

    model, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig, iterations=3, beta=0.1)
    original = copy.deepcopy(model).eval()
    policy = add_lora(model, LoRAConfig(r=4, alpha=8))
    trainer = GroupTrainer(policy, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg)
    assert trainer.ref_model is None  # no second copy of the weights
    history = trainer.train()
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapters start as a no-op
    assert history[-1]["kl_k3"] > 1e-4  # then the policy moves away from the reference
    ids, mask = torch.tensor([[1, 5, 6, 7, 8]]), torch.tensor([[0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = torch.log_softmax(original(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        ref = trainer.token_logps(ids, torch.ones_like(ids), mask, reference=True)[:, 1:]
    assert torch.allclose(ref, expected * mask[:, 1:], atol=1e-5)
