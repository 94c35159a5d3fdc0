"""Importing a large preference file: alignflow's import_preferences stage against `datasets` reading the
same file and writing Parquet, in one invocation, each in a process of its own (peak RSS is per process).

    .venv/bin/python benchmarks/bench_import.py [--pairs 100000] [--keep FILE]

The file is conversational JSONL (TRL's layout: a user turn as the prompt, assistant messages as the
answers) of about 1.9 KB a pair, as the issue measured (100,000 pairs, 189 MB). Printed: seconds and peak
RSS of each, their ratio, and peak RSS against the file's size.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the rice water cook rinse simmer minutes cup salt pot lid heat serve grain stove boil steam fluffy "
         "long short brown white wash soak drain rest fork bowl").split()

OURS = """
import sys, time
sys.path.insert(0, {root!r})
t = time.perf_counter()
from tasks.stages.import_preferences import Params, import_preferences
from tasks import schemas
clean, rejects, counts = import_preferences(Params(path={path!r}))
clean = schemas.validate(clean, schemas.PREFERENCES, {path!r})
from pathlib import Path
schemas.write_parquet(clean, Path({out!r}))
import resource
print(time.perf_counter() - t, int(counts["rows_kept"]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
PEER = """
import time
t = time.perf_counter()
import datasets
datasets.disable_progress_bars()
data = datasets.load_dataset("json", data_files={path!r}, split="train")
data.to_parquet({out!r})
import resource
print(time.perf_counter() - t, len(data), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_file(path: Path, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(pairs):
            row = {"prompt": [{"role": "user", "content": f"question {i}: " + sentence(rng, 60)}],
                   "chosen": [{"role": "assistant", "content": sentence(rng, 120)}],
                   "rejected": [{"role": "assistant", "content": sentence(rng, 110)}]}
            fh.write(json.dumps(row) + "\n")


def measure(code: str) -> tuple[float, int, float]:
    """(seconds the script reports, rows, peak RSS in MB of its process)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[-3]), int(out[-2]), int(out[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--keep", type=Path, default=None, help="write the generated file here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "pairs.jsonl"
        if not path.exists():
            write_file(path, args.pairs)
        size_mb = path.stat().st_size / 2**20
        peer_s, peer_rows, peer_mb = measure(PEER.format(path=str(path), out=str(Path(tmp) / "peer.parquet")))
        ours_s, ours_rows, ours_mb = measure(OURS.format(root=str(ROOT), path=str(path), out=str(Path(tmp) / "ours.parquet")))
    print(f"file: {args.pairs} pairs, {size_mb:.0f} MB")
    print(f"datasets load_dataset + to_parquet: {peer_s:6.1f} s, peak RSS {peer_mb:6.0f} MB ({peer_rows} rows)")
    print(f"alignflow import_preferences:       {ours_s:6.1f} s, peak RSS {ours_mb:6.0f} MB ({ours_rows} pairs)")
    print(f"ratio: {ours_s / peer_s:.2f}x the time of datasets; peak RSS {ours_mb / size_mb:.2f}x the file's size "
          f"(goal: within 3x and 3x)")


if __name__ == "__main__":
    main()
