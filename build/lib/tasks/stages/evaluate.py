"""The `evaluate` stage: did the policy get better than its reference, and how far did it move?

On prompts (the `prompts` input's test split, a prompts file, or the test split's prompts of the
preferences): KL (k3 headline, k1 beside it), length, distinct-n; with a reward model, its score of both
answers and the policy's win rate; with the sandbox world, gold reward, gold win rate and banned words.
On the held-out preference pairs: the policy's preference accuracy, DPO's implicit-reward accuracy and
margin, and the reward model's accuracy. Gates bound any metric; a policy that passes them all is
registered under `register_as`.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from alignment.config import DPOConfig, SamplingParams
from tasks import rewards
from tasks.data import DataError, prompt_of, read_prompt_rows
from tasks.stage import ModelStageParams, StageSpec, load_policy, read_preferences, read_prompts, template_preflight

INPUTS = {"policy": "policy", "reference": "policy", "reward_model": "reward_model?", "preferences": "preferences?",
          "prompts": "prompts?", "world": "world?"}
OUTPUT = ("evaluation",)
GATE = re.compile(r"^\s*(>=|<=|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


class Params(ModelStageParams):
    prompts: int = 100  # how many prompts both policies answer
    prompts_file: str | None = None  # prompts to evaluate on; None: the prompts input, else the preferences' test split
    columns: dict[str, str] = {}  # the prompts file's column -> ours, e.g. {question: prompt} (GSM8K)
    sampling: SamplingParams = SamplingParams()  # how answers are sampled
    max_length: int = 1024  # prompt + answer tokens of a held-out pair
    beta: float | None = None  # beta of DPO's implicit reward beta * log(pi / pi_ref) in the pair metrics;
    # None: the beta a dpo stage trained the policy with, else DPO's default
    reward_functions: list[str] = []  # as for grpo: each one's mean over both policies' answers, eval/reward/<name>
    # and eval/ref_reward/<name> (e.g. exact match against a prompts file's `answer` column)
    gates: dict[str, str] = {}  # metric -> bound, e.g. {eval/rm_win_rate: ">= 0.6", eval/kl: "<= 6"}
    register_as: str | None = None  # model-registry name; registered only when every gate passes
    seed: int = 0  # sampling noise

    @field_validator("reward_functions")
    @classmethod
    def _specs(cls, specs: list[str]) -> list[str]:
        return [rewards.check_spec(s) for s in specs]

    @field_validator("gates")
    @classmethod
    def _bounds(cls, gates: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}: {v!r}" for k, v in gates.items() if not GATE.match(str(v))]
        if bad:
            raise ValueError(f"a gate is a comparison with a number, e.g. \">= 0.6\" or \"<= 6\"; got {', '.join(bad)}")
        return gates


class Stage(StageSpec):
    type: Literal["evaluate"]
    params: Params = Params()

    @model_validator(mode="after")
    def _has_prompts(self):
        if self.params.prompts_file is None and not {"prompts", "preferences"} & set(self.inputs):
            raise ValueError("evaluation needs prompts: params.prompts_file, inputs.prompts or inputs.preferences")
        return self


def reward_function_means(specs: list[str], prompts: list, extras: list[dict], rows: list[dict]) -> dict[str, float]:
    """eval/reward/<name> and eval/ref_reward/<name>: each reward function's mean over the policy's and the
    reference's answers (rows: evaluate_policy's), with the prompts' other columns as for training."""
    from alignment.rewards import score

    out = {}
    names = {k for e in extras for k in e}
    columns = {k: [e.get(k) for e in extras] for k in names}
    for spec in specs:
        fns = {spec: rewards.load(spec)}
        for key, column in (("reward", "answer"), ("ref_reward", "reference_answer")):
            _, each = score(fns, {}, prompts, [r[column] for r in rows], columns)
            out[f"eval/{key}/{spec.rpartition(':')[2]}"] = float(each[spec].mean())
    return out


def sources(p) -> dict[str, str]:
    """A prompts file and the reward functions' source files are part of the cache key."""
    from tasks.stages.sample import sources as prompt_sources

    return {**prompt_sources(p), **rewards.source_hashes(p.reward_functions)}


def check_gates(gates: dict[str, str], metrics: dict[str, float]) -> list[str]:
    failed = []
    for name, bound in gates.items():
        op, value = GATE.match(bound).groups()
        if name not in metrics:
            failed.append(f"{name} was not computed (computed: {', '.join(sorted(metrics))})")
        elif not OPS[op](metrics[name], float(value)):
            failed.append(f"{name} = {metrics[name]:.4g}, needs {op} {value}")
    return failed


def rm_accuracy(reward_fn, pairs: list[dict], batch_size: int = 64) -> float:
    """P(r(x, y_w) > r(x, y_l)) over held-out pairs, each prompt read by the reward model's own tokenizer
    and each distinct (prompt, answer) scored once."""
    index: dict[tuple, int] = {}
    for r in pairs:
        for answer in (r["chosen"], r["rejected"]):
            index.setdefault((r["prompt"], r["messages"], answer), len(index))
    keys = list(index)
    scores = []
    for i in range(0, len(keys), batch_size):
        part = keys[i : i + batch_size]
        scores += reward_fn([prompt_of({"prompt": p, "messages": m}) for p, m, _ in part], [a for _, _, a in part]).tolist()
    right = [scores[index[(r["prompt"], r["messages"], r["chosen"])]] > scores[index[(r["prompt"], r["messages"], r["rejected"])]]
             for r in pairs]
    return sum(right) / len(pairs)


def computed_once(ctx, kind: str, params: dict, inputs: dict[str, str], run_id: str, compute):
    """What every evaluate stage with the same inputs computes alike, whatever policy it evaluates (the
    reference's answers, its log-probs of the held-out pairs, the reward model's accuracy on them): computed
    by the first, stored as JSON under `kind` (keyed by params and the inputs' content hashes) and read back by
    the others. Returns the value, and tags the run with its key and whether it was reused."""
    from tasks.store import stage_key

    key = stage_key(kind, params, inputs)
    stored = ctx.store.final(kind, key) / "value.json"
    with ctx.store.lock(kind, key):  # evaluations running at once compute it once
        reused = ctx.store.lookup(kind, key, log=ctx.log) is not None
        if reused:
            value = json.loads(stored.read_text())
        else:
            value = compute()
            (ctx.store.partial(kind, key) / "value.json").write_text(json.dumps(value))
            ctx.store.publish(kind, key, {"run_id": run_id})
    ctx.tracker.set_tags(run_id, {f"{kind}.key": key, f"{kind}.reused": reused})
    return value


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def run(ctx, p: Params, inputs, out: Path, run_id: str) -> dict[str, float]:
    import dataclasses

    import pandas as pd
    import torch

    from alignment.evaluation import answer_pair_logps, evaluate_policy, generate_answers, pair_metrics
    from tasks import schemas
    from tasks.stages.dpo import trained_beta
    from tasks.stages.train_reward_model import examples, load_reward_fn

    policy, tokenizer = load_policy(inputs, dtype=p.dtype)
    reference, _ = load_policy(inputs, "reference", p.dtype)
    test_pairs = read_preferences(inputs, "test") if "preferences" in inputs else []
    extras: list[dict] = []
    if p.prompts_file:
        prompts, extras = read_prompt_rows(p.prompts_file, p.columns)
        prompts, extras = prompts[: p.prompts], extras[: p.prompts]
    elif "prompts" in inputs:
        prompts = read_prompts(inputs, "test", p.prompts)
    else:
        unique = {(r["prompt"], r["messages"]): r for r in test_pairs}
        prompts = [prompt_of(r) for r in list(unique.values())[: p.prompts]]
    if not prompts:
        raise DataError(f"{inputs['preferences'].name}: the test split has no pairs to take prompts from; raise held_out")
    template_preflight(tokenizer, prompts, p.prompts_file or "the evaluation prompts", ctx.log)
    scores = {}
    if "reward_model" in inputs:
        scores["reward_fn"] = load_reward_fn(inputs, dtype=p.dtype)
    if "world" in inputs:
        from tasks.stages.world import gold_scores, has_banned_word, load_world

        world = load_world(inputs)
        scores.update(gold_fn=gold_scores(world), banned_fn=has_banned_word(world))
    ref_answers = computed_once(
        ctx, "reference_answers", {"sampling": dataclasses.asdict(p.sampling), "seed": p.seed + 8, "prompts": digest(prompts)},
        {"reference": inputs["reference"].content_hash}, run_id,
        lambda: generate_answers(reference, tokenizer, prompts, p.sampling, seed=p.seed + 8)[0])
    metrics, rows = evaluate_policy(policy, reference, tokenizer, prompts, p.sampling, seed=p.seed + 7,
                                    reference_answers=ref_answers, **scores)
    metrics.update(reward_function_means(p.reward_functions, prompts, extras, rows))
    if test_pairs:
        pairs = examples(tokenizer, test_pairs, p.max_length)
        beta = p.beta if p.beta is not None else trained_beta(inputs["policy"].path) or DPOConfig().beta
        ctx.tracker.set_tags(run_id, {"implicit_reward.beta": beta})
        reference_logps = computed_once(  # keyed by the token ids it reads: the policy's tokenizer made them
            ctx, "reference_pair_logps", {"pairs": digest([(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in pairs])},
            {"reference": inputs["reference"].content_hash}, run_id,
            lambda: answer_pair_logps(reference, pairs, tokenizer.pad_token_id).tolist())
        metrics.update(pair_metrics(answer_pair_logps(policy, pairs, tokenizer.pad_token_id), torch.tensor(reference_logps), beta))
        if "reward_model" in inputs:
            metrics["eval/rm_accuracy"] = computed_once(
                ctx, "rm_accuracy", {"pairs": digest(test_pairs)}, {"reward_model": inputs["reward_model"].content_hash}, run_id,
                lambda: rm_accuracy(scores["reward_fn"], test_pairs))
    df = schemas.validate(pd.DataFrame(rows), schemas.EVALUATION, "evaluation")
    schemas.write_parquet(df, out / "evaluation.parquet")
    failed = check_gates(p.gates, metrics)
    (out / "gates.json").write_text(json.dumps({"passed": not failed, "failed": failed}, indent=2))
    tags = {"gates.passed": not failed, "gates.failed": "; ".join(failed) or "none"}
    if failed:
        ctx.log(f"EVALUATION GATE FAILED for {inputs['policy'].name}: " + "; ".join(failed) + " -> the policy is NOT registered")
    elif p.register_as:
        version = ctx.tracker.register(inputs["policy"].run_id, inputs["policy"].path, p.register_as)
        tags["registered"] = f"{p.register_as}/{version}"
    ctx.tracker.set_tags(run_id, tags)
    return metrics
