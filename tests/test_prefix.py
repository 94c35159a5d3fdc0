"""Shared-prefix pair batches give the same rewards and log-probs as scoring each answer in its own row."""

import pytest
import torch
from transformers import (
    GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM, LlamaForSequenceClassification,
    Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification,
)

from alignment.data import PairExample
from alignment.models import RewardModel
from alignment.prefix import collate_groups, collate_shared_prefix, group_by_prompt, pair_values, shared_prefix_logps
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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager adds its mask: a boolean one would mask nothing
@pytest.mark.parametrize("family", sorted(LMS))
def test_shared_prefix_logps_equal_separate_rows(family, attention):
    torch.manual_seed(0)
    model = LMS[family]().eval()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        chosen, rejected = shared_prefix_logps(model, collate_shared_prefix(PAIRS, pad_id=0)).unbind(-1)
        for i, e in enumerate(PAIRS):
            assert chosen[i].item() == pytest.approx(alone_logp(model, e.prompt_ids, e.chosen_ids), abs=1e-4)
            assert rejected[i].item() == pytest.approx(alone_logp(model, e.prompt_ids, e.rejected_ids), abs=1e-4)
    # answers of different content get different log-probs: the check is not vacuous
    assert abs(chosen[0] - rejected[0]) > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_shared_prefix_rewards_equal_separate_rows(family, attention):
    torch.manual_seed(0)
    rm = RewardModel(CLASSIFIERS[family]()).eval()
    rm.model.set_attn_implementation(attention)
    with torch.no_grad():
        chosen, rejected = rm(shared=collate_shared_prefix(PAIRS, pad_id=0)).unbind(-1)
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
    assert batch.answer_last.tolist() == [[5, 7]]


# Two prompts; the first has four distinct answers over five labeled pairs (one answer repeated across pairs).
GROUPED = [
    PairExample([1, 5, 6], [7, 8, 2], [9, 2]),
    PairExample([1, 10], [11, 12, 2], [13, 2]),
    PairExample([1, 5, 6], [9, 2], [14, 15, 16, 2]),
    PairExample([1, 5, 6], [17, 2], [7, 8, 2]),
    PairExample([1, 5, 6], [7, 8, 2], [14, 15, 16, 2]),
    PairExample([1, 5, 6], [17, 2], [9, 2]),
]


def test_group_by_prompt_scores_each_answer_once_and_keeps_every_pair():
    groups = group_by_prompt(GROUPED)
    assert [g.prompt_ids for g in groups] == [(1, 5, 6), (1, 10)]
    assert groups[0].answers == ((7, 8, 2), (9, 2), (14, 15, 16, 2), (17, 2))
    assert groups[0].pairs == ((0, 1), (1, 2), (3, 0), (0, 2), (3, 1))
    assert groups[1].pairs == ((0, 1),)
    assert groups[0].tokens == 3 + 3 + 2 + 4 + 2
    # a cap on answers per row splits a prompt's pairs over several groups, each pair in exactly one
    capped = group_by_prompt(GROUPED, max_answers=3)
    assert max(len(g.answers) for g in capped) == 3
    labeled = sorted((g.prompt_ids, g.answers[w], g.answers[l]) for g in capped for w, l in g.pairs)
    assert labeled == sorted((tuple(e.prompt_ids), tuple(e.chosen_ids), tuple(e.rejected_ids)) for e in GROUPED)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_grouped_rows_equal_separate_rows(family):
    """Every answer of a group row gets the log-prob and the reward it gets alone after its prompt."""
    torch.manual_seed(0)
    model, rm = LMS[family]().eval(), RewardModel(CLASSIFIERS[family]()).eval()
    groups = group_by_prompt(GROUPED)
    batch = collate_groups(groups, pad_id=0)
    with torch.no_grad():
        logps, rewards = shared_prefix_logps(model, batch), rm(shared=batch)  # [2, 4]
        for b, g in enumerate(groups):
            for k, answer in enumerate(g.answers):
                assert logps[b, k].item() == pytest.approx(alone_logp(model, list(g.prompt_ids), list(answer)), abs=1e-4)
                assert rewards[b, k].item() == pytest.approx(alone_reward(rm, list(g.prompt_ids), list(answer)), abs=1e-5)
        assert logps[1, 2:].abs().max() == 0  # the second prompt has two answers: the other slots are empty
        chosen, rejected = pair_values(rewards, groups)
    for i, (w, l) in enumerate([p for g in groups for p in g.pairs]):
        assert chosen[i] == rewards[0 if i < 5 else 1, w] and rejected[i] == rewards[0 if i < 5 else 1, l]


def test_grouped_reward_loss_is_the_bradley_terry_mean_over_all_pairs():
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.reward import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    rm = RewardModel(CLASSIFIERS["llama"]()).eval()
    trainer = RewardTrainer(rm, GROUPED, 0, RewardConfig(TrainConfig(max_steps=1, batch_size=2), group_by_prompt=True))
    assert len(trainer.groups) == 2 and trainer.sampler.n == 2  # a batch element is a prompt
    with torch.no_grad():
        loss, metrics = trainer.micro_loss([0, 1])
        # independent: each pair scored in its own rows, -log sigma(r_w - r_l) averaged over the 6 pairs
        diffs = [alone_reward(rm, e.prompt_ids, e.chosen_ids) - alone_reward(rm, e.prompt_ids, e.rejected_ids) for e in GROUPED]
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(d, dtype=torch.float64)) for d in diffs) / len(diffs)
    assert loss.item() == pytest.approx(float(expected), abs=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(sum(d > 0 for d in diffs) / 6)


def test_grouped_dpo_loss_equals_the_dpo_loss_of_each_pair():
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.dpo import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    policy, reference = LMS["llama"]().eval(), LMS["llama"]().eval()  # two different random models
    beta = 0.3
    cfg = DPOConfig(TrainConfig(max_steps=1, batch_size=2), beta=beta, group_by_prompt=True)
    trainer = DPOTrainer(policy, GROUPED, 0, cfg, ref_model=reference)
    assert trainer.reference_logps.shape == (2, 4)  # precomputed per answer of each group
    with torch.no_grad():
        loss, metrics = trainer.micro_loss([1, 0])
        margins = []
        for e in GROUPED:  # independent: log-ratios of each answer in its own row, Eq. of DPO per pair
            ratio_w = alone_logp(policy, e.prompt_ids, e.chosen_ids) - alone_logp(reference, e.prompt_ids, e.chosen_ids)
            ratio_l = alone_logp(policy, e.prompt_ids, e.rejected_ids) - alone_logp(reference, e.prompt_ids, e.rejected_ids)
            margins.append(beta * (ratio_w - ratio_l))
    expected = sum(-torch.nn.functional.logsigmoid(torch.tensor(m, dtype=torch.float64)) for m in margins) / len(margins)
    assert loss.item() == pytest.approx(float(expected), abs=1e-4)
    assert metrics["rewards/margin"].item() == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert abs(float(expected) - 0.6931) > 1e-3  # the policy differs from the reference: not log 2 by construction


def test_pack_rows_by_hand():
    """First fit, longest first, into bins of the longest row's length; each bin in the rows' order."""
    from alignment.prefix import pack_rows

    # lengths 7, 3, 4, 2, 7, 1 into 7: 7 | 7 | 4+3 | 2+1 (the 3 joins the 4's bin, the 1 the 2's)
    assert pack_rows([7, 3, 4, 2, 7, 1], 7) == [[0], [1, 2], [3, 5], [4]]
    assert pack_rows([5], 5) == [[0]]
    assert pack_rows([9, 2], 5) == [[0], [1]]  # too long for the capacity: alone


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_packed_rows_give_every_answer_what_it_gets_unpacked(family):
    """Several groups in one row (packing) change no log-prob, reward or gradient: each group attends only to
    itself and its positions restart at 0. The batch holds fewer rows, and so less padding."""
    from alignment.prefix import collate_answers_shared

    torch.manual_seed(0)
    model, rm = LMS[family]().eval(), RewardModel(CLASSIFIERS[family]()).eval()  # eval: no dropout; gradients still flow
    rows = [((1, 5, 6), ((7, 8, 2), (9, 2))), ((1, 10), ((11, 2),)), ((1, 3, 4, 5, 6, 7, 8, 9, 10), ((8, 2), (8, 9, 2))),
            ((1, 4), ((5, 2), (6, 2))), ((1,), ((12, 13, 2),))]  # lengths 8, 4, 14, 6, 4: three rows of 14, not five
    plain, packed = collate_answers_shared(rows, pad_id=0), collate_answers_shared(rows, pad_id=0, pack=True)
    assert tuple(packed.input_ids.shape) == (3, 14) and tuple(plain.input_ids.shape) == (5, 14)
    assert int((packed.input_ids != 0).sum()) == int((plain.input_ids != 0).sum()) == 36  # the same tokens, 6 pads not 34
    for net, fn in ((model, shared_prefix_logps), (rm, lambda m, b: m(shared=b))):
        out = []
        for batch in (plain, packed):
            net.zero_grad()
            values = fn(net, batch)  # [5, 2]
            (values * torch.arange(1, 11.0).view(5, 2)).sum().backward()
            out.append((values.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
        assert torch.allclose(out[0][0], out[1][0], atol=1e-5), (out[0][0], out[1][0])
        assert out[0][0].abs().min() > 0 if net is rm else out[0][0][1, 1] == 0  # log-probs: an empty slot is 0
        assert len(out[0][1]) == len(out[1][1]) > 0
        for a, b in zip(out[0][1], out[1][1]):
            assert torch.allclose(a, b, atol=1e-5)


def trained(make, inputs: list | None = None, **kw):
    """(the losses, the final weights flattened) of a trainer make(**kw) after train(); `inputs` collects the
    shape of every input_ids its backbone reads."""
    torch.manual_seed(0)
    trainer = make(**kw)
    if inputs is not None:
        backbone = getattr(trainer.model, "model", trainer.model).base_model  # a RewardModel's classifier, or the LM
        backbone.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    losses = [h["loss"] for h in trainer.train()]
    return losses, torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_sft_dpo_and_reward_training_with_packing_take_the_steps_they_take_without():
    """packing: true is a layout, not a change of the objective: 3 steps of DPO (pairs, and prompt groups), of the
    reward model and of SFT give the losses and the weights they give unpacked, to float tolerance. And it refuses a layout it
    cannot pack."""
    from transformers import LlamaForSequenceClassification

    from alignment.config import DPOConfig, RewardConfig, SFTConfig, TrainConfig
    from alignment.trainers.dpo import DPOTrainer
    from alignment.trainers.reward import RewardTrainer
    from alignment.trainers.sft import SFTTrainer

    pairs = PAIRS + GROUPED  # prompts of 2 to 6 tokens, answers of 2 to 5
    train = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, group_by_length=False)
    for grouped in (False, True):
        dpo = lambda packing: DPOTrainer(LlamaForCausalLM(tiny_llama_config()), pairs, 0, DPOConfig(
            train, beta=0.5, group_by_prompt=grouped, packing=packing))
        (plain_losses, plain_weights), (packed_losses, packed_weights) = trained(dpo, packing=False), trained(dpo, packing=True)
        assert plain_losses == pytest.approx(packed_losses, abs=1e-5) and plain_losses[0] != pytest.approx(plain_losses[-1])
        assert torch.allclose(plain_weights, packed_weights, atol=1e-5)
    rm = lambda packing: RewardTrainer(RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1))), pairs, 0,
                                       RewardConfig(train, packing=packing))
    (plain_losses, plain_weights), (packed_losses, packed_weights) = trained(rm, packing=False), trained(rm, packing=True)
    assert plain_losses == pytest.approx(packed_losses, abs=1e-5)
    assert torch.allclose(plain_weights, packed_weights, atol=1e-5)
    sft = lambda packing: SFTTrainer(LlamaForCausalLM(tiny_llama_config()), [(e.prompt_ids, e.chosen_ids) for e in pairs]
                                     + [(e.prompt_ids, e.rejected_ids) for e in pairs], 0, SFTConfig(train, packing=packing))
    (plain_losses, plain_weights), (packed_losses, packed_weights) = trained(sft, packing=False), trained(sft, packing=True)
    assert plain_losses == pytest.approx(packed_losses, abs=1e-5) and plain_losses[0] != pytest.approx(plain_losses[-1])
    assert torch.allclose(plain_weights, packed_weights, atol=1e-5)
    with pytest.raises(ValueError, match="packing .* needs shared_prefix"):
        DPOConfig(shared_prefix=False, packing=True)


def test_group_by_prompt_under_a_token_budget_splits_a_prompt_before_its_row_grows_past_it():
    """Worked by hand on GROUPED with max_tokens 12: prompt (1, 5, 6) takes answers 7 8 2, 9 2 (8 tokens), then
    14 15 16 2 (12); the 4th pair's new answer 17 2 would make 14, so that group closes and a new one starts (17 2,
    7 8 2: 8; then 14 15 16 2: 12); the last pair's 9 2 would make 14 again: a third group. (1, 10) stays whole."""
    groups = group_by_prompt(GROUPED, max_tokens=12)
    assert [g.prompt_ids for g in groups] == [(1, 5, 6), (1, 5, 6), (1, 5, 6), (1, 10)]
    assert [g.tokens for g in groups] == [12, 12, 7, 7]
    assert [g.answers for g in groups[:3]] == [((7, 8, 2), (9, 2), (14, 15, 16, 2)), ((17, 2), (7, 8, 2), (14, 15, 16, 2)),
                                              ((17, 2), (9, 2))]
    assert [g.pairs for g in groups] == [((0, 1), (1, 2)), ((0, 1), (1, 2)), ((0, 1),), ((0, 1),)]
    labeled = sorted((g.prompt_ids, g.answers[w], g.answers[l]) for g in groups for w, l in g.pairs)
    assert labeled == sorted((tuple(e.prompt_ids), tuple(e.chosen_ids), tuple(e.rejected_ids)) for e in GROUPED)


def test_token_budget_split_by_hand():
    """A step's rows into micro-batches of at most the budget (first fit, longest first), named by row index;
    a row over the budget is refused with what to do."""
    from alignment.trainers.rows import token_budget_split

    split = token_budget_split([7, 3, 4, 2, 7, 1], 7)
    assert split([0, 1, 2, 3, 4, 5]) == [[0], [1, 2], [3, 5], [4]]
    assert split([5, 2, 3]) == [[5, 2, 3]]  # 1 + 4 + 2 = 7: one micro-batch
    assert split([4, 2, 3, 0]) == [[4], [2, 3], [0]]  # 7 | 4 + 2 | 7: bins in the order of their first row in the step
    with pytest.raises(ValueError, match=r"1 pair\(s\) are longer than micro_batch_tokens=6 .* pair 1, is 9 tokens.*at least 9"):
        token_budget_split([5, 9, 2], 6, "pair")


def test_a_token_budget_packs_each_step_into_rows_of_its_width_and_takes_the_same_steps():
    """micro_batch_tokens: every micro-batch the backbone reads is ONE row of exactly the budget (16 tokens), a
    step's 4 examples spread over as many such rows as they need (accumulated, weighed by pairs or tokens), and
    3 steps of DPO (pairs, prompt groups), the reward model and SFT give the losses and weights of unpacked
    training. A budget under what max_length allows, or beside grad_accum_steps, is refused at configuration."""
    from transformers import LlamaForSequenceClassification

    from alignment.config import DPOConfig, RewardConfig, SFTConfig, TrainConfig
    from alignment.trainers.dpo import DPOTrainer
    from alignment.trainers.reward import RewardTrainer
    from alignment.trainers.sft import SFTTrainer

    pairs = PAIRS + GROUPED  # rows of 7 to 11 tokens; prompt groups of 11 to 16
    train = TrainConfig(max_steps=3, batch_size=4, lr=1e-2, group_by_length=False)
    demos = [(e.prompt_ids, e.chosen_ids) for e in pairs] + [(e.prompt_ids, e.rejected_ids) for e in pairs]
    makers = {
        "dpo": lambda budget: DPOTrainer(LlamaForCausalLM(tiny_llama_config()), pairs, 0, DPOConfig(
            train, beta=0.5, max_length=8, packing=budget > 0, micro_batch_tokens=budget)),
        "dpo groups": lambda budget: DPOTrainer(LlamaForCausalLM(tiny_llama_config()), pairs, 0, DPOConfig(
            train, beta=0.5, max_length=8, group_by_prompt=True, packing=budget > 0, micro_batch_tokens=budget)),
        "reward model": lambda budget: RewardTrainer(RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1))),
                                                     pairs, 0, RewardConfig(train, max_length=8, packing=budget > 0, micro_batch_tokens=budget)),
        "sft": lambda budget: SFTTrainer(LlamaForCausalLM(tiny_llama_config()), demos, 0, SFTConfig(
            train, max_length=16, packing=budget > 0, micro_batch_tokens=budget)),
    }
    for name, make in makers.items():
        inputs = []
        (plain_losses, plain_weights), (budget_losses, budget_weights) = trained(make, budget=0), trained(make, inputs, budget=16)
        assert set(inputs) == {(1, 16)}, name
        assert len(inputs) > 3, name  # more than one micro-batch a step: the accumulation is exercised
        assert plain_losses == pytest.approx(budget_losses, abs=1e-5) and plain_losses[0] != pytest.approx(plain_losses[-1]), name
        assert torch.allclose(plain_weights, budget_weights, atol=1e-5), name
    with pytest.raises(ValueError, match=r"micro_batch_tokens 100 is less than 2 x max_length \(128\)"):
        DPOConfig(max_length=64, packing=True, micro_batch_tokens=100)
    with pytest.raises(ValueError, match="micro_batch_tokens 100 is less than max_length"):
        SFTConfig(packing=True, micro_batch_tokens=100)
    with pytest.raises(ValueError, match="needs packing: true"):
        RewardConfig(max_length=64, micro_batch_tokens=128)
    with pytest.raises(ValueError, match="set one of them"):
        RewardConfig(TrainConfig(max_steps=1, grad_accum_steps=2), max_length=64, packing=True, micro_batch_tokens=128)


def test_under_a_token_budget_a_compiled_backbone_is_compiled_once_for_every_step():
    """train.compile with micro_batch_tokens: every micro-batch is one row of the budget, so the backbone is compiled
    for that one shape (dynamic=False) and no later step recompiles (dynamo raises if one does: it did when packed
    rows of varying width were compiled statically); the losses are eager's."""
    import random

    from alignment.config import SFTConfig, TrainConfig
    from alignment.trainers.sft import SFTTrainer

    rng = random.Random(0)
    demos = [([1] + [rng.randrange(3, 40) for _ in range(rng.randrange(2, 12))],
              [rng.randrange(3, 40) for _ in range(rng.randrange(2, 12))] + [2]) for _ in range(32)]
    def losses(compile: bool) -> list[float]:
        torch.manual_seed(0)
        trainer = SFTTrainer(LlamaForCausalLM(tiny_llama_config()), demos, 0, SFTConfig(
            TrainConfig(max_steps=4, batch_size=8, lr=1e-3, group_by_length=False, compile=compile), max_length=32,
            packing=True, micro_batch_tokens=48))
        trainer.callback = lambda step, metrics: setattr(torch._dynamo.config, "error_on_recompile", compile)
        return [h["loss"] for h in trainer.train()]

    with torch._dynamo.config.patch(error_on_recompile=False):  # what the callback sets is undone after the test
        eager, compiled = losses(False), losses(True)
    assert compiled == pytest.approx(eager, abs=1e-5) and eager[0] != pytest.approx(eager[-1])


def test_a_flex_attention_model_reads_shared_prefix_and_packed_rows_through_a_block_mask():
    """attn_implementation="flex_attention": the shared-prefix rule goes in as a BlockMask (no dense mask is built)
    and gives the log-probs and rewards of the dense-mask path, for pairs and for packed groups (forward only: torch
    has no FlexAttention backward on a CPU, so training there is refused with a sentence)."""
    from torch.nn.attention.flex_attention import BlockMask

    from alignment import prefix
    from alignment.prefix import collate_answers_shared

    torch.manual_seed(0)
    model, rm = LMS["llama"]().eval(), RewardModel(CLASSIFIERS["llama"]()).eval()
    rows = [((1, 5, 6), ((7, 8, 2), (9, 2))), ((1, 10), ((11, 2),)), ((1, 3, 4, 5, 6, 7, 8, 9, 10), ((8, 2), (8, 9, 2))),
            ((1, 4), ((5, 2), (6, 2)))]
    batches = [collate_shared_prefix(PAIRS, pad_id=0), collate_answers_shared(rows, pad_id=0, pack=True)]
    with torch.no_grad():
        dense = [(shared_prefix_logps(model, b), rm(shared=b)) for b in batches]
        for net in (model, rm.model):
            net.set_attn_implementation("flex_attention")
        masks = []
        real = prefix.block_mask
        prefix.block_mask = lambda b: masks.append(real(b)) or masks[-1]
        try:
            flex = [(shared_prefix_logps(model, b), rm(shared=b)) for b in batches]
        finally:
            prefix.block_mask = real
    assert len(masks) == 4 and all(isinstance(m, BlockMask) for m in masks)
    for (logps, rewards), (flex_logps, flex_rewards) in zip(dense, flex):
        assert torch.allclose(flex_logps, logps, atol=1e-5) and torch.allclose(flex_rewards, rewards, atol=1e-5)
    assert dense[0][0].abs().min() > 0.1  # real log-probs: the comparison is not of zeros
    with pytest.raises(ValueError, match="FlexAttention cannot train on a CPU"):
        shared_prefix_logps(model, batches[0])


@pytest.mark.parametrize("family", sorted(LMS))
def test_models_set_to_segments_read_shared_prefix_rows_with_the_dense_masks_numbers_and_gradients(family):
    """A model set to SEGMENTS attends each prompt ++ first answer causally and each later answer against its prompt
    and itself: no [R, 1, L, L] mask is formed, and the log-probs, rewards and gradients equal the dense-mask path's,
    for pairs, for groups of one to three answers a row, and for such groups packed (Qwen2: grouped key/value heads)."""
    import dataclasses

    from alignment.prefix import SEGMENTS, collate_answers_shared, use_segments

    rows = [((1, 5, 6), ((7, 8, 2), (9, 2))), ((1, 10), ((11, 2),)), ((1, 3, 4, 5, 6, 7, 8, 9, 10), ((8, 2), (8, 9, 2), (4, 2))),
            ((1, 4), ((5, 2), (6, 2)))]
    torch.manual_seed(0)
    model, rm = LMS[family]().eval(), RewardModel(CLASSIFIERS[family]()).eval()  # eval: no dropout (GPT-2's), still gradients
    for net in (model, rm.model):
        use_segments(net)
    batches = (collate_shared_prefix(PAIRS, pad_id=0), collate_answers_shared(rows, pad_id=0),  # heads read in place
               collate_answers_shared(rows, pad_id=0, pack=True))  # heads gathered
    for batch in batches:
        dense = dataclasses.replace(batch, spans=None)  # the same batch without its segments: the mask
        # (a call without segments is plain SDPA, so the same model gives the mask path's numbers)
        results = []
        for b in (batch, dense):
            logps, rewards = shared_prefix_logps(model, b), rm(shared=b)
            (logps.sum() + rewards.sum()).backward()
            results.append((logps.detach(), rewards.detach(), [p.grad.clone() for net in (model, rm) for p in net.parameters()]))
            model.zero_grad(), rm.zero_grad()
        assert "attention_mask" not in batch.__dict__ and "attention_mask" in dense.__dict__  # segments built no mask
        assert "segments" in batch.__dict__ and "segments" not in dense.__dict__  # and the mask path no segments
        assert model.config._attn_implementation == SEGMENTS == rm.model.config._attn_implementation
        (logps, rewards, grads), (dense_logps, dense_rewards, dense_grads) = results
        assert torch.allclose(logps, dense_logps, atol=1e-5) and torch.allclose(rewards, dense_rewards, atol=1e-5)
        assert all(torch.allclose(g, d, atol=1e-5) for g, d in zip(grads, dense_grads))
        real = batch.target_mask.sum(-1) > 0  # [B, K] the answers a group has
        assert dense_logps[real].abs().min() > 0.1 and max(g.abs().max() for g in dense_grads) > 1e-3  # not zeros


@pytest.mark.parametrize("group_by_prompt", [False, True])
def test_on_a_cpu_the_dpo_and_reward_trainers_read_segments_and_train_as_the_mask_does(group_by_prompt):
    """On a CPU the DPO and reward-model trainers set an SDPA model to segments (segments_on_cpu), and a model set to
    eager attention keeps it and reads the dense mask: the two give the same losses and weights, step by step. A
    model to be compiled keeps SDPA's mask."""
    from alignment.prefix import SEGMENTS
    from alignment.trainers.common import TrainConfig
    from alignment.trainers.dpo import DPOConfig, DPOTrainer
    from alignment.trainers.reward import RewardConfig, RewardTrainer

    pairs = [PairExample([1, 5 + i % 3, 6][: 2 + i % 2], [10 + i % 4, 12, 2], [11, 12 + i % 3, 13, 2]) for i in range(8)]
    pairs += [PairExample([1, 5], [10, 12, 2], [14, 2]), PairExample([1, 5], [14, 2], [11, 2])]  # prompt (1, 5): 3 answers
    train = TrainConfig(max_steps=3, batch_size=4, lr=1e-2)
    runs = {}
    for attention in ("sdpa", "eager"):
        torch.manual_seed(0)
        policy, rm = LlamaForCausalLM(tiny_llama_config()), RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1)))
        for net in (policy, rm.model):
            net.set_attn_implementation(attention)
        start = [p.detach().clone() for net in (policy, rm) for p in net.parameters()]
        dpo = DPOTrainer(policy, pairs, 0, DPOConfig(train, beta=0.5, group_by_prompt=group_by_prompt))
        reward = RewardTrainer(rm, pairs, 0, RewardConfig(train, group_by_prompt=group_by_prompt))
        losses = [m["loss"] for m in dpo.train() + reward.train()]
        weights = [p.detach().clone() for net in (policy, rm) for p in net.parameters()]
        assert max((w - w0).abs().max() for w, w0 in zip(weights, start)) > 1e-3  # they trained
        runs[attention] = (losses, weights, policy.config._attn_implementation, rm.model.config._attn_implementation)
    (losses, weights, *impl), (mask_losses, mask_weights, *mask_impl) = runs["sdpa"], runs["eager"]
    assert impl == [SEGMENTS, SEGMENTS] and mask_impl == ["eager", "eager"]
    assert losses == pytest.approx(mask_losses, abs=1e-5) and len(losses) == 6
    # (Adam divides by each gradient's own size: float-rounding differences of tiny gradients grow to 1e-5)
    assert all(torch.allclose(w, m, atol=1e-4) for w, m in zip(weights, mask_weights))
    # a model to be compiled keeps the mask (inductor fails on the heads' strided slices); nothing is compiled yet
    compiled = TrainConfig(max_steps=1, batch_size=4, compile=True)
    policy, rm = LlamaForCausalLM(tiny_llama_config()), RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1)))
    DPOTrainer(policy, pairs, 0, DPOConfig(compiled, group_by_prompt=group_by_prompt))
    RewardTrainer(rm, pairs, 0, RewardConfig(compiled, group_by_prompt=group_by_prompt))
    assert policy.config._attn_implementation == rm.model.config._attn_implementation == "sdpa"


def test_segment_layout_by_hand():
    """Packed: three groups in rows as long as the longest (6): prompt (1, 5) with answers (7, 2) and (9, 2) fills
    row 0; prompt (1,) with answer (4, 2) and prompt (3,) with answer (8,) share row 1 (flattened 6-11), one pad
    last. Each group's head (prompt ++ first answer) is gathered into a sequence of 4; the one later answer, (9, 2),
    is a tail: its 2 queries against its prompt and itself, token j seeing 2 + j keys. Outputs: the heads' 3 x 4
    slots, then the tail's 2; the pad reads slot 0.
    Unpacked: each row is one group from its first position, so the heads are the rows' first 4 positions, read in
    place (no index), and the two rejected answers are the tails."""
    from alignment.prefix import collate_answers_shared

    batch = collate_answers_shared([((1, 5), ((7, 2), (9, 2))), ((1,), ((4, 2),)), ((3,), ((8,),))], pad_id=0, pack=True)
    assert batch.input_ids.tolist() == [[1, 5, 7, 2, 9, 2], [1, 4, 2, 3, 8, 0]]
    assert batch.spans == ((0, 2, 2, 2), (0, 2, 4, 2), (6, 1, 7, 2), (9, 1, 10, 1))
    layout = batch.segments
    assert layout.head_width == 4 and layout.head_index.tolist() == [[0, 1, 2, 3], [6, 7, 8, 0], [9, 10, 0, 0]]
    assert layout.tail_q.tolist() == [[4, 5]] and layout.tail_kv.tolist() == [[0, 1, 4, 5]]
    assert layout.tail_mask.tolist() == [[[[True, True, True, False], [True, True, True, True]]]]
    assert layout.owner.tolist() == [0, 1, 2, 3, 12, 13, 4, 5, 6, 8, 9, 0]

    batch = collate_answers_shared([((1, 5), ((7, 2), (9,))), ((3,), ((8, 2), (4, 2)))], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 7, 2, 9], [3, 8, 2, 4, 2]]
    layout = batch.segments
    assert layout.head_width == 4 and layout.head_index is None
    assert layout.tail_q.tolist() == [[4, 0], [8, 9]] and layout.tail_kv.tolist() == [[0, 1, 4], [5, 8, 9]]
    assert layout.tail_mask.squeeze(1).tolist() == [[[True] * 3, [True] * 3], [[True, True, False], [True] * 3]]
    assert layout.owner.tolist() == [0, 1, 2, 3, 8, 4, 5, 6, 10, 11]
    assert collate_answers_shared([((1, 5), ((7, 2),))], pad_id=0, pack=8).spans is None  # a fixed width: the mask


def test_a_model_whose_attention_never_sees_the_segments_reads_the_mask():
    """A model that takes the segments and drops them (as one whose attention does not go through transformers'
    attention functions would) would attend across answers: the forward notices its attention never saw them,
    computes again with the dense mask, and reads the mask from then on."""
    from alignment.prefix import shared_prefix_hidden

    from alignment.prefix import use_segments

    torch.manual_seed(0)
    lm = LMS["llama"]().eval()
    use_segments(lm)

    class Drops(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = lm.config

        def forward(self, alignflow_segments=None, **inputs):
            return lm.model(**inputs)

    drops, batch = Drops(), collate_shared_prefix(PAIRS, pad_id=0)
    with torch.no_grad():
        hidden = shared_prefix_hidden(drops, batch)
        expected = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).last_hidden_state
        real = batch.group >= 0
        assert torch.allclose(hidden[real], expected[real], atol=1e-6) and drops.__dict__["_alignflow_no_segments"]
        unmasked = lm.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state
        assert not torch.allclose(unmasked[real], expected[real], atol=1e-3)  # what the dropped segments would have given
