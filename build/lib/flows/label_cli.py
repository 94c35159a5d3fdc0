"""`alignflow label ...`: collect human preferences (items, the labeling page, invitations, the terminal
mode, export). Registered on the main command line in flows/cli.py."""

from __future__ import annotations

from pathlib import Path

import typer

label_app = typer.Typer(help="Collect human preferences: a labeling page, a terminal mode, export.", no_args_is_help=True)
DbOpt = typer.Option(Path("labels.db"), "--db", help="The SQLite label store.")


def fail(message: str, code: int = 2) -> None:
    """A user-facing error: the message in red on stderr, and the exit code (2: bad input)."""
    typer.secho(message, err=True, fg="red")
    raise typer.Exit(code=code)


@label_app.command("create")
def label_create(
    samples: Path = typer.Argument(..., help="samples.parquet of a sample stage (prompt, answer, sample)."),
    db: Path = DbOpt,
    batch: str = typer.Option("default", help="Name of this labeling batch."),
    pairs_per_prompt: int = typer.Option(1, min=0, help="Items a prompt: pairs of two of its distinct answers, drawn "
                                         "at random (0: every pair; 8 answers make 28)."),
    seed: int = typer.Option(0, help="Seed of the draw of pairs."),
) -> None:
    """Add labeling items: pairs of two distinct answers of each prompt (one a prompt unless told).

    Example: alignflow label create runs/stages/sample/<key>/samples.parquet --db labels.db
    """
    import pandas as pd

    from tasks import schemas
    from tasks.labeling import LabelStore

    try:
        df = schemas.validate(pd.read_parquet(samples), schemas.SAMPLES, samples)
    except (OSError, schemas.DataError) as err:
        fail(f"bad samples file: {err}")
    added = LabelStore(db).add_batch(df, batch, pairs_per_prompt or None, seed)
    typer.echo(f"{added} new item(s) from {df['prompt'].nunique()} prompt(s) in {db}; label them with "
               f"`alignflow label serve --db {db}`")


@label_app.command("serve")
def label_serve(db: Path = DbOpt, port: int = typer.Option(8765, help="Port of the page."),
                host: str = typer.Option("127.0.0.1", help="Interface to listen on.")) -> None:
    """Serve the labeling page: prompt and two answers side by side; keys 1 / 2 / t (tie) / s (skip).

    Every judgement is stored at once. On this machine (the default, 127.0.0.1) open
    http://127.0.0.1:PORT/?annotator=YOUR_ID. For a team, listen on another interface (--host 0.0.0.0):
    the page then refuses anyone without an invitation link (`alignflow label invite NAME`), and records
    each judgement under the invited annotator.

    Example: alignflow label serve --db labels.db --port 8765
    """
    from flows.label_server import make_server
    from tasks.labeling import LabelError, LabelStore

    try:
        server = make_server(LabelStore(db), host, port)
    except LabelError as err:
        fail(str(err), 2)
    typer.echo(f"labeling page on http://{host}:{port}/ (Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@label_app.command("invite")
def label_invite(annotator: str = typer.Argument(..., help="The annotator's id: their judgements are stored under it."),
                 db: Path = DbOpt, url: str = typer.Option("http://127.0.0.1:8765", help="Where the page is reached.")) -> None:
    """Create an access link for one annotator (needed when the page listens beyond this machine).

    Example: alignflow label invite alice --db labels.db --url http://labels.example.org:8765
    """
    from tasks.labeling import LabelError, LabelStore

    try:
        token = LabelStore(db).invite(annotator)
    except LabelError as err:
        fail(str(err), 2)
    typer.echo(f"{url.rstrip('/')}/?token={token}")


@label_app.command("tui")
def label_tui(annotator: str = typer.Option(..., help="Your annotator id."), db: Path = DbOpt) -> None:
    """Label in the terminal (for sessions over ssh); q quits, and the next start resumes.

    Example: alignflow label tui --annotator alice --db labels.db
    """
    from flows.label_server import terminal_session
    from tasks.labeling import LabelStore

    n = terminal_session(LabelStore(db), annotator)
    typer.echo(f"stored {n} judgement(s)")


@label_app.command("export")
def label_export(out: Path = typer.Argument(..., help="Output .jsonl, .csv or .parquet (prompt, chosen, rejected)."),
                 db: Path = DbOpt) -> None:
    """Write the judgements as standard preference pairs (majority vote; ties and skips left out).

    Example: alignflow label export prefs.jsonl --db labels.db
    """
    from tasks.labeling import LabelStore

    store = LabelStore(db)
    df = store.export()
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    elif out.suffix == ".csv":
        df.to_csv(tmp, index=False)
    else:
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    tmp.replace(out)
    agreement = store.agreement()
    typer.echo(f"{len(df)} pair(s) -> {out}; on {agreement['items_with_2plus']} item(s) judged by two or more people: "
               f"raw agreement {agreement['agreement']:.3f}, Fleiss' kappa {agreement['fleiss_kappa']:.3f}")
