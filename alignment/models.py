"""Models of RLHF on top of Hugging Face transformers: reward model, policy with value head, reference.

Everything loads from any Hugging Face model id or local directory and saves back to a normal Hugging
Face directory (config.json + model.safetensors), so other tools can load what alignflow trains.
Remote code is never trusted unless the caller asks for it with the trust_remote_code argument.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from alignment.config import DTYPES
from alignment.logprobs import answer_pass

Tensor = torch.Tensor

# transformers' from_pretrained monkeypatches torch.nn.init and PreTrainedModel.init_weights for the
# duration of a load. Two loads interleaved in threads (parallel pipeline branches) restore each other's
# patches and leave weights uninitialised or on the meta device, so every model construction holds this.
MODEL_BUILD_LOCK = threading.RLock()


def serialized(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with MODEL_BUILD_LOCK:
            return fn(*args, **kwargs)

    return wrapper


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions.

    attention_mask: [B, T] of 0/1. Returns [B, T] int64: cumsum(mask) - 1, clamped at 0 on padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last non-pad token of each row; correct for left and right padding.

    attention_mask: [B, T]. Returns [B] int64.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
    return (attention_mask.long() * positions).argmax(-1)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """A tokenizer with a pad token (the EOS token when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer




def weights_dtype(dtype: str | torch.dtype | None = "auto"):
    """What from_pretrained gets as dtype. "auto": on an accelerator the dtype the checkpoint was saved in (bf16
    for today's chat models, as transformers 5 and TRL load them), on a CPU float32 (bf16 weights there are slow
    and lose AdamW's small updates); "saved": the checkpoint's dtype everywhere (a copy of a model);
    "float32" / "bfloat16" / "float16": that dtype. fp32 weights keep mixed_precision's meaning (autocast)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return "auto" if torch.cuda.is_available() else torch.float32
    if dtype == "saved":
        return "auto"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {list(DTYPES)}")
    return getattr(torch, dtype)


@serialized
def load_causal_lm(
    name_or_path: str | Path, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False
) -> PreTrainedModel:
    """Any causal LM by Hugging Face id or local path, its weights in weights_dtype(dtype)."""
    return AutoModelForCausalLM.from_pretrained(
        str(name_or_path), dtype=weights_dtype(dtype), trust_remote_code=trust_remote_code
    )


@contextlib.contextmanager
def quiet_load_report():
    """transformers' load report held back: loading an LM as a sequence classifier (head "missing", LM head
    "unexpected") or a reward model as a bare backbone (head "unexpected") is what was asked for."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


@serialized
def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen reference model: a deep copy in eval mode with no gradients."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


class RewardModel(nn.Module):
    """r_phi(x, y) = w^T h(x ++ y) + b, h = backbone's last hidden state at the last non-pad token.

    Wraps a Hugging Face `...ForSequenceClassification` model with one label, so a saved reward model
    is a standard directory that TRL and transformers load as a sequence classifier. Pooling is done
    here, from the attention mask (not from pad_token_id, which breaks when pad == eos), and positions
    are computed from the mask, so left and right padding give the same reward.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        if not hasattr(model, "score"):
            raise ValueError(f"{type(model).__name__} has no `score` head; use a decoder LM family (Llama, Qwen2, GPT-2, ...)")
        self.model = model

    @classmethod
    @serialized
    def from_pretrained(
        cls, name_or_path: str | Path, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False
    ) -> "RewardModel":
        """Load a trained reward model, or a pretrained LM with a freshly initialised scalar head.

        transformers' load report (score head "missing", LM head "unexpected") is expected for an LM
        base and is not printed.
        """
        with quiet_load_report():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(name_or_path), num_labels=1, dtype=weights_dtype(dtype), trust_remote_code=trust_remote_code
            )
        return cls(model)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, shared=None):
        """input_ids, attention_mask: [B, T]. Returns rewards [B] (float32).

        With shared= an alignment.prefix.SharedPrefixBatch instead: returns the reward of every answer of
        every row, [B, K], with each prompt computed once (a keyword of forward, so DDP wrappers see the call).
        """
        if shared is not None:
            from alignment.prefix import shared_prefix_hidden

            hidden = shared_prefix_hidden(self.model.base_model, shared)  # [R, L, H]
            flat = hidden.reshape(-1, hidden.shape[-1])[shared.answer_last.view(-1)]  # [B * K, H]
            return self.model.score(flat).squeeze(-1).float().view(shared.answer_last.shape)  # [B, K]
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state  # [B, T, H]
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
        return self.model.score(hidden[rows, last_token_index(attention_mask)]).squeeze(-1).float()  # [B]

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))


def reward_head(path: Path, name: str, like: nn.Linear) -> dict[str, Tensor]:
    """The scalar head `name` of a saved sequence classifier as a state dict for `like` (a Linear(H, 1)); the
    bias is 0 when the head has none (Llama's and Qwen's score heads have none)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if f"{name}.weight" in f.keys():
                weight = f.get_tensor(f"{name}.weight")
                bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in f.keys() else torch.zeros(1)
                if weight.shape != like.weight.shape:
                    raise ValueError(f"{path}: its {name} head is {tuple(weight.shape)}, not a scalar head {tuple(like.weight.shape)}")
                return {"weight": weight.to(like.weight.dtype), "bias": bias.to(like.bias.dtype)}
    raise ValueError(f"{path}: no `{name}` head in {', '.join(f.name for f in files) or 'no safetensors file'}: is it a reward model?")


class PolicyWithValueHead(nn.Module):
    """A causal-LM policy pi_theta and a value function V(s_t) for PPO.

    shared trunk (value_model=None): V = Linear(last hidden state of the policy);
    separate: V = Linear(last hidden state of `value_model`, a second backbone).
    Values are aligned with the labels like `sequence_logprobs`: values[:, t] = V(s before token t).
    """

    VALUE_HEAD_FILE = "value_head.safetensors"
    VALUE_MODEL_DIR = "value_model"

    def __init__(self, policy: PreTrainedModel, value_model: PreTrainedModel | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        hidden = (value_model or policy).config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    @serialized
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        value_model: str = "shared",
        reward_model: str | Path | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
    ) -> "PolicyWithValueHead":
        """The policy at name_or_path with a value function (PPOConfig.value_model): "shared", a head on the
        policy's trunk; "policy", a copy of the policy's backbone; "reward_model", the backbone and scalar head
        of the reward model at `reward_model` (as TRL's PPOTrainer). The reward model reads the policy's token
        ids then: it must share the policy's tokenizer. A directory saved by save_pretrained loads its own
        value function back, whatever value_model says."""
        path = Path(name_or_path)
        policy = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        value_model_dir, head = None, None
        if (path / cls.VALUE_MODEL_DIR).is_dir():
            value_model_dir = path / cls.VALUE_MODEL_DIR
        elif value_model == "policy":
            value_model_dir = path
        elif value_model == "reward_model":
            if reward_model is None:
                raise ValueError('value_model="reward_model" needs the reward model\'s directory as reward_model=')
            value_model_dir, head = Path(reward_model), "score"
        elif value_model != "shared":
            raise ValueError(f"value_model must be 'reward_model', 'policy' or 'shared', not {value_model!r}")
        backbone = None
        if value_model_dir is not None:
            with quiet_load_report():  # a reward model's score head is "unexpected" in a bare backbone
                backbone = AutoModel.from_pretrained(str(value_model_dir), dtype=weights_dtype(dtype),
                                                     trust_remote_code=trust_remote_code)
        model = cls(policy, backbone)
        if (path / cls.VALUE_HEAD_FILE).is_file():
            model.value_head.load_state_dict(load_file(str(path / cls.VALUE_HEAD_FILE)))
        elif head is not None:
            model.value_head.load_state_dict(reward_head(value_model_dir, head, model.value_head))
        return model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, temperature: float = 1.0,
                entropy: bool = False, budget: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """input_ids, attention_mask, mask (1 on answer tokens): [B, T]. Returns (token log-probs [B, T] of the
        answer tokens at temperature tau, values [B, T], entropies [B, T] of softmax(logits / tau) or None), each
        aligned with the labels. The log-probs go through answer_pass: at a real vocabulary only the answer
        positions reach the LM head, in chunks, so [B, T, V] logits are never held."""
        position_ids = position_ids_from_mask(attention_mask)
        shared = self.value_model is None
        out = answer_pass(self.policy, input_ids, attention_mask, mask, position_ids, temperature, budget,
                          entropy=entropy, hidden=shared)
        if shared:
            hidden = out.hidden  # [B, T, H]
        else:
            hidden = self.value_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state  # [B, T, H]
        state_values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)  # [B, T]
        values = torch.zeros_like(state_values)
        values[:, 1:] = state_values[:, :-1]  # value of the state that predicts token t
        return out.logps, values, out.entropies

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.policy.save_pretrained(str(path))
        save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()}, str(path / self.VALUE_HEAD_FILE))
        if self.value_model is not None:
            self.value_model.save_pretrained(str(path / self.VALUE_MODEL_DIR))
