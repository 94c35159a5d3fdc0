"""One stage across several hosts (`resources: {nodes: M, processes: N, pool: POOL}`), started by a Prefect
work pool: the pipeline's process registers the `alignflow-node` deployment in POOL, creates M flow runs of
it, and the pool's workers (one a host) each run `node_flow`, which starts torchrun for its node. torchrun's
c10d rendezvous joins the nodes and assigns their ranks; its store is hosted by the pipeline's process, the
one address every node is given. The workers of all nodes run tasks/worker.py on the job file, which must
be on storage every host sees (settings.workdir), as the stage cache already is for a team.

A node that fails (a killed process, a lost host) fails its flow run; the pipeline then cancels the others
(their workers stop them), and the stage fails with the node's reason. Its checkpoints are kept, so a
re-run resumes from the last one. Ctrl-C or SIGTERM of the pipeline cancels every node's flow run.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from prefect import flow

from tasks.context import STOP, StageContext
from tasks.launch import NODE_ENGINES, LaunchError, start, wait

DEPLOYMENT = "node-{pool}"  # one deployment of node_flow a work pool


def node_command(job_file: str, nodes: int, processes: int, endpoint: str, rendezvous_id: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(processes),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", rendezvous_id,
            "--rdzv_conf", "is_host=false", "--max_restarts", "0", "-m", "tasks.worker", job_file]


@flow(name="alignflow-node", log_prints=True)
def node_flow(job_file: str, nodes: int, processes: int, endpoint: str, rendezvous_id: str) -> None:
    """One node of a stage: torchrun with this host's processes, joined to the others at `endpoint`."""
    cmd = node_command(job_file, nodes, processes, endpoint, rendezvous_id)
    log = Path(job_file).parent / f"output-{socket.gethostname()}-{os.getpid()}.log"
    proc, output, reader = start(cmd, log, echo=lambda line: print(line, end=""))
    returncode = wait(proc, reader)
    if returncode != 0:
        raise LaunchError(f"on host {socket.gethostname()}: {output.why() or f'torchrun exited with code {returncode}'}")


def register(pool: str) -> str:
    """The node deployment in `pool`, its code this checkout (the pool's workers run it from here)."""
    remote = node_flow.from_source(source=str(Path(__file__).resolve().parents[1]), entrypoint="flows/nodes.py:node_flow")
    with contextlib.redirect_stdout(io.StringIO()):  # Prefect's table of the deployment: not the pipeline's news
        remote.deploy(name=DEPLOYMENT.format(pool=pool), work_pool_name=pool, build=False, push=False,
                      print_next_steps=False, tags=["alignflow"])
    return f"alignflow-node/{DEPLOYMENT.format(pool=pool)}"


def run_on_nodes(ctx: StageContext, stage, job_file: Path, run_id: str) -> tuple[int, str]:
    """The stage on resources.nodes hosts of its pool; returns (0, "") or (1, why it failed)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling
    from torch.distributed import TCPStore

    res = stage.resources
    store = TCPStore("0.0.0.0", 0, is_master=True, multi_tenant=True, wait_for_workers=False)  # the rendezvous' store
    endpoint = f"{res.rendezvous or socket.getfqdn()}:{store.port}"
    name = register(res.pool)
    params = {"job_file": str(job_file), "nodes": res.nodes, "processes": res.processes, "endpoint": endpoint,
              "rendezvous_id": f"{run_id}-{uuid.uuid4().hex[:8]}"}  # a fresh rendezvous for every attempt
    runs = [run_deployment(name, parameters=params, timeout=0, as_subflow=False) for _ in range(res.nodes)]
    ctx.log(f"[{stage.name}] on {res.nodes} nodes x {res.processes} process(es) of work pool {res.pool!r} "
            f"(flow runs {', '.join(r.name for r in runs)}; rendezvous at {endpoint})")
    with get_client(sync_client=True) as client:
        def cancel(done: set) -> None:
            for r in runs:
                if r.id not in done:
                    state = client.read_flow_run(r.id).state
                    client.set_flow_run_state(r.id, Cancelled() if state.is_scheduled() or state.is_pending() else Cancelling(),
                                              force=True)
            deadline = time.time() + 120  # the workers stop what they run (their torchrun dies with its flow run)
            while time.time() < deadline and not all(client.read_flow_run(r.id).state.is_final() for r in runs):
                time.sleep(1)

        try:
            while True:
                states = {r.id: client.read_flow_run(r.id).state for r in runs}
                failed = [(r, states[r.id]) for r in runs if states[r.id].is_final() and not states[r.id].is_completed()]
                if failed:
                    run, state = failed[0]
                    cancel({r.id for r, _ in failed})
                    why = (state.message or "no reason given").split("LaunchError: ")[-1].rstrip(".")
                    return 1, f"node flow run {run.name!r} ended {state.name} ({why})"
                if all(s.is_completed() for s in states.values()):
                    return 0, ""
                if STOP.is_set():
                    raise KeyboardInterrupt("stop requested")
                time.sleep(1)
        except BaseException:
            cancel(set())
            raise


NODE_ENGINES["prefect"] = run_on_nodes
