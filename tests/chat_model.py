"""A tiny local chat model built here, as a real user's would look on disk: a byte-level BPE tokenizer
(`tokenizers`), a ChatML chat template, EOS = <|im_end|>, no BOS (as Qwen2), and a small Llama."""

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "You are a helpful assistant.", "Convert this hexadecimal number to decimal: 0x1F", "The answer is 31.",
    "How do I cook rice?", "Rinse the rice and use two cups of water.", "Figure it out yourself.",
    "Write a haiku about autumn.", "Leaves fall, the air cools, the year sighs.", "No.", "Thanks! Anything else?",
    "Summarise the text in one sentence.", "What is the capital of France?", "Paris is the capital of France.",
]


def build_chat_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=None,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
