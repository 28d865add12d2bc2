"""`nl flush-cache`: drop the server's prefix (radix) cache."""

from __future__ import annotations

import typer
from rich.markup import escape

from nlcli.commands.common import Settings, ask, client_command, show


@client_command
def flush_cache(ctx: typer.Context, *, s: Settings) -> None:
    """Flush the prefix cache (skipped by the server while requests run)."""
    message = ask(s, lambda client: client.flush_cache()).strip()
    show(s, {"ok": True, "status": 200, "message": message}, escape(message), highlight=False,
         soft_wrap=True)
