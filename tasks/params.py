"""The params of each stage type: the fields a stage accepts in pipelines.yaml, one comment each.

Defaults are the sandbox quickstart's tuned values (alignment/sandbox/quickstart.py), kept in one place.
`parse` merges what a stage gives onto them field by field, nested: `--set ppo.ppo.seed=1` changes the
seed and keeps every other PPO default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from alignment.lora import LoRAConfig
from alignment.sampling import SamplingParams
from alignment.sandbox.assets import TinyModelConfig
from alignment.sandbox.quickstart import QuickstartConfig
from alignment.trainers.dpo import DPOConfig
from alignment.trainers.ppo import PPOConfig
from alignment.trainers.reward import RewardConfig
from alignment.trainers.sft import SFTConfig

QS = QuickstartConfig()


@dataclass(frozen=True)
class SFTParams:
    examples: int = QS.sft_examples  # demonstrations drawn from the sandbox world's SFT corpus
    model: TinyModelConfig = QS.model  # size of the tiny Llama built from scratch
    sft: SFTConfig = QS.sft  # training


@dataclass(frozen=True)
class ModelParams:
    name_or_path: str  # any Hugging Face causal LM id or local folder
    trust_remote_code: bool = False  # run the model repository's own code (only if you trust it)


@dataclass(frozen=True)
class SampleParams:
    prompts: int = QS.sample_prompts  # how many prompts to answer
    prompts_file: str | None = None  # one prompt per line (.txt) or a `prompt` column (.jsonl/.csv/.parquet); None = sandbox
    samples_per_prompt: int = QS.samples_per_prompt  # answers per prompt
    sampling: SamplingParams = QS.sampling  # temperature, top-p, top-k, max new tokens


@dataclass(frozen=True)
class LabelParams:
    labeler: str = "simulated"  # "simulated" (the sandbox labeler sigma((g_a - g_b) / tau)) or "human"
    held_out: float = 0.15  # fraction of pairs marked split=test
    db: str = "labels.db"  # human: the label store that `alignflow label serve` writes to
    min_judgements: int = 0  # human: wait until this many judgements of this batch exist
    wait_timeout_s: float = 86_400.0  # human: give up waiting after this long (the stage fails)


@dataclass(frozen=True)
class RewardParams:
    reward: RewardConfig = QS.reward  # training


@dataclass(frozen=True)
class DPOParams:
    dpo: DPOConfig = QS.dpo  # training
    lora: LoRAConfig | None = None  # train LoRA adapters only; the reference is the model with them off


@dataclass(frozen=True)
class PPOParams:
    prompts: int = 2000  # how many prompts rollouts are drawn from
    prompts_file: str | None = None  # as for the sample stage; None = sandbox prompts
    ppo: PPOConfig = QS.ppo  # training
    separate_value_model: bool = QS.separate_value_model  # value function on its own copy of the backbone,
    # not a head on the policy's (value gradients then cannot disturb the policy; twice the weights)
    lora: LoRAConfig | None = None  # LoRA adapters on the policy (reference = adapters off); the value model or head trains in full


@dataclass(frozen=True)
class EvaluateParams:
    prompts: int = QS.eval_prompts  # held-out sandbox prompts
    sampling: SamplingParams = QS.sampling  # how answers are sampled for evaluation
    prompts_from: str = "sandbox"  # "sandbox" (gold reward too) or "preferences" (the test split's prompts)
    max_kl: float | None = None  # gate: eval/kl must be <= this to register the policy
    min_win_rate: float | None = None  # gate: eval/gold_win_rate must be >= this
    register_as: str | None = None  # model-registry name; registered only when every gate passes


def _merged(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _merged(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict) else value
    return out


def with_defaults(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """`given` (a stage's params from pipelines.yaml and --set) merged onto the defaults of the params
    dataclass `cls`, nested dataclasses included; keys that are not fields are kept for the validator."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    defaults = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in defaults.items()}
    return _merged(defaults, given)


def parse(cls: type, given: dict[str, Any]):
    """The params instance of a stage: `given` merged onto the defaults, validated by pydantic."""
    from pydantic import TypeAdapter

    return TypeAdapter(cls).validate_python(with_defaults(cls, given))
