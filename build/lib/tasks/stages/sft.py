"""The `sft` stage: supervised fine-tuning of a policy on demonstrations, the loss on the answers only.

Demonstrations come from a file (`data`: Alpaca, ShareGPT conversations, TRL `messages` or
prompt/completion, auto-detected) or from an input that provides them (the sandbox world).
Conversations are rendered with the policy tokenizer's chat template; each assistant turn of a
conversation is a demonstration of its own (its conversation so far as the prompt), so the loss covers
every assistant turn and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from alignment.config import SFTConfig
from tasks.data import (DataError, DEMO_LAYOUTS, DEMONSTRATION_FORMATS, convert_rows, detect_demo_layout, prompt_columns, prompt_of,
                        read_once, readable_message)
from tasks.stage import (ModelStageParams, StageSpec, load_policy, metrics_logger, read_table, template_preflight, training_history,
                        save_model, write_first_sequence, write_rejects)
from tasks.store import dir_hash, file_hash

INPUTS = {"policy": "policy", "demonstrations": "demonstrations?"}
LAUNCHABLE = True  # resources.processes > 1 runs it under torchrun / accelerate launch (tasks/launch.py)
OUTPUT = ("policy",)


class Params(ModelStageParams):
    data: str | None = None  # demonstrations file or `datasets` folder; None: the `demonstrations` input
    format: Literal[DEMONSTRATION_FORMATS] = "auto"  # auto, alpaca, sharegpt, messages, prompt_completion
    columns: dict[str, str] = {}  # the file's column -> ours, e.g. {question: instruction}
    drop_invalid: bool = False  # train on the rows that pass every check (reading, chat template, max_length) and write
    # the others to rejects.parquet instead of failing
    sft: SFTConfig = SFTConfig()  # training (TRL's defaults: lr 2e-5, max_length 1024)


class Stage(StageSpec):
    type: Literal["sft"]
    params: Params = Params()

    @model_validator(mode="after")
    def _one_source(self):
        if (self.params.data is None) == ("demonstrations" not in self.inputs):
            raise ValueError("give demonstrations either as params.data (a file) or as inputs.demonstrations, not both or neither")
        return self


@read_once
def completion_columns(completion: str | dict) -> dict[str, str]:
    """An answer's columns: its text; a tool call also its message, which the chat template renders."""
    if isinstance(completion, str):
        return {"completion": completion, "completion_message": ""}
    return {"completion": readable_message(completion).split(": ", 1)[1], "completion_message": json.dumps(completion, ensure_ascii=False)}


def completions(tokenizer, rows: list[dict], source: str, drop_invalid: bool = False) -> tuple[list[str], list[int]]:
    """(the answer texts to learn, the 1-based rows whose tool calls the chat template does not write): a tool
    call's text is what the template writes for it. Such rows are a DataError unless drop_invalid."""
    from alignment.data import render_answer

    out, silent = [], []
    for i, r in enumerate(rows, start=1):
        if not r.get("completion_message"):
            out.append(r["completion"])
            continue
        message = json.loads(r["completion_message"])
        text = render_answer(tokenizer, prompt_of(r), message)
        out.append(text)
        if not all(c["function"]["name"] in text for c in message["tool_calls"]):
            silent.append(i)
    if silent and not drop_invalid:
        raise DataError(f"{source}: the model's chat template does not write the tool calls of {len(silent)} "
                        f"demonstration(s) (rows {silent[:20]}): it does not render tool_calls; use a template that does "
                        f"(e.g. Qwen's or Llama-3.1's), or leave the tool-calling rows out (drop_invalid: true)")
    return out, silent


@read_once
def import_demonstrations(p: Params):
    """The demonstrations of p.data as a validated table; a DataError lists every problem."""
    import pandas as pd

    from tasks import schemas

    rows, problems = convert_rows(p.data, DEMO_LAYOUTS, detect_demo_layout, p.format, p.columns)
    if problems and not p.drop_invalid:
        raise DataError(f"{len(problems)} problem(s) in {p.data} (nothing was written):\n" + "\n".join(problems))
    if not rows:
        raise DataError(f"{p.data}: no demonstrations" + (f" ({len(problems)} row(s) dropped as invalid)" if problems else ""))
    df = pd.DataFrame([{**prompt_columns(prompt), **completion_columns(completion)}
                       for _, _, demos in rows for prompt, completion in demos])  # a conversation: one per assistant turn
    return schemas.validate(df, schemas.DEMONSTRATIONS, p.data), pd.DataFrame({"problem": problems})


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.data import tokenize_demonstrations
    from alignment.trainers.common import set_seed
    from alignment.trainers.sft import SFTTrainer
    from tasks import schemas

    source = p.data or inputs["demonstrations"].name
    problems: list[str] = []
    if p.data:
        demos, rejects = import_demonstrations(p)
        problems = list(rejects["problem"])
    else:
        demos = read_table(inputs, "demonstrations", "demonstrations.parquet", schemas.DEMONSTRATIONS)
    set_seed(p.sft.train.seed)
    policy, tokenizer = load_policy(inputs, dtype=p.dtype)
    rows = demos.to_dict("records")
    index = list(range(1, len(rows) + 1))  # each kept demonstration's row in the demonstrations table
    unrenderable = template_preflight(tokenizer, [prompt_of(r) for r in rows], source, ctx.log, p.drop_invalid)
    problems += [f"{source}: demonstration {row}: {why}" for row, why in sorted(unrenderable.items())]
    index = [i for i in index if i not in unrenderable]
    answers, silent = completions(tokenizer, [rows[i - 1] for i in index], source, p.drop_invalid)
    problems += [f"{source}: demonstration {index[k - 1]}: the chat template does not write its tool call" for k in silent]
    silent_rows = set(silent)
    kept = [k for k in range(len(index)) if k + 1 not in silent_rows]
    index, answers = [index[k] for k in kept], [answers[k] for k in kept]
    examples = tokenize_demonstrations(tokenizer, [prompt_of(rows[i - 1]) for i in index], answers, p.sft.max_length)
    cut = {k for k, (_, answer) in enumerate(examples) if len(answer) <= 1}
    if cut and not p.drop_invalid:
        rows_cut = sorted(index[k] for k in cut)
        raise DataError(f"{len(cut)} demonstration(s) lose their whole answer to max_length={p.sft.max_length} "
                        f"(rows {rows_cut[:20]}); raise sft.max_length or shorten their prompts (or drop_invalid: true)")
    problems += [f"{source}: demonstration {index[k]}: its answer is cut to nothing at max_length={p.sft.max_length}"
                 for k in sorted(cut)]
    examples = [e for k, e in enumerate(examples) if k not in cut]
    if not examples:
        raise DataError(f"{source}: no demonstration is left to train on ({len(problems)} left out)")
    write_rejects(out, problems)
    if problems:
        ctx.log(f"[sft] left out {len(problems)} invalid row(s) or demonstration(s) of {source}; their reasons are in rejects.parquet")
    write_first_sequence(out, tokenizer, *examples[0])
    trainer = SFTTrainer(policy, examples, tokenizer.pad_token_id, p.sft, output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    rows = training_history(out)
    save_model(trainer.model, tokenizer, out)
    return {"final_loss": rows[-1]["loss"], "demonstrations": float(len(examples)),
            **({"rows_invalid": float(len(problems))} if p.drop_invalid else {})}


def sources(p: Params) -> dict[str, str]:
    if p.data is None:
        return {}
    path = Path(p.data)
    return {"data": dir_hash(path) if path.is_dir() else file_hash(path) if path.exists() else p.data}
