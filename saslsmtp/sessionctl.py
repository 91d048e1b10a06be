"""Who is connected to one serving process, and closing sessions: what ``saslsmtp-ctl who``
and ``saslsmtp-ctl kick`` do inside each process (``saslsmtp.control`` carries the
requests).

``SessionControl(factory, caches, clock, pid)`` reads the factory's open sessions.  A
kicked session gets ``421 4.7.0`` and is closed as if its client had hung up at that
moment (``SubmissionESMTP.end``, which a shutdown uses too): a message still arriving
(between the 354 and the final dot) is discarded, never delivered in part or in full
(RFC 5321 4.1.1.4: an unfinished DATA is no message); a session waiting for an answer
(its final dot was read, a backend or the relay is answering) gets that answer first,
then the 421.  ``kick`` of a user also drops that user's auth cache entries, so the next
login asks the backends.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger

from saslsmtp.logs import LoggedName
from saslsmtp.replies import REPLIES

log = Logger(namespace="saslsmtp")

KICKED = REPLIES["kicked"]


@dataclass(frozen=True)
class SessionInfo:
    """One open session as ``who`` shows it: no secret, only what the logs say anyway.
    ``since``: when it was accepted (seconds since the epoch); ``messages`` accepted."""

    pid: int
    client: str
    port: int
    listener: str
    user: str | None
    mechanism: str | None
    tls: str | None
    since: float
    messages: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SessionInfo":
        """Read what ``to_json`` wrote (``ValueError``/``TypeError``/``KeyError`` if not)."""
        def text(key: str) -> str | None:
            value = data[key]
            if value is not None and not isinstance(value, str):
                raise TypeError(key)
            return value
        return cls(pid=int(data["pid"]), client=str(data["client"]), port=int(data["port"]),
                   listener=str(data["listener"]), user=text("user"),
                   mechanism=text("mechanism"), tls=text("tls"), since=float(data["since"]),
                   messages=int(data["messages"]))

    @property
    def address(self) -> str:
        """``203.0.113.7:40112``, ``[2001:db8::1]:40112``."""
        host = f"[{self.client}]" if ":" in self.client else self.client
        return f"{host}:{self.port}" if self.port else (host or "-")

    @property
    def since_text(self) -> str:
        """``2026-11-30T13:44:10Z``."""
        return datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip(), strict=False)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:192.0.2.1 on a dual-stack listener
    return mapped if mapped is not None else ip


@dataclass(frozen=True)
class Selector:
    """Which sessions: logged in as ``user`` (any case, as the auth cache matches), and/or
    from ``client`` (an address, or a network such as ``203.0.113.0/24``).  Neither:
    every session."""

    user: str | None = None
    client: str | None = None

    def problem(self) -> str | None:
        """Why this selector cannot be used, or ``None``."""
        if self.user is not None:
            if not self.user:
                return "the user name is empty"
            if any(c in self.user for c in "\r\n\0"):
                return "a user name cannot contain line breaks or NUL"
        if self.client is not None:
            try:
                _network(self.client)
            except ValueError:
                return (f"{self.client!r} is no address or network (e.g. 203.0.113.7,"
                        " 203.0.113.0/24, 2001:db8::/32)")
        return None

    def matches(self, info: SessionInfo) -> bool:
        if self.user is not None and (info.user is None
                                      or info.user.casefold() != self.user.casefold()):
            return False
        if self.client is not None:
            ip = _ip(info.client)
            if ip is None or ip not in _network(self.client):
                return False
        return True


def describe(connection: Any, listener: str, pid: int) -> SessionInfo:
    """What ``who`` shows of one ``SubmissionESMTP`` (the address is the client's own,
    behind haproxy too: the PROXY header's)."""
    events = connection.events
    login = connection.auth.login
    return SessionInfo(pid=pid, client=connection.peer.ip, port=connection.peer.port,
                       listener=listener,
                       user=login.username if login is not None else None,
                       mechanism=login.mechanism if login is not None else None,
                       tls=(events.tls or "TLS") if connection.tls else None,
                       since=float(events.started), messages=int(events.messages))


class SessionControl:
    """``who`` and ``kick`` over ``factory``'s open sessions (``factory.connections``;
    ``factory.listener_of``: each session's listener).  ``caches()``: the auth caches a
    kicked user's entries are dropped from."""

    def __init__(self, factory: Any, caches: Callable[[], Iterable[Any]],
                 pid: int | None = None) -> None:
        self.factory = factory
        self.caches = caches
        self.pid = os.getpid() if pid is None else pid

    def _open(self) -> list[tuple[Any, SessionInfo]]:
        listener_of = getattr(self.factory, "listener_of", {})
        return [(c, describe(c, listener_of.get(c, ""), self.pid))
                for c in list(self.factory.connections) if not closing(c)]

    def who(self, selector: Selector = Selector()) -> list[SessionInfo]:
        """The open sessions ``selector`` matches, oldest first."""
        return sorted((info for _, info in self._open() if selector.matches(info)),
                      key=lambda info: info.since)

    def kick(self, selector: Selector) -> tuple[int, int]:
        """Close every session ``selector`` matches; returns (sessions, auth cache entries
        dropped).  A user's cache entries go first: a client that reconnects at once is
        checked by the backends."""
        dropped = 0
        if selector.user is not None:
            dropped = sum(cache.flush(selector.user) for cache in self.caches())
        kicked = 0
        for connection, info in self._open():
            if selector.matches(info):
                kicked += 1
                log.info("session closed by the administrator: client={client} user={user}",
                         client=info.client or "-",
                         user=LoggedName(info.user) if info.user is not None else "-")
                connection.end(KICKED)  # as a shutdown ends one: SubmissionESMTP.end
        return kicked, dropped


def closing(connection: Any) -> bool:
    """Already on its way out (``SubmissionESMTP.leaving``): not listed, not kicked twice."""
    return bool(connection.leaving)
