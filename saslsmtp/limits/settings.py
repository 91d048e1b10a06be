"""``[limits]`` and ``[auth.cache]``: rate windows, typed settings and the client key.

No Twisted here.  ``parse_limits(table, report)`` and ``parse_auth_cache(table, report)``
take the TOML table and a ``report(key, message)`` callback; the configuration module
adds file and line.  Every limit is off (``None``) unless its key is set.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from saslsmtp.limits.redisurl import checked_store_url
from saslsmtp.options import finite_number

Report = Callable[[str, str], None]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]*)\s*([smhd])\s*")


@dataclass(frozen=True)
class Rate:
    """``count`` events per rolling ``period`` seconds (GCRA: a burst of ``count`` is
    allowed, then one event every ``period / count`` seconds)."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds one event occupies in the window (GCRA's emission interval)."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """``"60/1m"``, ``"10/10m"``, ``"5/30s"``, ``"500/h"`` -> ``Rate``; ``ValueError`` else."""
    match = _RATE.fullmatch(text)
    if not match:
        raise ValueError(f'{text!r} is not "N/unit" or "N/Nunit" (units s, m, h, d)')
    count = int(match.group(1))
    multiple = int(match.group(2)) if match.group(2) else 1
    if count < 1:
        raise ValueError(f"{text!r}: the count must be at least 1")
    if multiple < 1:
        raise ValueError(f"{text!r}: the window must be at least 1{match.group(3)}")
    return Rate(count, float(multiple * UNIT_SECONDS[match.group(3)]))


@dataclass(frozen=True)
class LimitsSettings:
    """``[limits]``: where counters live and which limits are on (``None`` = off)."""

    store: str = "memory"
    trusted_networks: tuple[Network, ...] = ()
    ipv6_prefix: int = 64
    connections_per_ip: int | None = None
    connection_rate_per_ip: Rate | None = None
    auth_failures_per_ip: Rate | None = None
    auth_failures_per_user: Rate | None = None
    messages_per_user: Rate | None = None
    recipients_per_user: Rate | None = None
    auth_penalty_max: float = 0.0  # Dovecot-style growing delay cap in seconds; 0 = off

    def client_key(self, address: str) -> str:
        """The counting key of a client address (see ``client_key``)."""
        return _classify(address, self.ipv6_prefix, self.trusted_networks)[0]

    def is_trusted(self, address: str) -> bool:
        """Whether ``address`` is inside ``trusted_networks`` (never limited)."""
        return _classify(address, self.ipv6_prefix, self.trusted_networks)[1]

    def classify(self, address: str) -> tuple[str, bool]:
        """``(client_key(address), is_trusted(address))`` in one cached lookup."""
        return _classify(address, self.ipv6_prefix, self.trusted_networks)


@dataclass(frozen=True)
class AuthCacheSettings:
    """``[auth.cache]``: off unless ``ttl > 0``."""

    ttl: float = 0.0
    negative_ttl: float = 0.0
    size: int = 100000
    stale_if_error: float = 0.0
    control_socket: str | None = None  # deprecated: [server] control_socket (same socket)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP address a client is judged by: an IPv4-mapped IPv6 address (an IPv4 client
    of a dual-stack socket) as its IPv4 address, an IPv6 zone (``%eth0``) dropped;
    ``ValueError`` for anything else (a UNIX-socket peer).  The limits, their
    ``trusted_networks`` and ``proxy_trusted_networks`` all judge this form."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_key(address: str, ipv6_prefix: int = 64) -> str:
    """The string a client is counted under: an IPv4 address as is (IPv4-mapped IPv6
    folded to IPv4), an IPv6 address as its ``/ipv6_prefix`` network, since one host
    usually holds a whole /64.  Anything unparsable (a UNIX socket peer) is kept as is."""
    try:
        ip = client_ip(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


@functools.lru_cache(maxsize=4096)
def _classify(address: str, prefix: int, trusted: tuple[Network, ...]) -> tuple[str, bool]:
    """(client key, trusted?) for an address; cached, since parsing an address costs more
    than a whole in-memory rate check and one session asks several times."""
    try:
        ip = client_ip(address)
    except ValueError:
        return address, False
    return (client_key(address, prefix),
            any(ip.version == net.version and ip in net for net in trusted))


_LIMIT_RATES = ("connection_rate_per_ip", "auth_failures_per_ip", "auth_failures_per_user",
                "messages_per_user", "recipients_per_user")
_STORE_SCHEMES = ("redis://", "rediss://", "unix://")




def parse_limits(table: Mapping[str, Any], report: Report, prefix: str = "limits",
                 base: Path | None = None) -> LimitsSettings:
    """Check and convert a ``[limits]`` table; every problem goes to ``report``; a
    ``rediss://`` ``ca_file`` is relative to ``base`` (the configuration's folder)."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key == "store":
            if not isinstance(value, str):
                report(dotted, "must be a string")
            elif value != "memory" and not value.startswith(_STORE_SCHEMES):
                report(dotted, 'must be "memory" or a redis://, rediss:// or unix:// URL')
            else:
                if value != "memory":
                    try:
                        value = checked_store_url(value, base)
                    except ValueError as e:
                        report(dotted, str(e))
                        continue
                values[key] = value
        elif key == "trusted_networks":
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                report(dotted, "must be an array of networks (strings)")
                continue
            networks = []
            for item in items:
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    report(dotted, f"{item!r} is not an IP network (like 192.0.2.0/24)")
            values[key] = tuple(networks)
        elif key == "ipv6_prefix":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 128:
                report(dotted, "must be an integer from 1 to 128")
            else:
                values[key] = value
        elif key == "connections_per_ip":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                report(dotted, "must be a positive integer")
            else:
                values[key] = value
        elif key in _LIMIT_RATES:
            if not isinstance(value, str):
                report(dotted, 'must be a string like "60/1m"')
                continue
            try:
                values[key] = parse_rate(value)
            except ValueError as e:
                report(dotted, str(e))
        elif key == "auth_penalty_max":
            if not finite_number(value) or value < 0:
                report(dotted, "must be a number of seconds, 0 or more")
            else:
                values[key] = float(value)
        else:
            known = ["auth_penalty_max", "connections_per_ip", "ipv6_prefix", "store",
                     "trusted_networks", *_LIMIT_RATES]
            report(dotted, f"unknown key (known: {', '.join(sorted(known))})")
    return LimitsSettings(**values)


def parse_auth_cache(table: Mapping[str, Any], report: Report,
                     prefix: str = "auth.cache") -> AuthCacheSettings:
    """Check and convert an ``[auth.cache]`` table; every problem goes to ``report``."""
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key in ("ttl", "negative_ttl", "stale_if_error"):
            if not finite_number(value) or value < 0:
                report(dotted, "must be a number of seconds, 0 or more")
            else:
                values[key] = float(value)
        elif key == "size":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                report(dotted, "must be a positive integer")
            else:
                values[key] = value
        elif key == "control_socket":
            if not isinstance(value, str) or not value.startswith("/"):
                report(dotted, "must be an absolute path for a UNIX socket")
            else:
                values[key] = value
        else:
            report(dotted, "unknown key (known: control_socket, negative_ttl, size,"
                           " stale_if_error, ttl)")
    return AuthCacheSettings(**values)
