"""``Peer``: who is on the other end of one connection, as everyone else sees it.

The protocol reads the addresses (again once a PROXY header may have replaced them) and
the HELO name here; mechanisms, checkers and scripts get them as a ``Session``, the
envelope and the sender check as a ``Client``, the Received header as a ``Stamp``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.internet import tcp

from saslsmtp.envelope import Client
from saslsmtp.sendnow import SendNowServer
from saslsmtp.sasl.heard import Heard
from saslsmtp.sasl.outcome import Session
from saslsmtp.tlsinfo import NO_FACTS, tls_facts
from saslsmtp.transaction import Stamp


class Peer:
    """The client's and our address, its HELO name, the AUTH script's context and what the
    client said in its AUTH exchanges (``Heard``, bounded)."""

    __slots__ = ("hostname", "client_identity", "ip", "port", "local_ip", "local_port", "helo",
                 "context", "heard", "_settled")  # one per connection: no __dict__

    def __init__(self, hostname: str, client_identity: str = "cn") -> None:
        self.hostname = hostname
        self.client_identity = client_identity  # which certificate field names the client
        self.ip, self.port = "", 0
        self.local_ip, self.local_port = "", 0
        self.helo = ""  # the EHLO/HELO name, "" before it (and after STARTTLS)
        self.context: dict = {}  # the AUTH script's per-connection context
        self.heard = Heard()  # what the client said in AUTH: kept out of the script's errors
        self._settled = False  # the addresses are final (plain TCP)

    def read(self, transport: Any) -> None:
        """Take the addresses from ``transport`` (behind haproxy: from the PROXY header,
        so they are read again once data has arrived; a plain TCP connection's addresses
        never change and are read once)."""
        if self._settled:
            return
        self.ip, self.port = _address(transport.getPeer())
        self.local_ip, self.local_port = _address(transport.getHost())
        self._settled = type(transport) in _PLAIN_TCP

    def helo_pair(self) -> tuple:
        """The (HELO name, peer IP) pair stock ``smtp.User`` and avatars expect."""
        return (self.helo.encode("ascii") or None, self.ip)

    def session(self, transport: Any, tls: bool, mechanism: str = "") -> Session:
        """The connection as mechanisms, checkers and scripts see it (built once per
        exchange: reading the TLS channel bindings is not free)."""
        facts = tls_facts(transport, self.client_identity) if tls else NO_FACTS
        return Session(remote_ip=self.ip, remote_port=self.port,
                       local_ip=self.local_ip, local_port=self.local_port,
                       helo=self.helo, tls=tls, hostname=self.hostname,
                       mechanism=mechanism, context=self.context, heard=self.heard,
                       channel_bindings=facts.channel_bindings,
                       client_certificate=facts.client_certificate,
                       client_certificate_error=facts.certificate_error)

    def client(self, login: str | None, session: Callable[[], Any]) -> Client:
        """Who is sending, for the envelope and the sender check."""
        return Client(login, self.ip, self.port, self.helo, session)

    def stamp(self, tls: bool, user: str | None) -> Stamp:
        """What the Received header says about this connection."""
        return Stamp(self.helo, self.ip, self.hostname, tls, user)


#: Transports whose addresses are the connection's own (no PROXY header can change them).
_PLAIN_TCP = (tcp.Server, SendNowServer)


def _address(addr: Any) -> tuple[str, int]:
    """(host, port) of a transport address; UNIX and test addresses have neither.  An
    IPv4 client of a dual-stack socket (systemd's ``ListenStream=587`` is ``[::]:587``)
    comes as ``::ffff:a.b.c.d``: it is ``a.b.c.d``, as Postfix and Dovecot show it, for
    the logs (fail2ban bans IPv4 clients by their IPv4 address), limits and scripts."""
    host = str(getattr(addr, "host", "") or "")
    if host[:7].lower() == "::ffff:":
        host = ipv4_of(host)
    return (host, int(getattr(addr, "port", 0) or 0))


def ipv4_of(host: str) -> str:
    """``a.b.c.d`` for an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``), else ``host``."""
    try:
        mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped is not None else host
