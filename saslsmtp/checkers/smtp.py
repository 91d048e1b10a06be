"""``type = "smtp"``: forward the AUTH to another SMTP server; its verdict is ours.

One check = one fresh connection: greeting, ``EHLO``, ``STARTTLS`` + ``EHLO`` when
configured, the peer certificate checked again, **one** ``AUTH`` (PLAIN with an initial
response, or LOGIN when only that is offered), then ``QUIT``.  No mail is ever sent.

Verdicts: ``235`` -> the username; ``535``, ``534`` or another ``5xx`` with a ``5.7.x``
enhanced code (but ``5.7.11``) to the AUTH exchange -> ``UnauthorizedLogin``; ``454``,
other ``4xx``, a ``5xx`` that judges nothing (``500`` from a broken upstream, ``502``,
``503``, ``504``, ``538``), a refused connection, a TLS or certificate failure, a
protocol error or no verdict within ``timeout`` (the whole check) -> ``TemporaryFailure``
(see ``judges_credentials``).

Why a small ``LineOnlyReceiver`` instead of Twisted's ``ESMTPClient``:
the stock PLAIN authenticator retries with another authzid after any non-235 reply (two
attempts per check, which doubles failure counters and trips upstream lockouts);
``ESMTPClient`` only times out per line, keeps a transcript with the base64 password in
``SMTPClientError.log``, skips AUTH for an empty password, reaches success only through
``getMailFrom()``, and offers no hook between the TLS handshake and AUTH for our own
subjectAltName check.  Working around each means overriding private methods; the whole
conversation here is about a hundred lines with every transition visible.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, cast

from OpenSSL import SSL
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, clientFromString,
                                        wrapClientTLS)
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator, IReactorTime,
                                         ISSLTransport, IStreamClientEndpoint, ITLSTransport)
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers.quiet import connect_protocol
from saslsmtp.deadline import with_deadline
from saslsmtp.errors import TemporaryFailure
from saslsmtp.octets import as_bytes
from saslsmtp.options import (PATH, OptionProblem, Options, ca_file_problem,
                              endpoint_port_problem, hostname_problem, problem_if)
from saslsmtp.checkers.outage import OutageLog
from saslsmtp.checkers.tlsclient import (CertificateIdentityError, StrictClientTLS,
                                         load_trust_root, verify_peer_identity)
from saslsmtp.credentials import AvatarId

log = Logger()

MAX_REPLY_LINES = 100
QUIT_GRACE = 2.0  # seconds to wait for the 221 after a verdict before dropping the line
_REPLY = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")
_ENHANCED = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$")


@dataclass(frozen=True)
class SmtpOptions(Options):
    """``[backends.NAME] type = "smtp"``: forward the AUTH to another SMTP server."""

    host: str = "127.0.0.1"
    port: int = 587
    endpoint: str | None = None  # a Twisted client endpoint string, instead of host/port
    starttls: bool = True
    tls: bool = False  # implicit TLS (port 465 style)
    ca_file: str | None = field(default=None, metadata=PATH)
    tls_hostname: str | None = None
    helo: str | None = None
    timeout: float = 10.0

    def check(self) -> Iterable[OptionProblem]:
        return [*problem_if(not self.host and not self.endpoint, "host", "must not be empty"),
                *problem_if(not 0 < self.port < 65536, "port", "must be 1 to 65535"),
                *endpoint_problem("endpoint", self.endpoint),
                *ca_file_problem("ca_file", self.ca_file),
                *hostname_problem("helo", self.helo),
                *problem_if(self.timeout <= 0, "timeout", "must be positive")]


def endpoint_problem(key: str, description: str | None) -> list[OptionProblem]:
    """A problem when ``description`` is set and Twisted cannot parse it as a client
    endpoint: found at load (``--check``), not as a bare ``ValueError`` when the checker
    is built.  Parsing builds the endpoint without connecting, so no reactor is needed."""
    if not description:
        return []
    try:
        clientFromString(None, description)
    except Exception as e:  # an endpoint plugin's parser may raise anything
        return [OptionProblem(key, f"{description!r} is not a Twisted client endpoint string"
                                   f" ({str(e) or type(e).__name__})")]
    why = endpoint_port_problem(description, client=True)  # parsed, but no connect works
    return problem_if(why is not None, key, f"{description!r} cannot be connected to: {why}")


class UpstreamReply:
    """One complete (possibly multi-line) reply: its ``code`` and text ``lines``."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[bytes]) -> None:
        self.code = code
        self.lines = lines

    def status(self) -> str:
        """``"454 4.7.0"``: the code and, if present, the enhanced code (never free text)."""
        first = self.lines[0].decode("ascii", "replace").split(" ", 1)[0] if self.lines else ""
        return f"{self.code} {first}" if _ENHANCED.match(first) else str(self.code)


class AuthProbe(LineOnlyReceiver):
    """One upstream SMTP conversation for one username and password.

    ``result`` fires once: with the username (bytes) on 235, or fails with
    ``UnauthorizedLogin`` / ``TemporaryFailure``.  ``transcript`` records the
    conversation with every AUTH payload replaced by ``<redacted>``, and of the replies
    that follow the credentials only their codes: an upstream may echo the line it got
    (``500 5.5.2 Unrecognized: AUTH PLAIN AGFsaWNl...``).
    """

    MAX_LENGTH = 4096
    delimiter = b"\r\n"

    def __init__(self, username: bytes, password: bytes, *, clock: IReactorTime,
                 tls_creator: IOpenSSLClientConnectionCreator | None, starttls: bool,
                 implicit_tls: bool, tls_hostname: str, helo: str | None,
                 upstream: str) -> None:
        self.result: "Deferred[AvatarId]" = Deferred(self._cancelled)
        self.transcript: list[str] = []
        self._username = username
        self._password: bytes | None = password
        self._clock = clock
        self._tls_creator = tls_creator
        self._want_starttls = starttls and not implicit_tls
        self._tls = implicit_tls
        self._tls_hostname = tls_hostname
        self._helo = helo
        self._upstream = upstream
        self._state = "greeting"
        self._lines: list[bytes] = []
        self._code = b""
        self._quit_timer: Any = None
        self._credentials_sent = False
        self.cancelled_while = ""

    def __repr__(self) -> str:
        return f"<AuthProbe {self._upstream} user={self._username!r} state={self._state}>"

    @property
    def _connection(self) -> ITLSTransport:
        """The TCP (or TLS) transport; set by ``makeConnection`` before any line arrives."""
        return cast(ITLSTransport, self.transport)

    # ---- outcome -------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the verdict is known."""
        return self.result.called

    def _finish(self, outcome: bytes | Failure) -> None:
        self._password = None
        if not self.result.called:
            if isinstance(outcome, Failure):
                self.result.errback(outcome)
            else:
                self.result.callback(outcome)

    def _temporary(self, why: str) -> None:
        """Fail temporarily and drop the connection at once (no QUIT: state unknown)."""
        log.debug("smtp upstream {upstream} transcript: {transcript}",
                  upstream=self._upstream, transcript=" | ".join(self.transcript))
        self._finish(Failure(TemporaryFailure(f"upstream {self._upstream}: {why}")))
        self._state = "done"
        if self.transport is not None:
            self._connection.abortConnection()

    def _verdict(self, outcome: bytes | Failure) -> None:
        """A reply ended the exchange cleanly: report, then ``QUIT`` politely."""
        self._finish(outcome)
        self._state = "quit"
        self._send(b"QUIT")
        self._quit_timer = self._clock.callLater(QUIT_GRACE, self._give_up_quit)

    def _give_up_quit(self) -> None:
        self._quit_timer = None
        if self.transport is not None:
            self._connection.abortConnection()

    def _cancelled(self, result: "Deferred[bytes]") -> None:
        """The checker's deadline passed: temporary failure, connection aborted."""
        self.cancelled_while = self.waiting_for()
        self._temporary(f"cancelled while waiting for {self.cancelled_while}")

    def waiting_for(self) -> str:
        """What the conversation waits for now (for messages)."""
        return "the connection" if self.transport is None else self._state

    # ---- wire ----------------------------------------------------------------------

    def _send(self, line: bytes, shown: str | None = None) -> None:
        self.transcript.append("C: " + (shown if shown is not None
                                        else line.decode("ascii", "replace")))
        self.sendLine(line)

    def connectionMade(self) -> None:
        self.transcript.append(f"connected to {self._upstream}")

    def lineReceived(self, line: bytes) -> None:
        if self._state == "done":
            return
        match = _REPLY.match(line)
        if match is None or (self._lines and match.group(1) != self._code):
            self._temporary("malformed reply")
            return
        self.transcript.append("S: " + self._shown(line))
        self._code = match.group(1)
        self._lines.append(line[4:])
        if match.group(2) == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._temporary("reply has too many lines")
            return
        reply = UpstreamReply(int(self._code), self._lines)
        self._lines = []
        getattr(self, f"_on_{self._state}")(reply)

    def _shown(self, line: bytes) -> str:
        """A reply line for the transcript: whole (cut at 200 bytes) before the
        credentials were sent, only its code and enhanced code after."""
        if not self._credentials_sent:
            return line[:200].decode("ascii", "replace")
        text = line[4:].decode("ascii", "replace")
        enhanced = text.split(" ", 1)[0]
        status = line[:4].decode("ascii") + (enhanced if _ENHANCED.match(enhanced) else "")
        return status.rstrip() + " (text not logged: it may echo the credentials)"

    def lineLengthExceeded(self, line: bytes) -> None:
        self._temporary("reply line too long")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._quit_timer is not None and self._quit_timer.active():
            self._quit_timer.cancel()
        self._quit_timer = None
        if self.finished:
            return
        if reason.check(CertificateIdentityError):
            self._temporary(f"TLS certificate refused: {reason.value}")
        elif reason.check(SSL.Error):
            self._temporary("TLS handshake failed (certificate not trusted, or no common"
                            " protocol)")
        else:
            self._temporary(f"connection closed while waiting for {self._state}")

    # ---- states: one method per expected reply --------------------------------------

    def _on_greeting(self, reply: UpstreamReply) -> None:
        if reply.code != 220:
            self._temporary(f"greeting {reply.status()}")
            return
        self._ehlo()

    def _ehlo(self) -> None:
        name = self._helo
        if not name:
            host = self._connection.getHost()
            address = getattr(host, "host", "")
            name = (f"[IPv6:{address}]" if ":" in address else f"[{address}]") if address \
                else "localhost"
        self._state = "ehlo"
        self._send(b"EHLO " + name.encode("ascii", "replace"))

    def _on_ehlo(self, reply: UpstreamReply) -> None:
        if reply.code != 250:
            self._temporary(f"EHLO answered {reply.status()}")
            return
        capabilities = _capabilities(reply.lines[1:])
        if self._want_starttls and not self._tls:
            if "STARTTLS" not in capabilities:
                self._temporary("STARTTLS is configured but not offered")
                return
            self._state = "starttls"
            self._send(b"STARTTLS")
            return
        self._authenticate(capabilities)

    def _on_starttls(self, reply: UpstreamReply) -> None:
        if reply.code != 220:
            self._temporary(f"STARTTLS answered {reply.status()}")
            return
        if self._tls_creator is None:  # the checker asks for STARTTLS only with a context
            self._temporary("STARTTLS without a TLS context")
            return
        self._tls = True
        self.transcript.append("(TLS handshake)")
        self._connection.startTLS(self._tls_creator)
        self._ehlo()  # queued by the TLS layer until the handshake is done

    def _authenticate(self, capabilities: dict[str, list[str]]) -> None:
        if (self._tls or ISSLTransport.providedBy(self.transport)
                or isinstance(self.transport, TLSMemoryBIOProtocol)):
            try:  # the handshake is over (we got a reply through it): check before AUTH
                verify_peer_identity(self.transport, self._tls_hostname)
            except CertificateIdentityError as e:
                self._temporary(f"TLS certificate refused: {e}")
                return
        mechanisms = capabilities.get("AUTH")
        if mechanisms is None:
            self._temporary("AUTH is not offered")
            return
        assert self._password is not None
        if "PLAIN" in mechanisms:
            blob = base64.b64encode(b"\0" + self._username + b"\0" + self._password)
            self._state = "auth"
            self._credentials_sent = True
            self._send(b"AUTH PLAIN " + blob, "AUTH PLAIN <redacted>")
        elif "LOGIN" in mechanisms:
            self._state = "login_username"
            self._send(b"AUTH LOGIN")
        else:
            self._temporary("neither PLAIN nor LOGIN is offered")

    def _on_login_username(self, reply: UpstreamReply) -> None:
        if reply.code != 334:
            self._auth_failed(reply)
            return
        self._state = "login_password"
        self._send(base64.b64encode(self._username), "<redacted>")

    def _on_login_password(self, reply: UpstreamReply) -> None:
        if reply.code != 334:
            self._auth_failed(reply)
            return
        assert self._password is not None
        self._state = "auth"
        self._credentials_sent = True
        self._send(base64.b64encode(self._password), "<redacted>")

    def _on_auth(self, reply: UpstreamReply) -> None:
        if reply.code == 235:
            self._verdict(self._username)
        elif reply.code == 334:
            self._temporary("unexpected 334 challenge after the credentials")
        else:
            self._auth_failed(reply)

    def _auth_failed(self, reply: UpstreamReply) -> None:
        if judges_credentials(reply):
            if reply.code != 535:
                log.warn("smtp upstream {upstream} refused AUTH with {status}",
                         upstream=self._upstream, status=reply.status())
            self._verdict(Failure(UnauthorizedLogin(f"upstream answered {reply.status()}")))
        elif 400 <= reply.code < 600:
            self._verdict(Failure(TemporaryFailure(
                f"upstream {self._upstream}: AUTH answered {reply.status()}")))
        else:
            self._temporary(f"unexpected {reply.status()} during AUTH")

    def _on_quit(self, reply: UpstreamReply) -> None:
        self._state = "done"
        self._connection.loseConnection()


def judges_credentials(reply: UpstreamReply) -> bool:
    """Whether a 5xx to AUTH is a verdict on these credentials (our 535), rather than
    the upstream failing to judge them (our 454).

    A verdict: ``535`` (credentials invalid) and ``534`` (mechanism too weak *for that
    user*, RFC 4954; Gmail's "application-specific password required"), and any other
    5xx whose enhanced code is in the security and policy class ``5.7.x`` (``550 5.7.1``
    blocked), except ``5.7.11`` (encryption required: our TLS settings).  Not a verdict:
    ``500`` (aiosmtpd's answer when its password check raises), ``502``/``503``/``504``
    (AUTH not enabled, out of sequence, mechanism unknown), ``538``: the upstream's own
    trouble or a configuration mismatch that fails every user alike, so a 535 would tell
    users their password is wrong, count against them and drop their cached logins.
    """
    if not 500 <= reply.code < 600:
        return False
    if reply.code in (534, 535):
        return True
    enhanced = reply.status().partition(" ")[2]
    return enhanced.startswith("5.7.") and enhanced != "5.7.11"


def _capabilities(lines: list[bytes]) -> dict[str, list[str]]:
    """EHLO keywords (upper case) -> their parameters (upper case); ``AUTH=`` folded in."""
    capabilities: dict[str, list[str]] = {}
    for raw in lines:
        words = raw.decode("ascii", "replace").upper().split()
        if not words:
            continue
        keyword, params = words[0], words[1:]
        if keyword.startswith("AUTH="):  # pre-RFC 4954 servers
            keyword, params = "AUTH", [keyword[5:]] + params
        capabilities.setdefault(keyword, []).extend(params)
    return capabilities


@implementer(ICredentialsChecker)
class SmtpForwardChecker:
    """Checks a username and password by authenticating to an upstream SMTP server.

    Every collaborator is injected: ``reactor`` (time), ``endpoint`` (where to connect;
    already wrapped in TLS for implicit TLS), ``tls_creator`` (for STARTTLS).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, *, reactor: IReactorTime, endpoint: IStreamClientEndpoint,
                 upstream: str, tls_creator: IOpenSSLClientConnectionCreator | None,
                 starttls: bool, implicit_tls: bool, tls_hostname: str,
                 helo: str | None = None, timeout: float = 10.0, name: str = "smtp") -> None:
        if starttls and not implicit_tls and tls_creator is None:
            raise ValueError("STARTTLS needs a tls_creator")
        self._reactor = reactor
        self._endpoint = endpoint
        self.upstream = upstream
        self._tls_creator = tls_creator
        self._starttls = starttls
        self._implicit_tls = implicit_tls
        self._tls_hostname = tls_hostname
        self._helo = helo
        self.timeout = timeout
        self.name = name
        self.outages = OutageLog(name, reactor.seconds)

    def __repr__(self) -> str:
        return f"<SmtpForwardChecker {self.upstream}>"

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[AvatarId]":
        """One upstream AUTH for these credentials (see the module docstring)."""
        username, password = as_bytes(credentials.username), as_bytes(credentials.password)
        if not username or not password or b"\0" in username + password:
            # nothing an SMTP server could accept, and nothing worth a connection
            return fail(UnauthorizedLogin("empty or unencodable credentials"))
        probe = AuthProbe(username, password, clock=self._reactor,
                          tls_creator=self._tls_creator, starttls=self._starttls,
                          implicit_tls=self._implicit_tls, tls_hostname=self._tls_hostname,
                          helo=self._helo, upstream=self.upstream)
        connecting = connect_protocol(self._endpoint, probe)

        def connect_failed(failure: Failure) -> None:
            if probe.finished:
                return
            if failure.check(ConnectError):
                why = f"cannot connect ({failure.value.__class__.__name__})"
            else:
                why = f"cannot connect ({failure.getErrorMessage()})"
            probe._finish(Failure(TemporaryFailure(f"upstream {self.upstream}: {why}")))

        connecting.addErrback(connect_failed)
        def on_timeout(result: Any, timeout: float) -> Any:
            if not isinstance(result, Failure):
                return result
            if not connecting.called:
                connecting.cancel()
            return Failure(TemporaryFailure(f"upstream {self.upstream}: no verdict within"
                                            f" {timeout:g}s (while waiting for {probe.cancelled_while})"))

        return self.outages.watch(with_deadline(probe.result, self.timeout, self._reactor,
                                                on_timeout))


def endpoint_for(options: SmtpOptions, reactor: Any,
                 tls_creator: IOpenSSLClientConnectionCreator | None) -> IStreamClientEndpoint:
    """Where ``options`` says to connect: ``endpoint`` (a client endpoint string) or
    ``host``/``port``; wrapped in TLS when ``tls`` (implicit TLS, port 465 style)."""
    endpoint: IStreamClientEndpoint
    timeout = options.timeout
    if options.endpoint:
        endpoint = clientFromString(reactor, options.endpoint)
    elif isIPAddress(options.host):  # no resolver round trip (a thread) for an IP literal
        endpoint = TCP4ClientEndpoint(reactor, options.host, options.port, timeout=timeout)
    elif isIPv6Address(options.host):
        endpoint = TCP6ClientEndpoint(reactor, options.host, options.port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, options.host, options.port, timeout=timeout)
    if options.tls:
        assert tls_creator is not None
        endpoint = wrapClientTLS(tls_creator, endpoint)
    return endpoint


def from_config(name: str, options: SmtpOptions, deps: Any) -> SmtpForwardChecker:
    """The checker for ``[backends.NAME] type = "smtp"``."""
    hostname = options.tls_hostname or options.host
    tls_creator = None
    if options.tls or options.starttls:
        tls_creator = StrictClientTLS(hostname, load_trust_root(options.ca_file))
    upstream = options.endpoint or f"{options.host}:{options.port}"
    return SmtpForwardChecker(
        reactor=deps.reactor, endpoint=endpoint_for(options, deps.reactor, tls_creator),
        upstream=upstream, tls_creator=tls_creator, starttls=options.starttls,
        implicit_tls=options.tls, tls_hostname=hostname, helo=options.helo,
        timeout=options.timeout, name=name)
