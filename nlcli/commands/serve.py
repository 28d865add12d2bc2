"""`nl serve`: one flag per ServerArgs field, then the engine's launch_server.

The command's signature is generated from dataclasses.fields(ServerArgs), so a new field is a new
flag with its help text, choices and default, with no edit here. The engine is imported only when
the command runs, which keeps `nl --help` and the client commands fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand

from nlcli.engine.args import COMPAT_GROUP, ServerArgs


def _base_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # `from __future__ import annotations`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) is typing.Union and len(args) == 1
    return args[0] if optional else annotation


def _flag_param(f: dataclasses.Field) -> inspect.Parameter:
    meta = f.metadata
    base = _base_type(f.type)
    flag = "--" + f.name.replace("_", "-")
    choices = meta.get("choices")
    if base is bool:
        # An on-by-default or automatic (None) switch can also be turned off.
        decls = (flag,) if f.default is False else (f"{flag}/--no-{flag[2:]}",)
        kind: Any = bool
    else:
        decls = (flag,)
        kind = Literal[tuple(choices)] if choices else base
        if f.default is None:
            kind = Optional[kind]
    help_text = meta.get("help", "")
    if choices:
        help_text += f" One of: {', '.join(choices)}."
    option = typer.Option(
        *decls,
        help=help_text,
        metavar="CHOICE" if choices else None,  # the choices are in the help text
        show_default=f.default is not None and f.default is not False,
        rich_help_panel=meta.get("group"),
    )
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=f.default,
        annotation=Annotated[kind, option],
    )


def _metavar(f: dataclasses.Field) -> str:
    base = _base_type(f.type)
    if base is bool:
        return ""
    if f.metadata.get("choices"):
        return "CHOICE"
    return {int: "INT", float: "FLOAT"}.get(base, "TEXT")


def _help_entries(group: Optional[str] = None) -> list[tuple[str, str]]:
    """(flag, help) of the fields in `group` (None: the ungrouped ones, then --help)."""
    entries = []
    for f in dataclasses.fields(ServerArgs):
        if f.metadata.get("group") != group:
            continue
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        if _base_type(f.type) is bool and f.default is not False:
            flag += f"/--no-{flag[2:]}"
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" One of: {', '.join(f.metadata['choices'])}."
        if f.default is not None and f.default is not False:
            text += f" [default: {f.default}]"
        entries.append((f"{flag} {_metavar(f)}".rstrip(), text))
    if group is None:
        entries.append(("--help", "Show this message and exit."))
    return entries


class PlainHelpCommand(TyperCommand):
    """`nl serve --help` laid out here rather than by Typer: its rich table cuts long names such as
    --constrained-json-whitespace-pattern with an ellipsis at 80 columns, and click's plain layout
    breaks words at hyphens. Long names get their own line; help wraps only between words."""

    LEFT = 32

    def format_help(self, ctx: Any, formatter: Any) -> None:
        con = Console(file=sys.stdout, highlight=False)
        right = max(con.width - self.LEFT - 3, 20)
        lines = Text()
        lines.append(f"Usage: {ctx.command_path} [OPTIONS]\n\n", style="bold")
        for line in Text(inspect.cleandoc(self.help or "")).wrap(con, con.width - 2):
            line.rstrip()
            lines.append("  ").append(line).append("\n")
        for heading, group in (("Options", None), (COMPAT_GROUP, COMPAT_GROUP)):
            lines.append(f"\n{heading}:\n", style="bold")
            for name, text in _help_entries(group):
                self._entry(lines, con, name, text, right)
        con.print(lines, end="", soft_wrap=True)

    def _entry(self, lines: Text, con: Console, name: str, text: str, right: int) -> None:
        wrapped = list(Text(text).wrap(con, right))
        for w in wrapped:
            w.rstrip()
        if len(name) > self.LEFT - 1:
            lines.append(f"  {name}\n", style="cyan")
        else:
            first = wrapped.pop(0) if wrapped else Text("")
            lines.append(f"  {name:<{self.LEFT}} ", style="cyan").append(first).append("\n")
        for rest in wrapped:
            lines.append(" " * (self.LEFT + 3)).append(rest).append("\n")


def _launch(**kwargs: Any) -> None:
    args = ServerArgs(**kwargs)
    # Lazy on purpose: the engine pulls in torch and the model code.
    from nlcli.engine.launch import launch_server

    raise typer.Exit(launch_server(args) or 0)


def _build() -> Any:
    params = [_flag_param(f) for f in dataclasses.fields(ServerArgs) if f.init]

    def serve(**kwargs: Any) -> None:
        """Start the HTTP server and the engine (embedded SmolLM2 when no --model-path)."""
        _launch(**kwargs)

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    serve.__annotations__ = {p.name: p.annotation for p in params}
    return serve


serve = _build()
