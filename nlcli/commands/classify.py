"""`nl classify`: scores from /classify (reward and classification models)."""

from __future__ import annotations

from rich.table import Table

import typer

from nlcli.client import NlClient
from nlcli.commands.common import Settings, client_command
from nlcli.commands.encode import FileOpt, TextsArg, clip, read_texts, run


def score_table(data: list[dict]) -> Table:
    t = Table("#", "text", "tokens", "score")
    for r in data:
        scores = r["embedding"] or []
        shown = ", ".join(f"{v:.4f}" for v in scores[:4]) + (", …" if len(scores) > 4 else "")
        t.add_row(str(r["index"]), clip(r["text"], 48), str(r["prompt_tokens"] or "-"), shown)
    return t


@client_command
def classify(
    ctx: typer.Context, texts: TextsArg = None, file: FileOpt = None, *, s: Settings
) -> None:
    """Score texts with a reward or classification model."""
    run(s, read_texts(texts, file), NlClient.classify, score_table)
