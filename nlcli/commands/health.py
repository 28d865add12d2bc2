"""`nl health`: is the server up (/health), and can it generate (/health_generate)?

--wait polls until the probe answers 200 or the time is up: a starting server is unreachable or
answers 503 for a while. Exit 0 when healthy, 4 when it answered but not healthy, 3 when it never
answered.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.markup import escape

from nlcli.client import NlError, Unhealthy
from nlcli.commands.common import Settings, client_command, handled, show

POLL_INTERVAL = 0.5


@client_command
def health(
    ctx: typer.Context,
    generate: Annotated[
        bool, typer.Option("--generate", help="Probe generation (/health_generate).")
    ] = False,
    wait: Annotated[
        Optional[float],
        typer.Option(
            "--wait", metavar="SECONDS", help="Poll until healthy, for at most this long.",
            show_default=False, min=0,
        ),
    ] = None,
    *,
    s: Settings,
) -> None:
    """Check that the server is alive (exit 0), unhealthy (4) or unreachable (3)."""
    endpoint = "/health_generate" if generate else "/health"
    start = time.monotonic()
    deadline = start + (wait or 0.0)
    with handled(s):
        with s.client() as client:
            while True:
                try:
                    status = client.health(generate)
                    if status == 200:
                        break
                    last: NlError = Unhealthy(f"{endpoint} answered {status}", status)
                except NlError as e:
                    last = e
                if time.monotonic() + POLL_INTERVAL > deadline:
                    raise last
                time.sleep(POLL_INTERVAL)
    elapsed = time.monotonic() - start
    where = escape(f"{s.url}{endpoint}")
    show(s, {"ok": True, "status": 200, "endpoint": endpoint, "elapsed_s": round(elapsed, 3)},
         f"[green]healthy[/]: {where} ({elapsed:.2f} s)", soft_wrap=True)
