"""Training-curve plots, saved as PNG artifacts of the stage that trained."""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_history(path: Path) -> list[dict]:
    """metrics.jsonl written during training; a resumed run repeats some steps: the last one wins."""
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line a kill -9 cut short
            continue
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def finish_history(path: Path) -> list[dict]:
    """Rewrite the history without repeats (so a resumed run's file equals an uninterrupted one's)."""
    rows = read_history(path)
    if rows:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(path)
    return rows


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str) -> None:
    """One panel per metric against the step. Written to a temp file, then renamed."""
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def plot_reward_kl(rows: list[dict], path: Path, title: str) -> None:
    """Reward-model score against KL to the reference over PPO iterations (the reward-KL frontier)."""
    pts = [(r["kl"], r["reward"], r["step"]) for r in rows if "kl" in r and "reward" in r]
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=14)
    fig.colorbar(sc, label="iteration")
    ax.set_xlabel("KL(policy || reference) per answer, nats")
    ax.set_ylabel("reward-model score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
