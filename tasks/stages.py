"""One Prefect task per stage type. Each reads its inputs, validates them, calls the core library,
validates its output, logs to MLflow and returns a StageOutput (a path and a run id).

The shared steps (cache lookup, MLflow run, lineage tags, atomic publish, FAILED/KILLED status) are
in `execute`; what differs per stage type is its params dataclass and its `run_*` body.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file, save_file

from alignment.evaluation import evaluate_policy, generate_answers
from alignment.lora import add_lora, merged
from alignment.models import PolicyWithValueHead, RewardModel, load_causal_lm, load_tokenizer
from alignment.sandbox.quickstart import gold_scores, reward_scores, sft_trainer, to_examples
from alignment.sandbox.world import World, WorldConfig
from alignment.trainers.common import set_seed
from alignment.trainers.dpo import DPOTrainer
from alignment.trainers.ppo import PPOTrainer
from alignment.trainers.reward import RewardTrainer
from tasks import plots, schemas
from tasks.labeling import LabelStore
from tasks.params import (
    DPOParams, EvaluateParams, LabelParams, ModelParams, PPOParams, RewardParams, SampleParams, SFTParams, parse,
)
from tasks.preferences import ImportParams, import_preferences
from tasks.store import StageOutput, Store, dir_hash, file_hash, stage_key
from tasks.tracking import Tracker


@dataclass(frozen=True)
class StageType:
    params: type  # the params dataclass
    inputs: dict[str, str]  # input slot -> kind of artifact it needs ("kind?" = optional)
    output: str  # kind of artifact it produces
    run: Callable[..., dict[str, float]] = field(repr=False)  # the body
    sources: Callable[..., dict[str, str]] | None = field(default=None, repr=False)  # content hashes of files it reads


# -- context ----------------------------------------------------------------------------------------


@dataclass
class StageContext:
    tracker: Tracker
    store: Store
    parent_run_id: str
    seed: int
    world: WorldConfig
    log: Callable[[str], None] = print

    def world_model(self) -> World:
        return World(self.world)


# -- bodies: (ctx, params, inputs, out_dir, run_id) -> summary metrics ------------------------------


HISTORY = "train_metrics.jsonl"
STOP = threading.Event()  # set on Ctrl-C / SIGTERM: training stages stop at their next step, marked KILLED


def metrics_logger(ctx: StageContext, run_id: str, out: Path):
    """Per step: to MLflow (with the step) and to the stage's history file (kept across a crash)."""

    def log(step: int, metrics: dict[str, float]) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt("stop requested")
        ctx.tracker.log_metrics(run_id, {f"train/{k}": v for k, v in metrics.items()}, step)
        with open(out / HISTORY, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    return log


def save_curves(out: Path, keys: list[str], title: str) -> list[dict]:
    rows = plots.finish_history(out / HISTORY)
    plots.plot_curves(rows, keys, out / "training_curves.png", title)
    return rows


def run_sft(ctx, p: SFTParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    trainer, tokenizer = sft_trainer(ctx.world_model(), p.examples, p.model, p.sft, ctx.seed,
                                     output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    rows = save_curves(out, ["loss", "lr", "grad_norm"], "SFT")
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"final_loss": rows[-1]["loss"]}


def run_model(ctx, p: ModelParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    model = load_causal_lm(p.name_or_path, trust_remote_code=p.trust_remote_code)
    tokenizer = load_tokenizer(p.name_or_path, trust_remote_code=p.trust_remote_code)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"parameters": float(sum(t.numel() for t in model.parameters()))}


def model_sources(p: ModelParams) -> dict[str, str]:
    path = Path(p.name_or_path)
    return {"model": dir_hash(path)} if path.is_dir() else {"model_id": p.name_or_path}


def run_import(ctx, p: ImportParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    clean, rejects, counts = import_preferences(p)
    n_train = int(len(clean) * (1 - p.held_out))
    clean["split"] = ["train"] * n_train + ["test"] * (len(clean) - n_train)
    clean = schemas.validate(clean, schemas.PREFERENCES, p.path)
    schemas.write_parquet(clean, out / "preferences.parquet")
    if p.drop_invalid and len(rejects):
        schemas.write_parquet(rejects, out / "rejects.parquet")
        ctx.log(f"[import] dropped {counts['rows_invalid']} invalid row(s); their reasons are in rejects.parquet")
    return {k: float(v) for k, v in counts.items()}


def import_sources(p: ImportParams) -> dict[str, str]:
    path = Path(p.path)
    if not path.exists():
        raise schemas.DataError(f"{path}: no such file or folder")
    return {"source": dir_hash(path) if path.is_dir() else file_hash(path)}


def load_policy(inputs, slot: str = "policy"):
    path = Path(inputs[slot].path) / "model"
    return load_causal_lm(path), load_tokenizer(path)


def read_prompts(path: str | None, n: int, ctx, seed_offset: int) -> list[str]:
    """The first n prompts of a file (text: one per line; table: a `prompt` column), or sandbox prompts."""
    if path is None:
        return ctx.world_model().prompts(n, seed=ctx.seed + seed_offset)
    source = Path(path)
    if source.suffix == ".txt":
        prompts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        from tasks.preferences import read_table

        df, problems = read_table(source)
        if problems or "prompt" not in df.columns:
            raise schemas.DataError(f"{source}: needs a `prompt` column" + ("".join("\n" + m for m in problems)))
        prompts = [q for q in df["prompt"].tolist() if isinstance(q, str) and q.strip()]
    if not prompts:
        raise schemas.DataError(f"{source}: no prompts")
    return prompts[:n]


def prompt_sources(p) -> dict[str, str]:
    return {"prompts": file_hash(Path(p.prompts_file))} if p.prompts_file else {}


def run_sample(ctx, p: SampleParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    model, tokenizer = load_policy(inputs)
    prompts = read_prompts(p.prompts_file, p.prompts, ctx, 10)
    rows = []
    for k in range(p.samples_per_prompt):
        answers, _ = generate_answers(model, tokenizer, prompts, p.sampling, seed=ctx.seed * 100 + k)
        rows += [{"prompt": q, "answer": a, "sample": k} for q, a in zip(prompts, answers)]
    df = schemas.validate(pd.DataFrame(rows), schemas.SAMPLES, "samples")
    schemas.write_parquet(df, out / "samples.parquet")
    return {"samples": len(df), "answer_words_mean": float(df["answer"].str.split().str.len().mean())}


def run_label(ctx, p: LabelParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.sandbox.quickstart import stage_label

    source = Path(inputs["samples"].path) / "samples.parquet"
    samples = schemas.validate(pd.read_parquet(source), schemas.SAMPLES, source)
    if p.labeler == "simulated":
        pairs = pd.DataFrame(stage_label(samples.to_dict("records"), ctx.world_model(), ctx.seed))
    elif p.labeler == "human":
        pairs = human_labels(ctx, p, samples, inputs["samples"].content_hash[:16])
    else:
        raise ValueError(f"unknown labeler {p.labeler!r}: use 'simulated' or 'human'")
    pairs["split"] = ["train"] * int(len(pairs) * (1 - p.held_out)) + ["test"] * (len(pairs) - int(len(pairs) * (1 - p.held_out)))
    pairs = schemas.validate(pairs, schemas.PREFERENCES, "preferences")
    schemas.write_parquet(pairs, out / "preferences.parquet")
    return {"pairs": len(pairs), "train_pairs": int((pairs["split"] == "train").sum())}


def human_labels(ctx, p: LabelParams, samples: pd.DataFrame, batch: str) -> pd.DataFrame:
    """Create the labeling batch, wait for min_judgements if asked, and take the judgements present."""
    import time

    store = LabelStore(p.db)
    added = store.add_batch(samples, batch)
    ctx.log(f"[label] {added} new item(s) in {p.db}; label them with `alignflow label serve --db {p.db}`")
    deadline = time.time() + p.wait_timeout_s
    while len(store.judgements(batch)) < p.min_judgements:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(store.judgements(batch))} of {p.min_judgements} judgements after {p.wait_timeout_s} s")
        time.sleep(5.0)
    pairs = store.export(batch)
    if pairs.empty:
        raise schemas.DataError(f"{p.db}: no usable judgements yet for batch {batch} (ties and skips do not count)")
    return pairs


def label_sources(p: LabelParams) -> dict[str, str]:
    """Human labels change without any input changing: the judgements are part of the key."""
    return {"judgements": LabelStore(p.db).fingerprint()} if p.labeler == "human" else {}


def token_preflight(tokenizer, pairs: list[dict], max_length: int, source: str) -> list:
    """The pairs tokenised for training; before any training, every pair must still differ after
    tokenising and truncating to max_length (a DataError naming the rows otherwise)."""
    examples = to_examples(tokenizer, pairs, max_length)
    same = [i + 1 for i, e in enumerate(examples) if e.chosen_ids == e.rejected_ids]
    if same:
        raise schemas.DataError(
            f"{source}: {len(same)} pair(s) have chosen == rejected after truncation to max_length={max_length} "
            f"tokens (rows {same[:20]}{' ...' if len(same) > 20 else ''}); raise max_length or drop them")
    return examples


def read_preferences(inputs) -> pd.DataFrame:
    source = Path(inputs["preferences"].path) / "preferences.parquet"
    return schemas.validate(pd.read_parquet(source), schemas.PREFERENCES, source)


def run_reward(ctx, p: RewardParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    from alignment.sandbox.quickstart import gold_pair_accuracy

    pairs = read_preferences(inputs)
    train = pairs[pairs["split"] == "train"].to_dict("records")
    test = pairs[pairs["split"] == "test"].to_dict("records")
    base = Path(inputs["base"].path) / "model"
    tokenizer = load_tokenizer(base)
    examples = token_preflight(tokenizer, train, p.reward.max_length, f"{inputs['preferences'].name} (train split)")
    set_seed(ctx.seed)
    trainer = RewardTrainer(RewardModel.from_pretrained(base), examples,
                            tokenizer.pad_token_id, p.reward, output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    save_curves(out, ["loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm"], "reward model")
    metrics = {f"eval/{k}": v for k, v in trainer.evaluate(to_examples(tokenizer, test, p.reward.max_length)).items()}
    metrics["eval/gold_accuracy"] = gold_pair_accuracy(trainer, tokenizer, test, ctx.world_model(), p.reward.max_length)
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return metrics


def run_dpo(ctx, p: DPOParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    pairs = read_preferences(inputs)
    train = pairs[pairs["split"] == "train"].to_dict("records")
    policy, tokenizer = load_policy(inputs)
    examples = token_preflight(tokenizer, train, p.dpo.max_length, f"{inputs['preferences'].name} (train split)")
    # Reference log-probs are an artifact of their own, keyed by the policy's and the data's content.
    ref_key = stage_key("reference_logps", {"max_length": p.dpo.max_length, "group_by_prompt": p.dpo.group_by_prompt},
                        {"policy": inputs["policy"].content_hash, "preferences": inputs["preferences"].content_hash})
    ref_dir = ctx.store.final("reference_logps", ref_key)
    reference_logps = load_file(str(ref_dir / "logps.safetensors"))["logps"] if (ref_dir / "logps.safetensors").is_file() else None
    reused = reference_logps is not None
    set_seed(ctx.seed)
    if p.lora is not None:
        policy = add_lora(policy, p.lora)
    trainer = DPOTrainer(policy, examples, tokenizer.pad_token_id, p.dpo, reference_logps=reference_logps,
                         output_dir=out, callback=metrics_logger(ctx, run_id, out))
    if not reused:
        tmp = ctx.store.partial("reference_logps", ref_key)
        save_file({"logps": trainer.reference_logps.contiguous()}, str(tmp / "logps.safetensors"))
        ctx.store.publish("reference_logps", ref_key, {"run_id": run_id})
    ctx.tracker.set_tags(run_id, {"reference_logps.key": ref_key, "reference_logps.reused": reused})
    trainer.train()
    rows = save_curves(out, ["loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "grad_norm"], "DPO")
    merged(trainer.model).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"final_loss": rows[-1]["loss"]}


def run_ppo(ctx, p: PPOParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    path = Path(inputs["policy"].path) / "model"
    tokenizer = load_tokenizer(path)
    rm_path = Path(inputs["reward_model"].path) / "model"
    rm = RewardModel.from_pretrained(rm_path)
    set_seed(ctx.seed)
    model = PolicyWithValueHead.from_pretrained(path, separate_value_model=p.separate_value_model)
    if p.lora is not None:
        model.policy = add_lora(model.policy, p.lora)
    trainer = PPOTrainer(model, tokenizer,
                         read_prompts(p.prompts_file, p.prompts, ctx, 20),
                         reward_scores(rm, load_tokenizer(rm_path)), p.ppo,
                         output_dir=out, callback=metrics_logger(ctx, run_id, out))
    trainer.train()
    rows = save_curves(out, ["reward", "kl", "beta", "policy_loss", "value_loss", "entropy", "clip_frac",
                             "approx_kl", "value_explained_variance", "answer_len"], "PPO")
    plots.plot_reward_kl(rows, out / "reward_kl.png", "PPO: reward-model score against KL")
    trainer.model.policy = merged(trainer.model.policy)
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"final_reward": rows[-1]["reward"], "final_kl": rows[-1]["kl"]}


def run_evaluate(ctx, p: EvaluateParams, inputs, out: Path, run_id: str) -> dict[str, float]:
    policy, tokenizer = load_policy(inputs)
    reference, _ = load_policy(inputs, "reference")
    world = ctx.world_model()
    if p.prompts_from == "sandbox":
        prompts, gold_fn, banned_fn = world.prompts(p.prompts, seed=ctx.seed + 999), gold_scores(world), lambda a: world.banned_count(a) > 0
    elif p.prompts_from == "preferences" and "preferences" in inputs:
        pairs = read_preferences(inputs)
        prompts, gold_fn, banned_fn = pairs.loc[pairs["split"] == "test", "prompt"].drop_duplicates().head(p.prompts).tolist(), None, None
    else:
        raise ValueError("prompts_from must be 'sandbox', or 'preferences' with a preferences input")
    reward_fn = None
    if "reward_model" in inputs:
        rm_path = Path(inputs["reward_model"].path) / "model"
        reward_fn = reward_scores(RewardModel.from_pretrained(rm_path), load_tokenizer(rm_path))
    metrics, rows = evaluate_policy(policy, reference, tokenizer, prompts, p.sampling, seed=ctx.seed + 7,
                                    reward_fn=reward_fn, gold_fn=gold_fn, banned_fn=banned_fn)
    df = schemas.validate(pd.DataFrame(rows), schemas.EVALUATION, "evaluation")
    schemas.write_parquet(df, out / "evaluation.parquet")
    failed = []
    if p.max_kl is not None and metrics["eval/kl"] > p.max_kl:
        failed.append(f"eval/kl {metrics['eval/kl']:.3f} > max_kl {p.max_kl}")
    if p.min_win_rate is not None and metrics.get("eval/gold_win_rate", -1.0) < p.min_win_rate:
        failed.append(f"eval/gold_win_rate {metrics.get('eval/gold_win_rate', float('nan')):.3f} < min_win_rate {p.min_win_rate}")
    (out / "gates.json").write_text(json.dumps({"passed": not failed, "failed": failed}, indent=2))
    tags = {"gates.passed": not failed, "gates.failed": "; ".join(failed) or "none"}
    if failed:
        ctx.log(f"EVALUATION GATE FAILED for {inputs['policy'].name}: " + "; ".join(failed) + " -> the policy is NOT registered")
    elif p.register_as:
        version = ctx.tracker.register(inputs["policy"].run_id, "output/model", p.register_as)
        tags["registered"] = f"{p.register_as}/{version}"
    ctx.tracker.set_tags(run_id, tags)
    return metrics


STAGE_TYPES: dict[str, StageType] = {
    "model": StageType(ModelParams, {}, "policy", run_model, model_sources),
    "sft": StageType(SFTParams, {}, "policy", run_sft),
    "import_preferences": StageType(ImportParams, {}, "preferences", run_import, import_sources),
    "sample": StageType(SampleParams, {"policy": "policy"}, "samples", run_sample, prompt_sources),
    "label": StageType(LabelParams, {"samples": "samples"}, "preferences", run_label, label_sources),
    "train_reward_model": StageType(RewardParams, {"preferences": "preferences", "base": "policy"}, "reward_model", run_reward),
    "dpo": StageType(DPOParams, {"preferences": "preferences", "policy": "policy"}, "policy", run_dpo),
    "ppo": StageType(PPOParams, {"policy": "policy", "reward_model": "reward_model"}, "policy", run_ppo, prompt_sources),
    "evaluate": StageType(EvaluateParams, {"policy": "policy", "reference": "policy", "reward_model": "reward_model?",
                                           "preferences": "preferences?"}, "evaluation", run_evaluate),
}

def execute(ctx: StageContext, name: str, stage_type: str, raw_params: dict, inputs: dict[str, StageOutput]) -> StageOutput:
    """Cache lookup -> MLflow run with lineage -> body -> atomic publish -> artifacts -> status."""
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")
    st = STAGE_TYPES[stage_type]
    params = parse(st.params, raw_params)
    params_dict = {"params": dataclasses.asdict(params), "seed": ctx.seed, "world": dataclasses.asdict(ctx.world)}
    # Hash what the input folders hold now (not what was recorded), so new contents re-run this stage.
    inputs = {slot: dataclasses.replace(o, content_hash=dir_hash(Path(o.path))) for slot, o in inputs.items()}
    hashes = {slot: o.content_hash for slot, o in inputs.items()}
    if st.sources is not None:
        hashes.update(st.sources(params))
    key = stage_key(stage_type, params_dict, hashes)
    lineage = {}
    for slot, o in inputs.items():
        lineage.update({
            f"lineage.{slot}.stage": o.name, f"lineage.{slot}.run_id": o.run_id,
            f"lineage.{slot}.content_hash": o.content_hash,
            f"lineage.{slot}.artifact_uri": f"{ctx.tracker.artifact_uri(o.run_id)}/output",
        })
    tags = {"alignflow.stage": name, "alignflow.stage_type": stage_type, "alignflow.cache_key": key, **lineage}
    run_id = ctx.tracker.start_run(name, tags, parent_id=ctx.parent_run_id)
    try:
        ctx.tracker.log_params(run_id, params_dict)
        record = ctx.store.lookup(stage_type, key)
        if record is not None:
            ctx.log(f"[{name}] unchanged inputs, params and code: reusing {record['run_id']}")
            ctx.tracker.set_tags(run_id, {"alignflow.cache": "hit", "alignflow.reused_run_id": record["run_id"],
                                          "alignflow.content_hash": record["content_hash"]})
            ctx.tracker.end_run(run_id)
            return StageOutput(name, stage_type, str(ctx.store.final(stage_type, key)), key, record["content_hash"],
                               record["run_id"], cached=True)
        ctx.tracker.set_tags(run_id, {"alignflow.cache": "miss"})
        out = ctx.store.partial(stage_type, key)
        for slot, o in inputs.items():
            for data in Path(o.path).glob("*.parquet"):
                ctx.tracker.log_dataset(run_id, pd.read_parquet(data), source=str(data), name=f"{o.name}/{data.stem}",
                                        digest=file_hash(data), context=slot)
        metrics = st.run(ctx, params, inputs, out, run_id)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        final, content_hash = ctx.store.publish(stage_type, key, {"run_id": run_id, "stage": name})
        ctx.tracker.log_metrics(run_id, metrics, step=0)
        ctx.tracker.log_artifact(run_id, final, "output")
        ctx.tracker.set_tags(run_id, {"alignflow.content_hash": content_hash})
        ctx.tracker.end_run(run_id)
        ctx.log(f"[{name}] done: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return StageOutput(name, stage_type, str(final), key, content_hash, run_id)
    except KeyboardInterrupt:
        ctx.tracker.end_run(run_id, "KILLED")
        raise
    except BaseException as err:
        ctx.tracker.set_tags(run_id, {"alignflow.error": f"{type(err).__name__}: {err}"[:5000]})
        ctx.tracker.end_run(run_id, "FAILED")
        raise


STAGE_TASKS = {
    name: task(execute, name=name, cache_policy=NO_CACHE, log_prints=True)  # training is never retried
    for name in STAGE_TYPES
}
