"""`nl classify`: scores from /classify (reward and classification models)."""

from __future__ import annotations

from rich.table import Table

import typer

from nlcli.client import NlClient
from nlcli.commands.common import ApiKeyOpt, JsonOpt, TimeoutOpt, UrlOpt, settings
from nlcli.commands.encode import FileOpt, TextsArg, clip, read_texts, run


def score_table(data: list[dict]) -> Table:
    t = Table("#", "text", "tokens", "score")
    for r in data:
        scores = r["embedding"] or []
        shown = ", ".join(f"{v:.4f}" for v in scores[:4]) + (", …" if len(scores) > 4 else "")
        t.add_row(str(r["index"]), clip(r["text"], 48), str(r["prompt_tokens"] or "-"), shown)
    return t


def classify(
    ctx: typer.Context,
    texts: TextsArg = None,
    file: FileOpt = None,
    url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    timeout: TimeoutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Score texts with a reward or classification model."""
    s = settings(ctx, url, api_key, timeout, json_out)
    run(ctx, read_texts(texts, file), NlClient.classify, score_table, s)
