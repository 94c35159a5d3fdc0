"""The optimisation every trainer shares, against numbers worked by hand: the warm-up and decay
multipliers of the learning rate, gradient accumulation (the same update as the whole batch at once,
per-token losses included) and gradient clipping."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from alignment.trainers.common import Optimization, TrainConfig, lr_lambda
from alignment.trainers.sft import SFTConfig, SFTTrainer
from conftest import tiny_llama_config


def test_lr_multipliers_by_hand():
    # 4 warm-up steps, then 10 steps of decay (max_steps 14)
    cosine = lr_lambda(TrainConfig(max_steps=14, warmup_steps=4, lr_schedule="cosine"))
    # warm-up: (step + 1) / 4; decay: progress (step - 4) / 10; cosine 0.5 (1 + cos(pi progress))
    assert [cosine(s) for s in (0, 1, 3, 4)] == [0.25, 0.5, 1.0, 1.0]
    assert cosine(9) == pytest.approx(0.5)  # progress 0.5: 0.5 * (1 + cos(pi / 2))
    assert cosine(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))  # 0.904508
    assert cosine(6) == pytest.approx(0.904508, abs=1e-6)
    assert cosine(14) == pytest.approx(0.0, abs=1e-12) and cosine(20) == pytest.approx(0.0, abs=1e-12)  # held at the end
    linear = lr_lambda(TrainConfig(max_steps=14, warmup_steps=4, lr_schedule="linear"))
    assert [linear(s) for s in (0, 4, 9, 11, 14)] == [0.25, 1.0, 0.5, pytest.approx(0.3), 0.0]
    constant = lr_lambda(TrainConfig(max_steps=14, warmup_steps=0, lr_schedule="constant"))
    assert [constant(s) for s in (0, 7, 14)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        lr_lambda(TrainConfig(max_steps=14, warmup_steps=0, lr_schedule="cosin"))(3)


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


X = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0],
                  [-1.0, 0.0, 2.0], [3.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, -2.0, 1.0]])
Y = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0, 3.0, -2.0, 1.0])


def applied_gradients(opt: Optimization) -> list[torch.Tensor]:
    """Filled with the gradient the optimizer is about to apply, at every step (accumulated and clipped)."""
    seen = []
    opt.optimizer.optimizer.register_step_pre_hook(  # the torch optimizer inside accelerate's wrapper
        lambda optimizer, args, kwargs: seen.append(torch.cat([p.grad.flatten().clone() for p in opt.model.parameters()])))
    return seen


def gradients_at_each_step(opt: Optimization, micro_loss, steps: int, batch: list[int]) -> list[torch.Tensor]:
    seen = applied_gradients(opt)
    for _ in range(steps):
        opt.update(micro_loss, batch)
    return seen


def test_the_lr_of_each_step_is_the_peak_times_the_multiplier():
    opt = Optimization(linear_model(), TrainConfig(max_steps=14, batch_size=8, lr=1e-3, warmup_steps=4))
    lrs = [opt.update(lambda part: (((opt.model(X[part]).squeeze(-1) - Y[part]) ** 2).mean(), {}), list(range(8)))["lr"]
           for _ in range(6)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.1))])


def test_accumulating_four_micro_batches_of_two_is_one_batch_of_eight():
    def mse(opt):
        return lambda part: (((opt.model(X[part]).squeeze(-1) - Y[part]) ** 2).mean(), {})

    whole = Optimization(linear_model(), TrainConfig(max_steps=3, batch_size=8, lr=1e-2, warmup_steps=0, max_grad_norm=0))
    accumulated = Optimization(linear_model(), TrainConfig(max_steps=3, batch_size=8, grad_accum_steps=4, lr=1e-2, warmup_steps=0, max_grad_norm=0))
    assert accumulated.split(list(range(8))) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    g_whole = gradients_at_each_step(whole, mse(whole), 3, list(range(8)))
    g_accumulated = gradients_at_each_step(accumulated, mse(accumulated), 3, list(range(8)))
    # by hand at step 1: w = w0, gradient of mean (w.x + b - y)^2 = 2/8 sum (w.x_i + b - y_i) [x_i, 1]
    w0 = linear_model()
    r = (w0(X).squeeze(-1) - Y).detach()
    by_hand = torch.cat([2 / 8 * (r[:, None] * X).sum(0), (2 / 8 * r.sum()).reshape(1)])
    assert torch.allclose(g_whole[0], by_hand, atol=1e-6)
    for a, b in zip(g_whole, g_accumulated):
        assert torch.allclose(a, b, atol=1e-6)
    for p, q in zip(whole.model.parameters(), accumulated.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_micro_batch_out_of_memory_restarts_its_step_in_halves_with_the_same_gradient():
    """A micro-batch of more than 2 examples "runs out of memory" once the step's first micro-batch has added its
    gradient (the second of [0-3], [4-7]): the step starts again from zero gradients in micro-batches of 2, and so
    do the steps after it; every applied gradient is the whole batch's (were the first micro-batch's gradient
    kept, the first step's would count [0-3] twice). Several processes, or a token budget's split, re-raise."""
    def mse(opt, calls):
        def loss(part):
            calls.append(list(part))
            if len(part) > 2 and 4 in part:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return ((opt.model(X[part]).squeeze(-1) - Y[part]) ** 2).mean(), {}
        return loss

    cfg = TrainConfig(max_steps=3, batch_size=8, grad_accum_steps=2, lr=1e-2, warmup_steps=0, max_grad_norm=0)
    whole = Optimization(linear_model(), cfg)
    short, calls = Optimization(linear_model(), cfg), []
    g_whole = gradients_at_each_step(whole, lambda part: (((whole.model(X[part]).squeeze(-1) - Y[part]) ** 2).mean(), {}),
                                     3, list(range(8)))
    g_short = gradients_at_each_step(short, mse(short, calls), 3, list(range(8)))
    assert calls[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1]] and short.micro_cap == 2
    assert max(len(c) for c in calls[2:]) == 2 and len(calls) == 2 + 3 * 4
    for a, b in zip(g_whole, g_short):
        assert torch.allclose(a, b, atol=1e-6)
    budgeted = Optimization(linear_model(), dataclasses.replace(cfg, grad_accum_steps=1), micro_batch_tokens=4)
    budgeted.sampler(8, [1] * 8)  # 8 one-token rows: micro-batches [0-3], [4-7]
    assert budgeted.split(list(range(8))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(torch.OutOfMemoryError):  # the token budget's micro-batches are its own: lower it
        budgeted.update(mse(budgeted, []), list(range(8)))


def test_accumulation_weighs_per_token_losses_by_tokens():
    """SFT's loss is the mean over answer tokens. Micro-batches whose answers differ in length must be
    weighted by their tokens, not by their examples, or accumulation changes the update (the bug that
    transformers fixed in 4.46): 2 + 9 tokens in one half of the batch, 4 + 4 in the other."""
    examples = [([1, 5], [7, 8]), ([1, 6], [7, 8, 9, 10, 11, 12, 13, 8, 2]), ([1, 5, 6], [9, 8, 7, 2]), ([1, 7], [8, 9, 10, 2])]

    def sft(accumulate: int) -> SFTTrainer:
        torch.manual_seed(0)
        cfg = SFTConfig(TrainConfig(max_steps=2, batch_size=4, grad_accum_steps=accumulate, lr=1e-2, warmup_steps=0, max_grad_norm=0,
                                    group_by_length=False))
        return SFTTrainer(LlamaForCausalLM(tiny_llama_config()), examples, 0, cfg)

    whole, accumulated = sft(1), sft(2)
    g_whole, g_accumulated = applied_gradients(whole.opt), applied_gradients(accumulated.opt)
    whole.train()
    accumulated.train()
    assert accumulated.opt.split(whole.sampler.batch(0)) != [whole.sampler.batch(0)]  # two micro-batches ...
    assert {len(examples[i][1]) for i in whole.sampler.batch(0)} == {2, 9, 4}  # ... of answers of unequal length
    assert len(g_whole) == len(g_accumulated) == 2
    for a, b in zip(g_whole, g_accumulated):  # (the parameters after Adam would amplify float noise in
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()  # near-zero gradients: compare gradients)


def test_clipping_holds_at_max_grad_norm():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    opt = Optimization(model, TrainConfig(max_steps=2, batch_size=1, lr=1e-3, warmup_steps=0, max_grad_norm=1.0))
    x = torch.tensor([[3.0, 4.0]])
    # loss = w . x: the gradient is x = (3, 4), norm 5; clipped to norm 1: (0.6, 0.8)
    [applied] = gradients_at_each_step(opt, lambda part: (opt.model(x).sum(), {}), 1, [0])
    assert torch.allclose(applied, torch.tensor([0.6, 0.8]), atol=1e-6)
    metrics = opt.update(lambda part: (opt.model(x).sum(), {}), [0])
    assert metrics["grad_norm"] == pytest.approx(5.0)  # the norm before clipping, as TRL and accelerate report it
    unclipped = Optimization(torch.nn.Linear(2, 1, bias=False), TrainConfig(max_steps=1, batch_size=1, lr=1e-3, max_grad_norm=0))
    [raw] = gradients_at_each_step(unclipped, lambda part: (unclipped.model(x).sum(), {}), 1, [0])
    assert torch.allclose(raw, torch.tensor([3.0, 4.0]))  # max_grad_norm 0: no clipping


def test_accumulation_weighs_prompt_groups_by_their_pairs():
    """A grouped reward-model batch is a mean over pairs, and prompt groups hold different numbers of
    pairs (3 + 1 in one half of the batch, 1 + 2 in the other): micro-batches are weighted by pairs."""
    from transformers import LlamaForSequenceClassification

    from alignment.data import PairExample
    from alignment.models import RewardModel
    from alignment.trainers.reward import RewardConfig, RewardTrainer

    a, b, c, d = [1, 5], [1, 6], [1, 7, 5], [1, 8]
    pairs = [PairExample(a, [10, 2], [11, 2]), PairExample(a, [10, 2], [12, 13, 2]), PairExample(a, [11, 2], [12, 13, 2]),
             PairExample(b, [9, 2], [14, 2]), PairExample(c, [10, 12, 2], [9, 2]), PairExample(c, [10, 12, 2], [15, 2]),
             PairExample(d, [16, 2], [17, 18, 2])]

    def rm(accumulate: int) -> RewardTrainer:
        torch.manual_seed(0)
        cfg = RewardConfig(TrainConfig(max_steps=2, batch_size=4, grad_accum_steps=accumulate, lr=1e-3, warmup_steps=0,
                                       max_grad_norm=0, group_by_length=False), group_by_prompt=True)
        return RewardTrainer(RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1))), pairs, 0, cfg)

    whole, accumulated = rm(1), rm(2)
    halves = accumulated.opt.split(accumulated.sampler.batch(0))
    assert sorted(accumulated.micro_size(h) for h in halves) != [2, 2]  # the halves hold unequal numbers of pairs
    g_whole, g_accumulated = applied_gradients(whole.opt), applied_gradients(accumulated.opt)
    whole.train()
    accumulated.train()
    assert len(g_whole) == len(g_accumulated) == 2
    for x, y in zip(g_whole, g_accumulated):
        assert torch.allclose(x, y, atol=1e-6), (x - y).abs().max()


def test_a_given_divisor_replaces_the_batch_size_in_the_gradient_not_in_the_metrics():
    """GRPO's dapo steps divide by the rollout's tokens per step, not their own: a step holding 6 tokens of a
    rollout of 24 in 2 steps (12 a step) gives the gradient of sum / 12, while its reported loss stays its own
    mean. Loss = 3 w (a mean over 6 tokens): gradient 3 * 6 / 12 = 1.5 (no clipping); without: 3."""
    for given, grad in ((12.0, 1.5), (None, 3.0)):
        model = torch.nn.Linear(1, 1, bias=False)
        opt = Optimization(model, TrainConfig(max_steps=1, batch_size=1, lr=0.0, max_grad_norm=0.0))
        metrics = opt.update(lambda part: (3.0 * opt.model.weight.sum() + 1.0, {}), [0], size=lambda part: 6.0, total=given)
        assert metrics["grad_norm"] == pytest.approx(grad)
        assert metrics["loss"] == pytest.approx(3.0 * float(model.weight) + 1.0, abs=1e-6)


def test_a_trainer_keeps_its_mixed_precision_when_a_concurrent_stage_sets_another():
    """Stages in threads of one process (settings.concurrent_stages): a bf16 trainer, then one with "no" made in
    another thread (accelerate resets its one shared state for it). The first still reports bf16 (what its fp16
    gradient unscaling reads), its update still runs under bf16 autocast, and the second runs without."""
    import threading

    seen = {}

    def loss_of(name, opt):
        def micro(part):
            seen[name] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            return ((opt.model(X[part]).squeeze(-1).float() - Y[part]) ** 2).mean(), {}
        return micro

    first = Optimization(linear_model(), TrainConfig(max_steps=2, batch_size=8, mixed_precision="bf16"))
    made = {}
    other = threading.Thread(target=lambda: made.update(
        second=Optimization(linear_model(), TrainConfig(max_steps=2, batch_size=8, mixed_precision="no"))))
    other.start()
    other.join()
    second = made["second"]
    assert (first.accelerator.mixed_precision, second.accelerator.mixed_precision) == ("bf16", "no")
    first.update(loss_of("first", first), list(range(8)))
    second.update(loss_of("second", second), list(range(8)))
    assert seen["first"] == (True, torch.bfloat16)
    assert seen["second"][0] is False
    assert first.accelerator.device == second.accelerator.device == torch.device("cpu")
