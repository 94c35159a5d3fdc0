import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(vocab_size: int = 40, **kw) -> LlamaConfig:
    defaults = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    defaults.update(kw)
    return LlamaConfig(**defaults)


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="session")
def sandbox_tokenizer():
    """The sandbox world's word-level tokenizer (adds <bos> to every text, no chat template)."""
    from alignment.sandbox.assets import build_tokenizer, world_texts
    from alignment.sandbox.world import World

    return build_tokenizer(world_texts(World()))
