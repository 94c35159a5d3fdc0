"""One stage across several hosts through a Prefect work pool (`resources: {nodes: 2, processes: 1, pool: P}`),
tried on one machine as two "nodes": two workers of a local `process` pool, each taking one node's flow run,
joined by torchrun's c10d rendezvous. The 2-node DPO stage follows the 1-node x 2-process one; a node
whose process is killed fails the stage with a sentence (exit 1, its MLflow run FAILED, nothing published)
and a re-run resumes from the last checkpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from chat_model import TEXTS, build_chat_model

pytestmark = pytest.mark.usefixtures("prefect_server")  # the session's Prefect server (conftest.py)

BIN = Path(sys.executable).parent
STEPS, HOLD = 8, 5  # a checkpoint every 3 steps: a stage killed at step 5 resumes from 3


def config(root: Path, resources: dict, model: Path, prefs: Path) -> Path:
    stages = [
        {"name": "base", "type": "model", "params": {"name_or_path": str(model)}},
        {"name": "prefs", "type": "import_preferences", "params": {"path": str(prefs), "held_out": 0.0}},
        {"name": "dpo", "type": "dpo", "inputs": {"preferences": "prefs", "policy": "base"}, "resources": resources,
         "params": {"dpo": {"max_length": 128, "beta": 0.5,
                            "train": {"max_steps": STEPS, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3}}}},
    ]
    cfg = {"settings": {"seed": 0, "workdir": str(root / "runs"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
           "pipelines": {"nodes": {"stages": stages}}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipelines.yaml").write_text(yaml.safe_dump(cfg))
    return root / "pipelines.yaml"


def output(root: Path) -> Path:
    [success] = (root / "runs" / "stages" / "dpo").glob("*/_SUCCESS.json")
    return success.parent


def dpo_workers(root: Path) -> dict[int, int]:
    """Rank -> process id of the live tasks.worker processes of this test's DPO stage."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode().split("\0")
            if "tasks.worker" in args and "torch.distributed.run" not in args and args[-2].startswith(str(root)):
                environ = (cmdline.parent / "environ").read_bytes().decode().split("\0")
                env = dict(item.split("=", 1) for item in environ if "=" in item)
                found[int(env["RANK"])] = int(cmdline.parent.name)
        except (OSError, KeyError):
            continue
    return found


def start_workers(pool: str, cwd: Path, env: dict) -> list[subprocess.Popen]:
    """Two workers of the pool, one flow run each: the two "hosts"."""
    return [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"], cwd=cwd,
                             env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # a worker's graceful shutdown takes a minute: nothing here is worth keeping
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
def test_a_dpo_stage_on_two_nodes_of_a_work_pool_equals_two_processes_and_resumes_after_a_node_dies(tmp_path):
    model = build_chat_model(tmp_path / "model")
    rows = [{"prompt": q, "chosen": TEXTS[(i + k + 1) % len(TEXTS)], "rejected": TEXTS[(i + 2 * k + 5) % len(TEXTS)]}
            for i, q in enumerate(TEXTS[:8]) for k in range(1 + i % 3)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))

    one = tmp_path / "one"  # one node, two processes (torchrun --standalone), from this test's process
    from flows.config import load
    from flows.pipeline import pipeline_flow, resolved_yaml

    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg, raw = load(config(one, {"processes": 2}, model, prefs), "nodes")
    pipeline_flow(cfg, "nodes", resolved_yaml(raw))

    env = {**os.environ, "TQDM_DISABLE": "1", "PREFECT_CLIENT_MAX_RETRIES": "20"}
    pool = f"nodes-{tmp_path.name[-12:]}".replace("_", "-")
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                   capture_output=True, timeout=300)
    two = tmp_path / "two"
    path = config(two, {"nodes": 2, "processes": 1, "pool": pool, "rendezvous": "127.0.0.1"}, model, prefs)
    held = two / "held"
    workers = start_workers(pool, two, {**env, "ALIGNFLOW_TEST_HOLD": f"{HOLD}:{held}"})
    try:
        log = two / "cli.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([str(BIN / "alignflow"), "run", "nodes", "-c", str(path)], cwd=two, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (held.exists() and len(dpo_workers(two)) == 2):
            time.sleep(0.1)
        assert held.exists() and len(dpo_workers(two)) == 2, f"the two nodes never reached step {HOLD}: {log.read_text()[-3000:]}"
        time.sleep(1.0)  # both ranks write the marker in the same step: let the second one arrive
        os.kill(dpo_workers(two)[1], signal.SIGKILL)  # the second node's process dies
        proc.wait(timeout=240)
        text = log.read_text()
        assert proc.returncode == 1, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        assert "process 0 was killed by SIGKILL" in text or "process 1 was killed by SIGKILL" in text, text[-3000:]
        deadline = time.time() + 60  # the other node's flow run was cancelled: its worker stops it
        while time.time() < deadline and dpo_workers(two):
            time.sleep(0.2)
        assert dpo_workers(two) == {}, "a node's process outlived the failed stage"
    finally:
        stop(workers)
    assert not list((two / "runs" / "stages" / "dpo").glob("*/_SUCCESS.json"))  # nothing half-published
    [state] = (two / "runs" / "stages" / "dpo").glob("*.partial/checkpoints/checkpoint-*/trainer_state.json")
    assert json.loads(state.read_text())["step"] == 3

    workers = start_workers(pool, two, env)
    try:
        result = subprocess.run([str(BIN / "alignflow"), "run", "nodes", "-c", str(path)], cwd=two, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        stop(workers)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 nodes x 1 process(es) of work pool" in result.stdout + result.stderr

    h1 = [json.loads(line) for line in (output(one) / "train_metrics.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (output(two) / "train_metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h2] == [h["step"] for h in h1] == list(range(1, STEPS + 1))
    for a, b in zip(h1, h2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    w1, w2 = (load_file(output(r) / "model" / "model.safetensors") for r in (one, two))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    base = load_file(model / "model.safetensors")
    assert max(float((w1[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained (Adam: about lr a step): not idle runs

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{two / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name != "Default"]
    assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
    [failed] = client.search_runs([exp.experiment_id], "tags.`alignflow.stage` = 'dpo' and attributes.status = 'FAILED'")
    [resumed] = client.search_runs([exp.experiment_id], "tags.`alignflow.stage` = 'dpo' and attributes.status = 'FINISHED'")
    assert resumed.data.tags["alignflow.nodes"] == "2"
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == list(range(4, STEPS + 1))


def test_nodes_need_a_work_pool(tmp_path):
    from flows.config import ConfigError, load

    stages = [{"name": "base", "type": "model", "params": {"name_or_path": "x"}},
              {"name": "prefs", "type": "import_preferences", "params": {"path": "p.jsonl"}},
              {"name": "dpo", "type": "dpo", "inputs": {"preferences": "prefs", "policy": "base"}, "resources": {"nodes": 2}}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"pipelines": {"p": {"stages": stages}}}))
    with pytest.raises(ConfigError, match="name it as pool"):
        load(tmp_path / "p.yaml")
