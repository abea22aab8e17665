"""Network interfaces: find the address of the one the user named, or list those that exist."""

from __future__ import annotations

import socket

import psutil

from hpcdask.errors import BadInput


def interfaces() -> dict[str, str | None]:
    """Every interface here, with its IPv4 address (None when it has none)."""
    out: dict[str, str | None] = {}
    for name, addrs in psutil.net_if_addrs().items():
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        out[name] = ipv4[0] if ipv4 else None
    return out


def address_of(interface: str, option: str = "--interface") -> str:
    """The IPv4 address of ``interface``; a one-line error naming the ones that exist otherwise."""
    found = interfaces()
    if interface not in found:
        listing = ", ".join(f"{n} ({a or 'no IPv4'})" for n, a in sorted(found.items()))
        usable = [n for n, a in sorted(found.items()) if a and n != "lo"] or ["lo"]
        raise BadInput(
            f"interface '{interface}' does not exist on {socket.gethostname()}; "
            f"interfaces here: {listing}; pass one: {option} {usable[0]}"
        )
    if found[interface] is None:
        raise BadInput(
            f"interface '{interface}' on {socket.gethostname()} has no IPv4 address; "
            f"bring it up or pick another with {option}"
        )
    return found[interface]  # type: ignore[return-value]


def check_port_free(host: str, port: int, option: str) -> None:
    """Fail with one line when ``host:port`` is taken (port 0 is always free). Taken means
    what the server would find: something listens or is bound there. Connections of an
    earlier server on that port that are still in TIME_WAIT do not count (the servers,
    tornado's and distributed's, bind with SO_REUSEADDR, so they start regardless)."""
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise BadInput(
                f"port {port} on {host} is already in use; pick another with {option} PORT "
                f"(or {option} 0 for a free one)"
            ) from None


def port_or_any(host: str, port: int) -> int:
    """``port`` if free on ``host``, else 0 (any free one): another user's dashboard may hold it
    on a shared login or batch node."""
    try:
        check_port_free(host, port, "--dashboard-port")
    except BadInput:
        return 0
    return port
