"""`nl flush-cache`: drop the server's prefix (radix) cache."""

from __future__ import annotations

import typer
from rich.markup import escape

from nlcli.commands.common import ApiKeyOpt, JsonOpt, TimeoutOpt, UrlOpt, handled, settings
from nlcli.console import consoles, print_json


def flush_cache(
    ctx: typer.Context,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Flush the prefix cache (skipped by the server while requests run)."""
    s = settings(ctx, url, api_key, timeout, json_out)
    with handled(s), s.client() as client:
        message = client.flush_cache().strip()
    if s.json:
        print_json({"ok": True, "status": 200, "message": message})
    else:
        consoles().human.print(escape(message), highlight=False, soft_wrap=True)
