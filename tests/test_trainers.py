"""Per trainer: a tiny learning test (the loss falls / the preferred answer gains), exact resume,
and the NaN guard. Tiny random Llama models, a few steps, in-process."""

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from alignment.data import PairExample
from alignment.models import PolicyWithValueHead, RewardModel
from alignment.sampling import SamplingParams
from alignment.trainers.common import NonFiniteLossError, TrainConfig
from alignment.trainers.rows import minibatch
from alignment.trainers.dpo import DPOConfig, DPOTrainer, pair_logps
from alignment.trainers.ppo import PPOConfig, PPOTrainer
from alignment.trainers.reward import RewardConfig, RewardTrainer
from alignment.trainers.sft import SFTConfig, SFTTrainer
from conftest import gradients_by_micro_cap, tiny_llama_config

PAIRS = [PairExample([1, 5 + i % 3], [10, 12, 2], [11, 12, 2]) for i in range(12)]


def lm(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config())


def test_sft_loss_falls():
    examples = [([1, 5 + i % 3], [7 + i % 3, 8, 2]) for i in range(12)]
    trainer = SFTTrainer(lm(), examples, 0, SFTConfig(TrainConfig(max_steps=40, batch_size=6, lr=1e-2)))
    history = trainer.train()
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < 0.3 * history[0]["loss"]
    assert {"loss", "lr", "grad_norm"} <= history[0].keys()


def test_reward_model_learns_preference():
    torch.manual_seed(0)
    rm = RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1)))
    cfg = RewardConfig(TrainConfig(max_steps=25, batch_size=6, lr=3e-3))
    trainer = RewardTrainer(rm, PAIRS, 0, cfg)
    before = trainer.evaluate(PAIRS)
    history = trainer.train()
    after = trainer.evaluate(PAIRS)
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 1.0
    assert {"accuracy", "margin", "chosen_reward", "rejected_reward"} <= history[0].keys()


def test_reward_model_evaluation_scores_each_answer_once_and_equals_the_pair_by_pair_one():
    """Held-out pairs share answers (a prompt's k answers make up to k(k-1)/2 pairs): with group_by_prompt the
    evaluation reads each prompt's distinct answers once; its accuracy and margin are the pair-by-pair
    forward passes'."""
    torch.manual_seed(0)
    rm = RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1)))
    answers = [[10 + i, 12, 2] for i in range(5)] + [[20, 21, 22, 23, 2]]
    pairs = [PairExample([1, 5 + p], answers[i], answers[j]) for p in range(3) for i in range(6) for j in range(i + 1, 6)]

    def score(prompt, answer):  # one plain row prompt ++ answer, no padding, no shared prefix
        ids = torch.tensor([prompt + answer])
        return rm(ids, torch.ones_like(ids))[0]

    with torch.no_grad():
        diff = torch.stack([score(e.prompt_ids, e.chosen_ids) - score(e.prompt_ids, e.rejected_ids) for e in pairs])
    grouped = RewardTrainer(rm, pairs, 0, RewardConfig(TrainConfig(max_steps=1), group_by_prompt=True)).evaluate(pairs, batch_size=16)
    assert grouped["pairs"] == 45
    assert grouped["accuracy"] == pytest.approx(float((diff > 0).float().mean()), abs=1e-9)
    assert 0 < grouped["accuracy"] < 1  # a random model: both outcomes occur, so the comparison means something
    assert grouped["margin"] == pytest.approx(float(diff.mean()), abs=1e-5)


def test_dpo_raises_preferred_answer_probability():
    policy = lm()
    trainer = DPOTrainer(policy, PAIRS, 0, DPOConfig(TrainConfig(max_steps=20, batch_size=6, lr=3e-3), beta=0.5))
    ref_chosen, ref_rejected = trainer.reference_logps[:, 0], trainer.reference_logps[:, 1]
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)  # policy == reference at step 0
    assert history[-1]["loss"] < 0.2
    with torch.no_grad():
        chosen, rejected = pair_logps(trainer.model, PAIRS, 0, "cpu")
    assert torch.all(chosen - ref_chosen > 0.5)  # the preferred answer's log-prob rose
    assert torch.all(rejected < ref_rejected)
    assert history[-1]["rewards/accuracy"] == 1.0


def test_dpo_reference_on_the_fly_equals_precomputed():
    on_the_fly = DPOTrainer(lm(), PAIRS, 0, DPOConfig(TrainConfig(max_steps=3, batch_size=6), precompute_ref_logps=False))
    pre = DPOTrainer(lm(), PAIRS, 0, DPOConfig(TrainConfig(max_steps=3, batch_size=6)))
    assert on_the_fly.ref_model is not None and pre.ref_model is None  # precomputed: its copy is not kept
    a, b = on_the_fly.train(), pre.train()
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], abs=1e-5)


def params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_resume_gives_the_same_parameters(tmp_path):
    cfg = DPOConfig(TrainConfig(max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=3, warmup_steps=2))
    straight = DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "a")
    straight.train()
    first = DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "b")
    first.train(stop_at=3)
    torch.manual_seed(1234)  # a fresh process would have other RNG state
    resumed = DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "b")  # same start model, so the same reference
    torch.manual_seed(4321)
    history = resumed.train()
    assert len(history) == 3
    assert torch.allclose(params(straight.model), params(resumed.model), atol=1e-6)
    assert not torch.allclose(params(first.model), params(resumed.model), atol=1e-6)


def test_the_ledger_of_a_killed_and_resumed_run_equals_a_straight_runs(tmp_path):
    """Which pairs each step consumed: a run killed after its step-3 checkpoint, having already logged step 4,
    resumes at step 4 and logs it once; the ledger equals the uninterrupted run's, and each epoch of 6
    steps x 4 pairs = 24 visits covers every one of the 12 pairs twice."""
    cfg = DPOConfig(TrainConfig(max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=3, group_by_length=False))
    DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "a").train()
    DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "b").train(stop_at=3)
    ledger = tmp_path / "b" / "ledger.jsonl"
    with open(ledger, "a") as fh:  # what the killed process wrote after its last checkpoint
        fh.write(json.dumps({"step": 4, "ids": [0, 1, 2, 3]}) + "\n")
    DPOTrainer(lm(), PAIRS, 0, cfg, output_dir=tmp_path / "b").train()
    straight = [json.loads(line) for line in (tmp_path / "a" / "ledger.jsonl").read_text().splitlines()]
    assert ledger.read_text() == (tmp_path / "a" / "ledger.jsonl").read_text()
    assert [row["step"] for row in straight] == [1, 2, 3, 4, 5, 6]
    visits = sorted(i for row in straight for i in row["ids"])
    assert len(PAIRS) == 12 and visits == sorted(list(range(12)) * 2)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = SFTConfig(TrainConfig(max_steps=6, batch_size=4, checkpoint_every=2))
    examples = [([1, 5], [7, 8, 2])] * 8

    def diverge(step, metrics):  # simulate a blow-up after the update of step 3
        if step == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer = SFTTrainer(lm(), examples, 0, cfg, output_dir=tmp_path, callback=diverge)
    trainer.train(stop_at=2)
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "checkpoint-2").iterdir()}  # noqa: E731
    good = files()
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= good.keys()  # accelerate's save_state layout
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.train()
    assert files() == good
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]


def ppo_setup(tokenizer, seed=0, **kw):
    torch.manual_seed(seed)
    model = PolicyWithValueHead(LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)))
    prompts = ["user : how do i cook rice ? assistant :", "user : how can i sleep better ? assistant :"] * 8
    shorter_is_better = lambda ps, answers: torch.tensor([-0.2 * len(a.split()) for a in answers])  # noqa: E731
    cfg = PPOConfig(**{**dict(iterations=14, rollout_batch_size=16, minibatch_size=8, ppo_epochs=2, lr=1e-2,
                              beta=0.01, sampling=SamplingParams(max_new_tokens=12)), **kw})
    return model, prompts, shorter_is_better, cfg


def test_ppo_learns_to_raise_reward(sandbox_tokenizer):
    model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer)
    history = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg).train()
    keys = {"reward", "kl", "beta", "clip_frac", "approx_kl", "entropy", "value_explained_variance", "policy_loss", "value_loss"}
    assert keys <= history[0].keys()
    assert all(math.isfinite(v) for h in history for v in h.values())
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.5, (first, last)


def test_ppo_resume_gives_the_same_parameters(sandbox_tokenizer, tmp_path):
    def trainer(out, seed=0):
        model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, seed=seed, iterations=2, target_kl=1.0)
        return PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg, output_dir=out)

    straight = trainer(tmp_path / "a")
    straight.train()
    trainer(tmp_path / "b").train(stop_at=1)
    resumed = trainer(tmp_path / "b")
    torch.manual_seed(4321)  # the resumed run must not depend on the global RNG
    resumed.train()
    assert resumed.kl_ctl.value == pytest.approx(straight.kl_ctl.value)
    assert torch.allclose(params(straight.model), params(resumed.model), atol=1e-6)


def test_length_grouped_sampler_covers_each_example_once_with_little_padding():
    from alignment.trainers.rows import StepSampler

    lengths = torch.randint(5, 100, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = StepSampler(64, 8, seed=3, lengths=lengths)
    plain = StepSampler(64, 8, seed=3)
    batches = [grouped.batch(s) for s in range(8)]  # one group = one epoch here
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert [grouped.batch(s) for s in range(8)] == batches  # depends only on (seed, step): resumable

    def fill(batch):  # real tokens / padded tokens of a right-padded batch
        return sum(lengths[i] for i in batch) / (len(batch) * max(lengths[i] for i in batch))

    grouped_fill = sum(map(fill, batches)) / 8
    plain_fill = sum(fill(plain.batch(s)) for s in range(8)) / 8
    assert grouped_fill > 0.8 and grouped_fill > plain_fill + 0.15, (grouped_fill, plain_fill)
    # two processes split every global batch between them
    halves = [StepSampler(64, 8, 3, rank, 2, lengths).batch(5) for rank in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(batches[5])


def test_a_runs_random_streams_never_share_a_generator():
    """At seed 0 the old arithmetic (seed * 1,000,003 + i for a rollout's tokens, seed * 7,919 + i for its
    minibatch order, the prompt sampler's seed * 100,003 + e) seeded all three with i, so iteration 0's prompts,
    first uniforms and minibatch order came from the same numbers. stream_seed hashes (stream, seed, index):
    every stream, seed and iteration of a run gets its own generator, the same on every machine, and far from
    the prompt sampler's small arithmetic seeds."""
    from alignment.trainers.rows import stream_seed

    streams = ("rollout", "minibatches")
    seeds = {(name, seed, i): stream_seed(seed, name, i) for name in streams for seed in (0, 1, 2) for i in range(100)}
    assert len(set(seeds.values())) == len(seeds)  # no two share a seed
    assert all(2**32 <= v < 2**63 for v in seeds.values())  # none near the prompt sampler's seed * 100,003 + e
    # blake2b of "rollout/0/0", 8 bytes little-endian, top bit cleared: pinned, so a figure of a seed stays reproducible
    assert stream_seed(0, "rollout", 0) == 2065677411933855061
    prompt_order = torch.rand(4, generator=torch.Generator().manual_seed(0 * 100_003 + 0))
    first = [torch.rand(4, generator=torch.Generator().manual_seed(stream_seed(0, name, 0))) for name in streams]
    assert not torch.equal(first[0], first[1]) and all(not torch.equal(f, prompt_order) for f in first)


def test_ppo_reward_model_with_its_own_tokenizer(sandbox_tokenizer):
    """The RM reads the answer TEXT with its own tokenizer (a BPE here, the policy's is word level)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignment.sandbox.assets import world_texts
    from alignment.evaluation import reward_scores
    from alignment.sandbox.world import World

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(world_texts(World()), trainers.BpeTrainer(vocab_size=150, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"]))
    rm_tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    text = "happy to help ! rinse the rice and use two cups of water ."
    assert rm_tok(text)["input_ids"] != sandbox_tokenizer(text)["input_ids"]  # really different tokenizers
    torch.manual_seed(0)
    rm = RewardModel(LlamaForSequenceClassification(tiny_llama_config(vocab_size=len(rm_tok), num_labels=1))).eval()
    rm_fn = reward_scores(rm, rm_tok, max_length=128)
    seen = []

    def reward_fn(prompts, answers):
        scores = rm_fn(prompts, answers)
        seen.append((list(prompts), list(answers), scores))
        return scores

    model, prompts, _, cfg = ppo_setup(sandbox_tokenizer, iterations=1)
    trainer = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg)
    history = trainer.train()
    (ps, answers, scores), = seen
    assert history[0]["reward"] == pytest.approx(float(scores.mean()), abs=1e-6)
    assert any(answers) and all(isinstance(a, str) for a in answers)
    # each score is the RM's own reading of that text: re-tokenised with rm_tok, one at a time
    for p, a, s in list(zip(ps, answers, scores))[:4]:
        assert float(rm_fn([p], [a])[0]) == pytest.approx(float(s), abs=1e-4)


def test_gradient_checkpointing_gives_the_same_steps():
    def run(checkpointing):
        torch.manual_seed(0)
        rm = RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1)))
        cfg = RewardConfig(TrainConfig(max_steps=3, batch_size=6, lr=3e-3, gradient_checkpointing=checkpointing))
        trainer = RewardTrainer(rm, PAIRS, 0, cfg)
        return trainer, trainer.train()

    plain, a = run(False)
    ckpt, b = run(True)
    assert ckpt.model.model.model.gradient_checkpointing and not plain.model.model.model.gradient_checkpointing
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], abs=1e-6)
    assert [h["grad_norm"] for h in b] == pytest.approx([h["grad_norm"] for h in a], rel=1e-5)


def test_ppo_gradient_checkpointing_gives_the_same_update(sandbox_tokenizer):
    runs = []
    for checkpointing in (False, True):
        model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=2, gradient_checkpointing=checkpointing)
        runs.append(PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg).train())
    assert model.policy.model.gradient_checkpointing
    for key in ("policy_loss", "value_loss", "kl", "reward"):
        assert [h[key] for h in runs[1]] == pytest.approx([h[key] for h in runs[0]], abs=1e-5), key


def test_ppo_missing_eos_penalty_lowers_the_return_of_cut_off_answers(sandbox_tokenizer):
    """gamma = lam = 1: the return at the first answer token is the whole answer's reward, so the penalty
    shows there exactly, on the answers that reached max_new_tokens without a stop token and no others."""
    rollouts = []
    for penalty in (None, 2.0):
        model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=1, gamma=1.0, lam=1.0,
                                                   missing_eos_penalty=penalty, sampling=SamplingParams(max_new_tokens=4))
        rollouts.append(PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg).rollout(prompts))
    plain, penalised = rollouts
    assert torch.equal(plain["sequences"], penalised["sequences"])  # the same samples
    first = plain["mask"].argmax(-1)  # [B] first answer position
    rows = torch.arange(len(first))
    truncated = (plain["answer_len"] == 4) & ~(plain["sequences"][rows, first + 3] == sandbox_tokenizer.eos_token_id)
    assert truncated.any()
    assert torch.equal(penalised["truncated"].bool(), truncated)
    diff = penalised["returns"][rows, first] - plain["returns"][rows, first]
    assert torch.allclose(diff, -2.0 * truncated.float(), atol=1e-5)


def test_a_minibatch_keeps_only_the_columns_its_rows_use():
    am = torch.tensor([[0, 0, 1, 1, 1, 0],   # left padding 2, right padding 1
                       [0, 1, 1, 1, 1, 1],
                       [1, 1, 1, 0, 0, 0]])
    batch = {"attention_mask": am, "ids": torch.arange(18).view(3, 6), "scores": torch.tensor([0.5, 1.5, 2.5])}
    one = minibatch(batch, [0])
    assert one["attention_mask"].tolist() == [[1, 1, 1]]
    assert one["ids"].tolist() == [[2, 3, 4]]
    assert one["scores"].tolist() == [0.5]
    two = minibatch(batch, [2, 0])  # columns 0-4: row 2 starts at 0, row 0 ends at 4
    assert two["ids"].tolist() == [[12, 13, 14, 15, 16], [0, 1, 2, 3, 4]]
    assert minibatch(batch, [1])["ids"].tolist() == [[7, 8, 9, 10, 11]]


def test_ppo_loss_of_a_cut_minibatch_equals_the_full_width_one(sandbox_tokenizer, monkeypatch):
    """Dropping the padding columns changes no number: the same losses as the rows at full width."""
    import alignment.trainers.ppo as ppo_module

    model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=1)
    trainer = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg)
    batch = trainer.rollout(prompts)
    width = batch["sequences"].shape[1]
    # 3 columns of padding on the left and 5 on the right of every row, as a wider rollout would have
    wide = {k: torch.nn.functional.pad(v, (3, 5), value=sandbox_tokenizer.pad_token_id if k == "sequences" else 0)
            if v.dim() == 2 else v for k, v in batch.items()}
    rows = [0, 3, 5, 6]
    assert minibatch(wide, rows)["sequences"].shape[1] <= width
    cut, cut_metrics = trainer.micro_loss(wide, rows)
    monkeypatch.setattr(ppo_module, "minibatch", lambda b, i: {k: v[i] for k, v in b.items()})
    full, full_metrics = trainer.micro_loss(wide, rows)
    assert float(cut) == pytest.approx(float(full), abs=1e-5)
    for key in ("policy_loss", "value_loss", "entropy"):
        assert float(cut_metrics[key]) == pytest.approx(float(full_metrics[key]), abs=1e-5), key


def test_a_ppo_minibatch_cut_in_micro_batches_gives_the_whole_minibatchs_gradient(sandbox_tokenizer):
    """Where a minibatch runs out of memory its step goes in smaller micro-batches (Optimization.micro_cap): PPO's
    losses are token means, so each micro-batch weighs as its answer tokens, and one row at a time applies the
    gradient of the whole minibatch (weighed by rows, it did not: the answers differ in length)."""
    model, prompts, reward_fn, cfg = ppo_setup(sandbox_tokenizer, iterations=1)
    trainer = PPOTrainer(model, sandbox_tokenizer, prompts, reward_fn, cfg)
    batch, rows = trainer.rollout(prompts), [0, 3, 5, 6]
    for row, cut in ((3, 5), (5, 9)):  # shorter answers there (an untrained policy writes all 12 tokens)
        batch["mask"][row, batch["mask"][row].nonzero().flatten()[-cut:]] = 0
    assert len({int(batch["mask"][i].sum()) for i in rows}) == 3
    whole, one_by_one = gradients_by_micro_cap(trainer.opt, lambda: trainer.update(batch, rows), (None, 1))
    assert torch.allclose(whole, one_by_one, atol=1e-6) and whole.abs().max() > 0


def test_rloo_refuses_unbiased_kl_false_which_it_could_not_apply():
    """RLOO's KL is a penalty in the reward, so there is no KL term in its loss for unbiased_kl to weight: setting
    it is refused, not silently ignored. GRPO takes it."""
    from alignment.config import GRPOConfig, RLOOConfig

    with pytest.raises(ValueError, match="RLOO's KL is a penalty in the reward"):
        RLOOConfig(unbiased_kl=False)
    assert GRPOConfig(unbiased_kl=False).unbiased_kl is False and RLOOConfig().unbiased_kl
