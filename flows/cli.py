"""The `alignflow` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="alignflow: declarative, reproducible RLHF pipelines (SFT, preferences, reward model, PPO / DPO, evaluation).",
    no_args_is_help=True,
    add_completion=False,
)

PIPELINES = ("quickstart",)


@app.command()
def run(
    pipeline: str = typer.Argument(..., help="Pipeline to run. Shipped: quickstart (the sandbox world, CPU, minutes)."),
    out: Path = typer.Option(Path("runs/quickstart"), help="Directory for models, data and results."),
) -> None:
    """Run a pipeline end to end.

    Example: alignflow run quickstart --out runs/qs
    """
    if pipeline not in PIPELINES:
        typer.secho(f"unknown pipeline {pipeline!r}; shipped pipelines: {', '.join(PIPELINES)}", err=True, fg="red")
        raise typer.Exit(code=2)
    from alignment.sandbox.quickstart import QuickstartConfig, report, run as run_quickstart

    results = run_quickstart(QuickstartConfig(), out)
    typer.echo(report(results))


@app.command()
def version() -> None:
    """Print the version."""
    from alignment import __version__

    typer.echo(__version__)
