"""The `nl` Typer application: root options and subcommand registration."""

import typer

app = typer.Typer(name="nl", help="nl: a small LLM serving runtime.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print nl's version."""
    from nlcli import __version__

    print(__version__)
