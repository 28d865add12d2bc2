"""`nl serve`: flags generated from ServerArgs reach launch_server as the same ServerArgs."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
from typer.testing import CliRunner

from nlcli.cli import app
from nlcli.engine.args import ServerArgs


@pytest.fixture
def launched(monkeypatch):
    """Replace the engine's launch_server; records the ServerArgs it was given."""
    calls: list[ServerArgs] = []
    fake = types.ModuleType("nlcli.engine.launch")

    def launch_server(args: ServerArgs) -> int:
        calls.append(args)
        return 7 if args.port == 7 else 0

    fake.launch_server = launch_server
    monkeypatch.setitem(sys.modules, "nlcli.engine.launch", fake)
    return calls


def serve(*args: str):
    return CliRunner().invoke(app, ["serve", *args])


def test_defaults_give_default_server_args(launched):
    r = serve()
    assert r.exit_code == 0, r.output
    assert launched == [ServerArgs()]


def test_every_field_has_a_flag_that_sets_it(launched):
    # One non-default value per field, all on one command line.
    argv, expected = [], {}
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if f.type in (bool, "bool"):
            argv.append(flag if not f.default else f"--no-{flag[2:]}")
            expected[f.name] = not f.default
        elif f.type == "Optional[bool]":  # automatic unless set: either way is not the default
            argv.append(f"--no-{flag[2:]}")
            expected[f.name] = False
        elif choices:
            value = next((c for c in choices if c != f.default), f.default)
            argv += [flag, value]
            expected[f.name] = value
        elif "int" in str(f.type):
            argv += [flag, "3"]
            expected[f.name] = 3
        elif "float" in str(f.type):
            argv += [flag, "0.5"]
            expected[f.name] = 0.5
        else:
            argv += [flag, f"v-{f.name}"]
            expected[f.name] = f"v-{f.name}"
    r = serve(*argv)
    assert r.exit_code == 0, r.output
    assert launched == [ServerArgs(**expected)]


def test_exit_code_comes_from_launch_server(launched):
    assert serve("--port", "7").exit_code == 7


def test_bad_choice_is_a_usage_error(launched):
    r = serve("--dtype", "float8")
    assert r.exit_code == 2 and launched == []
    assert serve("--port", "many").exit_code == 2


def test_help_lists_every_flag_with_help_and_default():
    r = serve("--help")
    assert r.exit_code == 0
    words = r.stdout.replace("/--", " --").split()  # --flag/--no-flag: both are listed
    for f in dataclasses.fields(ServerArgs):
        assert "--" + f.name.replace("_", "-") in words, f.name
        for choice in f.metadata.get("choices", ()):
            assert choice in r.stdout
    assert "[default: 30000]" in " ".join(words)


def test_compatibility_flags_are_listed_apart_and_reported_when_set():
    from nlcli.engine.args import COMPAT_GROUP

    compat = [f for f in dataclasses.fields(ServerArgs) if f.metadata.get("group") == COMPAT_GROUP]
    assert {f.name for f in compat} >= {"tokenizer_mode", "trust_remote_code", "grammar_backend"}
    out = serve("--help").stdout
    below = out[out.index(COMPAT_GROUP + ":"):]
    for f in compat:  # every one under the heading, and only there
        flag = "--" + f.name.replace("_", "-")
        assert flag in below.split() and flag not in out[: out.index(COMPAT_GROUP)].split()
    assert ServerArgs().ignored_flags() == []
    args = ServerArgs(tokenizer_mode="slow", trust_remote_code=True, disable_cuda_graph=True)
    assert args.ignored_flags() == ["--tokenizer-mode", "--trust-remote-code"]
