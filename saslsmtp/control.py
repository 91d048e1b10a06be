"""The control sockets of a running server, and the client that asks them.

Each serving process (the single-process daemon, or each worker of ``workers = N``)
listens on its own UNIX socket when ``[server] control_socket`` is set (the older
``[auth.cache] control_socket`` still works, with a warning): the daemon on that path,
worker ``i`` on ``<path>.<i>`` (each worker has its own sessions and its own auth cache,
so each must be asked).  The master has none.  ``saslsmtp-ctl`` (``saslsmtp.ctl``) and
``saslsmtp-cache`` (``saslsmtp.cachectl``) find the sockets, ask each and sum the
answers; a socket nobody answers on (a process that died, an older run with more
workers) is skipped.  Nothing answering at all means no server is running.

The wire protocol is one line each way (UTF-8):

* ``flush`` or ``flush USER`` -> ``ok N`` (auth cache entries dropped);
* ``who`` -> ``ok JSON`` (a list of ``sessionctl.SessionInfo`` objects);
* ``kick user USER`` or ``kick client ADDRESS[/PREFIX]`` -> ``ok SESSIONS ENTRIES``;
* anything else -> ``error TEXT``.

The socket is mode 0600: only the server's user (and root) may ask.  Users are matched
without regard to case.
"""

from __future__ import annotations

import json
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from saslsmtp.sessionctl import SessionControl, Selector

log = Logger(namespace="saslsmtp")

EX_OK, EX_NOSERVER, EX_USAGE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 0, 1, 64, 75, 77, 78
SOCKET_MODE = 0o600
CONTROL_NAME = "control-socket"  # its name among the serving process's services
TIMEOUT = 10.0
KNOWN = "flush [USER], who, kick user USER, kick client ADDRESS"


def entries(n: int) -> str:
    """``1 entry``, ``2 entries``: what a flush reports."""
    return "1 entry" if n == 1 else f"{n} entries"


def control_setting(config: Any) -> tuple[str, str] | None:
    """``(path, key)`` of the configured control socket: ``[server] control_socket``,
    else the deprecated ``[auth.cache] control_socket``; ``None`` when neither is set."""
    path = getattr(getattr(config, "ops", None), "control_socket", None)
    if path:
        return path, "server.control_socket"
    path = config.section("auth.cache").control_socket
    if path:
        return path, "auth.cache.control_socket"
    return None


# ---- the server side ------------------------------------------------------------------


class ControlProtocol(LineOnlyReceiver):
    """One control connection: each line is one command (the module docstring)."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, caches: Callable[[], Iterable[Any]],
                 sessions: SessionControl | None = None) -> None:
        self.caches = caches
        self.sessions = sessions

    def lineReceived(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
        command, _, rest = text.partition(" ")
        if command == "flush":
            self.flush(rest or None)
        elif command == "who" and not rest and self.sessions is not None:
            found = [info.to_json() for info in self.sessions.who()]
            self.sendLine(b"ok " + json.dumps(found, separators=(",", ":")).encode("utf-8",
                                                                              "surrogateescape"))
        elif command == "kick" and self.sessions is not None:
            self.kick(rest)
        else:
            self.sendLine(f"error unknown command (known: {KNOWN})".encode())

    def flush(self, user: str | None) -> None:
        dropped = sum(cache.flush(user) for cache in self.caches())
        log.info("auth cache flushed ({who}): {n} dropped",
                 who=f"user {user}" if user else "every user", n=entries(dropped))
        self.sendLine(b"ok %d" % dropped)

    def kick(self, rest: str) -> None:
        kind, _, value = rest.partition(" ")
        selector = (Selector(user=value) if kind == "user" else
                    Selector(client=value) if kind == "client" else None)
        problem = "kick user USER or kick client ADDRESS" if selector is None or not value \
            else selector.problem()
        if problem is not None or selector is None or self.sessions is None:
            self.sendLine(f"error {problem}".encode("utf-8", "surrogateescape"))
            return
        kicked, dropped = self.sessions.kick(selector)
        self.sendLine(b"ok %d %d" % (kicked, dropped))

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class ControlService(service.Service):
    """The control socket of one serving process, bound at start (after privileges were
    dropped: the folder must be writable by the server's user, e.g. systemd's
    ``RuntimeDirectory=saslsmtp``).  ``preflight`` checks the folder and the path's
    length first; a bind that fails anyway (another live server holds the socket) stops
    the start with one line (``SystemExit``): a request would never reach this process.

    ``caches()`` returns the auth caches to flush now: the current wiring's and those of
    wirings a reload retired that still serve open sessions.  ``sessions``: who is
    connected, and kicking.  ``label``: ``FILE: KEY: `` for that line."""

    def __init__(self, reactor: Any, path: str, caches: Callable[[], Iterable[Any]],
                 label: str = "server.control_socket: ",
                 sessions: SessionControl | None = None) -> None:
        self.reactor = reactor
        self.path = path
        self.caches = caches
        self.sessions = sessions
        self.label = label
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: ControlProtocol(self.caches, self.sessions))
        factory.noisy = False  # no 'Starting factory <...Factory object at 0x...>' lines
        try:
            # wantPID: a lock file beside the socket; a stale socket of a dead process
            # is replaced, a live one's is not.
            self.port = self.reactor.listenUNIX(self.path, factory, mode=SOCKET_MODE,
                                                wantPID=True)
        except (OSError, CannotListenError) as e:
            raise SystemExit(f"saslsmtp: {self.label}cannot listen on {self.path}:"
                             f" {bind_problem(e)}") from None
        log.info("control socket {path}: saslsmtp-ctl who, kick and flush reach this process",
                 path=self.path)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


#: the name the auth-cache-only version had (``saslsmtp.cachectl`` re-exports it)
CacheControlService = ControlService


def bind_problem(error: Exception) -> str:
    """Plain words for a failed ``listenUNIX``: the OS's reason, not Twisted's repr."""
    cause = getattr(error, "socketError", error)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(error, CannotListenError) and "lock" in str(cause).lower():
        return "another running server holds it"
    return str(cause)


def wiring_caches(factory: Any, reloader: Any) -> Callable[[], list[Any]]:
    """The auth caches a flush must reach: the factory's current wiring's, and those of
    the wirings ``reloader`` is retiring."""
    def caches() -> list[Any]:
        wirings = [factory.wiring] + [entry[0] for entry in getattr(reloader, "retiring", ())]
        found: list[Any] = []
        for wiring in wirings:
            cache = getattr(getattr(wiring, "controls", None), "cache", None)
            if cache is not None and all(cache is not c for c in found):
                found.append(cache)
        return found
    return caches


def control_service(reactor: Any, factory: Any, reloader: Any,
                    suffix: str = "") -> ControlService | None:
    """The control socket service for a serving process whose configuration sets a
    control socket (``suffix``: ``.<slot>`` in a worker), else ``None``."""
    config = factory.wiring.config
    setting = control_setting(config)
    if setting is None:
        return None
    path, key = setting
    caches = wiring_caches(factory, reloader)
    return ControlService(reactor, path + suffix, caches, f"{config.path}: {key}: ",
                          SessionControl(factory, caches))


# ---- the client side ------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """What one socket said: ``reply`` (the text after ``ok``), or ``problem`` (``errno``
    if any); ``reached``: something accepted the connection (a server that did not
    answer)."""

    path: Path
    reply: str | None = None
    problem: str = ""
    errno: int | None = None
    reached: bool = False

    @property
    def dropped(self) -> int | None:
        """A flush's answer: entries dropped."""
        return int(self.reply) if self.reply is not None and self.reply.isdigit() else None


def control_paths(path: str) -> list[Path]:
    """The daemon's socket and every worker's (``<path>.<digits>``) that exist now."""
    base = Path(path)
    found = [base] if base.exists() else []
    pattern = re.compile(re.escape(base.name) + r"\.\d+")
    if base.parent.is_dir():
        found += sorted((p for p in base.parent.iterdir() if pattern.fullmatch(p.name)),
                        key=lambda p: int(p.name.rsplit(".", 1)[1]))
    return found


def ask(path: Path, line: bytes, timeout: float | None = None) -> Answer:
    """Send one command line to one control socket and read its answer (``timeout``:
    ``TIMEOUT`` seconds unless given)."""
    timeout = TIMEOUT if timeout is None else timeout
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return Answer(path, problem="is not a socket (is control_socket the server's?)")
    except OSError as e:
        return Answer(path, problem=e.strerror or str(e), errno=e.errno)
    reached = False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            reached = True
            s.sendall(line + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        return Answer(path, problem=e.strerror or str(e) or type(e).__name__, errno=e.errno,
                      reached=reached)
    text = reply.decode("utf-8", "replace").strip()
    if text == "ok" or text.startswith("ok "):
        return Answer(path, reply=text[3:], reached=True)
    return Answer(path, problem=text or "no answer", reached=True)


def ask_all(path: str, line: bytes) -> list[Answer]:
    """Send ``line`` to every serving process's control socket under ``path``."""
    return [ask(p, line) for p in control_paths(path)]


def flush(path: str, user: str | None) -> list[Answer]:
    """Ask every serving process's control socket under ``path`` to flush."""
    line = b"flush" if user is None else b"flush " + user.encode("utf-8", "surrogateescape")
    return ask_all(path, line)


#: the longest USER a flush line can carry to ``ControlProtocol`` ("flush " + USER + "\n")
MAX_USER_BYTES = ControlProtocol.MAX_LENGTH - len("flush ") - 1


def user_problem(user: str | None) -> str | None:
    """Why ``USER`` cannot be sent, or ``None``.  An empty one (an unset shell variable)
    would have flushed every user; a line break would have sent a second command; a
    longer one than a line holds was dropped by the server and read as no answer."""
    if user is None:
        return None
    if not user:
        return "the user name is empty (leave USER out to flush every user)"
    if any(c in user for c in "\r\n\0"):
        return "a user name cannot contain line breaks or NUL"
    if len(user.encode("utf-8", "surrogateescape")) > MAX_USER_BYTES:
        return f"the user name is longer than {MAX_USER_BYTES} bytes: no such login is cached"
    return None
