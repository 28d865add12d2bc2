"""Help fits 80 columns without cutting words; completion scripts are current and load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from nlcli.cli import app
from nlcli.commands.completion import completion_script

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(get_command(app).commands)  # type: ignore[attr-defined]
BOX = "│╭╮╰╯─┌┐└┘├┤┬┴┼━┃┏┓┗┛"


def help_text(*args: str) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0, r.output
    return r.stdout


def source_words(cmd) -> set[str]:
    """Every word of every help string behind a command's --help."""
    texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
    return {w for t in texts for w in t.split()}


@pytest.mark.parametrize("args", [[]] + [[c] for c in COMMANDS], ids=lambda a: a[0] if a else "nl")
def test_help_fits_80_columns_without_cutting_words(args):
    out = help_text(*args)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out  # rich's sign of a truncated cell
    shown = set(re.sub(f"[{BOX}]", " ", out).split())
    cmd = get_command(app)
    for name in args:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    words = source_words(cmd)
    if args == ["serve"]:  # serve's help is built from ServerArgs metadata
        from nlcli.engine.args import ServerArgs
        import dataclasses

        words = {w for f in dataclasses.fields(ServerArgs) for w in f.metadata["help"].split()}
    cut = sorted(w for w in words if w not in shown)
    assert not cut, f"words split or missing in {args} --help: {cut}"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_completion_scripts_are_current(shell):
    committed = (ROOT / "completions" / f"nl.{shell}").read_text()
    assert committed == completion_script(shell), (
        f"completions/nl.{shell} is stale: run `nl completion {shell} -o completions/nl.{shell}`"
    )
    r = CliRunner().invoke(app, ["completion", shell])
    assert r.exit_code == 0 and r.stdout == committed


def test_completion_output_file(tmp_path):
    out = tmp_path / "nl.bash"
    assert CliRunner().invoke(app, ["completion", "bash", "--output", str(out)]).exit_code == 0
    assert out.read_text() == completion_script("bash")
    assert CliRunner().invoke(app, ["completion", "tcsh"]).exit_code == 2


def nl_exe() -> str:
    return str(Path(sys.executable).with_name("nl"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_loads_and_completes():
    script = ROOT / "completions" / "nl.bash"
    r = subprocess.run(["bash", "-c", f"source {script} && complete -p nl"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "_nl_completion" in r.stdout, r.stderr
    # What the script asks `nl` for: the candidates for the word under the cursor.
    env = {**os.environ, "_NL_COMPLETE": "complete_bash", "COMP_WORDS": "nl serve --dtype ",
           "COMP_CWORD": "3"}
    r = subprocess.run([nl_exe()], env=env, capture_output=True, text=True)
    from nlcli.engine.args import ServerArgs
    import dataclasses

    dtype = next(f for f in dataclasses.fields(ServerArgs) if f.name == "dtype")
    assert r.stdout.split() == list(dtype.metadata["choices"])
    env.update(COMP_WORDS="nl flush", COMP_CWORD="1")
    assert subprocess.run([nl_exe()], env=env, capture_output=True, text=True).stdout.split() == [
        "flush-cache"
    ]
