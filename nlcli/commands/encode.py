"""`nl encode`: embeddings for texts (arguments or a file of lines) from /encode.

The pieces shared with `nl classify` (reading inputs, the JSON shape, the table) live here too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.table import Table

from nlcli.client import NlClient
from nlcli.commands.common import Settings, ask, client_command, show

TextsArg = Annotated[
    Optional[list[str]], typer.Argument(help="Texts to send.", show_default=False)
]
FileOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--file", "-f", help="Read texts from a file, one per line.", show_default=False,
        exists=True, dir_okay=False, readable=True,
    ),
]


def read_texts(texts: Optional[list[str]], file: Optional[Path]) -> list[str]:
    out = list(texts or [])
    if file is not None:
        out += [line for line in file.read_text().splitlines() if line.strip()]
    if not out:
        raise typer.BadParameter("give TEXTS arguments or --file", param_hint="TEXTS")
    return out


def as_list(resp: object) -> list[dict]:
    # A list in gives a list out; a lone object (single-text servers) is wrapped.
    return resp if isinstance(resp, list) else [resp]  # type: ignore[list-item]


def rows(texts: list[str], resp: object) -> list[dict]:
    out = []
    for i, (text, item) in enumerate(zip(texts, as_list(resp))):
        meta = item.get("meta_info") or {}
        out.append(
            {"index": i, "text": text, "embedding": item.get("embedding"),
             "prompt_tokens": meta.get("prompt_tokens")}
        )
    return out


def run(
    s: Settings,
    texts: list[str],
    call: Callable[[NlClient, list[str]], object],
    table: Callable[[list[dict]], Table],
) -> None:
    data = rows(texts, ask(s, lambda client: call(client, texts)))
    show(s, {"data": data}, lambda: table(data))


def clip(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def embedding_table(data: list[dict]) -> Table:
    t = Table("#", "text", "tokens", "dim", "norm", "head")
    for r in data:
        vec = r["embedding"] or []
        head = ", ".join(f"{v:.3f}" for v in vec[:3]) + (", …" if len(vec) > 3 else "")
        norm = math.sqrt(sum(v * v for v in vec))
        t.add_row(str(r["index"]), clip(r["text"]), str(r["prompt_tokens"] or "-"), str(len(vec)),
                  f"{norm:.4f}", head)
    return t


@client_command
def encode(
    ctx: typer.Context, texts: TextsArg = None, file: FileOpt = None, *, s: Settings
) -> None:
    """Embed texts (needs a server started with --is-embedding)."""
    run(s, read_texts(texts, file), NlClient.encode, embedding_table)
