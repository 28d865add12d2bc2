"""`nl completion SHELL`: the shell completion script, printed or written to a file.

The scripts are Typer's: they call `nl` back with _NL_COMPLETE set, so they stay valid as
commands change; completions/ holds copies, and a test keeps those current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer._completion_shared import get_completion_script

PROG = "nl"
COMPLETE_VAR = "_NL_COMPLETE"


def completion_script(shell: str) -> str:
    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell) + "\n"


def completion(
    shell: Annotated[Literal["bash", "zsh", "fish"], typer.Argument(help="Target shell.")],
    output: Annotated[
        Optional[Path],
        typer.Option("--output", "-o", help="Write the script here instead of stdout.",
                     show_default=False, dir_okay=False),
    ] = None,
) -> None:
    """Print a shell completion script (see the README for install lines)."""
    script = completion_script(shell)
    if output is None:
        typer.echo(script, nl=False)
    else:
        output.write_text(script)
