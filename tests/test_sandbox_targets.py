"""The shipped quickstart pipeline, `alignflow run quickstart` in a fresh directory: alignment must
really work, on request phrasings that training never saw. Then the user's next step: `alignflow run
compare-methods`, which reuses the quickstart's stages and adds GRPO and RLOO; the two pipeline runs
compared with `runs compare`, the comparison's table, and its figure in MLflow's own UI.

Seed 0 on the development machine: benchmarks/RESULTS.md. Floating-point results differ between CPUs, so
the win-rate bound sits a little below the issue's 0.80 target; KL, banned words and the reward model are
held to the targets.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from browser import browser_page, keep, mlflow_ui, need_chromium, run_artifact_url

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CLI = str(Path(sys.executable).parent / "alignflow")
ROOT = Path(__file__).resolve().parents[1]


def stage_metrics(workdir: Path) -> dict[str, dict]:
    out = {}
    for success in workdir.glob("stages/*/*/_SUCCESS.json"):
        record = json.loads(success.read_text())
        if "stage" in record:  # (DPO's reference log-probs are an entry of their own)
            out[record["stage"]] = json.loads((success.parent / "metrics.json").read_text())
    return out


def alignflow(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def pipeline_run(stdout: str) -> tuple[str, set[str]]:
    """The pipeline run id `alignflow run` printed, and the stages it computed (not reused from the cache)."""
    run_id = re.search(r"^pipeline run ([0-9a-f]{32})$", stdout, re.M).group(1)
    computed = {m.group(1) for m in re.finditer(r"^  (\S+)\s+(?!cached )/", stdout, re.M)}
    return run_id, computed


@pytest.mark.slow
def test_quickstart_then_compare_methods_align_the_policy_and_compare_in_the_mlflow_ui(tmp_path):
    quickstart = alignflow(tmp_path, "run", "quickstart")
    first, computed = pipeline_run(quickstart.stdout)
    assert len(computed) == 9
    shown = quickstart.stdout + quickstart.stderr  # a clean run: one line a stage, no Python warning or traceback
    assert "Warning" not in shown and "Traceback" not in shown, shown[-3000:]
    assert sorted(re.findall(r"\[(\w+)\] done: ", shown)) == sorted(computed)
    assert f"`alignflow ui`, run 'quickstart {first}'" in quickstart.stdout
    metrics = stage_metrics(tmp_path / "runs")
    assert metrics["reward_model"]["eval/gold_accuracy"] >= 0.80
    check_targets(metrics, ("dpo", "ppo"))

    # The comparison reuses every quickstart stage from the cache and adds GRPO and RLOO, evaluated alike.
    # Here they train 2 iterations instead of 30 (the suite's time): what is checked is the comparison, its
    # reuse of the cache, table, `runs compare` and figure; the four methods' targets over seeds 0-4 are
    # benchmarks/bench_methods.py's (RESULTS.md), and GRPO and RLOO learning is tests/test_group_rl.py's.
    # The shipped gate eval/gold_win_rate >= 0.6 is meant for 30 iterations, not 2: these evaluations gate KL only.
    two_iterations = [item for m in ("grpo", "rloo") for item in (
        "--set", f"{m}.{m}.iterations=2", "--set", f'evaluate_{m}.gates={{eval/kl: "<= 6"}}')]
    result = alignflow(tmp_path, "run", "compare-methods", *two_iterations)
    second, computed = pipeline_run(result.stdout)
    assert computed == {"grpo", "rloo", "evaluate_grpo", "evaluate_rloo"}, result.stdout
    metrics = stage_metrics(tmp_path / "runs")
    for method in ("grpo", "rloo"):  # two iterations already move the policy towards the reward model
        m = metrics[f"evaluate_{method}"]
        assert 0 < m["eval/kl"] <= 6.0 and m["eval/rm_reward_mean"] > m["eval/ref_rm_reward_mean"], (method, m)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    a, b = client.get_run(first), client.get_run(second)
    table = client.download_artifacts(second, "comparison/methods.csv", str(tmp_path))
    rows = {line.split(",")[0]: line.split(",")[1:] for line in Path(table).read_text().splitlines()}
    assert rows["metric"] == ["dpo", "ppo", "grpo", "rloo"]
    from flows.cli import _shown

    wins = [metrics[f"evaluate_{m}"]["eval/gold_win_rate"] for m in ("dpo", "ppo", "grpo", "rloo")]
    assert rows["eval/gold_win_rate"] == [f"{w:.4g}" for w in wins]
    assert a.data.metrics["evaluate_dpo/eval/gold_win_rate"] == b.data.metrics["evaluate_dpo/eval/gold_win_rate"] == wins[0]
    def cli(*args: str) -> str:  # a subprocess: typer's CliRunner closes the streams Prefect's logging holds, and
        # a flow run in this process afterwards (another test on this xdist worker) then fails in its logging
        result = subprocess.run([CLI, *args, "-c", str(ROOT / "pipelines.yaml")], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "MLFLOW_TRACKING_URI": tracking})
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    compared = cli("runs", "compare", first, second).splitlines()
    assert next(line for line in compared if " grpo.grpo.group_size " in line).split() == ["*", "grpo.grpo.group_size", "-", "8"]
    assert next(line for line in compared if " evaluate_rloo/eval/gold_win_rate " in line).split()[-2:] == ["-", _shown(wins[3])]
    methods = cli("runs", "compare", second).splitlines()  # one run: its methods side by side
    assert methods[0].split() == ["evaluate_dpo", "evaluate_grpo", "evaluate_ppo", "evaluate_rloo"]
    assert next(line for line in methods if "eval/gold_win_rate" in line).split() == [
        "eval/gold_win_rate", *(_shown(wins[i]) for i in (0, 2, 1, 3))]

    # the comparison's figure (one colour a method, curves along training) on its run's page in MLflow's UI,
    # in headless Chromium; its table's values are checked above through the downloaded comparison/methods.csv
    need_chromium()
    figure_shot = tmp_path / "mlflow_methods_figure.png"
    with mlflow_ui(tmp_path) as base, browser_page(1500, 1300) as page:
        page.goto(run_artifact_url(base, a.info.experiment_id, second, "reward_vs_kl.png"))
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 500)", timeout=60_000)
        page.screenshot(path=str(figure_shot))
    assert figure_shot.stat().st_size > 30_000
    keep(figure_shot)


def check_targets(metrics: dict, methods: tuple[str, ...]) -> None:
    for method in methods:
        m = metrics[f"evaluate_{method}"]
        assert m["eval/ref_banned_word_rate"] > 0.15  # the SFT model is a real mixture
        assert m["eval/gold_win_rate"] >= 0.75, (method, m)
        assert m["eval/gold_reward_mean"] > m["eval/ref_gold_reward_mean"] + 1.0, (method, m)
        assert 0.5 < m["eval/kl"] <= 6.0, (method, m)
        assert m["eval/banned_word_rate"] <= m["eval/ref_banned_word_rate"] / 5, (method, m)
        assert m["eval/rm_win_rate"] > 0.6 and m["eval/implicit_accuracy"] > 0.5, (method, m)


@pytest.mark.slow
def test_grpo_with_a_verifiable_reward_raises_exact_match_on_unseen_sequences(tmp_path):
    """The verifiable-reward pipeline: GRPO with an exact-match reward function and no reward model must
    raise greedy exact match on held-out letter sequences by >= 0.20 over the careless SFT model."""
    result = alignflow(tmp_path, "run", "verifiable-reward")
    _, computed = pipeline_run(result.stdout)
    assert computed == {"reverse_world", "reverse_sft", "reverse_grpo", "reverse_evaluate"}
    m = stage_metrics(tmp_path / "runs")["reverse_evaluate"]
    assert m["eval/gold_reward_mean"] >= m["eval/ref_gold_reward_mean"] + 0.20, m  # gold reward = exact match
    assert "eval/rm_win_rate" not in m and "eval/banned_word_rate" not in m  # no reward model, no banned words
