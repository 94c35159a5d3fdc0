"""The shipped quickstart pipeline, `alignflow run quickstart` in a fresh directory: alignment must
really work (about 6 minutes on a slow 2-core machine). Then the user's next step: the same pipeline with
`--set dpo.dpo.beta=0.3`, and the two pipeline runs compared in MLflow's own UI and with `runs compare`.

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

from browser import browser_page, compare_url, grid_row, keep, mlflow_ui, need_chromium, run_artifact_url, runs_table_url, same_line

pytestmark = pytest.mark.usefixtures("prefect_server")  # runs flows: the session's Prefect server (conftest.py)

CLI = str(Path(sys.executable).parent / "alignflow")


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
def test_quickstart_aligns_the_policy_and_two_runs_compare_in_the_mlflow_ui(tmp_path):
    first, computed = pipeline_run(alignflow(tmp_path, "run", "quickstart").stdout)
    assert len(computed) == 9
    metrics = stage_metrics(tmp_path / "runs")
    assert metrics["reward_model"]["eval/gold_accuracy"] >= 0.80
    for method in ("dpo", "ppo"):
        m = metrics[f"evaluate_{method}"]
        assert m["eval/ref_banned_word_rate"] > 0.15  # the SFT model is a real mixture
        assert m["eval/gold_win_rate"] >= 0.75, (method, m)
        assert m["eval/gold_reward_mean"] > m["eval/ref_gold_reward_mean"] + 1.0, (method, m)
        assert 0.5 < m["eval/kl"] <= 6.0, (method, m)
        assert m["eval/banned_word_rate"] <= m["eval/ref_banned_word_rate"] / 5, (method, m)
        assert m["eval/rm_win_rate"] > 0.6 and m["eval/implicit_accuracy"] > 0.5, (method, m)

    second, computed = pipeline_run(alignflow(tmp_path, "run", "quickstart", "--set", "dpo.dpo.beta=0.3").stdout)
    assert computed == {"dpo", "evaluate_dpo"}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    a, b = client.get_run(first), client.get_run(second)
    assert (a.data.params["dpo.dpo.beta"], b.data.params["dpo.dpo.beta"]) == ("0.5", "0.3")
    wins = [r.data.metrics["evaluate_dpo/eval/gold_win_rate"] for r in (a, b)]
    assert wins[0] == metrics["evaluate_dpo"]["eval/gold_win_rate"] and wins[0] != wins[1]
    assert a.data.metrics["evaluate_ppo/eval/gold_win_rate"] == b.data.metrics["evaluate_ppo/eval/gold_win_rate"]

    from flows.cli import _shown

    shown = [_shown(w) for w in wins]
    compared = alignflow(tmp_path, "runs", "compare", first, second).stdout.splitlines()
    assert next(line for line in compared if " dpo.dpo.beta " in line).split() == ["*", "dpo.dpo.beta", "0.5", "0.3"]
    assert next(line for line in compared if " evaluate_dpo/eval/gold_win_rate " in line).split()[-2:] == shown

    # MLflow's compare view of the two pipeline runs, in headless Chromium, as a person would open it
    need_chromium()
    shot = tmp_path / "mlflow_compare.png"
    with mlflow_ui(tmp_path) as base, browser_page(1500, 1300) as page:
        experiment = a.info.experiment_id
        page.goto(compare_url(base, experiment, [first, second]))
        toggles = page.get_by_text("Show diff only")
        toggles.first.wait_for(timeout=60_000)
        for i in range(toggles.count()):  # params, metrics, tags: only what differs
            toggles.nth(i).click()
        page.get_by_text("Visualizations", exact=True).click()  # folded: the tables come first
        if page.get_by_role("button", name="Close").count():
            page.get_by_role("button", name="Close").first.click()  # the assistant's side panel
        assert same_line(page, "dpo.dpo.beta") == ["dpo.dpo.beta", "0.5", "0.3"]
        page.screenshot(path=str(shot))  # before the metrics grid scrolls (its names column lags behind its values)
        assert grid_row(page, "evaluate_ppo/eval/gold_win_rate") == []  # reused from the cache: no difference
        assert grid_row(page, "evaluate_dpo/eval/gold_win_rate") == ["evaluate_dpo/eval/gold_win_rate", *shown]
        page.get_by_text("reward_vs_kl.png", exact=True).first.dispatch_event("click")  # each run's figure, side by side
        figures = "[...document.images].filter(i => i.complete && i.naturalWidth > 500 && i.getBoundingClientRect().width > 200)"
        page.wait_for_function(f"() => {figures}.length >= 2", timeout=60_000)
        page.evaluate(f"() => {figures}[0].scrollIntoView({{block: 'center'}})")
        page.wait_for_timeout(300)
        box = page.evaluate(f"() => {{ const r = {figures}.map(i => i.getBoundingClientRect());"
                            " return {x: Math.min(...r.map(b => b.left)), y: Math.min(...r.map(b => b.top)),"
                            " width: Math.max(...r.map(b => b.right)) - Math.min(...r.map(b => b.left)),"
                            " height: Math.max(...r.map(b => b.bottom)) - Math.min(...r.map(b => b.top))}; }")
        page.screenshot(path=str(tmp_path / "mlflow_compare_figures.png"), clip=box)
        # the runs table, filtered to the pipeline's runs by their tag
        page.goto(runs_table_url(base, experiment, "tags.alignflow.pipeline = 'quickstart'"))
        page.get_by_text("2 matching runs").wait_for(timeout=60_000)
        for run_id in (first, second):
            page.get_by_text(f"quickstart {run_id[:8]}").wait_for(timeout=30_000)
        # the figure on the second run's own page
        page.goto(run_artifact_url(base, experiment, second, "reward_vs_kl.png"))
        page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth > 500)", timeout=60_000)
    assert shot.stat().st_size > 50_000 and (tmp_path / "mlflow_compare_figures.png").stat().st_size > 30_000
    keep(shot)
    keep(tmp_path / "mlflow_compare_figures.png")
