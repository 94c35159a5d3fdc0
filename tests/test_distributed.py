"""2-process DDP on CPU (gloo, launched with torchrun) follows the same trajectory as 1 process with the
same global batch: same losses, same gradient norms, same final weights."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.sandbox.assets import build_tokenizer, world_texts
from alignment.sandbox.world import World

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS, BATCH = 3, 8


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder, and 16 sandbox preference pairs in JSONL."""
    root = tmp_path_factory.mktemp("ddp")
    world = World()
    tok = build_tokenizer(world_texts(world))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    with open(root / "prefs.jsonl", "w") as f:
        for prompt in world.prompts(16, seed=1):
            (_, a), (_, b) = world.sft_corpus(2, seed=rng.randrange(1000))
            f.write(json.dumps({"prompt": prompt, "chosen": a, "rejected": b}) + "\n")
    return root


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["dpo", "reward"])
def test_two_process_ddp_matches_one_process(workload, tmp_path, kind):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    args = [kind, str(workload / "model"), str(workload / "prefs.jsonl")]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, str(WORKER), *args, str(one), str(STEPS), str(BATCH)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(WORKER), *args, str(two), str(STEPS), str(BATCH)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (two / "processes").read_text() == "2"
    h1, h2 = history(one), history(two)
    assert len(h1) == len(h2) == STEPS
    for a, b in zip(h1, h2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert h1[-1]["loss"] < h1[0]["loss"]  # it trained: the comparison is not of two idle runs
    w1, w2 = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
