"""Real files nobody here wrote (../shared/realworld/, PROVENANCE.md there): read in place, never written.
Small models are built around their real tokenizers: a random tiny Llama with the tokenizer's vocabulary."""

import json
import os
import shutil
from pathlib import Path

import pytest


def _corpus() -> Path:
    """$ALIGNFLOW_REALWORLD, else shared/realworld beside the checkout or beside any folder above it (a
    checkout in a folder of its own, e.g. CI's, still finds the corpus next to that folder)."""
    if os.environ.get("ALIGNFLOW_REALWORLD"):
        return Path(os.environ["ALIGNFLOW_REALWORLD"])
    here = Path(__file__).resolve()
    found = (folder / "shared" / "realworld" for folder in here.parents[1:])
    return next((f for f in found if f.is_dir()), here.parents[2] / "shared" / "realworld")


REALWORLD = _corpus()


def real(relative: str) -> str:
    path = REALWORLD / relative
    if not path.exists():
        pytest.skip(f"the real-files corpus is not here ({path})")
    return str(path)


def tiny_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random 2-layer Llama of width 32 around `tokenizer` (its whole vocabulary), saved with it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def real_tokenizer(name: str, template: str | None = None):
    """A tokenizer of ../shared/realworld/tokenizers/<name>, with another real chat template attached when
    `template` names one: a .jinja file under templates/, or a tokenizer_config.json's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real(f"tokenizers/{name}"))
    if template is not None:
        path = Path(real(f"tokenizers/{template}"))
        tokenizer.chat_template = (json.loads(path.read_text())["chat_template"] if path.suffix == ".json"
                                   else path.read_text())
        specials = path.with_name("special_tokens_map.json")  # Gemma's <start_of_turn> / <end_of_turn>: one token each
        if path.suffix == ".json" and specials.is_file():
            extra = [t["content"] if isinstance(t, dict) else t for t in json.loads(specials.read_text())["additional_special_tokens"]]
            tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def gpt2_tokenizer():
    """GPT-2's real vocab.json and merges.txt as GPT2TokenizerFast reads them from a folder (no template, no
    pad). (In transformers 5, GPT2TokenizerFast(vocab_file=..., merges_file=...) builds an empty tokenizer.)"""
    import tempfile

    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(real(f"tokenizers/gpt2/{f}"), Path(folder) / f)
        return GPT2TokenizerFast.from_pretrained(folder)


def bare_gpt2_folder(folder: Path) -> Path:
    """A model folder as a user might copy GPT-2's files: vocab.json and merges.txt, no tokenizer_config.json."""
    tiny_llama(folder, gpt2_tokenizer())
    for f in folder.glob("tokenizer*"):
        f.unlink()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(real(f"tokenizers/gpt2/{f}"), folder / f)
    return folder
