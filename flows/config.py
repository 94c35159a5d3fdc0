"""pipelines.yaml: loaded and validated in this one place, before any work starts.

A bad file fails with the key path and the reason, e.g.
`pipelines.quickstart.stages[3].params.train.lr: Input should be a valid number`.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.params import parse
from tasks.stages import STAGE_TYPES

StageType = Literal["model", "sft", "sample", "label", "import_preferences", "train_reward_model", "ppo", "dpo", "evaluate"]


class ConfigError(ValueError):
    """pipelines.yaml is invalid; the message names the key path and the reason."""


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str  # unique within the pipeline; how later stages name this one in `inputs`
    type: StageType  # what the stage does
    inputs: dict[str, str] = Field(default_factory=dict)  # input slot -> name of an earlier stage
    params: dict[str, Any] = Field(default_factory=dict)  # the stage type's config (see tasks/stages.py)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""  # one line shown by `alignflow validate`
    stages: list[StageSpec]  # in an order where every input comes earlier


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0  # global seed, passed to every stage
    tracking_uri: str | None = None  # MLflow store; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "alignflow"  # MLflow experiment
    workdir: str = "runs"  # stage outputs (content-addressed cache) and MLflow artifacts
    world: dict[str, Any] = Field(default_factory=dict)  # sandbox WorldConfig overrides
    device: str = "auto"  # "auto", "cpu" or "cuda"; multi-GPU goes through `accelerate launch`
    concurrent_stages: bool | None = None  # run independent stages (DPO and PPO) at the same time; None:
    # only with 8 or more CPU cores (on fewer they share the cores and the pipeline got slower)


class PipelinesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: Settings = Field(default_factory=Settings)
    pipelines: dict[str, PipelineSpec]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = _loc(tuple(e["loc"]))
        lines.append(f"{prefix}{'.' if prefix and path and not path.startswith('[') else ''}{path}: {e['msg']}")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str], pipeline: str) -> dict:
    """`stage.param=value` (dots into nested params) or `settings.key=value`; values parsed as YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected stage.param=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected stage.param=value")
        if parts[0] == "settings":
            target = raw.setdefault("settings", {})
        else:
            stages = raw.get("pipelines", {}).get(pipeline, {}).get("stages", [])
            match = [s for s in stages if s.get("name") == parts[0]]
            if not match:
                raise ConfigError(f"--set {item!r}: pipeline {pipeline!r} has no stage {parts[0]!r}")
            target = match[0].setdefault("params", {})
        for p in parts[1:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = yaml.safe_load(value)
    return raw


def load(path: str | Path, pipeline: str | None = None, overrides: list[str] | None = None) -> tuple[PipelinesFile, dict]:
    """Read, override, validate. Returns (config, resolved raw dict for logging)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `pipelines:` at the top")
    if overrides:
        raw = apply_overrides(raw, overrides, pipeline or "")
    try:
        cfg = PipelinesFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{path}:\n{_errors(err)}") from None
    if pipeline is not None and pipeline not in cfg.pipelines:
        raise ConfigError(f"{path}: no pipeline {pipeline!r}; defined: {', '.join(cfg.pipelines)}")
    problems = []
    for pname, spec in cfg.pipelines.items():
        problems += check_pipeline(pname, spec)
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(problems))
    return cfg, raw


def unknown_keys(cls: type, data: Any, where: str) -> list[str]:
    """Keys that are not fields of the (nested) params dataclass; pydantic ignores them silently."""
    if typing.get_origin(cls) in (typing.Union, types.UnionType):  # `X | None`: check against X
        cls = next((a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)), cls)
    if not (dataclasses.is_dataclass(cls) and isinstance(data, dict)):
        return []
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems = [f"{where}.{k}: unknown parameter; {cls.__name__} has {sorted(names)}" for k in data if k not in names]
    for k, v in data.items():
        if k in names:
            problems += unknown_keys(hints[k], v, f"{where}.{k}")
    return problems


def check_pipeline(pname: str, spec: PipelineSpec) -> list[str]:
    """Stage params against their dataclasses; inputs name earlier stages of the right kind."""
    problems, kinds = [], {}
    for i, stage in enumerate(spec.stages):
        where = f"pipelines.{pname}.stages[{i}]"
        stype = STAGE_TYPES[stage.type]
        if stage.name in kinds:
            problems.append(f"{where}.name: duplicate stage name {stage.name!r}")
        unknown = unknown_keys(stype.params, stage.params, f"{where}.params")
        problems += unknown
        try:
            parse(stype.params, stage.params)
        except ValidationError as err:
            problems.append(_errors(err, f"{where}.params"))
        for slot in stage.inputs:
            if slot not in stype.inputs:
                problems.append(f"{where}.inputs.{slot}: {stage.type} takes no input {slot!r}; it takes {sorted(stype.inputs)}")
        for slot, kind in stype.inputs.items():
            optional, kind = kind.endswith("?"), kind.rstrip("?")
            if slot not in stage.inputs:
                if not optional:
                    problems.append(f"{where}.inputs.{slot}: missing (a {kind} from an earlier stage)")
                continue
            src = stage.inputs[slot]
            if src not in kinds:
                problems.append(f"{where}.inputs.{slot}: {src!r} is not an earlier stage")
            elif kinds[src] != kind:
                problems.append(f"{where}.inputs.{slot}: {src!r} gives a {kinds[src]}, {stage.type} needs a {kind}")
        kinds[stage.name] = stype.output
    return problems
