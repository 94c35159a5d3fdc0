"""Prompts rendered with the tokenizer's chat template, BOS once, EOS once, and the pre-flight checks."""

import logging

import pytest

from alignment.data import encode_answer, encode_prompt, fit_to_length, render_prompt, tokenize_demonstrations, tokenize_pairs
from tasks.schemas import DataError
from tasks.stage import token_preflight

USER = [{"role": "user", "content": "how do i cook rice ?"}]


def test_chatml_prompt_and_answer(tmp_path):
    from chat_model import build_chat_model
    from alignment.models import load_tokenizer

    tok = load_tokenizer(build_chat_model(tmp_path / "m"))
    system = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "How do I cook rice?"}]
    assert tok.decode(encode_prompt(tok, system)) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                                      "<|im_start|>user\nHow do I cook rice?<|im_end|>\n<|im_start|>assistant\n")
    answer = encode_answer(tok, "Rinse the rice.")
    assert answer[-1] == tok.eos_token_id and answer.count(tok.eos_token_id) == 1
    assert encode_answer(tok, "Rinse the rice.<|im_end|>") == answer  # text that already ends in EOS gets no second one
    assert tok.decode(encode_prompt(tok, "plain text")) == "plain text"  # TRL's standard format: as it is


def test_an_answer_to_a_conversation_ends_its_turn_as_the_template_writes_it():
    """Phi-3's template ends an assistant turn with <|end|>, then the conversation with EOS (<|endoftext|>): the
    answer to a conversation is learned with both, as TRL's conversational SFT and DPO learn it, so the trained model
    keeps ending its answers with <|end|> (where sampling and chat servers stop). Gemma's <end_of_turn> (on a
    vocabulary whose EOS is another token) gets the EOS after it; plain-text prompts keep answer + EOS."""
    from realworld import real_tokenizer

    from alignment.data import turn_suffix

    phi3 = real_tokenizer("phi-3-mini")
    assert turn_suffix(phi3) == "<|end|>\n<|endoftext|>"
    answer = encode_answer(phi3, "Rinse the rice.", chat=True)
    # <|end|> strips the whitespace after it (its rstrip), as the whole rendered conversation tokenizes
    assert phi3.decode(answer).endswith("Rinse the rice.<|end|><|endoftext|>") and answer.count(phi3.eos_token_id) == 1
    assert encode_answer(phi3, "Rinse the rice.<|end|>\n<|endoftext|>", chat=True) == answer  # rendered already: once
    assert phi3.decode(encode_answer(phi3, "Rinse the rice.")).endswith("rice.<|endoftext|>")  # a plain-text prompt's
    [pair] = tokenize_pairs(phi3, [USER], ["Rinse it."], ["Boil it."], 64)
    assert phi3.decode(pair.chosen_ids).endswith("Rinse it.<|end|><|endoftext|>")
    [(_, demo)] = tokenize_demonstrations(phi3, [USER], ["Rinse it."], 64)
    assert demo == pair.chosen_ids
    gemma = real_tokenizer("minimind", "gemma/tokenizer_config.json")
    assert turn_suffix(gemma) == "<end_of_turn>"
    assert gemma.decode(encode_answer(gemma, "Rinse.", chat=True)).endswith("Rinse.<end_of_turn>" + gemma.eos_token)


def test_bos_once_when_the_template_writes_it(sandbox_tokenizer):
    """A Llama-style template writes BOS itself; the tokenizer must not add a second one."""
    tok = sandbox_tokenizer
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}{% endfor %}assistant :"
    try:
        ids = encode_prompt(tok, USER)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True).split() == "user : how do i cook rice ? assistant :".split()
        assert encode_prompt(tok, "user : hi")[:1] == [tok.bos_token_id]  # plain text: the tokenizer's BOS
    finally:
        tok.chat_template = None


def test_no_template_falls_back_to_plain_text_with_one_warning(sandbox_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="alignment.data"):
        first = encode_prompt(sandbox_tokenizer, USER)
        encode_prompt(sandbox_tokenizer, USER)
    assert render_prompt(sandbox_tokenizer, USER) == ("user: how do i cook rice ?\nassistant:", False)
    assert first == sandbox_tokenizer("user: how do i cook rice ?\nassistant:")["input_ids"]
    assert sum("has no chat template" in r.message for r in caplog.records) <= 1


def test_preflight_names_the_rows_it_rejects(sandbox_tokenizer):
    tok = sandbox_tokenizer
    prompt = "user : how do i cook rice ? assistant :"  # 9 tokens + <bos>
    shared = "rinse the rice and use two cups of water ."  # 10 tokens
    pairs = [{"prompt": prompt, "messages": "", "chosen": shared + " good luck !", "rejected": shared + " not my problem ."}]
    assert token_preflight(tok, pairs, max_length=64, source="prefs")  # all differ: passes
    with pytest.raises(DataError, match=r"prefs: 1 pair\(s\) have chosen == rejected after truncation with max_length=14"):
        token_preflight(tok, pairs, max_length=14, source="prefs")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        doubled = [{**pairs[0], "prompt": "<bos> " + prompt}]  # a text prompt that already holds BOS
        with pytest.raises(DataError, match=r"start with BOS twice"):
            token_preflight(tok, doubled, max_length=64, source="prefs")
    finally:
        tok.chat_template = None
    demos = tokenize_demonstrations(tok, [prompt], ["rinse the rice ."], max_length=64)
    assert demos[0][1][-1] == tok.eos_token_id and demos[0][0][0] == tok.bos_token_id


def test_pairs_that_share_prompts_and_answers_are_tokenised_as_each_alone(sandbox_tokenizer):
    """tokenize_pairs tokenises each distinct prompt and answer once; every pair must still be what it is on
    its own, the one whose long answer cuts the shared prompt included (and the cut must not reach the others)."""
    tok = sandbox_tokenizer
    prompt = "user : how do i cook rice ? assistant :"  # <bos> + 10 tokens
    short, other, long = "rinse it .", "boil it .", "rinse the rice and use two cups of water ."  # 3, 3 and 10 tokens + <eos>
    prompts, chosen, rejected = [prompt, USER, prompt, prompt, USER], [short, short, long, short, other], [other, other, short, other, short]
    pairs = tokenize_pairs(tok, prompts, chosen, rejected, max_length=16)
    for e, p, c, r in zip(pairs, prompts, chosen, rejected):
        prompt_ids, (c_ids, r_ids) = fit_to_length(encode_prompt(tok, p), [encode_answer(tok, c), encode_answer(tok, r)], 16)
        assert (e.prompt_ids, e.chosen_ids, e.rejected_ids) == (prompt_ids, c_ids, r_ids)
    # 11 + 11 > 16: the long pair keeps the prompt's last 8 tokens and 8 of each answer; the next pair, 11 + 4
    assert [len(pairs[i].prompt_ids) for i in (0, 2, 3)] == [11, 8, 11] and len(pairs[2].chosen_ids) == 8
    assert pairs[1].prompt_ids != pairs[0].prompt_ids  # a conversation and a text are different prompts


def test_a_template_that_rejects_system_turns_gets_them_folded_into_the_first_user_turn(sandbox_tokenizer):
    """Gemma's rule (raise on a system role) on a small template: merge renders the system text before the
    user's, separated by a blank line, as LLaMA-Factory does; drop leaves it out; the complaint is the
    template's own words."""
    import copy

    from alignment.data import adapt_system_turns

    tokenizer = copy.deepcopy(sandbox_tokenizer)  # (the fixture is the session's)
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for mode, expected in (("merge", "<user>Be brief.\n\nHi<assistant>"), ("drop", "<user>Hi<assistant>")):
        tokenizer.chat_template = strict
        assert adapt_system_turns(tokenizer, mode) == "System role not supported"
        assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == expected
    tokenizer.chat_template = strict
    assert adapt_system_turns(tokenizer, "error") == "System role not supported"
    with pytest.raises(Exception, match="System role not supported"):
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def test_drop_invalid_leaves_out_the_pairs_the_token_checks_reject(sandbox_tokenizer):
    """With drop_invalid, a pair whose answers become equal at max_length is left out and listed, the others
    are kept in order; every pair left out is a DataError that says so."""
    tok = sandbox_tokenizer
    prompt = "user : how do i cook rice ? assistant :"  # 9 tokens + <bos>
    shared = "rinse the rice and use two cups of water ."  # 10 tokens
    pairs = [{"prompt": prompt, "messages": "", "chosen": "rinse it .", "rejected": "no ."},
             {"prompt": prompt, "messages": "", "chosen": shared + " good luck !", "rejected": shared + " not my problem ."}]
    kept, rejects = token_preflight(tok, pairs, max_length=14, source="prefs", drop_invalid=True, log=lambda _: None)
    assert len(kept) == 1 and kept[0].chosen_ids[:2] == tok("rinse it", add_special_tokens=False)["input_ids"]
    assert rejects == ["prefs: pair 2: chosen == rejected after truncation with max_length=14"]
    with pytest.raises(DataError, match="no pair is left to train on"):
        token_preflight(tok, pairs[1:], max_length=14, source="prefs", drop_invalid=True, log=lambda _: None)


def test_a_saved_model_declares_the_templates_end_of_turn_and_a_reward_model_is_left_alone(tmp_path):
    """declare_stop_tokens, which every stage's save runs (save_model, PPO's save): Gemma's template on minimind's
    vocabulary ends a turn with <end_of_turn> (6401) where EOS is <|im_end|> (2); the causal LM's
    generation_config then lists both, in that order, once each (called twice); a sequence classifier, which
    generates nothing, gets no generation config."""
    from realworld import real_tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from alignment.sampling import declare_stop_tokens

    gemma = real_tokenizer("minimind", "gemma/tokenizer_config.json")
    config = LlamaConfig(vocab_size=len(gemma), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, eos_token_id=gemma.eos_token_id, pad_token_id=0, num_labels=1)
    lm = LlamaForCausalLM(config)
    assert lm.generation_config.eos_token_id == 2
    declare_stop_tokens(lm, gemma)
    declare_stop_tokens(lm, gemma)
    lm.save_pretrained(tmp_path / "lm")
    assert GenerationConfig.from_pretrained(tmp_path / "lm").eos_token_id == [2, 6401]
    rm = LlamaForSequenceClassification(config)  # (transformers gives a classifier no generation_config)
    declare_stop_tokens(rm, gemma)
    assert getattr(rm, "generation_config", None) is None
