"""Flush the auth cache of a running server: ``saslsmtp-cache --config F flush [USER]``.

Like Dovecot's ``doveadm auth cache flush [user]``.  Each serving process (the
single-process daemon, or each worker of ``workers = N``) listens on its own UNIX socket
when ``[auth.cache] control_socket`` is set: the daemon on that path, worker ``i`` on
``<path>.<i>`` (each worker has its own cache, so each must be told).  The command finds
them all, asks each, and sums the answers; a socket nobody answers on (a process that
died, an older run with more workers) is skipped.  Nothing answering at all means no
server is running, and the command says so.

The wire protocol is one line each way: ``flush`` or ``flush USER`` (UTF-8), answered
``ok N`` (entries dropped) or ``error TEXT``.  The socket is mode 0600: only the
server's user (and root) may flush.  Users are matched without regard to case, so a
flush never leaves a variant of the name cached.
"""

from __future__ import annotations

import argparse
import errno
import re
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.internet.protocol import Factory

from saslsmtp.commandline import parse_arguments

log = Logger(namespace="saslsmtp")

EX_OK, EX_NOSERVER, EX_USAGE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 0, 1, 64, 75, 77, 78
SOCKET_MODE = 0o600
CONTROL_NAME = "auth-cache-control"  # its name among the serving process's services
TIMEOUT = 10.0


def entries(n: int) -> str:
    """``1 entry``, ``2 entries``: what a flush reports."""
    return "1 entry" if n == 1 else f"{n} entries"


# ---- the server side ------------------------------------------------------------------


class ControlProtocol(LineOnlyReceiver):
    """One control connection: each ``flush [USER]`` line is answered ``ok N``."""

    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, caches: Callable[[], Iterable[Any]]) -> None:
        self.caches = caches

    def lineReceived(self, line: bytes) -> None:
        command, _, user = line.rstrip(b"\r").decode("utf-8", "surrogateescape").partition(" ")
        if command != "flush":
            self.sendLine(b"error unknown command (known: flush [USER])")
            return
        dropped = sum(cache.flush(user or None) for cache in self.caches())
        log.info("auth cache flushed ({who}): {n} dropped",
                 who=f"user {user}" if user else "every user", n=entries(dropped))
        self.sendLine(b"ok %d" % dropped)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class CacheControlService(service.Service):
    """The control socket of one serving process, bound at start (after privileges were
    dropped: the folder must be writable by the server's user, e.g. systemd's
    ``RuntimeDirectory=saslsmtp``).  ``preflight`` checks the folder and the path's
    length first; a bind that fails anyway (another live server holds the socket) stops
    the start with one line (``SystemExit``): a flush would never reach this process.

    ``caches()`` returns the auth caches to flush now: the current wiring's and those of
    wirings a reload retired that still serve open sessions.  ``label``: ``FILE: KEY: ``
    for that line."""

    def __init__(self, reactor: Any, path: str, caches: Callable[[], Iterable[Any]],
                 label: str = "auth.cache.control_socket: ") -> None:
        self.reactor = reactor
        self.path = path
        self.caches = caches
        self.label = label
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        factory = Factory.forProtocol(lambda: ControlProtocol(self.caches))
        factory.noisy = False  # no 'Starting factory <...Factory object at 0x...>' lines
        try:
            # wantPID: a lock file beside the socket; a stale socket of a dead process
            # is replaced, a live one's is not.
            self.port = self.reactor.listenUNIX(self.path, factory, mode=SOCKET_MODE,
                                                wantPID=True)
        except (OSError, CannotListenError) as e:
            raise SystemExit(f"saslsmtp: {self.label}cannot listen on {self.path}:"
                             f" {bind_problem(e)}") from None
        log.info("auth cache: flush with saslsmtp-cache (control socket {path})", path=self.path)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


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
                    suffix: str = "") -> CacheControlService | None:
    """The control socket service for a serving process whose configuration sets
    ``[auth.cache] control_socket`` (``suffix``: ``.<slot>`` in a worker), else ``None``."""
    config = factory.wiring.config
    path = config.section("auth.cache").control_socket
    if not path:
        return None
    return CacheControlService(reactor, path + suffix, wiring_caches(factory, reloader),
                               f"{config.path}: auth.cache.control_socket: ")


# ---- the command ----------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """What one socket said: ``dropped`` entries, or ``problem`` (``errno`` if any);
    ``reached``: something accepted the connection (a server that did not answer)."""

    path: Path
    dropped: int | None = None
    problem: str = ""
    errno: int | None = None
    reached: bool = False


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
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as e:
        return Answer(path, problem=e.strerror or str(e) or type(e).__name__, errno=e.errno,
                      reached=reached)
    text = reply.decode("utf-8", "replace").strip()
    if text.startswith("ok ") and text[3:].isdigit():
        return Answer(path, dropped=int(text[3:]), reached=True)
    return Answer(path, problem=text or "no answer", reached=True)


def flush(path: str, user: str | None) -> list[Answer]:
    """Ask every serving process's control socket under ``path`` to flush."""
    line = b"flush" if user is None else b"flush " + user.encode("utf-8", "surrogateescape")
    return [ask(p, line) for p in control_paths(path)]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saslsmtp-cache", description="Flush the auth cache of a running saslsmtp.")
    parser.add_argument("--config", required=True, help="the server's configuration file")
    commands = parser.add_subparsers(dest="command", required=True)
    flush_cmd = commands.add_parser("flush", help="forget cached logins (all, or one user's)")
    flush_cmd.add_argument("user", nargs="?", help="only this user (any case)")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command; returns the exit status: 0 flushed, 1 no server running,
    64 usage (a USER that is empty or cannot be sent too), 75 a server holds the socket but did not answer, 77 permission denied,
    78 configuration problem."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    args = parse_arguments(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):
        return EX_USAGE if args else EX_OK
    refused = user_problem(args.user)
    if refused:
        print(f"saslsmtp-cache: {refused}", file=stderr)
        return EX_USAGE
    from saslsmtp.config import ConfigError
    from saslsmtp.service import load
    try:
        settings = load(args.config).section("auth.cache")
    except ConfigError as e:
        for problem in e.problems:
            print(f"saslsmtp-cache: {problem}", file=stderr)
        return EX_CONFIG
    except OSError as e:
        print(f"saslsmtp-cache: {args.config}: {e.strerror}", file=stderr)
        return EX_CONFIG
    if not settings.control_socket:
        print(f"saslsmtp-cache: {args.config} sets no [auth.cache] control_socket, so a running"
              " server cannot be reached (SIGHUP empties the whole cache)", file=stderr)
        return EX_CONFIG
    answers = flush(settings.control_socket, args.user)
    done = [a for a in answers if a.dropped is not None]
    denied = [a for a in answers if a.errno in (errno.EACCES, errno.EPERM)]
    for answer in answers:
        if answer.dropped is None and answer.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            print(f"saslsmtp-cache: {answer.path}: {answer.problem}", file=stderr)
    if not done:
        if denied:
            print("saslsmtp-cache: permission denied: run as root or as the server's user",
                  file=stderr)
            return EX_NOPERM
        if any(a.reached for a in answers):  # running, but busy or stuck: not "not running"
            print("saslsmtp-cache: the server did not answer (nothing was flushed); try again",
                  file=stderr)
            return EX_TEMPFAIL
        print(f"saslsmtp-cache: no saslsmtp server is running (nothing answers on"
              f" {settings.control_socket})", file=stderr)
        return EX_NOSERVER
    who = f"user {args.user}" if args.user else "every user"
    dropped = sum(a.dropped or 0 for a in done)
    processes = "1 process" if len(done) == 1 else f"{len(done)} processes"
    cache = "" if settings.enabled else " (the cache is off in this configuration)"
    print(f"auth cache flushed for {who}: {entries(dropped)} dropped in {processes}{cache}",
          file=stdout)
    return EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
