"""Our GRPO and RLOO updates against TRL 1.16's, term by term, on one fixed rollout batch.

The same tiny Llama, prompts left-padded and answers right-padded as a rollout leaves them, old log-probs one
update away from the current ones and a reference further off: our GroupTrainer.micro_loss and TRL's
GRPOTrainer / RLOOTrainer._compute_loss must give the same loss and the same gradient of every parameter.
What each term is, with numbers worked by hand, is in test_group_rl.py; this file says that the sum of
them is TRL's (position ids from the mask against TRL's none: RoPE sees the same relative positions).
"""

import pytest
import torch
from transformers import LlamaForCausalLM

from alignment.config import SamplingParams
from alignment.logprobs import sequence_logprobs
from alignment.trainers.group import GRPOConfig, GroupTrainer, RLOOConfig
from conftest import tiny_llama_config

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

B, P, N = 8, 5, 6
PROMPT_LENGTHS = [5, 3, 4, 5, 3, 4, 5, 3]
ANSWER_LENGTHS = [6, 2, 4, 6, 3, 5, 1, 6]  # an answer shorter than N ends with EOS; the others were cut off


@pytest.fixture(scope="module")
def fixed(tmp_path_factory, sandbox_tokenizer):
    tok = sandbox_tokenizer
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = torch.full((B, P), tok.pad_token_id), torch.zeros(B, P, dtype=torch.long)
    answer_ids, answer_mask = torch.full((B, N), tok.pad_token_id), torch.zeros(B, N, dtype=torch.long)
    for i, (p, a) in enumerate(zip(PROMPT_LENGTHS, ANSWER_LENGTHS)):
        prompt_ids[i, P - p:], prompt_mask[i, P - p:] = torch.randint(5, len(tok), (p,), generator=g), 1
        answer_ids[i, :a], answer_mask[i, :a] = torch.randint(5, len(tok), (a,), generator=g), 1
        if a < N:
            answer_ids[i, a - 1] = tok.eos_token_id
    sequences, attention = torch.cat([prompt_ids, answer_ids], 1), torch.cat([prompt_mask, answer_mask], 1)
    mask = torch.zeros_like(attention)
    mask[:, P:] = answer_mask
    with torch.no_grad():
        model = LlamaForCausalLM.from_pretrained(folder)
        current = sequence_logprobs(model(input_ids=sequences, attention_mask=attention).logits, sequences, mask)[0][:, P:]
    return dict(folder=folder, tok=tok, prompt_ids=prompt_ids, prompt_mask=prompt_mask, answer_ids=answer_ids,
                answer_mask=answer_mask, sequences=sequences, attention=attention, mask=mask,
                advantages=torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.0, -0.4, 1.5]),
                old=(current + 0.05 * torch.randn(B, N, generator=g)) * answer_mask,
                ref=(current + 0.3 * torch.randn(B, N, generator=g)) * answer_mask)


def gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for _, p in sorted(model.named_parameters())])


def ours(f, cfg_type, **kw):
    # minibatches of half the rollout: old log-probs count (as in compare-methods: 4 steps of 32 a rollout of 128)
    cfg = cfg_type(iterations=1, prompts_per_batch=B // 2, group_size=2, minibatch_size=B // 2, **kw)
    trainer = GroupTrainer(LlamaForCausalLM.from_pretrained(f["folder"]), f["tok"], ["a"] * 4,
                           {"r": lambda prompts, answers: [0.0] * len(answers)}, cfg)
    widen = lambda t: torch.cat([torch.zeros(B, P), t], 1)  # noqa: E731 - answer columns -> rollout columns
    batch = {"sequences": f["sequences"], "attention_mask": f["attention"], "mask": f["mask"],
             "advantages": f["advantages"], "old_logps": widen(f["old"])}
    if cfg.beta and not cfg.kl_in_reward:
        batch["ref_logps"] = widen(f["ref"])
    trainer.opt.model.train()
    loss, _ = trainer.micro_loss(batch, list(range(B)))
    loss.backward()
    return loss.item(), gradients(trainer.model)


def theirs(f, kind, **kw):
    config, trainer_type = (trl.GRPOConfig, trl.GRPOTrainer) if kind == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    args = config(output_dir=str(f["folder"] / "trl"), per_device_train_batch_size=B, num_generations=2, use_cpu=True,
                  bf16=False, report_to="none", max_completion_length=N, **kw)
    trainer = trainer_type(model=LlamaForCausalLM.from_pretrained(f["folder"]), args=args, processing_class=f["tok"],
                           reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
                           train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * B))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": f["prompt_ids"], "prompt_mask": f["prompt_mask"], "completion_ids": f["answer_ids"],
              "completion_mask": f["answer_mask"], "advantages": f["advantages"], "old_per_token_logps": f["old"],
              "old_logps": (f["old"] * f["answer_mask"]).sum(1), "ref_per_token_logps": f["ref"],
              "num_items_in_batch": f["answer_mask"].sum()}
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.item(), gradients(trainer.model)


@pytest.mark.parametrize("name, cfg_type, ours_kw, kind, trl_kw", [
    ("GRPO, TRL's defaults (loss dapo) with beta 0.2", GRPOConfig, dict(beta=0.2), "grpo", dict(beta=0.2)),
    ("GRPO, loss grpo, beta 0.2", GRPOConfig, dict(beta=0.2, loss_type="grpo"), "grpo", dict(beta=0.2, loss_type="grpo")),
    ("GRPO, clip-higher 0.28, beta 0", GRPOConfig, dict(clip_eps_high=0.28), "grpo", dict(epsilon_high=0.28, beta=0.0)),
    ("GRPO, plain k3 (use_bias_correction_kl off)", GRPOConfig, dict(beta=0.2, unbiased_kl=False), "grpo",
     dict(beta=0.2, use_bias_correction_kl=False)),
    ("GRPO sampled at temperature 0.7: log-probs of logits / 0.7", GRPOConfig,
     dict(beta=0.2, sampling=SamplingParams(temperature=0.7)), "grpo", dict(beta=0.2, temperature=0.7)),
    ("RLOO, TRL's defaults (KL in the reward)", RLOOConfig, dict(beta=0.3), "rloo", dict(beta=0.3)),
])
def test_one_fixed_batch_gives_trls_loss_and_gradient(fixed, name, cfg_type, ours_kw, kind, trl_kw):
    our_loss, our_grad = ours(fixed, cfg_type, **ours_kw)
    trl_loss, trl_grad = theirs(fixed, kind, **trl_kw)
    assert our_loss == pytest.approx(trl_loss, abs=1e-5), name
    assert (our_grad - trl_grad).norm() <= 1e-4 * trl_grad.norm(), name


def test_the_kl_weighting_is_what_tells_the_two_apart(fixed):
    """The check above can fail: with plain k3 ours differs from TRL's default by more than rounding."""
    _, plain = ours(fixed, GRPOConfig, beta=0.2, unbiased_kl=False)
    _, trl_default = theirs(fixed, "grpo", beta=0.2)
    assert (plain - trl_default).norm() > 1e-3 * trl_default.norm()


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_four_optimizer_steps_on_one_rollout_leave_trls_weights(fixed, kind, monkeypatch):
    """The loop around the loss: 4 optimizer steps of 2 answers each on the fixed rollout (lr 3e-4; every
    step's gradient norm is asserted above 1, so clipping to norm 1 acts at every step, as in compare-methods' RLOO), ours through
    GroupTrainer.update, TRL's through RLOOTrainer / GRPOTrainer.train() with its generation replaced by the same
    rollout and its shuffle by the identity. Weights agree to float rounding after every step while they move by
    3e-4 a step: clipping, AdamW's state across steps and the constant schedule are TRL's."""
    import transformers

    f, steps = fixed, 4
    folder = f["folder"]
    cfg_type, trl_config, trl_trainer = ((RLOOConfig, trl.RLOOConfig, trl.RLOOTrainer) if kind == "rloo" else
                                         (GRPOConfig, trl.GRPOConfig, trl.GRPOTrainer))
    cfg = cfg_type(iterations=1, prompts_per_batch=B // 2, group_size=2, minibatch_size=B // steps, lr=3e-4, beta=0.0,
                   lr_schedule="constant")
    ours = GroupTrainer(LlamaForCausalLM.from_pretrained(folder), f["tok"], ["a"] * 4,
                        {"r": lambda prompts, answers: [0.0] * len(answers)}, cfg)
    old = torch.cat([torch.zeros(B, P), f["old"]], 1)
    batch = {"sequences": f["sequences"], "attention_mask": f["attention"], "mask": f["mask"],
             "advantages": f["advantages"] * 10, "old_logps": old}
    ours.opt.model.train()
    our_weights, norms = [], []
    for s in range(steps):
        norms.append(ours.update(batch, float(f["mask"].sum()), list(range(s * B // steps, (s + 1) * B // steps)))["grad_norm"])
        our_weights.append({k: v.detach().clone() for k, v in ours.model.state_dict().items()})
    assert min(norms) > 1.0, norms  # clipped at every step

    rollout = {"prompt_ids": f["prompt_ids"], "prompt_mask": f["prompt_mask"], "completion_ids": f["answer_ids"],
               "completion_mask": f["answer_mask"], "advantages": f["advantages"] * 10, "old_per_token_logps": f["old"],
               "old_logps": (f["old"] * f["answer_mask"]).sum(1), "num_items_in_batch": f["answer_mask"].sum()}
    monkeypatch.setattr(f"trl.trainer.{kind}_trainer.shuffle_sequence_dict", lambda d: d)
    trl_weights = []

    class Weights(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            trl_weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    args = trl_config(output_dir=str(folder / f"trl-{kind}-steps"), per_device_train_batch_size=B // steps, steps_per_generation=steps,
                      num_generations=2, max_steps=steps, learning_rate=3e-4, lr_scheduler_type="constant", beta=0.0,
                      use_cpu=True, bf16=False, report_to="none", save_strategy="no", max_completion_length=N,
                      disable_tqdm=True, seed=0)
    theirs = trl_trainer(model=LlamaForCausalLM.from_pretrained(folder), args=args, processing_class=f["tok"],
                         reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
                         train_dataset=datasets.Dataset.from_list([{"prompt": "a"}] * 4 * B), callbacks=[Weights()])
    theirs._generate_and_score_completions = lambda inputs: {k: v.clone() for k, v in rollout.items()}
    theirs.train()
    start = LlamaForCausalLM.from_pretrained(folder).state_dict()
    for s in range(steps):
        moved = max((our_weights[s][k] - start[k]).abs().max().item() for k in start)
        apart = max((our_weights[s][k] - trl_weights[s][k]).abs().max().item() for k in start)
        assert moved > 2.9e-4 * (s + 1) and apart < 1e-5, (s, moved, apart)


def test_one_generation_built_from_the_same_tokens_gives_trls_advantages_and_old_log_probs(fixed, monkeypatch):
    """Around the update, the rollout's bookkeeping: 4 prompts x 2 answers, the same sampled tokens handed to both
    (our sampler and TRL's generation replaced), a policy moved off the reference and beta 0.3: RLOO's
    KL-penalised, leave-one-out advantages, the old log-probs and the answers' lengths (cut after EOS, a cut-off
    answer kept whole) are TRL's."""
    from alignment.data import pad
    from alignment.sampling import SampleOutput

    f = fixed
    tok, folder = f["tok"], f["folder"]
    prompts = ["user : how do i cook rice ? assistant :", "user : hi assistant :", "user : how can i sleep better ? assistant :",
               "user : what is a good name for a dog ? assistant :"]
    g = torch.Generator().manual_seed(3)
    completions = []
    for i in range(8):
        n = int(torch.randint(1, N + 1, (1,), generator=g))
        ids = torch.randint(5, len(tok), (n,), generator=g).tolist()
        if n < N or i % 3 == 0:
            ids[-1] = tok.eos_token_id
        completions.append(ids)
    reward = lambda answers: [len(a) / 10 for a in answers]  # noqa: E731

    def policy():
        model = LlamaForCausalLM.from_pretrained(folder)
        noise = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=noise))
        return model

    def these_tokens(model, ids, mask, params, pad_id, seed, rows=None, answers_per_prompt=1):
        answer_ids, answer_mask = pad(completions, pad_id)
        ids, mask = ids.repeat_interleave(answers_per_prompt, 0), mask.repeat_interleave(answers_per_prompt, 0)
        return SampleOutput(torch.cat([ids, answer_ids], 1), torch.cat([mask, answer_mask], 1), answer_ids, answer_mask,
                            torch.zeros(answer_ids.shape), ids.shape[1])

    monkeypatch.setattr("alignment.trainers.group.sample_within_memory", these_tokens)
    cfg = RLOOConfig(iterations=1, prompts_per_batch=4, group_size=2, minibatch_size=4, beta=0.3)
    ours = GroupTrainer(policy(), tok, prompts, {"r": lambda p, a: reward(a)}, cfg, ref_model=LlamaForCausalLM.from_pretrained(folder))
    batch = ours.rollout([0, 1, 2, 3])

    class Generating(trl.RLOOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            return [list(c) for c in completions]

    args = trl.RLOOConfig(output_dir=str(folder / "trl-rollout"), per_device_train_batch_size=4, steps_per_generation=2,
                          num_generations=2, beta=0.3, use_cpu=True, bf16=False, report_to="none", max_completion_length=N)
    theirs = Generating(model=policy(), args=args, processing_class=tok,  # its reference: the folder's weights, as ours
                        reward_funcs=[lambda prompts, completions, **_: reward(completions)],
                        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]))
    theirs.model.train()
    out = theirs._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(2)])
    assert batch["mask"].sum(-1).tolist() == out["completion_mask"].sum(-1).tolist() == [len(c) for c in completions]
    assert torch.allclose((batch["old_logps"] * batch["mask"]).sum(-1), out["old_logps"], atol=1e-4)
    assert torch.allclose(batch["advantages"], out["advantages"], atol=1e-4)
    r = torch.tensor(reward(completions)).view(4, 2)
    without_kl = (r - r.flip(-1)).view(-1)  # leave-one-out of 2 answers: r_k - r_other
    assert (batch["advantages"] - without_kl).abs().max() > 0.1  # the KL penalty counts in them
