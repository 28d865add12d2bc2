"""`nl info`: server args, model info and KV pool size in one view.

Reads whichever route names the server has (/get_server_info or /get_server_args, ...). The API key
field of the server args is masked in every output.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from nlcli.commands.common import Settings, client_command, handled
from nlcli.console import consoles, print_json

SECRET_KEYS = ("api_key", "admin_api_key")
# Shown first in the summary panel; everything else goes in the full table.
HEADLINE = ("model_path", "served_model_name", "dtype", "device", "context_length", "tp_size",
            "dp_size", "attention_backend", "max_total_num_tokens", "version", "status")


def redact(args: dict) -> dict:
    return {k: ("***" if k in SECRET_KEYS and v else v) for k, v in args.items()}


def pool_size(server_info: dict, pool: Any) -> Any:
    return pool if pool is not None else server_info.get("max_total_num_tokens")


def kv_table(items: dict, title: str) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="cyan", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in items.items():
        t.add_row(escape(str(k)), escape(str(v)))
    return t


@client_command
def info(ctx: typer.Context, *, s: Settings) -> None:
    """Show server args, model info and KV pool size."""
    with handled(s), s.client() as client:
        server = redact(client.server_info())
        model = client.model_info()
        pool = pool_size(server, client.memory_pool_size())
    if s.json:
        print_json({"server_args": server, "model_info": model, "memory_pool_size": pool})
        return
    head = {"url": s.url, **model, "kv_pool_tokens": pool}
    head.update({k: server[k] for k in HEADLINE if k in server and k not in head})
    con = consoles().human
    con.print(Panel(kv_table(head, ""), title="nl server", expand=False))
    rest = {k: v for k, v in sorted(server.items()) if k not in head}
    con.print(kv_table(rest, "server args"))
