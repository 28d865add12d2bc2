"""Where nl's output goes: results on stdout, people's output and diagnostics on stderr.

`out` carries results (generated text, JSON). `human` carries tables, panels and summaries meant
for a person: stdout at a terminal, stderr when stdout is piped, so a script's stdout holds only
results.
`err` carries diagnostics. Consoles are built per call because tests and pipes swap sys.stdout; rich
itself honours NO_COLOR, FORCE_COLOR and COLUMNS.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console


@dataclass
class Consoles:
    out: Console
    human: Console
    err: Console


def consoles() -> Consoles:
    out = Console(file=sys.stdout, highlight=False)
    err = Console(file=sys.stderr, stderr=True, highlight=False)
    human = out if sys.stdout.isatty() else err
    return Consoles(out=out, human=human, err=err)


def print_json(obj: Any) -> None:
    """Exactly one JSON document on stdout, raw UTF-8, no colour, no wrapping."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def write_text(text: str) -> None:
    """Plain result text (streamed tokens): no markup parsing, flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()
