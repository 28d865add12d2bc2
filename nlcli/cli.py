"""The `nl` Typer application: root options and subcommand registration.

Exit codes (the scripting contract): 0 ok, 1 the server answered with an error, 2 usage error,
3 server unreachable or timed out, 4 unhealthy, 5 unauthorized, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from nlcli.commands.bench import bench
from nlcli.commands.classify import classify
from nlcli.commands.common import EXIT_INTERRUPTED, root_settings
from nlcli.commands.completion import completion
from nlcli.commands.encode import encode
from nlcli.commands.flush_cache import flush_cache
from nlcli.commands.generate import generate
from nlcli.commands.health import health
from nlcli.commands.info import info
from nlcli.commands.serve import PlainHelpCommand, serve
from nlcli.commands.update_weights import update_weights
from nlcli.console import print_json

CONNECTION = "Connection"


class NlGroup(TyperGroup):
    """Keeps the --json promise for usage errors too: one JSON object on stdout, exit 2."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode or "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            print_json({"ok": False, "status": None, "error": "interrupted"})
            sys.exit(EXIT_INTERRUPTED)
        except Exception as e:  # click's UsageError and friends, from the vendored click
            code = getattr(e, "exit_code", None)
            if not isinstance(code, int) or not hasattr(e, "format_message"):
                raise
            print_json({"ok": False, "status": None, "error": e.format_message()})
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="nl",
    cls=NlGroup,
    help="nl: a small LLM serving runtime (SGLang- and OpenAI-compatible).",
    epilog="Exit codes: 0 ok, 1 server error, 2 usage, 3 unreachable, 4 unhealthy, "
    "5 unauthorized, 130 interrupted.",
    no_args_is_help=True,
    add_completion=True,  # also registers the completion classes `nl completion` relies on
    pretty_exceptions_show_locals=False,  # locals would include the API key
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from nlcli import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[
        Optional[str],
        typer.Option(envvar="NL_URL", help="Server URL (default http://127.0.0.1:30000).",
                     show_default=False, rich_help_panel=CONNECTION),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="NL_API_KEY", help="Bearer key for --api-key servers.",
                     show_default=False, rich_help_panel=CONNECTION),
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option(help="Seconds to wait for an answer (default 300).", show_default=False,
                     rich_help_panel=CONNECTION),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout.",
                           rich_help_panel=CONNECTION),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """nl: serve a model, or talk to a running server.

    The connection options work here and after any client command.
    """
    if timeout is not None and timeout <= 0:
        raise typer.BadParameter("must be positive", param_hint="--timeout")
    ctx.obj = root_settings(url, api_key, timeout, json_out)


app.command("serve", rich_help_panel="Server", cls=PlainHelpCommand)(serve)
for fn, name in (
    (generate, "generate"), (encode, "encode"), (classify, "classify"), (health, "health"),
    (flush_cache, "flush-cache"), (update_weights, "update-weights"), (info, "info"),
    (bench, "bench"),
):
    app.command(name, rich_help_panel="Client")(fn)

app.command("completion", rich_help_panel="Setup")(completion)
