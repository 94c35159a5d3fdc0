"""pipelines.yaml, parsed once into types, before any work starts.

yaml -> `--set` overrides on the raw tree -> `PipelinesFile` (pydantic; a stage is a discriminated union
on `type`; frozen; unknown keys are errors). The flow and the stage tasks receive these typed objects.
A bad file fails with the key path and the reason, e.g.
`pipelines.quickstart.stages[4].params.dpo.betta: unknown parameter`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.stages import MODULES

Stage = Annotated[Union[tuple(m.Stage for m in MODULES.values())], Field(discriminator="type")]
PACKAGED = Path(__file__).parent / "pipelines.yaml"  # a link to the repository's pipelines.yaml


class ConfigError(ValueError):
    """pipelines.yaml is invalid; the message names the key path and the reason."""


class SeveralErrors(Exception):
    """Independent problems of one run (of several stages, or several stages' files), in pipeline order:
    reported together, so that one run shows everything to mend."""

    def __init__(self, errors: list[BaseException]):
        super().__init__(f"{len(errors)} problems")
        self.errors = list(errors)


def raise_together(errors: list[BaseException]) -> None:
    """Nothing for no errors, the error itself for one, SeveralErrors for more (one file two stages read is
    one problem, said once; the same problem in two stages, whose notes say where, is two)."""
    seen, unique = set(), []
    for e in errors:
        said = (type(e), str(e), tuple(getattr(e, "__notes__", ())))
        if said not in seen:
            seen.add(said)
            unique.append(e)
    errors = unique
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SeveralErrors(errors)


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str = ""  # one line shown by `alignflow validate`
    stages: list[Stage]  # in an order where every input comes earlier


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 0  # every stage's seed (data order, sampling, initialisation) unless the stage sets its own
    tracking_uri: str | None = None  # MLflow store; None = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "alignflow"  # MLflow experiment
    workdir: str = "runs"  # stage outputs (content-addressed cache) and MLflow artifacts
    device: str = "auto"  # "auto", "cpu" or "cuda"
    concurrent_stages: bool | None = None  # run independent stages (DPO and PPO) at the same time; None:
    # only with 8 or more CPU cores (on fewer they share the cores and the pipeline got slower)


class PipelinesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    settings: Settings = Field(default_factory=Settings)
    pipelines: dict[str, PipelineSpec]


MESSAGES = {"unexpected_keyword_argument": "unknown parameter", "extra_forbidden": "unknown key"}


def _loc(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i >= 2 and loc[i - 2] == "stages" and isinstance(loc[i - 1], int) and part in MODULES:
            continue  # the union's branch (the stage type) adds nothing to the path
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


RENAMED = {"separate_value_model": "value_model: reward_model, policy or shared"}
"""Parameters of earlier versions, and what replaced them: the unknown-parameter message says so."""


def _message(e: dict) -> str:
    if e["type"] in MESSAGES:
        name = e["loc"][-1] if e["loc"] else None
        return MESSAGES[e["type"]] + (f" (replaced by {RENAMED[name]})" if name in RENAMED else "")
    return e["msg"].removeprefix("Value error, ")


def _errors(err: ValidationError) -> str:
    """One line a problem: where, and what (a validator's own sentence without pydantic's "Value error, ")."""
    return "\n".join(f"{_loc(tuple(e['loc']))}: {_message(e)}" for e in err.errors())


def apply_overrides(raw: dict, overrides: list[str], pipeline: str) -> dict:
    """`stage.param=value` (dots into nested params) or `settings.key=value`; values parsed as YAML."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, _, value = item.partition("=")
        parts = key.split(".")
        if not _ or len(parts) < 2:
            raise ConfigError(f"--set {item!r}: expected STAGE.PARAM=VALUE or settings.KEY=VALUE")
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
    seed = (raw.get("settings") or {}).get("seed", 0)
    for spec in (raw.get("pipelines") or {}).values():  # every stage has params: their defaults and seeds
        for stage in (spec or {}).get("stages") or []:
            if isinstance(stage, dict):
                stage.setdefault("params", {})
    try:
        cfg = PipelinesFile.model_validate(raw, context={"seed": seed if isinstance(seed, int) else 0})
    except ValidationError as err:
        raise ConfigError(f"{path}:\n{_errors(err)}") from None
    if pipeline is not None and pipeline not in cfg.pipelines:
        raise ConfigError(f"{path}: no pipeline {pipeline!r}; defined: {', '.join(cfg.pipelines)}")
    problems = [p for name, spec in cfg.pipelines.items() for p in check_inputs(name, spec)]
    if problems:
        raise ConfigError(f"{path}:\n" + "\n".join(problems))
    return cfg, raw


def check_inputs(pname: str, spec: PipelineSpec) -> list[str]:
    """Stage names are unique; inputs name earlier stages that provide the kind the slot needs."""
    problems: list[str] = []
    provides: dict[str, tuple[str, ...]] = {}
    for i, stage in enumerate(spec.stages):
        where, module = f"pipelines.{pname}.stages[{i}]", MODULES[stage.type]
        if stage.name in provides:
            problems.append(f"{where}.name: duplicate stage name {stage.name!r}")
        for slot in stage.inputs:
            if slot not in module.INPUTS:
                problems.append(f"{where}.inputs.{slot}: {stage.type} takes no input {slot!r}; it takes {sorted(module.INPUTS)}")
        for slot, kind in module.INPUTS.items():
            optional, kind = kind.endswith("?"), kind.rstrip("?")
            if slot not in stage.inputs:
                if not optional:
                    problems.append(f"{where}.inputs.{slot}: missing (a {kind} from an earlier stage)")
                continue
            src = stage.inputs[slot]
            if src not in provides:
                problems.append(f"{where}.inputs.{slot}: {src!r} is not an earlier stage")
            elif kind not in provides[src]:
                problems.append(f"{where}.inputs.{slot}: {src!r} gives {', '.join(provides[src])}; {stage.type} needs a {kind}")
        if stage.resources.launched and not getattr(module, "LAUNCHABLE", False):
            launchable = sorted(t for t, m in MODULES.items() if getattr(m, "LAUNCHABLE", False))
            problems.append(f"{where}.resources: a {stage.type} stage runs in one process; several processes are for {', '.join(launchable)}")
        config = stage.resources.accelerate_config
        if config is not None and not Path(config).is_file():
            problems.append(f"{where}.resources.accelerate_config: no file {config!r} (paths are relative to where you run alignflow)")
        provides[stage.name] = module.OUTPUT
    return problems


def preflight(spec, only: str | None, workdir: str | Path | None = None) -> None:
    """Validate every data file the pipeline reads (all problems at once, of every stage) and load its reward functions,
    before any work. A local model folder's tokenizer is checked, and the conversations of the files that
    go straight to it (sft's data, the pairs of an import that a dpo or reward model stage trains it on)
    are rendered through its chat template. A file is read once in a run (the stage gets what this read:
    tasks.data.read_once), and an import already in the stage store of `workdir` is not read at all."""
    from tasks import rewards
    from tasks.data import DataError, prompt_of, read_prompt_file
    from tasks.stage import key_of, template_preflight
    from tasks.stages import MODULES
    from tasks.stages.import_preferences import import_preferences
    from tasks.stages.sft import import_demonstrations
    from tasks.store import Store

    tokenizers, pairs = {}, {}  # model stage -> its tokenizer; import stage -> its pairs (what this run read)
    errors = []
    quiet = lambda _: None  # noqa: E731 - warnings are the stage's to say, once
    for stage in spec.stages:
        if only is not None and only != stage.name:
            continue
        try:
            if stage.type == "import_preferences":
                stored = workdir is not None and Store(workdir).lookup(stage.type, key_of(stage, MODULES[stage.type], {}))
                if not stored:
                    pairs[stage.name] = import_preferences(stage.params)[0]
            elif stage.type == "model" and Path(stage.params.name_or_path).is_dir():
                from tasks.stages.model import open_tokenizer

                tokenizers[stage.name] = open_tokenizer(stage.params, log=quiet)  # a local folder's tokenizer, before any work
            elif stage.type == "sft" and stage.params.data:
                demos, _ = import_demonstrations(stage.params)
                if stage.inputs.get("policy") in tokenizers:
                    template_preflight(tokenizers[stage.inputs["policy"]], [prompt_of(r) for r in demos.to_dict("records")],
                                       stage.params.data, quiet, stage.params.drop_invalid)
            elif stage.type in ("dpo", "train_reward_model"):
                model = stage.inputs.get("policy") or stage.inputs.get("base")
                if model in tokenizers and stage.inputs.get("preferences") in pairs:
                    rows = pairs[stage.inputs["preferences"]].to_dict("records")
                    template_preflight(tokenizers[model], [prompt_of(r) for r in rows], f"{stage.inputs['preferences']} (its pairs)",
                                       quiet, stage.params.drop_invalid)
            if getattr(stage.params, "prompts_file", None):
                read_prompt_file(stage.params.prompts_file, stage.params.columns)
            for spec in getattr(stage.params, "reward_functions", []):
                rewards.load(spec)
        except (DataError, rewards.RewardFunctionError) as err:  # the other stages' files are still checked
            errors.append(err)
    raise_together(errors)
