"""What `nl serve` tells the operator at start: the warning for a server others can reach
without a key, and the panel printed once it is ready."""

from __future__ import annotations

import ipaddress
from typing import Optional


def exposure_warning(args) -> Optional[str]:
    """What to warn about a server that others can reach without a user API key (None when it
    binds a loopback address or has one). Host names other than localhost count as reachable."""
    if args.api_key or _is_loopback(args.host):
        return None
    what = ("only the admin routes need a key (--admin-api-key)" if args.admin_api_key else
            "they can also update weights, flush the cache and abort requests")
    return (f"listening on {args.host} without --api-key: anyone who can reach port {args.port} "
            f"can generate and read the server info; {what}. Set --api-key (or NL_API_KEY, "
            "--api-key-file), or bind 127.0.0.1.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def print_panel(url: str, args, ready) -> None:
    from rich.console import Console
    from rich.panel import Panel

    lines = [f"URL            {url}", f"Model          {args.model_path}",
             f"Device / dtype {ready.device} / {ready.dtype}",
             f"KV pool        {ready.max_total_num_tokens} tokens",
             f"Max context    {ready.context_len} tokens"]
    Console(stderr=True).print(Panel("\n".join(lines), title="nl serve", expand=False))
