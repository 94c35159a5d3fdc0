"""The GPU check cannot rot: its dry run (tiny shapes, this machine's CPU, TRL as the peer) runs every
part through benchmarks/gpu_check.sh and writes the JSON and the RESULTS.md section."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_measures_every_part_and_writes_its_results_section(tmp_path):
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr + log
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [k for k, v in result.items() if "error" in v] == [], log
    assert result["env"]["dry_run"] is True and result["env"]["trl"]
    for part in ("dpo", "dpo_1_5b", "reward"):  # ours and the peer measured on the same workload, and their ratio
        assert result[part]["ours"]["tokens_per_s"] > 0 and result[part]["trl"]["tokens_per_s"] > 0, log
        assert result[part]["ratio"] > 0
    dpo = result["dpo"]
    assert dpo["trl_precomputed"]["tokens_per_s"] > 0 and dpo["ratio_ref_every_step"] > 0
    assert dpo["ours_flex"] == {"error": "GPU only: torch has no FlexAttention backward on a CPU"}
    assert dpo["ours_budget"]["tokens_per_s"] > 0 and "micro_batch_tokens 64" in dpo["ours_budget"]["name"]
    assert dpo["ours_segments"]["tokens_per_s"] > 0 and "alignflow_sdpa" in dpo["ours_segments"]["name"]
    assert result["dpo_1_5b"]["workload"]["kv_heads"] == 2 and result["lora_7b"]["ours"]["peak_mb"] > 0
    assert "LoRA" in result["lora_7b"]["ours"]["name"]
    rollout = result["rollout"]
    assert rollout["static"]["ours"]["completions_per_s"] > 0 and rollout["static"]["peer"]["completions_per_s"] > 0
    assert rollout["dynamic"]["completions_per_s"] > 0
    grpo = result["grpo"]
    assert grpo["ours"]["completions_per_s"] > 0 and grpo["trl"]["completions_per_s"] > 0 and grpo["ratio"] > 0
    sandbox = result["sandbox"]
    assert list(sandbox["seconds"]) == ["world", "sft", "sample+label", "reward_model", "dpo", "ppo", "evaluate"]
    assert sandbox["pairs"] > 0 and 0 <= sandbox["dpo_gold_win_rate"] <= 1 and sandbox["ppo_kl"] >= 0

    section = (tmp_path / "gpu_check.md").read_text()
    assert section.startswith("<!-- gpu_check:start -->") and section.rstrip().endswith("<!-- gpu_check:end -->")
    assert "| TRL (defaults) |" in section and "| TRL GRPOTrainer |" in section and "dry run" in section
    assert "| TRL (precompute_ref_log_probs) |" in section and "**DPO with LoRA at the Qwen2-7B shape** (memory):" in section
    assert "| alignflow (reference precomputed, FlexAttention block mask) | not run: GPU only" in section
    assert "| alignflow (reference precomputed, micro_batch_tokens 64: a pair a row) | " in section
    assert "| alignflow (reference precomputed, segments: prompt ++ chosen causal, rejected against its prompt, no row mask) | " in section
    # --into puts the section into a RESULTS.md once, and replaces it on the next report
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier text\n")
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, value in result.items():
        (parts / f"{name}.json").write_text(json.dumps(value))
    for _ in range(2):
        subprocess.run([str(ROOT / ".venv/bin/python"), "benchmarks/gpu_check.py", "report", str(parts), "--into", str(results)],
                       cwd=ROOT, check=True, capture_output=True)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier text\n") and text.count("<!-- gpu_check:start -->") == 1
    assert text.endswith(section)
    # a part that started and left no result is reported as such; one that never started is left out
    (parts / "grpo.json").unlink()
    (parts / ".grpo.started").touch()
    (parts / "sandbox.json").unlink()
    subprocess.run([str(ROOT / ".venv/bin/python"), "benchmarks/gpu_check.py", "report", str(parts)], cwd=ROOT, check=True,
                   capture_output=True)
    section = (parts / "gpu_check.md").read_text()
    assert "**GRPO step**" in section and "not measured: no result: the part crashed or ran past its time limit" in section
    assert "sandbox quickstart" not in section


def test_the_trl_peer_reward_function_scores_our_prompt_of_each_answer_as_trl_calls_it():
    """TRL passes its batch's `prompts` and every dataset column by keyword; the prompt an answer is scored with
    is ours at its prompt_index (index 5 of 6 prompts, in a batch of 2), and an answer without EOS loses the
    penalty: scores 5 + len("ab") = 7, and 2 + len("c") - 0.5 = 2.5."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trl_peer import reward_function

    ours = [f"p{i}" for i in range(6)]
    rm = lambda ps, answers: torch.tensor([float(p[1:]) + len(a) for p, a in zip(ps, answers)])  # noqa: E731
    fn = reward_function(rm, ours, penalty=0.5, eos=2)
    scores = fn(prompts=["batch 0", "batch 1"], completions=["ab", [{"role": "assistant", "content": "c"}]],
                completion_ids=[[7, 8, 2], [9]], prompt_index=[5, 2], trainer_state=None)
    assert scores == [7.0, 2.5]


def test_a_gpu_check_part_stopped_at_its_time_limit_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The device's minutes are few: a part killed by its time limit must not take the rows it already measured
    with it. The DPO part writes its result after every row; here the third row (TRL's) stops the process as
    `timeout` would, and the report shows the two rows measured, the others as not reached, and no ratio."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_dpo
    import gpu_check

    def ours(w, device, precompute, *args):
        return {"name": "alignflow", "tokens_per_s": 2000.0 if precompute else 1000.0, "step_ms": 5.0, "peak_mb": 10.0,
                "mfu_pct": None, "note": ""}

    def stopped(*args):
        raise SystemExit("killed at the part's time limit")  # not an Exception: peer() does not catch it

    monkeypatch.setattr(bench_dpo, "ours", ours)
    monkeypatch.setattr(bench_dpo, "trl", stopped)
    parts = tmp_path / "parts"
    try:
        gpu_check.run_part("dpo", parts, dry=True)
        raise AssertionError("the stop did not propagate")
    except SystemExit:
        pass
    kept = json.loads((parts / "dpo.json").read_text())
    assert kept["ours"]["tokens_per_s"] == 2000.0 and kept["ours_ref_every_step"]["tokens_per_s"] == 1000.0
    assert kept["unfinished"] == ["trl", "trl_precomputed", "ours_budget", "ours_segments", "ours_flex"]
    assert kept["ratio"] is None and kept["target_met"] is False and "part_s" not in kept
    (parts / "env.json").write_text(json.dumps({"dry_run": True}))
    gpu_check.report(parts, tmp_path, None)
    section = (tmp_path / "gpu_check.md").read_text()
    assert "| alignflow (reference precomputed) | 2,000 | 5.0 | 10 | - |" in section
    assert "| alignflow (reference every step) | 1,000 | 5.0 | 10 | - |" in section
    for row in ("TRL (defaults)", "TRL (precompute_ref_log_probs)", "alignflow (reference precomputed, FlexAttention block mask)"):
        assert f"| {row} | {gpu_check.UNFINISHED} |" in section
    assert "Ratio alignflow / TRL: -x with the reference precomputed (both), -x with it every step (both). Target NOT met." in section
