"""The `model` stage: any Hugging Face causal LM (hub id or local folder) as a policy for later stages."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from tasks.stage import StageParams, StageSpec, save_model
from tasks.store import dir_hash

INPUTS: dict[str, str] = {}
OUTPUT = ("policy",)


class Params(StageParams):
    name_or_path: str  # any Hugging Face causal LM id or local folder
    trust_remote_code: bool = False  # run the model repository's own code (only if you trust it)


class Stage(StageSpec):
    type: Literal["model"]
    params: Params


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(p.name_or_path, trust_remote_code=p.trust_remote_code)
    tokenizer = load_tokenizer(p.name_or_path, trust_remote_code=p.trust_remote_code)
    save_model(model, tokenizer, out)
    return {"parameters": float(sum(t.numel() for t in model.parameters())),
            "chat_template": float(bool(getattr(tokenizer, "chat_template", None)))}


def sources(p: Params) -> dict[str, str]:
    path = Path(p.name_or_path)
    return {"model": dir_hash(path)} if path.is_dir() else {"model_id": p.name_or_path}
