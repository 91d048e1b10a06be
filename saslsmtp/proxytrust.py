"""Which peers a ``haproxy:`` listener believes a PROXY header from.

A PROXY header names the client's address, and that address is what ``allow_nets``,
``[limits] trusted_networks``, the per-address limits and the logs (fail2ban) judge.
Anyone who can reach a ``haproxy:`` listener could name any address, so
``[server] proxy_trusted_networks`` names the proxies (as Dovecot's
``haproxy_trusted_networks`` does): a connection from any other peer is closed at the
accept, before a byte is read or sent, and logged with the peer's address (once; more
within a minute are counted in one line).  Unset, every peer is believed, as before the
setting existed; the start and ``--check`` warn about it (``saslsmtp.preflight``).

A UNIX-socket peer has no address to judge: its socket file's mode says who may connect,
so it is always believed.  No Twisted here but the clock it is given.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, Callable

from twisted.logger import Logger

from saslsmtp.limits.settings import Network, client_ip
from saslsmtp.repeats import PacedWarning

log = Logger(namespace="saslsmtp.smtp")

#: Seconds within which more refusals are counted into one line instead of logged each.
REFUSAL_LOG_INTERVAL = 60.0
#: What ``proxy_trusted_networks`` holds: its strings as written, or ``None`` (unset).
Trusted = tuple[str, ...] | None


def network_problem(item: str) -> str | None:
    """Why ``item`` is no address or network (``None``: it is one)."""
    try:
        ipaddress.ip_network(item, strict=False)
    except ValueError:
        return f"{item!r} is not an IP address or network (like 192.0.2.0/24)"
    return None


@functools.lru_cache(maxsize=64)
def networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of ``items`` (checked at load: ``network_problem``), as the limits'
    ``trusted_networks`` reads them: a host's bits beyond the prefix are ignored."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


@functools.lru_cache(maxsize=4096)
def believed(host: str | None, items: Trusted) -> bool:
    """Whether a PROXY header from the peer ``host`` (``None``: a UNIX-socket peer) is
    believed.  Cached: one lookup per connection, whatever the number of networks."""
    if items is None or host is None:
        return True
    try:
        ip = client_ip(host)  # an IPv4-mapped IPv6 peer (a dual-stack socket) as its IPv4 address
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in networks(items))


def peer_host(addr: Any) -> str | None:
    """The IP address of a Twisted peer address, ``None`` for a UNIX-socket peer."""
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else None


def refusal_log(clock: Any, name: str,
                interval: float = REFUSAL_LOG_INTERVAL) -> PacedWarning[tuple[str, int]]:
    """The refusals of listener ``name``: one line for the first refused peer
    (``occurred((host, port))``), then at most one line per ``interval`` counting the
    others, so a scan or a flood cannot fill the log."""

    def first(peer: tuple[str, int]) -> None:
        log.warn("PROXY header from {peer} refused on {listener}: {host} is not in"
                 " server.proxy_trusted_networks; closed without a greeting",
                 peer="%s:%d" % peer, host=peer[0], listener=name)

    def more(count: int, peer: tuple[str, int]) -> None:
        log.warn("refused {count} more connections on {listener} from peers not in"
                 " server.proxy_trusted_networks in {seconds:.0f} s (the last from {peer})",
                 count=count, listener=name, seconds=interval, peer="%s:%d" % peer)

    return PacedWarning(clock, first, more, interval)


def configured(factory: Any) -> Callable[[], Trusted]:
    """``proxy_trusted_networks`` of the configuration ``factory`` (or the shared factory
    it wraps, ``serving.ListenerFactory``) serves now: read at each connection, so a
    SIGHUP reload, which swaps the factory's wiring, changes it for the next one."""
    shared = factory
    while not hasattr(shared, "wiring") and hasattr(shared, "factory"):
        shared = shared.factory
    if not hasattr(shared, "wiring"):
        return lambda: None
    return lambda: shared.wiring.config.server.proxy_trusted_networks
