"""Reading a ``host:port`` bind, ``[v6]:port`` for an IPv6 address, and its URL.

One reading for every bind the gateway takes (``serve``'s and ``demo``'s ``--bind``, the
admin bind, ``hypercorn.toml``'s ``bind``). Hypercorn's own is loose: it drops every
bracket and splits at the last colon, so ``[::1:0`` bound ``::1`` port 0, ``::1``
bound ``::`` port 1, and ``host:http`` took the port as part of the host. A bind read
here is one Hypercorn reads as the same address.
"""

from __future__ import annotations

import ipaddress

BIND_EXAMPLE = "e.g. 127.0.0.1:8080 or [::1]:8080"


def split_bind(bind: str) -> tuple[str, int | None]:
    """The host and port of a bind; port None when it names none (Hypercorn then takes
    8000). Raises ValueError, saying why, for a bind that is no ``host[:port]``."""
    if bind.startswith("["):
        host, closed, rest = bind[1:].partition("]")
        if not closed:
            raise ValueError(f"no ']' closes the IPv6 address ({BIND_EXAMPLE})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is no IPv6 address ({BIND_EXAMPLE})") from None
        if not rest.startswith(":"):
            raise ValueError(f"no ':port' after the IPv6 address in brackets ({BIND_EXAMPLE})")
        port = rest[1:]
    else:
        if "[" in bind or "]" in bind:
            raise ValueError(f"brackets go around an IPv6 address only ({BIND_EXAMPLE})")
        host, sep, port = bind.rpartition(":")
        if not sep:
            return bind, None
        if ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets ({BIND_EXAMPLE})")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"port {port} is not a port number (0..65535)")
    return host, int(port)


def http_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
