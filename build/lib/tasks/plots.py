"""Training histories, and the one picture MLflow's own per-step charts cannot draw: reward against KL
across the policies of a pipeline run (logged on the parent run with log_figure)."""

from __future__ import annotations

import json
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


MEASURES = {"gold": "gold reward (the sandbox's known truth)", "rm": "reward-model score"}


def reward_kl_figure(policies: list[dict], references: list[dict], trajectories: list[dict], title: str):
    """Reward against KL to the reference: a point per evaluated policy, its reference at KL 0, and the
    training trajectories where a trainer measured both along the way (the rollouts of PPO, GRPO, RLOO),
    each in its policy's colour. One panel per reward measure present. Entries: {"label", "kl", "gold"?,
    "rm"?}; trajectories {"label", "policy" (a policy's label), "kl": [...], "rm": [...]}. Returns a
    matplotlib figure, or None when no evaluation measured a reward."""
    measures = [m for m in MEASURES if any(m in p for p in policies)]
    if not measures:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4.2), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {p["label"]: palette[i % len(palette)] for i, p in enumerate(policies)}
    for ax, measure in zip(axes[0], measures):
        for t in trajectories:
            if measure in t:
                ax.plot(t["kl"], t[measure], "-", color=colors.get(t.get("policy"), "0.6"), lw=1, alpha=0.6, marker=".",
                        ms=3, label=t["label"])
        for r in references:
            if measure in r:
                ax.scatter([0.0], [r[measure]], marker="s", s=50, color="black", zorder=3)
                ax.annotate(r["label"], (0.0, r[measure]), textcoords="offset points", xytext=(6, -12), fontsize=9)
        for p in (q for q in policies if measure in q):
            ax.scatter([p["kl"]], [p[measure]], s=60, color=colors[p["label"]], zorder=4)
            ax.annotate(p["label"], (p["kl"], p[measure]), textcoords="offset points", xytext=(6, 4), fontsize=9)
        ax.locator_params(axis="x", nbins=5)
        ax.set_xlabel("KL(policy || reference) per answer, nats")
        ax.set_ylabel(f"mean {MEASURES[measure]}")
        ax.grid(alpha=0.3)
        if any(measure in t for t in trajectories):
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def methods_table(evaluations: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Every evaluation metric side by side, one column per evaluated policy: (csv, markdown) text.
    evaluations: policy label -> its evaluate stage's metrics. A metric one evaluation lacks is left empty."""
    labels = list(evaluations)
    keys = sorted({k for m in evaluations.values() for k in m if k.startswith("eval/")})

    def cell(m: dict, k: str) -> str:
        return f"{m[k]:.4g}" if k in m else ""

    csv = "\n".join([",".join(["metric", *labels])] + [",".join([k, *(cell(evaluations[x], k) for x in labels)]) for k in keys])
    md = "\n".join([f"| metric | {' | '.join(labels)} |", "| --- |" + " ---: |" * len(labels)]
                   + [f"| {k} | " + " | ".join(cell(evaluations[x], k) for x in labels) + " |" for k in keys])
    return csv + "\n", md + "\n"
