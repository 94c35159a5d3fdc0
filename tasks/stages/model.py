"""The `model` stage: any Hugging Face causal LM (hub id or local folder) as a policy for later stages."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from tasks.data import DataError
from tasks.stage import StageParams, StageSpec, save_model
from tasks.store import dir_hash

INPUTS: dict[str, str] = {}
EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")  # "TypeError: " inside a library's message
OUTPUT = ("policy",)


class Params(StageParams):
    name_or_path: str  # any Hugging Face causal LM id or local folder
    trust_remote_code: bool = False  # run the model repository's own code (only if you trust it)
    system_turns: Literal["merge", "drop", "error"] = "merge"  # when the chat template rejects the system role
    # (Gemma): fold the system text into the first user turn, leave it out, or stop at the first such row


class Stage(StageSpec):
    type: Literal["model"]
    params: Params


def said_by(err: Exception, limit: int = 300) -> str:
    """What an exception's message says, its lines joined (transformers often puts the detail on the second)."""
    lines = (EXCEPTION_PREFIX.sub("", line.strip()) for line in str(err).splitlines())
    text = " ".join(line for line in lines if line) or "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_tokenizer(p: Params, log=print):
    """The model's tokenizer, checked before anything trains: it loads, has an EOS token, fits the
    embeddings, and its chat template takes system turns (or p.system_turns says what to do instead).
    A DataError says what is wrong with the folder otherwise."""
    from transformers import AutoConfig

    from alignment.data import adapt_system_turns
    from alignment.models import load_tokenizer

    name = p.name_or_path
    try:  # first: the tokenizer's loader reads config.json too, and would blame the tokenizer for a broken one
        config = AutoConfig.from_pretrained(name, trust_remote_code=p.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers' many ways to fail: what its message says
        if (Path(name) / "config.json").is_file():
            raise DataError(f"{name}: its config.json cannot be read ({said_by(err)}); a model folder needs the "
                            f"config.json that save_pretrained writes for the model") from None
        config = None  # a tokenizer-only folder, or a hub id out of reach: the tokenizer's load says more
    try:
        tokenizer = load_tokenizer(name, trust_remote_code=p.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - transformers' many ways to fail: what its message says
        said = said_by(err)
        raise DataError(f"{name}: its tokenizer cannot be loaded ({said}). A model folder needs the files that "
                        f"save_pretrained writes: tokenizer.json (or a slow tokenizer's vocabulary files) and "
                        f"tokenizer_config.json; e.g. for GPT-2's vocab.json and merges.txt, "
                        f"GPT2TokenizerFast.from_pretrained(their folder).save_pretrained(folder)") from None
    if not tokenizer("Hello, world.", add_special_tokens=False)["input_ids"]:
        raise DataError(f"{name}: its tokenizer turns text into no tokens ({len(tokenizer)} in its vocabulary): it was "
                        f"saved without its vocabulary; save it again from a tokenizer that encodes text (e.g. "
                        f"GPT2TokenizerFast.from_pretrained(folder with vocab.json and merges.txt))")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{name}: the tokenizer has no EOS token, so no answer could end; set eos_token in its "
                        f"tokenizer_config.json (the token its chat template ends a turn with)")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise DataError(f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings {vocab} rows, so "
                        f"token ids from {vocab} on have no embedding; resize them "
                        f"(model.resize_token_embeddings(len(tokenizer))) and save the model again")
    try:
        complaint = adapt_system_turns(tokenizer, p.system_turns)
    except Exception as err:  # noqa: BLE001 - the template fails without a system turn too
        raise DataError(f"{name}: its chat template cannot render a plain user/assistant conversation: it says "
                        f"{str(err) or type(err).__name__!r}; fix the template (chat_template in tokenizer_config.json)") from None
    if complaint is not None and p.system_turns != "error":
        what = "folded into the first user turn" if p.system_turns == "merge" else "left out"
        log(f"[model] the chat template of {name} rejects system turns (it says {complaint!r}): their text is {what} "
            f"(system_turns: {p.system_turns}; merge, drop or error)")
    return tokenizer


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.models import load_causal_lm

    tokenizer = open_tokenizer(p, ctx.log)
    model = load_causal_lm(p.name_or_path, dtype="saved", trust_remote_code=p.trust_remote_code)  # as saved: later stages choose
    save_model(model, tokenizer, out)
    return {"parameters": float(sum(t.numel() for t in model.parameters())),
            "chat_template": float(bool(getattr(tokenizer, "chat_template", None)))}


def sources(p: Params) -> dict[str, str]:
    path = Path(p.name_or_path)
    return {"model": dir_hash(path)} if path.is_dir() else {"model_id": p.name_or_path}
