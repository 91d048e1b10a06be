"""Listening sockets shared by worker processes.

The master ``bind``s every ``server.listen`` entry itself (a plain socket, before it
drops privileges) and hands the file descriptors to its workers; each worker ``adopt``s
them with ``AdoptedStreamServerEndpoint`` and adds what the endpoint string asked for on
top: the PROXY protocol (``haproxy:``) and implicit TLS (``ssl:``).  All workers then
accept from one kernel queue, so a worker that dies loses only its own connections and
nothing waiting in the queue.  A ``systemd:`` entry is a socket systemd bound and passed
(``saslsmtp.activation``): the master (or the single process) takes it instead of
binding, and serves it like its own.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from saslsmtp.options import split_endpoint

#: Endpoint kinds a worker can adopt; anything else needs ``workers = 1``.
ADOPTABLE = ("tcp", "tcp6", "ssl", "unix", "systemd")
#: The names of each adoptable kind's positional arguments, in Twisted's parsers' order.
POSITIONAL = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
#: The keys a ``systemd:`` entry takes (``ssl=yes``: implicit TLS with ``[tls]``).
SYSTEMD_KEYS = ("domain", "index", "name", "port", "ssl")
#: Seconds ``interface_problem`` waits for a name to resolve: --check must not hang on DNS.
RESOLVE_TIMEOUT = 5.0


class ListenError(Exception):
    """A ``server.listen`` entry cannot be bound (message names the entry)."""


class ListenFailed(SystemExit):
    """A start that cannot listen on ``error``'s endpoint: the line that ends it."""

    def __init__(self, error: CannotListenError, configured: Sequence[str] = ()) -> None:
        reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
        super().__init__(f"saslsmtp: cannot listen on {configured_listener(error, configured)}:"
                         f" {reason}")
        self.error = error


def start_or_exit(start: Callable[[], None], configured: Sequence[str] = ()) -> None:
    """Run ``start`` (a service's ``privilegedStartService``): a port that cannot be
    listened on (taken, not permitted) ends the process with one line and a non-zero
    status (``ListenFailed``), without a traceback and before anything says it is ready.
    The line names the listener as configured (one of ``configured``; an inner call that
    was not told them leaves that to this one) and the reason, as the master's ``bind``
    does: the same words with and without workers."""
    try:
        start()
    except CannotListenError as e:
        raise ListenFailed(e, configured) from None
    except ListenFailed as e:
        if not configured:
            raise
        raise ListenFailed(e.error, configured) from None


def configured_listener(error: CannotListenError, configured: Sequence[str]) -> str:
    """The description in ``configured`` that ``error`` (Twisted's) is about, or
    ``INTERFACE:PORT`` when none is (an endpoint type the master cannot parse)."""
    for description in configured:
        try:
            spec = parse(description)
        except ListenError:
            continue
        if spec.kind == "systemd":  # never bound here: its index is no port
            continue
        if spec.kind == "unix":
            if spec.address == error.port:
                return description
        elif spec.port == error.port and spec.address == (error.interface or ""):
            return description
    return f"{error.interface or '*'}:{error.port}"


@dataclass(frozen=True)
class ListenerSpec:
    """One ``server.listen`` entry, parsed."""

    description: str
    proxy: bool  # "haproxy:" prefix: a PROXY v1/v2 header precedes each connection
    kind: str  # tcp | tcp6 | ssl | unix | systemd
    address: str  # interface (tcp), path (unix) or socket name (systemd:name=, or "")
    port: int  # for systemd: the index (systemd:index=), else -1 (its port= is an option)
    backlog: int
    options: tuple[tuple[str, str], ...]  # every key=value, for ssl: key files

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte: ``ssl:``, or ``systemd:...:ssl=yes``."""
        return self.kind == "ssl" or self.kind == "systemd" and dict(self.options).get("ssl") == "yes"

    def wanted(self) -> Any:
        """The ``activation.Wanted`` of a ``systemd:`` entry."""
        from saslsmtp.activation import Wanted
        options = dict(self.options)
        return Wanted(self.description, self.address or None,
                      self.port if self.port >= 0 else None, options.get("domain"),
                      int(options["port"]) if "port" in options else None)

    @property
    def family(self) -> socket.AddressFamily:
        if self.kind == "unix":
            return socket.AF_UNIX
        if self.kind == "tcp6" or ":" in self.address:
            return socket.AF_INET6
        return socket.AF_INET


def keywords(parts: list[str]) -> dict[str, str]:
    """The ``key=value`` arguments of an endpoint string's parts."""
    return {key: value for key, _, value in (p.partition("=") for p in parts if "=" in p)}


def parse(description: str) -> ListenerSpec:
    """Parse a ``server.listen`` endpoint string the way the master binds it."""
    proxy = description.startswith("haproxy:")
    parts = split_endpoint(description[len("haproxy:"):] if proxy else description)
    kind = parts[0]
    if kind not in ADOPTABLE:
        raise ListenError(f"{description}: {kind}: endpoints cannot be shared by workers"
                          f" (use {', '.join(ADOPTABLE)}, or workers = 1)")
    positional = [p for p in parts[1:] if "=" not in p]
    if kind == "systemd":
        return _parse_systemd(description, proxy, positional, keywords(parts[1:]))
    # Twisted's parsers take their arguments by position too (tcp:2525:127.0.0.1 is an
    # interface): read them as it does, or the master would bind another address
    options = dict(zip(POSITIONAL[kind][1:], positional[1:]))
    options.update(keywords(parts[1:]))
    first = options.pop("port" if kind != "unix" else "address", None)
    if first is None:
        if not positional:
            raise ListenError(f"{description}: needs a {'path' if kind == 'unix' else 'port'}")
        first = positional[0]
    try:
        backlog = int(options.pop("backlog", "50"))
        if kind == "unix":
            return ListenerSpec(description, proxy, kind, first, 0, backlog,
                                tuple(sorted(options.items())))
        port = int(first)
    except ValueError:
        raise ListenError(f"{description}: port and backlog must be numbers") from None
    if not 0 <= port < 65536:
        raise ListenError(f"{description}: port {port} is out of range")
    address = options.pop("interface", "::" if kind == "tcp6" else "")
    return ListenerSpec(description, proxy, kind, address, port, backlog,
                        tuple(sorted(options.items())))


def _parse_systemd(description: str, proxy: bool, positional: list[str],
                   options: dict[str, str]) -> ListenerSpec:
    """``systemd:name=NAME``, ``systemd:port=N``, both, or ``systemd:index=N`` (Twisted's
    ``domain=`` optional, as its positional form ``systemd:INET:0``), ``ssl=yes`` for
    implicit TLS."""
    named = dict(zip(POSITIONAL["systemd"], positional))
    named.update(options)
    unknown = sorted(set(named) - set(SYSTEMD_KEYS))
    if unknown:
        raise ListenError(f"{description}: unknown option {unknown[0]}= (a systemd: listener"
                          f" takes {', '.join(k + '=' for k in SYSTEMD_KEYS)})")
    if "index" in named and ("name" in named or "port" in named) \
            or not {"index", "name", "port"} & set(named):
        raise ListenError(f"{description}: needs name= (the .socket unit's"
                          " FileDescriptorName=) and/or port=, or index= alone")
    domain = named.get("domain")
    if domain is not None and domain not in ("INET", "INET6", "UNIX"):
        raise ListenError(f"{description}: domain={domain} is none of INET, INET6, UNIX")
    if named.get("ssl", "no") not in ("yes", "no"):
        raise ListenError(f"{description}: ssl={named['ssl']} is neither yes nor no")
    if named.get("name") == "":
        raise ListenError(f"{description}: name= is empty")
    for key in ("index", "port"):
        if key in named and not named[key].isdigit():
            raise ListenError(f"{description}: {key}={named[key]} is not a number")
    if not 0 < int(named.get("port", "1")) < 65536:
        raise ListenError(f"{description}: port {named['port']} is out of range")
    name = named.get("name", "")
    index = int(named.get("index", "-1"))
    extra = tuple(sorted((k, v) for k, v in named.items() if k in ("domain", "port", "ssl")))
    return ListenerSpec(description, proxy, "systemd", name, index, 0, extra)


def open_socket(spec: ListenerSpec, passed: Any = None) -> socket.socket:
    """``spec``'s listening socket: the one systemd passed (``passed``: entry -> fd,
    ``activation.Matched.fds``), or a new one, bound (``bind``)."""
    if spec.kind != "systemd":
        return bind(spec)
    fd = (passed or {}).get(spec.description)
    if fd is None:
        raise ListenError(not_passed(spec.description))
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def not_passed(description: str) -> str:
    """Why a ``systemd:`` listener cannot listen when systemd passed no sockets."""
    return (f"cannot listen on {description}: systemd passed no sockets to this process"
            " (no LISTEN_FDS for it): start the .socket unit (systemctl start"
            " saslsmtp.socket), or use a tcp: listener instead")


@implementer(IStreamServerEndpoint)
class NotPassedEndpoint:
    """A ``systemd:`` listener of a process systemd passed no sockets: its ``listen``
    (in ``privilegedStartService``) ends the start with ``not_passed``'s line."""

    def __init__(self, description: str) -> None:
        self.description = description

    def listen(self, factory: Any) -> Any:
        raise SystemExit(f"saslsmtp: {not_passed(self.description)}")


def bind(spec: ListenerSpec) -> socket.socket:
    """A listening, non-blocking, inheritable socket for ``spec`` (as Twisted would bind it)."""
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        if spec.kind == "unix":
            try:
                if stat.S_ISSOCK(os.stat(spec.address).st_mode):
                    os.unlink(spec.address)  # a stale socket from an earlier run
            except FileNotFoundError:
                pass
            sock.bind(spec.address)
            mode = dict(spec.options).get("mode")
            if mode is not None:
                os.chmod(spec.address, int(mode, 8))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((spec.address, spec.port))
        sock.listen(spec.backlog)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {spec.description}: {e.strerror}") from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def adopt(reactor: Any, fd: int, spec: ListenerSpec, factory: Any, tls_context: Any) -> tuple[Any, Any]:
    """(endpoint, factory) serving the inherited socket ``fd`` like ``spec`` says:
    implicit TLS around the SMTP factory for ``ssl:``, the PROXY header parsed before
    anything else for ``haproxy:`` (outside TLS, as HAProxy's ``send-proxy`` sends it)."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from saslsmtp.descriptors import AcceptLogEndpoint
    from saslsmtp.proxyheader import metered, proxy_endpoint
    from saslsmtp.proxytrust import configured
    from saslsmtp.sendnow import send_now_reactor
    if spec.kind == "systemd":
        from saslsmtp.activation import socket_family
        family = socket_family(fd)
    else:
        family = spec.family
    endpoint: Any = AdoptedStreamServerEndpoint(send_now_reactor(reactor), fd, family)
    if spec.proxy:
        endpoint = proxy_endpoint(endpoint, reactor, trusted=configured(factory),
                                  name=spec.description, metrics=metered(factory))
    if spec.implicit_tls:
        options = dict(spec.options)
        if "privateKey" in options:
            tls_context = _explicit_ssl_context(reactor, spec)
        if tls_context is None:
            raise ListenError(f"{spec.description}: implicit TLS needs a [tls] section")
        factory = TLSMemoryBIOFactory(tls_context, False, factory)
    return AcceptLogEndpoint(endpoint, reactor), factory


def _explicit_ssl_context(reactor: Any, spec: ListenerSpec) -> Any:
    """``ssl:...:privateKey=...``: the context Twisted's own ssl: parser builds."""
    from twisted.internet import endpoints
    endpoint = endpoints.serverFromString(reactor, spec.description[len("haproxy:"):]
                                          if spec.proxy else spec.description)
    return endpoint._sslContextFactory  # the parsed CertificateOptions


def interface_problem(description: str, timeout: float = RESOLVE_TIMEOUT,
                      resolve: Callable[..., Any] = socket.getaddrinfo,
                      master: bool = False) -> str | None:
    """Why the ``interface`` of the listener ``description`` (``tcp:``, ``tcp6:``,
    ``ssl:``, ``haproxy:`` in front) cannot be bound, or ``None``: a name that does not
    resolve (within ``timeout`` seconds: a thread asks, nobody waits longer) in the
    address family the listener binds, or an address that is not this machine's.
    Twisted finds both only when it binds, so ``--check`` said OK to a start that failed.
    ``master``: the master of workers binds it (``bind``), not Twisted.  Nothing is
    bound: a probe socket takes port 0 and is closed."""
    import ipaddress
    import threading
    parts = split_endpoint(description.removeprefix("haproxy:"))
    kind = parts[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    named = dict(zip(POSITIONAL[kind], [p for p in parts[1:] if "=" not in p]))
    named.update(keywords(parts[1:]))
    name = named.get("interface", "")
    if not name:
        return None
    try:  # Twisted binds IPv6 for an IPv6 literal only (tcp6 too), the master as parse says
        six = ipaddress.ip_address(name.partition("%")[0]).version == 6
    except ValueError:
        six = False
    family = socket.AF_INET6 if six or master and kind == "tcp6" else socket.AF_INET
    answer: list[Any] = []

    def ask() -> None:
        try:
            answer.append(resolve(name, None, family, socket.SOCK_STREAM))
        except OSError as e:
            answer.append(e)
    asking = threading.Thread(target=ask, name="saslsmtp-resolve", daemon=True)
    asking.start()
    asking.join(timeout)
    if not answer:
        return f"interface {name!r} did not resolve within {timeout:g} s"
    if isinstance(answer[0], OSError):
        why = answer[0].strerror or str(answer[0])
        return f"interface {name!r} does not resolve ({why})"
    address = answer[0][0][4]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address[0], 0, *address[2:]))
        except OSError as e:
            if e.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):
                return f"interface {name!r} is no address of this machine ({e.strerror})"
    return None
