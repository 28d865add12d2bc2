"""`nl update-weights MODEL_PATH`: reload weights in place (the server rolls back on failure)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from nlcli.commands.common import Settings, ask, client_command, show


@client_command
def update_weights(
    ctx: typer.Context,
    model_path: Annotated[str, typer.Argument(help="New weights: directory, .gguf or repo id.")],
    load_format: Annotated[
        Optional[str],
        typer.Option(help="Weight format (default: the server's current one).", show_default=False),
    ] = None,
    *,
    s: Settings,
) -> None:
    """Load new weights of the same architecture into the running server."""
    out = ask(s, lambda client: client.update_weights(model_path, load_format))
    show(s, out, lambda: f"[green]ok[/]: {escape(str(out.get('message', '')))}", soft_wrap=True)
