"""The GPU check: each measurement a part of its own (run by gpu_check.sh, each under a time limit), then
one report that merges them into gpu_check.json and a RESULTS.md section.

    python benchmarks/gpu_check.py part {env,dpo,dpo_1_5b,lora_7b,reward,rollout,grpo,sandbox} --out DIR [--dry-run]
    python benchmarks/gpu_check.py report DIR [--into benchmarks/RESULTS.md]

Parts: DPO and reward-model training against TRL in the same process (Qwen2-0.5B shapes, random weights in bf16
for both: TRL as its users run it, alignflow with its defaults), our DPO with FlexAttention block masks or with
segments (alignment/prefix.py) instead of the dense shared-prefix mask, and under the least token budget
(micro_batch_tokens), a Qwen2-1.5B-shaped DPO row,
a Qwen2-7B-shaped LoRA DPO row for memory; rollouts (our default on CUDA, a static cache with a compiled step)
against transformers' `generate` with a static cache, plus our dynamic cache; one GRPO step against TRL's GRPOTrainer; the sandbox quickstart's SFT, reward-model, DPO
and PPO training through the core library (benchmarks/sandbox_chain.py; dry runs only, where the GPU's minutes
go to the rows above). Every row reports tokens/s, MFU (against 989 TFLOP/s dense bf16 on H100 and H200) and its
own peak memory. `--dry-run`: tiny shapes on whatever device there is, so the script is checked on CPU in CI
(the peer runs where TRL is installed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("env", "dpo", "dpo_1_5b", "lora_7b", "reward", "rollout", "grpo", "sandbox")
TARGETS = {  # issue 29, on the Qwen2-0.5B shape
    "dpo": "DPO >= 110k tokens/s and >= 1.5x TRL, with the reference every step and with it precomputed",
    "reward": "reward model >= 130k tokens/s",
    "rollout": "rollouts >= 400 completions/s at 256 new tokens",
    "grpo": "GRPO step faster than TRL's GRPOTrainer",
}
START, END = "<!-- gpu_check:start -->", "<!-- gpu_check:end -->"


def workload(dry: bool):
    """Qwen2-0.5B shapes, or tiny ones for a dry run."""
    from common import Workload

    if dry:
        return Workload(vocab=512, hidden=64, layers=2, heads=4, intermediate=128, pairs=4, prompt_tokens=16, answer_tokens=16,
                        steps=2, warmup=1)
    return Workload.gpu()


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peer(fn, *args) -> dict:
    """The peer's figures, or why it did not run (TRL missing, an error): the rest of the part still counts."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, not raised: our figures stand on their own
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def ratio(ours: dict, theirs: dict, key: str = "tokens_per_s") -> float | None:
    return ours[key] / theirs[key] if key in theirs else None


def part_env(dry: bool) -> dict:
    import accelerate
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "device": device(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "trl": trl_version, "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def on_gpu_only(fn, *args) -> dict:
    """fn's figures on a GPU; on a CPU why not (torch has no FlexAttention backward there)."""
    return peer(fn, *args) if device() == "cuda" else {"error": "GPU only: torch has no FlexAttention backward on a CPU"}


def part_dpo(dry: bool) -> dict:
    """The rows most wanted first (ours and TRL's in both reference modes), then the token budget and segments, and
    FlexAttention (which compiles) last; each row is kept as it is measured, so a part stopped by its time limit
    keeps the rows before."""
    import bench_dpo

    w = workload(dry)
    budget = 2 * (w.prompt_tokens + w.answer_tokens)
    return rows_kept({"workload": vars(w)}, [
        ("ours", lambda: bench_dpo.ours(w, device(), precompute=True)),
        ("ours_ref_every_step", lambda: bench_dpo.ours(w, device(), precompute=False)),
        ("trl", lambda: peer(bench_dpo.trl, w, device())),
        ("trl_precomputed", lambda: peer(bench_dpo.trl, w, device(), True)),
        ("ours_budget", lambda: peer(bench_dpo.ours, w, device(), True, True, None, False, budget)),
        ("ours_segments", lambda: peer(bench_dpo.ours, w, device(), True, True, "alignflow_sdpa")),
        ("ours_flex", lambda: on_gpu_only(bench_dpo.ours, w, device(), True, True, "flex_attention")),
    ], dpo_ratios)


def dpo_ratios(r: dict) -> dict:
    """Ratios and the target from the rows measured so far."""
    r_pre, r_every = ratio(r["ours"], r.get("trl_precomputed", {})), ratio(r.get("ours_ref_every_step", {}), r.get("trl", {}))
    out = {"ratio": r_pre, "ratio_ref_every_step": r_every}
    if "ours_ref_every_step" in r:
        out["target_met"] = (min(r["ours"]["tokens_per_s"], r["ours_ref_every_step"]["tokens_per_s"]) >= 110_000
                             and min(r_pre or 0, r_every or 0) >= 1.5)
    return out


def part_dpo_1_5b(dry: bool) -> dict:
    """DPO at the Qwen2-1.5B shape, ours (both reference modes) and TRL's defaults."""
    import dataclasses

    import bench_dpo
    from common import Workload

    w = dataclasses.replace(workload(dry), kv_heads=2) if dry else Workload.gpu_1_5b()
    return rows_kept({"workload": vars(w)}, [
        ("ours", lambda: bench_dpo.ours(w, device(), precompute=True)),
        ("ours_ref_every_step", lambda: bench_dpo.ours(w, device(), precompute=False)),
        ("trl", lambda: peer(bench_dpo.trl, w, device())),
    ], lambda r: {"ratio": ratio(r.get("ours_ref_every_step", {}), r.get("trl", {}))})


def part_lora_7b(dry: bool) -> dict:
    """Peak memory of DPO with LoRA (r 16, every linear layer) at the Qwen2-7B shape and vocabulary."""
    import dataclasses

    import bench_dpo
    from common import Workload

    w = dataclasses.replace(workload(dry), vocab=2048, steps=1) if dry else Workload.gpu_7b()
    return {"workload": vars(w), "ours": bench_dpo.ours(w, device(), precompute=True, lora=True)}


def part_reward(dry: bool) -> dict:
    import bench_reward

    w = workload(dry)
    return rows_kept({"workload": vars(w)}, [("ours", lambda: bench_reward.ours(w, device())),
                                             ("trl", lambda: peer(bench_reward.trl, w, device()))],
                     lambda r: {"ratio": ratio(r["ours"], r.get("trl", {})), "target_met": r["ours"]["tokens_per_s"] >= 130_000})


def part_rollout(dry: bool) -> dict:
    from bench_ppo_rollout import measure

    w, batch, new, repeats = (workload(dry), 4, 8, 1) if dry else (workload(dry), 256, 256, 2)
    return rows_kept({"workload": vars(w), "batch": batch, "new_tokens": new}, [  # static + compiled = auto on CUDA
        ("static", lambda: measure(w, device(), batch, new, repeats, cache="static", compile=not dry, peer=True)),
        ("dynamic", lambda: measure(w, device(), batch, new, 1, cache="dynamic", compile=False, peer=False)["ours"]),
    ], lambda r: {"target_met": r["static"]["ours"]["completions_per_s"] >= 400})


def part_grpo(dry: bool) -> dict:
    """One GRPO step (8 prompts x 8 answers of up to 64 new tokens, one update) against TRL's GRPOTrainer
    (benchmarks/bench_grpo.py), bf16 on a GPU."""
    import dataclasses

    import bench_grpo

    w = dataclasses.replace(workload(dry), prompt_tokens=16 if dry else 32, steps=2 if dry else 4, warmup=1)
    return rows_kept({"workload": vars(w), "prompts": bench_grpo.PROMPTS, "group": bench_grpo.GROUP,
                      "new_tokens": bench_grpo.NEW_TOKENS},
                     [("ours", lambda: bench_grpo.ours(w, device())), ("trl", lambda: peer(bench_grpo.trl, w, device()))],
                     lambda r: {"ratio": ratio(r["ours"], r.get("trl", {}), "completions_per_s"),
                                "target_met": (ratio(r["ours"], r.get("trl", {}), "completions_per_s") or 0) > 1})


def part_sandbox(dry: bool) -> dict:
    import sandbox_chain

    return sandbox_chain.run(tiny=dry)


UNFINISHED = "not measured: the part stopped before this row (its time limit, or a crash: see gpu_check.log)"
_writing: tuple[Path, str] | None = None  # (folder, part) of the part running now: where rows_kept writes


def rows_kept(result: dict, rows: list[tuple[str, Callable[[], dict]]], summary: Callable[[dict], dict]) -> dict:
    """Measure the rows in order; after each, the part's result so far (summary(result) added) is written as the
    part's JSON, marked unfinished, so that a part killed at its time limit still reports the rows it measured."""
    for key, measure in rows:
        result[key] = measure()
        result.update(summary(result))
        if _writing is not None:
            write_result(*_writing, {**result, "unfinished": [k for k, _ in rows if k not in result]})
    return result


def write_result(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / f"{name}.json")


def run_part(name: str, out: Path, dry: bool) -> None:
    global _writing
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / f".{name}.started").touch()  # a part that started and left no result crashed or ran out of time
    _writing = (out, name)
    try:
        result = globals()[f"part_{name}"](dry)
    finally:
        _writing = None
    result["part_s"] = round(time.perf_counter() - t, 1)
    write_result(out, name, result)


# -- the report ---------------------------------------------------------------------------------------


def gather(parts_dir: Path) -> dict:
    """The parts' results; a part that started without leaving one is an error, one that never started is left out."""
    merged = {}
    for name in PARTS:
        file = parts_dir / f"{name}.json"
        if file.is_file():
            merged[name] = json.loads(file.read_text())
        elif (parts_dir / f".{name}.started").exists() or name == "env":
            merged[name] = {"error": "no result: the part crashed or ran past its time limit (see gpu_check.log)"}
    return merged


def _n(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _trainer_rows(rows: list[tuple[str, dict]]) -> list[str]:
    out = ["| trainer | tokens/s | ms/step | peak MB | MFU |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, r in rows:
        if r is None:
            out.append(f"| {label} | {UNFINISHED} | | | |")
        elif "error" in r:
            out.append(f"| {label} | not run: {r['error'][:120]} | | | |")
        else:
            util = "-" if r["mfu_pct"] is None else f"{r['mfu_pct']:.1f}%"
            out.append(f"| {label} | {_n(r['tokens_per_s'])} | {_n(r['step_ms'], 1)} | {_n(r['peak_mb'])} | {util} |")
    return out


def markdown(r: dict) -> str:
    env = r["env"]
    lines = [START, f"## GPU check (`benchmarks/gpu_check.sh`{', dry run' if env.get('dry_run') else ''})", "",
             f"{env.get('date', '?')}: {env.get('gpu') or 'no GPU (CPU)'}; python {env.get('python')}, torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, "
             f"TRL {env.get('trl') or 'not installed'}. Every figure below comes from one run of the script; "
             f"the full record is `gpu_check.json`.", ""]
    parts = [("dpo", f"**DPO** ({TARGETS['dpo']}):", lambda p: _trainer_lines("dpo", p)),
             ("dpo_1_5b", "**DPO at the Qwen2-1.5B shape:**", lambda p: _trainer_lines("dpo_1_5b", p)),
             ("lora_7b", "**DPO with LoRA at the Qwen2-7B shape** (memory):", lambda p: _trainer_lines("lora_7b", p)),
             ("reward", f"**Reward model** ({TARGETS['reward']}):", lambda p: _trainer_lines("reward", p)),
             ("rollout", f"**Rollouts** ({TARGETS['rollout']}):", _rollout_lines),
             ("grpo", f"**GRPO step** ({TARGETS['grpo']}):", _grpo_lines),
             ("sandbox", "**The sandbox quickstart's training through the core library** (`benchmarks/sandbox_chain.py`, the "
                         "quickstart's values from pipelines.yaml, fp32):", _sandbox_lines)]
    for name, title, body in parts:  # a part's title, then its figures or why it was not measured
        if name not in r:
            continue
        p = r[name]
        lines += [title, *([f"not measured: {p['error']}", ""] if "error" in p else body(p))]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _trainer_lines(name: str, p: dict) -> list[str]:
    w = p["workload"]
    lines = [f"{w['pairs']} pairs x ({w['prompt_tokens']} + {w['answer_tokens']}) tokens, vocab {w['vocab']}, hidden "
             f"{w['hidden']}, {w['layers']} layers, random weights in bf16 " + ("(alignflow only)." if name == "lora_7b" else
             "for both (as a user's bf16 checkpoint loads: TRL and alignflow's dtype auto)."), ""]
    if name == "lora_7b":
        return lines + _trainer_rows([("alignflow (LoRA r 16, reference precomputed)", p["ours"])]) + [""]
    labels = [("ours", "alignflow (reference precomputed)" if name != "reward" else "alignflow")]
    if name != "reward":
        labels.append(("ours_ref_every_step", "alignflow (reference every step)"))
    if name == "dpo":
        labels += [("ours_flex", "alignflow (reference precomputed, FlexAttention block mask)"),
                   ("ours_segments", "alignflow (reference precomputed, segments: prompt ++ chosen causal, rejected against its prompt, no row mask)"),
                   ("ours_budget", f"alignflow (reference precomputed, micro_batch_tokens "
                                   f"{2 * (w['prompt_tokens'] + w['answer_tokens'])}: a pair a row)")]
    labels.append(("trl", "TRL (defaults)"))
    if name == "dpo":
        labels.append(("trl_precomputed", "TRL (precompute_ref_log_probs)"))
    # a row the part did not reach says so; one that an older record has no key for is left out
    rows = [(label, p.get(key)) for key, label in labels if key in p or key in p.get("unfinished", ())]
    if name == "dpo":
        summary = (f"Ratio alignflow / TRL: {_n(p.get('ratio'), 2)}x with the reference precomputed (both), "
                   f"{_n(p.get('ratio_ref_every_step'), 2)}x with it every step (both).")
    elif name == "dpo_1_5b":
        summary = f"Ratio alignflow / TRL, the reference every step (both): {_n(p.get('ratio'), 2)}x."
    else:
        summary = f"Ratio alignflow / TRL: {_n(p.get('ratio'), 2)}x."
    target = "" if "target_met" not in p else f" Target {'met' if p['target_met'] else 'NOT met'}."
    return lines + _trainer_rows(rows) + ["", summary + target, ""]


def _rollout_lines(p: dict) -> list[str]:
    lines = [f"{p['batch']} prompts x {p['workload']['prompt_tokens']} tokens, {p['new_tokens']} new tokens each (no early "
             f"stop), bf16, best of the timed batches after a warm-up call (which compiles).", "",
             "| sampler | completions/s | new tokens/s | s/batch | warm-up s | log-prob gap |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in (p["static"]["ours"], p["static"].get("peer", {}), p.get("dynamic", {})):
        if s:
            lines.append(f"| {s['name']} | {_n(s['completions_per_s'], 2)} | {_n(s['new_tokens_per_s'])} | {_n(s['batch_s'], 3)} | "
                         f"{_n(s['warmup_s'], 1)} | {_n(s.get('logp_gap'), 3)} |")
    if "dynamic" in p.get("unfinished", ()):
        lines.append(f"| alignflow sample (dynamic cache) | {UNFINISHED} | | | | |")
    return lines + ["", "Log-prob gap: the largest |log pi(token)| difference between what our sampler recorded while decoding "
                    "and a full forward over its samples (bf16 rounding when the KV cache is used right; large when not).",
                    "", f"Ratio alignflow / HF generate (static cache): {_n(p['static'].get('ratio'), 2)}x. "
                    f"Target {'met' if p['target_met'] else 'NOT met'}.", ""]


def _grpo_lines(p: dict) -> list[str]:
    lines = [f"{p['prompts']} prompts x {p['group']} answers, up to {p['new_tokens']} new tokens, prompts of "
             f"{p['workload']['prompt_tokens']} tokens, one update a step, beta 0, loss dapo, bf16.", "",
             "| trainer | completions/s | s/step |", "| --- | ---: | ---: |"]
    for label, t in (("alignflow GroupTrainer", p["ours"]), ("TRL GRPOTrainer", p.get("trl", {"error": UNFINISHED}))):
        lines.append(f"| {label} | not run: {t['error'][:120]} | |" if "error" in t
                     else f"| {label} | {_n(t['completions_per_s'], 1)} | {_n(t['step_s'], 2)} |")
    return lines + ["", f"Ratio alignflow / TRL: {_n(p['ratio'], 2)}x. Target {'met' if p['target_met'] else 'NOT met'}.", ""]


def _sandbox_lines(p: dict) -> list[str]:
    return ["", "| stage | " + " | ".join(p["seconds"]) + " | total |", "| --- |" + " ---: |" * (len(p["seconds"]) + 1),
            "| seconds | " + " | ".join(_n(v, 1) for v in p["seconds"].values()) + f" | {_n(p['total_s'], 1)} |", "",
            f"Reward model accuracy (held-out labels) {_n(p['rm_accuracy'], 3)}; DPO: KL {_n(p['dpo_kl'], 2)}, gold win rate "
            f"{_n(p['dpo_gold_win_rate'], 3)}, banned words {_n(p['dpo_banned_word_rate'], 3)}; PPO: KL {_n(p['ppo_kl'], 2)}, "
            f"gold win rate {_n(p['ppo_gold_win_rate'], 3)}, banned words {_n(p['ppo_banned_word_rate'], 3)} "
            f"(SFT: {_n(p['dpo_ref_banned_word_rate'], 3)}).", ""]


def report(parts_dir: Path, out: Path, into: Path | None) -> None:
    merged = gather(parts_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(merged, indent=1))
    section = markdown(merged)
    (out / "gpu_check.md").write_text(section)
    print(section)
    if into is not None:
        text = into.read_text()
        if START in text and END in text:
            text = text[: text.index(START)] + section + text[text.index(END) + len(END) + 1 :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        into.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("part", help="run measurements, one after the other, and write DIR/<part>.json for each")
    p.add_argument("names", nargs="+", choices=PARTS)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (checks that the script runs)")
    r = sub.add_parser("report", help="merge DIR/<part>.json into gpu_check.json and a RESULTS.md section")
    r.add_argument("parts_dir", type=Path)
    r.add_argument("--out", type=Path, help="where gpu_check.json and gpu_check.md go (default: parts_dir)")
    r.add_argument("--into", type=Path, help="a RESULTS.md whose gpu_check section is replaced (or appended)")
    args = parser.parse_args()
    if args.command == "part":
        for name in args.names:
            run_part(name, args.out, args.dry_run)
    else:
        report(args.parts_dir, args.out or args.parts_dir, args.into)


if __name__ == "__main__":
    main()
