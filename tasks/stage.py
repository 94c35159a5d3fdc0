"""The one lifecycle every stage shares, and what stage modules have in common.

`execute`: cache lookup -> MLflow run with lineage tags -> the stage's body -> atomic publish ->
artifacts -> FINISHED / FAILED / KILLED. A stage module (tasks/stages/<type>.py) holds only its
`Params`, its `Stage` (the pipelines.yaml entry), INPUTS, OUTPUT and its `run` body.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from alignment.config import DTYPES
from tasks.context import STOP, StageContext  # noqa: F401 - StageContext: what stage bodies are given
from tasks.data import TOOLS, DataError, prompt_of
from tasks.launch import run_body
from tasks.store import StageOutput, file_hash, stage_key

if TYPE_CHECKING:  # torch, transformers, pandas and MLflow are imported where a stage runs, so that loading
    import pandas as pd  # and validating pipelines.yaml (every stage module's Params) takes a fraction of a second

HISTORY = "train_metrics.jsonl"
METRICS = "metrics.json"  # a stage's final metrics, in its output folder
HOLD = "ALIGNFLOW_TEST_HOLD"  # tests only: "STEP:FILE" holds a training stage after step STEP (see hold_for_test)


# -- config -----------------------------------------------------------------------------------------


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for name, f in model.model_fields.items():
        if f.is_required():
            continue
        value = f.get_default(call_default_factory=True)
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _merged(defaults: Any, given: Any, seed: int | None) -> Any:
    """`given` merged onto `defaults` key by key, nested; a `seed` the user did not give is the pipeline's."""
    if not (isinstance(defaults, dict) and isinstance(given, dict)):
        return given
    out = {**defaults, **{k: _merged(defaults.get(k), v, seed) for k, v in given.items()}}
    for k, v in defaults.items():
        if k not in given and isinstance(v, dict):
            out[k] = _merged(v, {}, seed)
    if seed is not None and "seed" in defaults and "seed" not in given:
        out["seed"] = seed
    return out


class StageParams(BaseModel):
    """A stage's params: frozen, unknown keys are errors. What the yaml gives is merged onto the defaults
    field by field (a partial `train: {max_steps: 10}` keeps the algorithm's learning rate), and every
    `seed` left unset is settings.seed (the validation context's `seed`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _with_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        seed = (info.context or {}).get("seed")
        return _merged(_defaults(cls), data, seed)


class ModelStageParams(StageParams):
    """Params of a stage that loads models (policy, reference, reward model)."""

    dtype: Literal[DTYPES] = "auto"  # their weights: "auto" = the dtype the
    # checkpoint was saved in on an accelerator (bf16 for today's chat models, as TRL loads them), float32 on a CPU


class Resources(BaseModel):
    """Where a stage runs. Not part of its cache key: N processes compute what one does (tasks/launch.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    processes: int = Field(1, ge=1)  # processes on the host (each node); > 1 starts the stage with torchrun (DDP: gloo on CPU, NCCL on GPUs)
    accelerate_config: str | None = None  # an accelerate config (configs/accelerate/fsdp2.yaml, zero3.yaml, ...): starts it with accelerate launch
    nodes: int = Field(1, ge=1)  # hosts; > 1: one flow run a node on the workers of `pool`, joined by torchrun's c10d rendezvous
    pool: str | None = None  # the Prefect work pool whose workers run the nodes (nodes > 1)
    rendezvous: str | None = None  # the address the nodes reach this pipeline's host at (its rendezvous store); default: its host name

    @model_validator(mode="after")
    def _nodes(self) -> "Resources":
        if self.nodes > 1 and not self.pool:
            raise ValueError(f"nodes: {self.nodes} runs a node on each of {self.nodes} hosts through a Prefect work pool: "
                             "name it as pool (prefect work-pool create POOL --type process; prefect worker start --pool POOL on each host)")
        if self.nodes > 1 and self.accelerate_config is not None:
            raise ValueError("nodes > 1 starts torchrun on each node; accelerate_config is for one host (drop one of them)")
        return self

    @property
    def launched(self) -> bool:
        """Whether the stage runs in processes of its own rather than in the pipeline's."""
        return self.processes > 1 or self.nodes > 1 or self.accelerate_config is not None


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str  # unique within the pipeline; how later stages name this one in `inputs`
    inputs: dict[str, str] = Field(default_factory=dict)  # input slot -> name of an earlier stage
    resources: Resources = Resources()  # processes (training stages: sft, train_reward_model, dpo, ppo, grpo, rloo)


# -- what bodies share ------------------------------------------------------------------------------


METRICS_EVERY_S = 2.0  # training metrics reach MLflow at most this long after their step


def metrics_logger(ctx: StageContext, run_id: str, out: Path):
    """Per step: to the stage's history file (kept across a crash), and to MLflow with the step, written
    together every METRICS_EVERY_S seconds (the rest when the run ends)."""

    def log(step: int, metrics: dict[str, float]) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt("stop requested")
        ctx.tracker.log_metrics(run_id, {f"train/{k}": v for k, v in metrics.items()}, step, every_s=METRICS_EVERY_S)
        with open(out / HISTORY, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        hold_for_test(step)

    return log


def hold_for_test(step: int) -> None:
    """With ALIGNFLOW_TEST_HOLD="STEP:FILE" set, a training stage that logs step STEP writes FILE and waits
    there until it is stopped (Ctrl-C, SIGTERM) or killed. The crash tests signal a stage at a point they
    choose (after a checkpoint, before the end) instead of after a sleep that races the machine's speed."""
    at, _, marker = os.environ.get(HOLD, "").partition(":")
    if not marker or step != int(at):
        return
    Path(marker).write_text(f"{os.getpid()}\n")
    while not STOP.is_set():
        time.sleep(0.05)
    raise KeyboardInterrupt("stop requested")


def training_history(out: Path) -> list[dict]:
    """The per-step metrics of the finished training, one row a step (the curves are MLflow's charts)."""
    from tasks import plots

    return plots.finish_history(out / HISTORY)


def stage_metrics(path: str | Path) -> dict[str, float]:
    """The final metrics a finished stage wrote to its output folder."""
    file = Path(path) / METRICS
    return json.loads(file.read_text()) if file.is_file() else {}


def write_first_sequence(out: Path, tokenizer, prompt_ids: list[int], answer_ids: list[int]) -> None:
    """The first training sequence as the model reads it (`first_sequence.json`): check the chat template."""
    (out / "first_sequence.json").write_text(json.dumps(
        {"text": tokenizer.decode(prompt_ids + answer_ids), "ids": prompt_ids + answer_ids, "answer_start": len(prompt_ids)}, indent=1))


def model_dir(inputs: dict[str, StageOutput], slot: str) -> Path:
    return Path(inputs[slot].path) / "model"


def load_policy(inputs: dict[str, StageOutput], slot: str = "policy", dtype: str = "auto"):
    from alignment.models import load_causal_lm, load_tokenizer

    path = model_dir(inputs, slot)
    return load_causal_lm(path, dtype=dtype), load_tokenizer(path)


def save_model(model, tokenizer, out: Path) -> None:
    """The model and tokenizer as a Hugging Face folder `out/model`, written once. In a stage on several
    processes every rank calls this: sharded parameters (FSDP2) are gathered into the full state dict
    (a collective), and only rank 0 writes (the others, whose `out` is scratch, get an empty folder)."""
    import torch.distributed as dist

    from alignment.sampling import declare_stop_tokens

    state = None
    if dist.is_available() and dist.is_initialized():
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            (out / "model").mkdir(parents=True, exist_ok=True)
            return
    declare_stop_tokens(model, tokenizer)
    model.save_pretrained(out / "model", **({"state_dict": state} if state is not None else {}))
    tokenizer.save_pretrained(out / "model")


def read_table(inputs: dict[str, StageOutput], slot: str, file: str, schema) -> "pd.DataFrame":
    import pandas as pd

    from tasks import schemas

    source = Path(inputs[slot].path) / file
    return schemas.validate(pd.read_parquet(source), schema, source)


def read_preferences(inputs: dict[str, StageOutput], split: str | None = None) -> list[dict]:
    from tasks import schemas

    pairs = read_table(inputs, "preferences", "preferences.parquet", schemas.PREFERENCES)
    return pairs[pairs["split"] == split].to_dict("records") if split else pairs.to_dict("records")


def read_prompts(inputs: dict[str, StageOutput], split: str, n: int) -> list:
    """The first n prompts of a split of a `prompts` input (the sandbox world, or any prompts table)."""
    from tasks import schemas

    df = read_table(inputs, "prompts", "prompts.parquet", schemas.PROMPTS)
    return [prompt_of(r) for r in df[df["split"] == split].head(n).to_dict("records")]


def template_preflight(tokenizer, prompts: list, source: str, log: Callable[[str], None] = print,
                       drop_invalid: bool = False) -> dict[int, str]:
    """Every distinct conversation shape (its sequence of roles) of the data rendered through the
    tokenizer's chat template before any training. A template that raises (a role it rejects, turns that
    do not alternate) is a DataError naming the rows and quoting the template; a template that leaves a
    message's text out of what it renders (an older Phi-3 drops the system turn) gets one warning a role.
    With drop_invalid the rows that cannot render are returned instead ({1-based row: why}); else {}."""
    from alignment.data import render_prompt

    if not getattr(tokenizer, "chat_template", None):
        return {}
    shapes: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            shapes.setdefault(tuple(m["role"] for m in prompt), []).append(i + 1)
    problems, dropped, bad = [], {}, {}
    for shape, rows in shapes.items():
        example = prompts[rows[0] - 1]
        try:
            text, _ = render_prompt(tokenizer, example)
        except Exception as err:  # noqa: BLE001 - jinja's TemplateError, or what the template raises itself
            said = f"the chat template says {str(err) or type(err).__name__!r}"
            problems.append(f"{len(rows)} row(s) with the turns {' -> '.join(shape)} (rows {rows[:10]}"
                            f"{' ...' if len(rows) > 10 else ''}): {said}")
            bad.update({row: said for row in rows})
            continue
        for m in example:
            if m["content"].strip() and m["content"].strip() not in text:
                dropped[m["role"]] = dropped.get(m["role"], 0) + len(rows)
            if m["role"] == TOOLS and not any(t.get("function", t).get("name", "") in text for t in m["tools"]):
                dropped[TOOLS] = dropped.get(TOOLS, 0) + len(rows)  # a template that ignores tools=

    if problems and drop_invalid:
        log(f"[{source}] dropped {len(bad)} row(s) the chat template cannot render (drop_invalid): " + "; ".join(problems))
    elif problems:
        raise DataError(f"{source}: the model's chat template cannot render {len(problems)} kind(s) of conversation:\n"
                        + "\n".join(problems) + "\nfix or leave out those rows, or give the model stage a template that "
                        "takes them (a template that rejects system turns: system_turns: merge folds them into the user's)")
    for role, n in dropped.items():
        what = "the tool definitions (tools=)" if role == TOOLS else f"the {role} turn's text"
        log(f"warning: {source}: the model's chat template leaves {what} out of what it renders, in {n} row(s): "
            f"the model never reads it; use a template that renders {role} turns if it matters")
    return bad


def token_preflight(tokenizer, pairs: list[dict], max_length: int, source: str, drop_invalid: bool = False,
                    log: Callable[[str], None] = print) -> tuple[list, list[str]]:
    """The pairs tokenised for training, checked before any training: the chat template renders them
    (template_preflight), BOS at most once at the start, EOS once at the end of each answer, no answer
    truncated to nothing, and chosen != rejected after truncation to max_length. A DataError names the
    rows otherwise; with drop_invalid those rows are left out instead. Returns (the PairExamples of the
    kept pairs, a line for each pair left out)."""
    from alignment.data import tokenize_pairs

    unrenderable = template_preflight(tokenizer, [prompt_of(p) for p in pairs], source, log, drop_invalid)
    rejects = [f"{source}: row {row}: {why}" for row, why in sorted(unrenderable.items())]
    pairs = [p for i, p in enumerate(pairs, start=1) if i not in unrenderable]
    examples = tokenize_pairs(tokenizer, [prompt_of(p) for p in pairs], [p["chosen"] for p in pairs],
                              [p["rejected"] for p in pairs], max_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    checks = {
        "have chosen == rejected after truncation": lambda e: e.chosen_ids == e.rejected_ids,
        "have an answer truncated to nothing (only EOS, or less, is left)": lambda e: min(len(e.chosen_ids), len(e.rejected_ids)) <= 1,
        "start with BOS twice (the chat template and the tokenizer both add it)":
            lambda e: bos is not None and e.prompt_ids[:2] == [bos, bos],
        "end an answer with EOS twice": lambda e: any(a[-2:] == [eos, eos] for a in (e.chosen_ids, e.rejected_ids)),
    }
    left_out: set[int] = set()
    for problem, bad in checks.items():
        rows = [i + 1 for i, e in enumerate(examples) if bad(e)]
        if rows and not drop_invalid:
            raise DataError(
                f"{source}: {len(rows)} pair(s) {problem} with max_length={max_length} tokens "
                f"(rows {rows[:20]}{' ...' if len(rows) > 20 else ''}); raise max_length or drop them (drop_invalid: true)")
        rejects += [f"{source}: pair {row}: {problem[5:] if problem.startswith('have ') else problem} with max_length={max_length}"
                    for row in rows if row not in left_out]
        left_out.update(rows)
    kept = [e for i, e in enumerate(examples, start=1) if i not in left_out]
    if not kept:
        raise DataError(f"{source}: no pair is left to train on ({len(rejects)} left out); raise max_length or fix the data")
    if left_out:
        log(f"[{source}] left out {len(left_out)} pair(s) that fail the token checks (drop_invalid); listed in rejects.parquet")
    return kept, rejects


def write_rejects(out: Path, rejects: list[str]) -> None:
    """The rows a stage left out (drop_invalid) and why, as `rejects.parquet` in its output."""
    if rejects:
        import pandas as pd

        from tasks import schemas

        schemas.write_parquet(pd.DataFrame({"problem": rejects}), out / "rejects.parquet")


# -- the lifecycle ----------------------------------------------------------------------------------


def key_of(stage, module, inputs: dict[str, StageOutput]) -> str:
    """The stage's cache key: its type, params, code, and the content of its inputs and source files.
    An input's content hash is what its folder holds: computed when it was published, and checked again by
    Store.lookup before a cached output is reused (an edited folder is computed again, never read)."""
    hashes = {slot: o.content_hash for slot, o in inputs.items()}
    if hasattr(module, "sources"):
        hashes.update(module.sources(stage.params))
    return stage_key(stage.type, {"params": stage.params.model_dump(mode="json")}, hashes)


def execute(ctx: StageContext, stage, module, inputs: dict[str, StageOutput]) -> StageOutput:
    """Cache lookup -> MLflow run with lineage -> body -> atomic publish -> artifacts -> status."""
    import pandas as pd

    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")
    name, stage_type, params = stage.name, stage.type, stage.params
    params_dict = {"params": params.model_dump(mode="json")}
    key = key_of(stage, module, inputs)
    lineage = {}
    for slot, o in inputs.items():
        lineage.update({
            f"lineage.{slot}.stage": o.name, f"lineage.{slot}.run_id": o.run_id,
            f"lineage.{slot}.content_hash": o.content_hash,
            f"lineage.{slot}.artifact_uri": ctx.tracker.output_uri(o.run_id, o.path),
        })
    tags = {"alignflow.stage": name, "alignflow.stage_type": stage_type, "alignflow.cache_key": key,
            "alignflow.processes": str(stage.resources.processes), "alignflow.nodes": str(stage.resources.nodes), **lineage}
    run_id = ctx.tracker.start_run(name, tags, parent_id=ctx.parent_run_id)
    try:
        ctx.tracker.log_params(run_id, params_dict)
        # One computation per key, across threads and processes: a second run of the same stage waits here,
        # then finds the first one's output published and reuses it.
        waiting = f"[{name}] another run is computing this stage (the same key {key}): waiting to reuse its output"
        with ctx.store.lock(stage_type, key, on_wait=lambda: ctx.log(waiting)):
            record = ctx.store.lookup(stage_type, key, log=ctx.log)
            if record is not None:
                ctx.log(f"[{name}] unchanged inputs, params and code: reusing {record['run_id']}")
                final = ctx.store.final(stage_type, key)
                ctx.tracker.set_tags(run_id, {"alignflow.cache": "hit", "alignflow.reused_run_id": record["run_id"],
                                              "alignflow.content_hash": record["content_hash"]})
                ctx.tracker.log_metrics(run_id, stage_metrics(final), step=0)  # so that runs sharing it compare fully
                ctx.tracker.end_run(run_id)
                return StageOutput(name, stage_type, str(final), key, record["content_hash"], record["run_id"], cached=True,
                                   duration_s=record.get("duration_s"))
            ctx.tracker.set_tags(run_id, {"alignflow.cache": "miss"})
            out = ctx.store.partial(stage_type, key)
            for slot, o in inputs.items():
                for data in Path(o.path).glob("*.parquet"):
                    ctx.tracker.log_dataset(run_id, pd.read_parquet(data), source=str(data), name=f"{o.name}/{data.stem}",
                                            digest=file_hash(data), context=slot)
            started = time.perf_counter()
            metrics = run_body(ctx, stage, module, inputs, out, run_id)  # here, or on resources.processes
            duration = round(time.perf_counter() - started, 3)  # the stage's own work: no MLflow run set-up or upload
            (out / METRICS).write_text(json.dumps(metrics, indent=2))
            final, content_hash = ctx.store.publish(stage_type, key, {"run_id": run_id, "stage": name, "duration_s": duration})
            ctx.tracker.log_metrics(run_id, {**metrics, "duration_s": duration}, step=0)
            ctx.tracker.log_artifact(run_id, final, "output")
            ctx.tracker.set_tags(run_id, {"alignflow.content_hash": content_hash})
            ctx.tracker.end_run(run_id)
            ctx.log(f"[{name}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
            return StageOutput(name, stage_type, str(final), key, content_hash, run_id, duration_s=duration)
    except KeyboardInterrupt:
        ctx.tracker.end_run(run_id, "KILLED")
        raise
    except BaseException as err:
        ctx.tracker.set_tags(run_id, {"alignflow.error": f"{type(err).__name__}: {err}"[:5000],
                                      "alignflow.traceback": traceback.format_exc()[-5000:]})  # for a bug report
        ctx.tracker.end_run(run_id, "FAILED")
        err.add_note(f"stage {name!r} (MLflow run {run_id})")  # where it happened, for the command line's message
        raise
