"""The sandbox's tokenizer (word level, trained offline with `tokenizers`) and tiny Llama model."""

from __future__ import annotations

from dataclasses import dataclass

from alignment.sandbox.world import (
    BANNED_NOUN_TEMPLATES,
    BANNED_TEMPLATES,
    FRAMES,
    PREFIXES,
    SUFFIXES,
    PROMPT_TEMPLATE,
    TOPICS,
    World,
    NEUTRAL_OPENERS,
    POLITE_PHRASES,
    RUDE_PHRASES,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def world_texts(world: World) -> list[str]:
    """Every phrase the world can produce, so the vocabulary covers all answers."""
    texts = [PROMPT_TEMPLATE.format(ask=frame.format(task=task)) for frames in FRAMES.values() for frame in frames
             for t in TOPICS.values() for task in t["tasks"]]
    texts += PREFIXES + SUFFIXES
    texts += [s for t in TOPICS.values() for s in t["advice"]]
    texts += POLITE_PHRASES + RUDE_PHRASES + NEUTRAL_OPENERS
    texts += [t.format(w=w) for t in BANNED_TEMPLATES + BANNED_NOUN_TEMPLATES for w in world.cfg.banned_words]
    return texts


def build_tokenizer(texts: list[str]):
    """Word-level tokenizer trained on `texts`; prompts get <bos> prepended, answers end in <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


@dataclass(frozen=True)
class TinyModelConfig:
    hidden_size: int = 128  # width of the residual stream
    num_layers: int = 3  # transformer blocks
    num_heads: int = 4  # attention heads
    intermediate_size: int = 384  # MLP width
    max_positions: int = 128  # longest prompt + answer, in tokens


def build_model(tokenizer, cfg: TinyModelConfig, seed: int = 0):
    """A tiny Llama with random weights (seeded) for the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.models import MODEL_BUILD_LOCK

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with MODEL_BUILD_LOCK:
        return LlamaForCausalLM(config)
