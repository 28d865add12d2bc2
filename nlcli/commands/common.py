"""Connection options shared by the client commands, and the one place errors become exit codes.

--url, --api-key, --timeout and --json are accepted both before the command (`nl --url U health`)
and after it (`nl health --url U`); the command's own value wins. Environment variables are read
by the root options only, so an explicit root flag is never overridden by the environment.

`client_command` gives a command those options; `ask` makes one server call under the exit-code
contract and `show` prints its result (JSON or human).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.markup import escape

from nlcli.client import DEFAULT_TIMEOUT, DEFAULT_URL, NlClient, NlError
from nlcli.console import consoles, print_json

PANEL = "Connection"
EXIT_INTERRUPTED = 130

UrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--url", help="Server URL (env NL_URL).", show_default=False, rich_help_panel=PANEL
    ),
]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        "--api-key", help="Bearer key (env NL_API_KEY).", show_default=False, rich_help_panel=PANEL
    ),
]
TimeoutOpt = Annotated[
    Optional[float],
    typer.Option(
        "--timeout",
        help=f"Seconds to wait for an answer (default {DEFAULT_TIMEOUT:g}).",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON object on stdout.", rich_help_panel=PANEL),
]


@dataclass
class Settings:
    url: str = DEFAULT_URL
    api_key: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
    json: bool = False

    def client(self) -> NlClient:
        return NlClient(self.url, api_key=self.api_key, timeout=self.timeout)


def root_settings(
    url: Optional[str], api_key: Optional[str], timeout: Optional[float], json_out: bool
) -> Settings:
    return Settings(
        url=url or os.environ.get("NL_URL") or DEFAULT_URL,
        api_key=api_key or os.environ.get("NL_API_KEY") or None,
        timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
        json=json_out,
    )


def settings(
    ctx: typer.Context,
    url: Optional[str] = None,
    api_key: Optional[str] = None,
    timeout: Optional[float] = None,
    json_out: bool = False,
) -> Settings:
    """The command's flags layered over the root's (which already folded in the environment)."""
    if timeout is not None and timeout <= 0:
        raise typer.BadParameter("must be positive", param_hint="--timeout")
    root = ctx.find_root().obj
    if not isinstance(root, Settings):
        root = root_settings(None, None, None, False)
    return Settings(
        url=url or root.url,
        api_key=api_key or root.api_key,
        timeout=timeout if timeout is not None else root.timeout,
        json=json_out or root.json,
    )


def fail(s: Settings, message: str, exit_code: int, status: Optional[int] = None) -> typer.Exit:
    """Report a failure (JSON or human) and return the Exit to raise."""
    if s.json:
        print_json({"ok": False, "status": status, "error": message})
    else:
        where = f" (HTTP {status})" if status is not None else ""
        text = f"[bold red]error[/]{where}: {escape(message)}"
        consoles().err.print(text, highlight=False, soft_wrap=True)
    return typer.Exit(exit_code)


@contextmanager
def handled(s: Settings) -> Iterator[None]:
    """Turn client errors and Ctrl-C into the scripting contract's output and exit codes."""
    try:
        yield
    except NlError as e:
        raise fail(s, e.message, e.exit_code, e.status) from None
    except KeyboardInterrupt:
        raise fail(s, "interrupted", EXIT_INTERRUPTED) from None


T = TypeVar("T")
_CONNECTION_PARAMS = [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                      annotation=annotation)
    for name, annotation, default in (
        ("url", UrlOpt, None), ("api_key", ApiKeyOpt, None), ("timeout", TimeoutOpt, None),
        ("json_out", JsonOpt, False),
    )
]


def client_command(fn: Callable[..., T]) -> Callable[..., T]:
    """Append --url, --api-key, --timeout and --json to a command; it gets the Settings as `s`.

    `fn` takes `ctx: typer.Context` first and a keyword `s: Settings`. Typer reads the signature
    set here: fn's own parameters (without `s`), then the connection options, so help keeps them
    last. The settings are resolved before fn runs, so a bad --timeout fails before anything else.
    """
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "s"]
    params = own + _CONNECTION_PARAMS

    @functools.wraps(fn)
    def command(ctx: typer.Context, *args: Any, url: Optional[str] = None,
                api_key: Optional[str] = None, timeout: Optional[float] = None,
                json_out: bool = False, **kwargs: Any) -> T:
        return fn(ctx, *args, s=settings(ctx, url, api_key, timeout, json_out), **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    # Typer resolves annotations through get_type_hints: give it objects, not fn's strings.
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def ask(s: Settings, call: Callable[[NlClient], T]) -> T:
    """One exchange with the server: a fresh client, errors mapped to exit codes."""
    with handled(s), s.client() as client:
        return call(client)


def show(s: Settings, data: Any, human: Any, **print_kw: Any) -> None:
    """Print `data` as one JSON object with --json, else `human` (text or a rich renderable).

    `human` may be a function building it, so JSON output never depends on the human view.
    """
    if s.json:
        print_json(data)
    else:
        consoles().human.print(human() if callable(human) else human, **print_kw)
