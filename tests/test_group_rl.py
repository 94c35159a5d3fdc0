"""GRPO and RLOO: advantages and losses against numbers worked by hand, the reward-function checks, and
tiny learning and resume tests (sandbox tokenizer, a tiny random Llama, in-process)."""

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from alignment.advantages import group_advantages, leave_one_out_advantages
from alignment.losses import group_policy_loss
from alignment.sampling import SamplingParams
from alignment.rewards import RewardFunctionError, score
from alignment.trainers.group import GRPOConfig, GroupTrainer, RLOOConfig
from conftest import gradients_by_micro_cap, tiny_llama_config


def test_group_advantages_by_hand():
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # row 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.577350; A = +-0.5 / (0.577350 + 1e-4) = +-0.865875
    expected = torch.tensor([[0.865875, -0.865875, -0.865875, 0.865875], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(scores), expected, atol=1e-6)
    # Dr. GRPO: no division by the std
    assert torch.allclose(group_advantages(scores, scale=False), torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4]))
    # one divisor for every group (the batch's std, TRL's scale_rewards="batch"): the std of the 8 scores
    # [1, 0, 0, 1, 2, 2, 2, 2] (mean 1.25) is sqrt((2 * 0.0625 + 2 * 1.5625 + 4 * 0.5625) / 7) = sqrt(5.5 / 7)
    # = 0.886405; A = +-0.5 / (0.886405 + 1e-4) = +-0.564012, and the all-equal group stays 0
    batch = group_advantages(scores, std=scores.std())
    assert torch.allclose(batch, torch.tensor([[0.564012, -0.564012, -0.564012, 0.564012], [0.0] * 4]), atol=1e-6)
    # a group whose scores are all equal: zero advantage, and no NaN
    assert group_advantages(torch.full((1, 8), 3.7)).abs().max() == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(3, 1))


def test_leave_one_out_advantages_by_hand():
    # baselines: (2 + 1) / 2 = 1.5, (3 + 2) / 2 = 2.5, (3 + 1) / 2 = 2.0
    assert torch.equal(leave_one_out_advantages(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([[1.5, -1.5, 0.0]]))
    assert torch.equal(leave_one_out_advantages(torch.tensor([[4.0, 4.0]])), torch.zeros(1, 2))


def hand_batch():
    """Two answers. Row 0: A = +1, tokens with ratios 1.5 and 0.5; row 1: A = -2, one token with ratio 0.5.
    Masked positions hold junk that must not count."""
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    old = torch.zeros(2, 3)
    logps = torch.tensor([[5.0, math.log(1.5), math.log(0.5)], [5.0, math.log(0.5), 7.0]])
    return logps, old, torch.tensor([1.0, -2.0]), mask


def test_group_policy_loss_by_hand():
    logps, old, adv, mask = hand_batch()
    # eps_low 0.2, eps_high 0.28: row 0 token 1: min(1.5, 1.28) = 1.28 -> l = -1.28;
    # token 2: min(0.5, 0.8) = 0.5 -> l = -0.5; row 1: min(0.5 * -2, 0.8 * -2) = -1.6 -> l = 1.6
    loss, m = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, loss_type="grpo")
    assert loss.item() == pytest.approx(((-1.28 - 0.5) / 2 + 1.6) / 2)  # 0.355: each answer's token mean
    assert m["clip_frac"].item() == pytest.approx(2 / 3)  # row 0 token 1 (above 1.28, A > 0), row 1 (below 0.8, A < 0)
    loss, _ = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, loss_type="dapo")
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.6) / 3)  # -0.06: every token weighs the same
    # the k3 KL: ref = logp + ln 2 on every token -> k3 = e^(ln 2) - 1 - ln 2 = 0.306853; plain k3, beta 0.1 adds 0.0306853
    ref = logps + math.log(2.0)
    plain = dict(ref_logps=ref, beta=0.1, unbiased_kl=False)
    loss, m = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, loss_type="grpo", **plain)
    assert loss.item() == pytest.approx(0.355 + 0.0306853, abs=1e-6)
    assert m["kl_k3"].item() == pytest.approx(0.306853, abs=1e-6)
    loss, _ = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, loss_type="dapo", **plain)
    assert loss.item() == pytest.approx(-0.06 + 0.0306853, abs=1e-6)
    # weighted by the ratio (the default): row 0's tokens 1.5 and 0.5, row 1's 0.5 -> grpo adds
    # 0.0306853 * ((1.5 + 0.5) / 2 + 0.5) / 2 = 0.0230140; dapo 0.0306853 * (1.5 + 0.5 + 0.5) / 3 = 0.0255711
    loss, _ = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, ref_logps=ref, beta=0.1, loss_type="grpo")
    assert loss.item() == pytest.approx(0.355 + 0.0230140, abs=1e-6)
    loss, _ = group_policy_loss(logps, old, adv, mask, 0.2, 0.28, ref_logps=ref, beta=0.1, loss_type="dapo")
    assert loss.item() == pytest.approx(-0.06 + 0.0255711, abs=1e-6)


def test_the_kl_term_has_the_gradient_of_the_reverse_kl_by_hand():
    """One token with pi = 0.5 where pi_ref = 0.25, on-policy (ratio 1), no advantage, beta 1.
    k3 = pi_ref / pi - 1 - ln(pi_ref / pi) = 0.5 - 1 + ln 2 = 0.193147 either way. Its gradient on log pi:
    plain k3: 1 - pi_ref / pi = 0.5 (expected over pi: the gradient of the forward KL(pi_ref || pi));
    ratio-weighted (TRL's use_bias_correction_kl): k3 + 1 - pi_ref / pi = ln(pi / pi_ref) = ln 2 = 0.693147,
    the per-token k1, whose expectation over pi is the gradient of KL(pi || pi_ref), what evaluation measures."""
    mask = torch.ones(1, 1)
    for unbiased, grad in ((False, 0.5), (True, math.log(2.0))):
        logps = torch.tensor([[math.log(0.5)]], requires_grad=True)
        loss, _ = group_policy_loss(logps, logps.detach(), torch.zeros(1), mask, ref_logps=torch.tensor([[math.log(0.25)]]),
                                    beta=1.0, loss_type="dapo", unbiased_kl=unbiased)
        loss.backward()
        assert loss.item() == pytest.approx(0.193147, abs=1e-6)
        assert logps.grad.item() == pytest.approx(grad, abs=1e-6)
    # a token the policy made 4x likelier than the reference: plain k3's weight saturates (1 - 1/4 = 0.75),
    # the reverse KL's keeps growing (ln 4 = 1.386294)
    for unbiased, grad in ((False, 0.75), (True, math.log(4.0))):
        logps = torch.tensor([[math.log(0.8)]], requires_grad=True)
        loss, _ = group_policy_loss(logps, logps.detach(), torch.zeros(1), mask, ref_logps=torch.tensor([[math.log(0.2)]]),
                                    beta=1.0, loss_type="dapo", unbiased_kl=unbiased)
        loss.backward()
        assert logps.grad.item() == pytest.approx(grad, abs=1e-6)


def test_sequence_loss_treats_the_answer_as_one_action_by_hand():
    """RLOO's loss (as TRL's RLOOTrainer): the ratio of the answer's probability, clipped, mean over answers."""
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    old = torch.zeros(2, 3)
    # row 0: A = +1, log-ratios 0.1 + 0.2 -> ratio e^0.3 = 1.349859 -> min(1.349859, 1.2) = 1.2 -> l = -1.2 (clipped)
    # row 1: A = -2, log-ratio -0.5 -> ratio 0.606531 -> min(-1.213061, 0.8 * -2) = -1.6 -> l = 1.6 (clipped)
    logps = torch.tensor([[9.0, 0.1, 0.2], [9.0, -0.5, 9.0]])  # masked positions hold junk
    loss, m = group_policy_loss(logps, old, torch.tensor([1.0, -2.0]), mask, loss_type="sequence")
    assert loss.item() == pytest.approx((-1.2 + 1.6) / 2)
    assert m["clip_frac"].item() == 1.0  # both answers
    # row 0 alone at log-ratio 0.05 + 0.05 (ratio 1.105171, inside the clip): l = -1.105171
    logps = torch.tensor([[9.0, 0.05, 0.05], [9.0, 0.0, 9.0]])
    loss, m = group_policy_loss(logps, old, torch.tensor([1.0, 0.0]), mask, loss_type="sequence")
    assert loss.item() == pytest.approx(-1.105171 / 2, abs=1e-6) and m["clip_frac"].item() == 0.0
    # on-policy the gradient on each answer token is -A_i / B: REINFORCE on log pi(y | x), no 1 / |y_i|
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, _ = group_policy_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), mask, loss_type="sequence")
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -0.5, -0.5], [0.0, 1.0, 0.0]]))


def test_group_policy_loss_gradient_by_hand():
    """At ratio 1 (first pass) the gradient of the grpo loss on a token's log-prob is -A / |y_i| / B."""
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    loss, _ = group_policy_loss(logps, logps.detach(), torch.tensor([1.0, -2.0]), mask, loss_type="grpo")
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -0.25, -0.25], [0.0, 1.0, 0.0]]))
    # an all-equal group: zero advantage, zero gradient, no NaN
    logps.grad = None
    loss, _ = group_policy_loss(logps, logps.detach(), group_advantages(torch.ones(1, 2)).reshape(-1), mask)
    loss.backward()
    assert loss.item() == 0.0 and logps.grad.abs().max() == 0.0


@pytest.mark.parametrize("fn, message", [
    (lambda ps, ans: 1 / 0, "reward function bad failed on a batch of 2 answers: ZeroDivisionError"),
    (lambda ps, ans: [1.0], "reward function bad returned 1 scores for 2 answers"),
    (lambda ps, ans: [1.0, float("nan")], "reward function bad returned nan for answer 1 .'b'.; return a finite"),
    (lambda ps, ans: {"a": 1}, "reward function bad returned dict, not one number per answer"),
])
def test_a_broken_reward_function_is_named(fn, message):
    with pytest.raises(RewardFunctionError, match=message):
        score({"good": lambda ps, ans: [0.0, 1.0], "bad": fn}, {}, ["p", "q"], ["a", "b"])


def test_scores_are_the_weighted_sum_of_the_functions():
    total, each = score({"f": lambda ps, ans: [1.0, 2.0], "g": lambda ps, ans: torch.tensor([10.0, 0.0])},
                        {"f": 0.5}, ["p", "q"], ["a", "b"])
    assert total.tolist() == [10.5, 1.0] and each["g"].tolist() == [10.0, 0.0]


def setup(tokenizer, cfg_type, seed=0, **kw):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2))
    prompts = ["user : how do i cook rice ? assistant :", "user : how can i sleep better ? assistant :"] * 8
    cfg = cfg_type(**{**dict(iterations=12, prompts_per_batch=4, group_size=4, minibatch_size=8, epochs=2, lr=1e-2,
                             lr_schedule="constant",
                             sampling=SamplingParams(max_new_tokens=12)), **kw})
    return model, prompts, cfg


def shorter_is_better(prompts, answers):
    return [-0.2 * len(a.split()) for a in answers]


# RLOO (one action an answer) learns more slowly: at 12 iterations its gain ranged 0.38-1.67 over seeds 0-5,
# at 20 it is 2.3 on each
@pytest.mark.parametrize("cfg_type, kw", [(GRPOConfig, {}), (GRPOConfig, {"advantage": "batch_std"}),
                                          (RLOOConfig, {"beta": 0.01, "iterations": 20})])
def test_group_trainers_learn_to_raise_reward(sandbox_tokenizer, cfg_type, kw):
    model, prompts, cfg = setup(sandbox_tokenizer, cfg_type, **kw)
    history = GroupTrainer(model, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg).train()
    assert {"reward", "reward/short", "clip_frac", "loss", "reward_std_in_group", "answer_len"} <= history[0].keys()
    assert ("kl" in history[0]) == bool(cfg.beta)  # measured where there is a reference
    assert all(math.isfinite(v) for h in history for v in h.values())
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.5, (first, last)


def test_groups_scored_alike_are_counted_without_signal(sandbox_tokenizer):
    """Prompt 0's answers all score 3.7 (eight equal floats whose float std need not be 0), the others differ."""
    model, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig, iterations=1, prompts_per_batch=4, group_size=8)
    trainer = GroupTrainer(model, sandbox_tokenizer, prompts, {"f": lambda ps, answers: [0.0] * len(answers)}, cfg)
    trainer.reward_fns = {"f": lambda ps, answers: [3.7] * 8 + [float(i) for i in range(len(answers) - 8)]}
    stats = trainer.rollout([0, 1, 2, 3])["stats"]
    assert stats["groups_without_signal"] == 0.25


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_grpo_resume_gives_the_same_parameters(sandbox_tokenizer, tmp_path):
    """Two passes of two minibatches per rollout batch and a KL to the reference: old and reference log-probs."""
    def trainer(out):
        model, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig, iterations=3, epochs=2, minibatch_size=8, beta=0.05)
        return GroupTrainer(model, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg, output_dir=out)

    straight = trainer(tmp_path / "a")
    straight_history = straight.train()
    trainer(tmp_path / "b").train(stop_at=2)
    resumed = trainer(tmp_path / "b")
    torch.manual_seed(4321)  # the resumed run must not depend on the global RNG
    resumed_history = resumed.train()
    assert resumed_history[0]["loss"] == pytest.approx(straight_history[2]["loss"], abs=1e-6)
    assert torch.allclose(params(straight.model), params(resumed.model), atol=1e-6)
    assert straight_history[1]["kl_k3"] > 0  # the reference is kept, and the policy moved away from it (k3 >= 0)


def test_a_config_refuses_another_familys_advantage(sandbox_tokenizer):
    model, prompts, cfg = setup(sandbox_tokenizer, RLOOConfig, advantage="grpo")
    with pytest.raises(ValueError, match="advantage 'grpo' is not one of rloo's"):
        GroupTrainer(model, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg)


@pytest.mark.parametrize("params, inputs, message", [
    ({}, {}, r"stages\[1\]: give params.reward_functions, an inputs.reward_model, or both"),
    ({"reward_functions": ["my_rewards.exact"]}, {}, "reward function 'my_rewards.exact': write it as module:function"),
    ({"reward_functions": ["m:f"], "reward_weights": {"m:g": 2.0}}, {}, r"reward_weights names \['m:g'\], which score nothing"),
    ({"reward_functions": ["m:f"], "grpo": {"group_size": 8, "epochz": 2}}, {}, r"params.grpo.epochz: unknown parameter"),
])
def test_a_grpo_stage_without_a_reward_or_with_a_bad_one_is_refused_at_load(tmp_path, params, inputs, message):
    import yaml

    from flows.config import ConfigError, load

    stages = [{"name": "base", "type": "model", "params": {"name_or_path": "x"}},
              {"name": "grpo", "type": "grpo", "inputs": {"policy": "base", **inputs}, "params": {"prompts_file": "p.txt", **params}}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"pipelines": {"p": {"stages": stages}}}))
    with pytest.raises(ConfigError, match=message):
        load(tmp_path / "p.yaml")


def test_dapo_steps_divide_by_the_rollouts_tokens_in_their_share(sandbox_tokenizer):
    """A rollout of 16 answers holding 50 answer tokens (over all processes), in steps of 8 answers: each dapo step's sum is divided by
    50 * 8 / 16 = 25 (TRL's num_items_in_batch / steps_per_generation), whatever its own 8 answers hold."""
    model, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig)  # 4 prompts x 4 answers, minibatches of 8
    trainer = GroupTrainer(model, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg)
    assert trainer.step_divisor(50.0, 8) == 25.0
    trainer.cfg = GRPOConfig(**{**cfg.__dict__, "loss_type": "grpo"})
    assert trainer.step_divisor(50.0, 8) is None  # a mean over the step's answers


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_a_grpo_minibatch_cut_in_micro_batches_gives_the_whole_minibatchs_gradient(sandbox_tokenizer, loss_type):
    """Where a minibatch runs out of memory its step goes in smaller micro-batches (Optimization.micro_cap): one
    answer at a time applies the gradient of the whole minibatch, for dapo's token mean over the rollout (each
    micro-batch weighs as its tokens against the rollout's divisor) and grpo's mean over answers."""
    model, prompts, cfg = setup(sandbox_tokenizer, GRPOConfig, iterations=1, beta=0.1, loss_type=loss_type)
    trainer = GroupTrainer(model, sandbox_tokenizer, prompts, {"short": shorter_is_better}, cfg)
    batch = trainer.rollout(trainer.prompt_sampler.global_batch(0))
    tokens, rows = batch.pop("tokens"), [0, 3, 5, 6, 9]
    batch.pop("stats")
    for row, cut in ((3, 5), (5, 9)):  # shorter answers there (an untrained policy writes all 12 tokens)
        batch["mask"][row, batch["mask"][row].nonzero().flatten()[-cut:]] = 0
    whole, in_twos = gradients_by_micro_cap(trainer.opt, lambda: trainer.update(batch, tokens, rows), (None, 2))
    assert torch.allclose(whole, in_twos, atol=1e-6) and whole.abs().max() > 0
