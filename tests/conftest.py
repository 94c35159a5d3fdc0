import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

_PREFECT_SERVER: subprocess.Popen | None = None


def pytest_configure(config):
    """One Prefect server for the whole session (started now, in the background, while tests are
    collected), so that flows (in-process, and `alignflow run` in subprocesses, which inherit
    PREFECT_API_URL) do not each start a temporary server (10-15 s a flow on 2 cores)."""
    global _PREFECT_SERVER
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        # pytest-xdist workers (and the pipelines they start) run torch on one thread each: two processes of
        # two OpenMP threads on two cores spin against each other (a 5-minute test took 14 minutes)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    if os.environ.get("PREFECT_API_URL") or hasattr(config, "workerinput"):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="prefect-home-")  # removed at exit with the server (14 MB a session)
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    _PREFECT_SERVER = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env=env, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    # at exit, after Prefect's own exit handlers (registered later, so run earlier) have sent their last logs
    atexit.register(_stop_prefect_server, home)


def _stop_prefect_server(home: str) -> None:
    os.killpg(_PREFECT_SERVER.pid, signal.SIGKILL)  # a throwaway server: nothing to shut down gracefully
    _PREFECT_SERVER.wait()
    shutil.rmtree(home, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The longest tests first: the sandbox's minutes-long learning tests (marked slow), then those that run
    pipelines (they use the Prefect server), then the rest. The suite runs on two pytest-xdist workers
    (pyproject.toml), one test at a time each: started first, the long tests run beside the short ones
    instead of alone at the end."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "prefect_server" not in item.fixturenames))


@pytest.fixture(scope="session")
def prefect_server():
    """Wait (once) until the session's Prefect server answers: modules that run flows use it
    (`pytestmark = pytest.mark.usefixtures("prefect_server")`); the others run while it starts. An xdist
    worker waits on the server its controller started (PREFECT_API_URL, inherited)."""
    if not os.environ.get("PREFECT_API_URL"):
        return
    deadline = time.time() + 120
    while time.time() < deadline:
        if _PREFECT_SERVER is not None and _PREFECT_SERVER.poll() is not None:
            raise RuntimeError(f"the test session's Prefect server exited with code {_PREFECT_SERVER.returncode}")
        try:
            with urllib.request.urlopen(os.environ["PREFECT_API_URL"] + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("the test session's Prefect server did not start within 120 s")


def tiny_llama_config(vocab_size: int = 40, **kw) -> LlamaConfig:
    defaults = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    defaults.update(kw)
    return LlamaConfig(**defaults)


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="session")
def sandbox_tokenizer():
    """The sandbox world's word-level tokenizer (adds <bos> to every text, no chat template)."""
    from alignment.sandbox.assets import build_tokenizer, world_texts
    from alignment.sandbox.world import World

    return build_tokenizer(world_texts(World()))


# A command run through this gets Ctrl-C as in a terminal: a shell starts a background job (`pytest ... &`, a CI
# runner's) with SIGINT ignored, children inherit that, and Python then leaves it ignored, so a test that sends
# SIGINT would wait for nothing. SIG_DFL survives the exec, and the command's Python installs its own handler.
WITH_CTRL_C = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.argv[1], sys.argv[1:])"]


def gradients_by_micro_cap(opt, step, caps) -> list[torch.Tensor]:
    """The gradient an Optimization's optimizer applies in step(), once for each micro_cap in caps (None: the
    micro-batches as configured), each from the same starting weights."""
    start = {k: v.clone() for k, v in opt.model.state_dict().items()}
    applied = []
    opt.optimizer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: applied.append(  # inside accelerate's
        torch.cat([p.grad.flatten().clone() for p in opt.model.parameters() if p.grad is not None])))  # wrapper
    for cap in caps:
        opt.model.load_state_dict(start)
        opt.micro_cap = cap
        step()
    return applied
