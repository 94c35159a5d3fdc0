import inspect

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from alignment.models import PolicyWithValueHead, RewardModel, last_token_index
from alignment.sampling import SamplingParams, filter_logits, sample
from conftest import tiny_llama_config


def test_last_token_index_left_and_right():
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [1, 3, 3]


def make_reward_model():
    torch.manual_seed(0)
    return RewardModel(LlamaForSequenceClassification(tiny_llama_config(num_labels=1))).eval()


def test_reward_model_left_and_right_padding_give_same_reward():
    rm = make_reward_model()
    seqs = [[1, 5, 6, 7, 8], [1, 9, 10]]
    right = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 0, 0]])
    left = torch.tensor([[1, 5, 6, 7, 8], [0, 0, 1, 9, 10]])
    with torch.no_grad():
        r_right = rm(right, (torch.arange(5) < torch.tensor([[5], [3]])).long())
        r_left = rm(left, (torch.arange(5) >= torch.tensor([[0], [2]])).long())
        r_alone = torch.stack([rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    assert torch.allclose(r_right, r_alone, atol=1e-5)
    assert torch.allclose(r_left, r_alone, atol=1e-5)
    # and the reward really depends on the content: not a constant head
    assert abs(r_alone[0] - r_alone[1]) > 1e-4


def test_reward_model_saves_as_standard_hf_sequence_classifier(tmp_path):
    rm = make_reward_model()
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(rm(ids, mask), loaded(ids, mask))
        # plain transformers reads the same directory; on an unpadded row its score is ours
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        assert torch.allclose(hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1), rm(ids, mask), atol=1e-5)


def test_policy_with_value_head_round_trip_and_alignment(tmp_path, tiny_lm):
    for value_model in (None, "separate"):
        torch.manual_seed(1)
        vm = None
        if value_model:
            from transformers import LlamaModel

            vm = LlamaModel(tiny_llama_config())
        model = PolicyWithValueHead(tiny_lm, vm)
        torch.nn.init.normal_(model.value_head.weight)
        ids = torch.tensor([[1, 5, 6, 7]])
        answer = torch.tensor([[0, 0, 1, 1]])
        logps, values, entropies = model(ids, torch.ones_like(ids), answer, entropy=True)
        assert logps.shape == values.shape == entropies.shape == (1, 4)
        # the log-probs and entropies of the answer tokens, as the policy's logits give them
        logits = tiny_lm(input_ids=ids).logits[0].log_softmax(-1)  # [4, 40]
        assert torch.allclose(logps[0, 2:], logits[[1, 2], [6, 7]], atol=1e-6) and (logps[0, :2] == 0).all()
        assert torch.allclose(entropies[0, 2:], -(logits[1:3].exp() * logits[1:3]).sum(-1), atol=1e-5)
        assert values[0, 0] == 0  # no state precedes the first token
        model.save_pretrained(tmp_path / f"p-{value_model}")
        loaded = PolicyWithValueHead.from_pretrained(tmp_path / f"p-{value_model}")
        assert (loaded.value_model is None) == (value_model is None)
        with torch.no_grad():
            _, values2, _ = loaded(ids, torch.ones_like(ids), answer)
        assert torch.allclose(values, values2, atol=1e-6)


def test_a_value_model_from_the_reward_model_starts_as_the_reward_of_each_prefix(tmp_path, tiny_lm):
    """value_model="reward_model" (TRL's PPO): backbone and head are the reward model's, so before training
    V(state before token t) is the reward model's score of the answer so far, tokens 0..t-1."""
    rm = make_reward_model()
    torch.nn.init.normal_(rm.model.score.weight)  # a head that is not the default zero-ish init
    rm.save_pretrained(tmp_path / "rm")
    tiny_lm.save_pretrained(tmp_path / "policy")
    model = PolicyWithValueHead.from_pretrained(tmp_path / "policy", value_model="reward_model", reward_model=tmp_path / "rm")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        _, values, _ = model(ids, torch.ones_like(ids), torch.ones_like(ids))
        prefix_rewards = torch.stack([rm(ids[:, :t], torch.ones(1, t, dtype=torch.long))[0] for t in range(1, 6)])
    assert values[0, 0] == 0
    assert torch.allclose(values[0, 1:], prefix_rewards, atol=1e-5)
    assert values[0, 1:].std() > 1e-3  # the prefixes score differently: not a constant
    # the other choices: a copy of the policy's backbone with the head at zero, and a head on the trunk
    copy = PolicyWithValueHead.from_pretrained(tmp_path / "policy", value_model="policy")
    assert copy.value_model is not None and copy.value_head.weight.abs().sum() == 0
    assert PolicyWithValueHead.from_pretrained(tmp_path / "policy", value_model="shared").value_model is None
    with pytest.raises(ValueError, match="reward model's directory"):
        PolicyWithValueHead.from_pretrained(tmp_path / "policy", value_model="reward_model")
    with pytest.raises(ValueError, match="no `score` head"):
        PolicyWithValueHead.from_pretrained(tmp_path / "policy", value_model="reward_model", reward_model=tmp_path / "policy")


def test_greedy_sampling_matches_hf_generate_and_respects_padding(tiny_lm):
    tiny_lm.eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    out = sample(tiny_lm, ids, mask, SamplingParams(max_new_tokens=6, temperature=0), pad_token_id=0)
    hf = tiny_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.answer_ids, hf[:, 5:])
    alone = sample(tiny_lm, ids[:1, 2:], mask[:1, 2:], SamplingParams(max_new_tokens=6, temperature=0), pad_token_id=0)
    assert torch.equal(alone.answer_ids[0], out.answer_ids[0])


def test_sampling_stops_masks_and_logps(tiny_lm):
    tiny_lm.eval()
    ids = torch.tensor([[1, 5, 6]] * 8)
    g = torch.Generator().manual_seed(0)
    out = sample(tiny_lm, ids, torch.ones_like(ids), SamplingParams(max_new_tokens=30, temperature=1.0, stop_token_ids=tuple(range(2, 20))), 0, g)
    for row_ids, row_mask in zip(out.answer_ids, out.answer_mask):
        n = int(row_mask.sum())
        stops = [i for i, t in enumerate(row_ids.tolist()[:n]) if 2 <= t < 20]
        assert stops == [] or stops == [n - 1]  # generation ends right after the first stop token
        assert torch.all(row_ids[n:] == 0)
    # the recorded logps are those of a fresh forward pass at temperature 1
    full = tiny_lm(input_ids=out.sequences, attention_mask=out.attention_mask).logits
    P = out.prompt_length
    lp = torch.log_softmax(full[:, P - 1 : -1], -1).gather(-1, out.answer_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(lp * out.answer_mask, out.answer_logps, atol=1e-4)


def test_top_k_and_top_p_filtering_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist()[0] == [False, False, True, True]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7 -> keep the first two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist()[0] == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist()[0] == [False, False, False, True]


def test_draw_follows_the_categorical_distribution():
    from alignment.sampling import draw

    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw(probs.repeat(2000, 1)[::2], g) for _ in range(10)]).flatten()  # 20000 draws of row 0
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    # independent check: frequencies within 4 standard errors of p, and a zero-probability token never drawn
    se = (probs[0] * (1 - probs[0]) / len(draws)).sqrt()
    assert torch.all((freq - probs[0]).abs() <= 4 * se + 1e-9), freq
    assert freq[1] == 0
    assert draw(probs[1:].repeat(50, 1), g).eq(3).all()


def test_static_cache_samples_what_the_dynamic_cache_samples(tiny_lm):
    """The preallocated cache (fixed shapes for a compiled step) changes nothing: the same tokens, stops
    and log-probs from the same seed, with left-padded prompts of different lengths."""
    tiny_lm.eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 1, 9, 8, 7]])
    mask = (ids != 0).long()
    for temperature in (0.0, 1.0):
        outs = [sample(tiny_lm, ids, mask, SamplingParams(max_new_tokens=8, temperature=temperature, stop_token_ids=(2, 3), cache=c),
                       0, torch.Generator().manual_seed(5)) for c in ("dynamic", "static")]
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        assert torch.equal(outs[0].answer_mask, outs[1].answer_mask)
        assert torch.allclose(outs[0].answer_logps, outs[1].answer_logps, atol=1e-5)
    assert outs[0].answer_mask.sum() > 3  # real answers were drawn
    with pytest.raises(ValueError, match="cache must be one of auto, dynamic, static, not 'paged'"):
        SamplingParams(cache="paged")


def test_a_static_cache_keeps_its_shape_across_prompt_widths_and_auto_means_compiled_on_cuda_only(tiny_lm, monkeypatch, caplog):
    """Prompts of 5 and of 9 tokens fill one static cache shape (64 + 8: what a compiled step needs to run again
    without recompiling), and the output has the prompts' own width, as the dynamic cache gives it. `auto` is a
    static cache with a compiled step on CUDA only; where compiling fails, sampling goes on uncompiled, with one
    warning."""
    from alignment import sampling

    tiny_lm.eval()
    shapes = []
    real = sampling.StaticCache
    monkeypatch.setattr(sampling, "StaticCache", lambda **kw: shapes.append(kw["max_cache_len"]) or real(**kw))
    for width in (5, 9):
        ids = torch.randint(3, 40, (2, width))
        mask = torch.ones_like(ids)
        outs = [sample(tiny_lm, ids, mask, SamplingParams(max_new_tokens=8, cache=c), 0, torch.Generator().manual_seed(1))
                for c in ("static", "dynamic")]
        assert outs[0].prompt_length == outs[1].prompt_length == width
        assert torch.equal(outs[0].sequences, outs[1].sequences) and outs[0].sequences.shape == (2, width + 8)
    assert shapes == [72, 72]
    assert [sampling.cache_mode(SamplingParams(cache="auto"), torch.device(d)) for d in ("cpu", "cuda")] == \
        [(False, False), (True, True)]
    assert sampling.cache_mode(SamplingParams(cache="dynamic", compile=True), torch.device("cpu")) == (True, True)
    assert sampling.cache_mode(SamplingParams(cache="static"), torch.device("cuda")) == (True, False)

    class Broken:  # a compiled model whose first call fails, as torch.compile does on a model it cannot trace
        def __call__(self, **kwargs):
            raise RuntimeError("dynamo could not trace this")

    ids = torch.randint(3, 40, (2, 5))
    monkeypatch.setattr(sampling, "_compiled_step", lambda model: Broken())
    with caplog.at_level("WARNING", logger="alignment.sampling"):
        out = sample(tiny_lm, ids, torch.ones_like(ids), SamplingParams(max_new_tokens=8, compile=True), 0,
                     torch.Generator().manual_seed(1))
    plain = sample(tiny_lm, ids, torch.ones_like(ids), SamplingParams(max_new_tokens=8, cache="static"), 0,
                   torch.Generator().manual_seed(1))
    assert torch.equal(out.sequences, plain.sequences)
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile could not compile LlamaForCausalLM's decoding step; sampling goes on without compiling "
        "(sampling `cache: dynamic` skips the attempt)"]
    tiny_lm.__dict__.pop("_alignflow_compiled", None)


def test_a_batch_that_runs_out_of_memory_is_sampled_in_parts_with_the_same_answers(tiny_lm, monkeypatch):
    """sample_within_memory: the whole rollout at once where it fits; past the accelerator's memory (here: a sampler
    that raises torch.OutOfMemoryError above 2 prompts) the prompts go in halves, each part seeded alike and placed
    by its rows, so the 5 prompts x 3 answers are what the whole batch samples, token for token (also as one process's
    share of a larger batch); the size that fitted is kept for the next batch."""
    from alignment import sampling

    tiny_lm.eval()
    prompts = torch.randint(3, 40, (5, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=(2, 3))
    whole = sample(tiny_lm, prompts, mask, params, 0, torch.Generator().manual_seed(7), rows=(3, 21), answers_per_prompt=3)
    real, calls = sampling.sample, []

    def small_memory(model, ids, *args, **kwargs):
        calls.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample", small_memory)
    parts = sampling.sample_within_memory(tiny_lm, prompts, mask, params, 0, seed=7, rows=(3, 21), answers_per_prompt=3)
    assert calls == [5, 2, 2, 1] and tiny_lm.__dict__["_alignflow_sample_prompts"] == 2
    assert torch.equal(parts.sequences, whole.sequences) and torch.equal(parts.answer_mask, whole.answer_mask)
    assert torch.allclose(parts.answer_logps, whole.answer_logps, atol=1e-6) and parts.prompt_length == whole.prompt_length
    assert whole.answer_mask.sum(-1).min() < whole.answer_mask.shape[1]  # some answers stopped early: parts padded
    calls.clear()
    sampling.sample_within_memory(tiny_lm, prompts, mask, params, 0, seed=7, rows=(3, 21), answers_per_prompt=3)
    assert calls == [2, 2, 1]  # no second try at the size that did not fit
    del tiny_lm.__dict__["_alignflow_sample_prompts"]


def test_a_prompt_is_computed_once_for_its_answers_and_they_are_what_repeated_rows_sample(tiny_lm):
    """answers_per_prompt G: the prompt pass reads each distinct prompt once (B0 rows, not B0 * G) and its keys and
    values are repeated into the cache, dynamic or static. The G answers are what G repeated rows draw from the same
    seed: tokens and stops exactly, log-probs to float tolerance; and with rows=(first, total), a process's share."""
    tiny_lm.eval()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7], [0, 1, 9, 8, 7]])
    mask, G = (prompts != 0).long(), 4
    seen = []
    hook = tiny_lm.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        for cache in ("dynamic", "static"):
            params = SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=(2, 3), cache=cache)
            seen.clear()
            once = sample(tiny_lm, prompts, mask, params, 0, torch.Generator().manual_seed(5), answers_per_prompt=G)
            width = 64 if cache == "static" else 5  # a static cache's prompts are padded to a multiple of 64
            assert seen[0] == (3, width) and all(shape == (12, 1) for shape in seen[1:]), seen  # prompts once, then 12 rows
            seen.clear()
            rows = sample(tiny_lm, prompts.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), params, 0,
                          torch.Generator().manual_seed(5))
            assert seen[0] == (12, width)  # the repeated rows' prompt pass reads every copy
            assert torch.equal(once.sequences, rows.sequences) and torch.equal(once.answer_mask, rows.answer_mask)
            assert torch.allclose(once.answer_logps, rows.answer_logps, atol=1e-5)
            assert once.answer_mask.sum() > 12  # real answers were drawn
            assert len({tuple(r) for r in once.answer_ids[:G].tolist()}) > 1  # a prompt's answers differ
            share = sample(tiny_lm, prompts[1:2], mask[1:2], params, 0, torch.Generator().manual_seed(5), rows=(G, 3 * G),
                           answers_per_prompt=G)  # the process holding prompt 1 of the 3
            assert torch.equal(share.sequences, once.sequences[G : 2 * G])
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="answers_per_prompt"):
        sample(tiny_lm, prompts, mask, SamplingParams(), 0, answers_per_prompt=0)


def test_sampler_names_the_kv_cache_as_the_model_does_and_refuses_one_that_drops_it(tiny_lm):
    """transformers renamed the forward's `past_key_values` to `cache`; under 5.17 our `cache=` was swallowed
    by **kwargs and every token was drawn without its context (found on the GPU image). The sampler asks the
    model's signature, and refuses to go on when the cache stays empty after the prompt pass."""
    from alignment.sampling import cache_kwarg

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, **kwargs):
            raise AssertionError("not called")

    class NewStyle(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, cache=None, **kwargs):
            raise AssertionError("not called")

    assert (cache_kwarg(OldStyle()), cache_kwarg(NewStyle())) == ("past_key_values", "cache")
    # the installed transformers' Llama: `cache` from 5.2x on, `past_key_values` in 5.17 (the GPU image's)
    named = inspect.signature(type(tiny_lm).forward).parameters
    assert cache_kwarg(tiny_lm) == ("cache" if "cache" in named else "past_key_values")

    class Forgetful(torch.nn.Module):  # takes the cache and ignores it, as transformers 5.17 did with `cache=`
        def __init__(self, lm):
            super().__init__()
            self.lm, self.config = lm, lm.config

        def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, cache=None, **kwargs):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep)

    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with pytest.raises(RuntimeError, match="did not fill the KV cache"):
        sample(Forgetful(tiny_lm), ids, torch.ones_like(ids), SamplingParams(max_new_tokens=4), 0)


def test_weights_load_in_float32_on_a_cpu_and_as_saved_on_an_accelerator(tmp_path, monkeypatch):
    """A bf16 checkpoint (today's chat models): fp32 on a CPU by default, bf16 when asked or kept as saved;
    on an accelerator "auto" hands from_pretrained transformers' "auto" (the saved dtype, as TRL loads it)."""
    from transformers import LlamaForCausalLM as Llama

    from alignment.models import RewardModel, load_causal_lm, weights_dtype
    from conftest import tiny_llama_config

    Llama(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_causal_lm(tmp_path).dtype == torch.float32
    assert load_causal_lm(tmp_path, dtype="bfloat16").dtype == torch.bfloat16
    assert load_causal_lm(tmp_path, dtype="saved").dtype == torch.bfloat16
    assert next(RewardModel.from_pretrained(tmp_path).parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'bf16': use one of"):
        weights_dtype("bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert weights_dtype("auto") == "auto" and weights_dtype("float32") == torch.float32
