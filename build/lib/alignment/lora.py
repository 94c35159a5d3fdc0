"""LoRA adapters (PEFT) on a policy: only the adapters train, and the reference policy of DPO and PPO is
the same model with its adapters disabled, so no second copy of the weights is held. Needs the `peft` extra. (QLoRA's 4-bit base weights need bitsandbytes and a
CUDA GPU: not wired yet.)
"""

from __future__ import annotations

import contextlib

from torch import nn

from alignment.config import LoRAConfig  # noqa: F401 - re-exported



def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA needs the `peft` package: pip install 'alignflow[peft]'") from err
    return peft


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap a transformers causal LM in trainable LoRA adapters (base weights frozen). Returns a PeftModel."""
    peft = _peft()
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=targets)
    return peft.get_peft_model(model, config)


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def reference_mode(model: nn.Module):
    """Run a PEFT model as its base model (the reference policy): adapters off, eval mode, no grad."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def merged(model: nn.Module) -> nn.Module:
    """The plain transformers model with the adapters folded into its weights (for saving a policy that
    any tool loads); models without adapters are returned as they are. The PeftModel is spent after."""
    return model.merge_and_unload() if has_adapters(model) else model
