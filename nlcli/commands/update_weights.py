"""`nl update-weights MODEL_PATH`: reload weights in place (the server rolls back on failure)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from nlcli.commands.common import ApiKeyOpt, JsonOpt, TimeoutOpt, UrlOpt, handled, settings
from nlcli.console import consoles, print_json


def update_weights(
    ctx: typer.Context,
    model_path: Annotated[str, typer.Argument(help="New weights: directory, .gguf or repo id.")],
    load_format: Annotated[
        Optional[str],
        typer.Option(help="Weight format (default: the server's current one).", show_default=False),
    ] = None,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Load new weights of the same architecture into the running server."""
    s = settings(ctx, url, api_key, timeout, json_out)
    with handled(s), s.client() as client:
        out = client.update_weights(model_path, load_format)
    if s.json:
        print_json(out)
    else:
        message = escape(str(out.get("message", "")))
        consoles().human.print(f"[green]ok[/]: {message}", soft_wrap=True)
