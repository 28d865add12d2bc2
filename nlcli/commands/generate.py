"""`nl generate`: one prompt through /generate, or /v1/chat/completions with --chat.

Streams text to stdout as it arrives (native events carry the cumulative text, OpenAI chunks carry
deltas), then prints token counts and the finish reason for a person. With --json the request is
not streamed and stdout gets the server's JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from nlcli.client import NlClient
from nlcli.commands.common import Settings, client_command, fail, handled
from nlcli.console import consoles, print_json, write_text

SAMPLING = "Sampling"


def _sampling(help: str) -> Any:
    return typer.Option(help=help, show_default=False, rich_help_panel=SAMPLING)


def read_prompt(prompt: Optional[str]) -> str:
    if prompt is not None and prompt != "-":
        return prompt
    if prompt is None and sys.stdin.isatty():
        raise typer.BadParameter("give a PROMPT argument or pipe one on stdin", param_hint="PROMPT")
    text = sys.stdin.read().rstrip("\n")
    if not text:
        raise typer.BadParameter("the prompt on stdin is empty", param_hint="PROMPT")
    return text


def load_schema(value: Optional[str]) -> Optional[str]:
    """--json-schema takes JSON text or @FILE; the server wants it as a JSON string."""
    if value is None:
        return None
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        json.loads(text)
    except OSError as e:
        raise typer.BadParameter(str(e), param_hint="--json-schema") from None
    except ValueError as e:
        raise typer.BadParameter(f"not valid JSON: {e}", param_hint="--json-schema") from None
    return text


def finish_text(finish: Any, matched: Any = None) -> str:
    if isinstance(finish, dict):
        kind = finish.get("type", "?")
        detail = finish.get("matched", finish.get("length", finish.get("message")))
        return f"{kind} ({detail!r})" if detail is not None else kind
    if finish and matched is not None:
        return f"{finish} ({matched!r})"
    return finish or "none"


def abort_message(finish: Any) -> Optional[str]:
    if isinstance(finish, dict) and finish.get("type") == "abort":
        return str(finish.get("message") or "request aborted")
    if finish == "abort":
        return "request aborted"
    return None


def native_body(prompt: str, params: dict) -> dict:
    return {"text": prompt, "sampling_params": params}


def chat_body(prompt: str, params: dict, system: Optional[str]) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    body: dict[str, Any] = {"model": "default", "messages": messages}
    renames = {"max_new_tokens": "max_tokens", "sampling_seed": "seed"}
    for key, value in params.items():
        if key == "json_schema":
            schema = json.loads(value)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "schema", "schema": schema},
            }
        else:
            body[renames.get(key, key)] = value
    return body


def run_native(client: NlClient, s: Settings, body: dict, stream: bool) -> tuple[dict, dict, str]:
    """(raw response, meta_info, text); raw is the last event when streaming."""
    if not stream:
        out = client.generate(body)
        if not s.json:
            write_text(out.get("text", ""))
        return out, out.get("meta_info", {}), out.get("text", "")
    text, meta, event = "", {}, {}
    for event in client.generate_stream(body):
        new = event.get("text", "")
        # Cumulative text: print only what is new since the last event.
        write_text(new[len(text):] if new.startswith(text) else new)
        text, meta = new, event.get("meta_info", meta)
    return event, meta, text


def run_chat(client: NlClient, s: Settings, body: dict, stream: bool) -> tuple[dict, dict, str]:
    """(raw response, first choice + usage, text); raw is the last chunk when streaming."""
    if not stream:
        out = client.chat(body)
        choice = (out.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        if not s.json:
            write_text(text)
        return out, {"usage": out.get("usage"), **choice}, text
    text, last, chunk = "", {}, {}
    body = {**body, "stream_options": {"include_usage": True}}
    for chunk in client.chat_stream(body):
        for choice in chunk.get("choices", []):
            delta = (choice.get("delta") or {}).get("content") or ""
            write_text(delta)
            text += delta
            if choice.get("finish_reason"):
                last.update(choice)
        if chunk.get("usage"):
            last["usage"] = chunk["usage"]
    return chunk, last, text


def summary(info: dict, chat: bool) -> str:
    if chat:
        usage = info.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"), cached)
        finish = finish_text(info.get("finish_reason"), info.get("matched_stop"))
    else:
        counts = tuple(info.get(k) for k in ("prompt_tokens", "completion_tokens", "cached_tokens"))
        finish = finish_text(info.get("finish_reason"))
    names = ("prompt", "completion", "cached")
    shown = " · ".join(f"{n} {'-' if c is None else c}" for n, c in zip(names, counts))
    return f"tokens: {shown} · finish: {finish}"


@client_command
def generate(
    ctx: typer.Context,
    prompt: Annotated[
        Optional[str],
        typer.Argument(help="Prompt; read from stdin when omitted or '-'.", show_default=False),
    ] = None,
    chat: Annotated[
        bool, typer.Option("--chat", help="Apply the chat template (/v1/chat/completions).")
    ] = False,
    system: Annotated[
        Optional[str],
        typer.Option("--system", help="System message for --chat.", show_default=False),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive.")
    ] = True,
    max_new_tokens: Annotated[Optional[int], _sampling("Most tokens to generate.")] = None,
    temperature: Annotated[Optional[float], _sampling("0 = greedy.")] = None,
    top_p: Annotated[Optional[float], _sampling("Nucleus probability mass.")] = None,
    top_k: Annotated[Optional[int], _sampling("Keep the k likeliest tokens.")] = None,
    stop: Annotated[Optional[list[str]], _sampling("Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], _sampling("Per-request sampling seed.")] = None,
    json_schema: Annotated[
        Optional[str],
        _sampling("Constrain output to this JSON schema (text or @FILE)."),
    ] = None,
    regex: Annotated[Optional[str], _sampling("Constrain output to this regex.")] = None,
    *,
    s: Settings,
) -> None:
    """Generate text from a prompt (argument or stdin)."""
    text_in = read_prompt(prompt)
    params = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stop": list(stop) if stop else None,
        "sampling_seed": seed,
        "json_schema": load_schema(json_schema),
        "regex": regex,
    }
    params = {k: v for k, v in params.items() if v is not None}
    stream = stream and not s.json
    c = consoles()
    with handled(s), s.client() as client:
        if chat:
            raw, info, text = run_chat(client, s, chat_body(text_in, params, system), stream)
        else:
            raw, info, text = run_native(client, s, native_body(text_in, params), stream)
    finish = info.get("finish_reason")
    message = abort_message(finish)
    if s.json:
        if message is None:
            print_json(raw)
    else:
        if text and not text.endswith("\n"):
            write_text("\n")
        c.human.print(escape(summary(info, chat)), style="dim", highlight=False)
    if message is not None:
        raise fail(s, message, 1, 200)
