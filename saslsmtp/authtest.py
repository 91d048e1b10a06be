"""``saslsmtp-authtest``: check a password exactly as the server would, from a shell.

    saslsmtp-authtest --config F [--mechanism PLAIN] [--remote-ip IP] [--tls] USER

The password is read like ``saslsmtp-passwd`` reads it (a prompt on a terminal, else one
line of standard input).  The configuration is wired with the server's own functions:
with an ``auth.script`` the script decides (PLAIN and LOGIN go to it), otherwise the
``auth.backends`` chain, first accept wins.  It prints the verdict, the deciding backend
(or the script) and the time taken, one line per backend asked (with the reply the
client would get when the script or a backend chose it: a ``nologin`` user's ``reason``),
and one ``logged:`` line per warning or error the server logged meanwhile
(a script that raised: its file:line and the exception; never a traceback).

Exit status: 0 accepted, 1 rejected, 2 temporary failure (the server would answer 454);
64 usage error, 78 configuration error (sysexits.h).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass as getpass_module
import ipaddress
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TextIO

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import LogLevel, globalLogPublisher

from saslsmtp.commandline import parse_arguments, standard_streams
from saslsmtp.config import Config, ConfigError
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.logs import format_message
from saslsmtp.replies import auth_reply
from saslsmtp.sasl.outcome import Defer, Reject, Session

ACCEPT, REJECT, TEMPORARY = "accept", "reject", "temporary"
EXIT = {ACCEPT: 0, REJECT: 1, TEMPORARY: 2}
EX_USAGE, EX_CONFIG = 64, 78
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True)
class Step:
    """One backend (or the script) asked, what it said and how long it took."""

    name: str
    verdict: str
    seconds: float
    detail: str = ""


@dataclass(frozen=True)
class Outcome:
    """The verdict, who decided it, the total time, every step, and what the server
    logged meanwhile at warn level or above (one line each: a script's error names its
    file:line)."""

    verdict: str
    decided_by: str | None
    seconds: float
    username: str
    steps: tuple[Step, ...] = field(default=())
    notes: tuple[str, ...] = field(default=())


def _verdict_of(failure: BaseException, script: bool = False) -> tuple[str, str]:
    """The verdict and its detail: the reply the client would get from the script, and
    from a backend that chose its own (a users file's ``nologin`` with a ``reason``: 525
    5.7.13 and the reason, which the chain passes on when no other backend accepts)."""
    outcome = getattr(failure, "outcome", None)
    if (script or isinstance(failure, AuthRejected)) and isinstance(outcome, (Reject, Defer)):
        reply = auth_reply(outcome)
        return REJECT if isinstance(outcome, Reject) else TEMPORARY, \
            f"{reply.code} {reply.enhanced} {reply.text}"
    if isinstance(failure, UnauthorizedLogin):
        return REJECT, ""
    if isinstance(failure, TemporaryFailure):
        return TEMPORARY, str(failure)
    return TEMPORARY, f"{type(failure).__name__}: {failure}"


async def _ask(name: str, checker: Any, credentials: Any, clock: Callable[[], float],
               script: bool = False) -> tuple[Step, Any]:
    started = clock()
    try:
        avatar = await defer.maybeDeferred(checker.requestAvatarId, credentials)
    except Exception as e:
        verdict, detail = _verdict_of(e, script)
        return Step(name, verdict, clock() - started, detail), None
    return Step(name, ACCEPT, clock() - started), avatar


class _Notes:
    """The server's warnings and errors while one check runs, one line each (a
    traceback is the server log's business, not the terminal's)."""

    def __init__(self, publisher: Any) -> None:
        self.publisher = publisher
        self.lines: list[str] = []

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        if level is None or level < LogLevel.warn or not str(
                event.get("log_namespace", "")).startswith("saslsmtp"):
            return
        text = (format_message(event).splitlines() or [""])[0]
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {getattr(failure.type, '__name__', failure.type)}: {failure.getErrorMessage()}"
        self.lines.append(text)

    def __enter__(self) -> "_Notes":
        self.publisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.publisher.removeObserver(self)


async def check_password(config: Config, wiring: Any, mechanism: str, username: str,
                         password: str, *, remote_ip: str = "127.0.0.1", tls: bool = False,
                         clock: Callable[[], float] = time.monotonic,
                         publisher: Any = None) -> Outcome:
    """Decide like the server: the script when one is configured, else the backend chain
    (first accept wins; none accepts and one failed temporarily -> temporary).  What the
    server logs meanwhile (``publisher``, default the global one) comes back as notes."""
    with _Notes(publisher or globalLogPublisher) as notes:
        outcome = await _check_password(config, wiring, mechanism, username, password,
                                        remote_ip, tls, clock)
    return dataclasses.replace(outcome, notes=tuple(notes.lines))


async def _check_password(config: Config, wiring: Any, mechanism: str, username: str,
                          password: str, remote_ip: str, tls: bool,
                          clock: Callable[[], float]) -> Outcome:
    session = Session(remote_ip=remote_ip, tls=tls, hostname=config.server.hostname,
                      mechanism=mechanism)
    credentials = PasswordCredentials(username.encode("utf-8"), password.encode("utf-8"), session)
    started = clock()
    if config.auth.script is not None:
        checker = wiring.portal.checkers[IUsernamePassword]
        step, avatar = await _ask(f"script {config.auth.script}", checker, credentials, clock,
                                  script=True)
        name = avatar.decode("utf-8", "replace") if isinstance(avatar, bytes) else username
        return Outcome(step.verdict, step.name, clock() - started, name, (step,))
    steps: list[Step] = []
    for backend in config.auth.backends:
        step, avatar = await _ask(backend, wiring.checkers[backend], credentials, clock)
        steps.append(step)
        if step.verdict == ACCEPT:
            name = avatar.decode("utf-8", "replace") if isinstance(avatar, bytes) else username
            return Outcome(ACCEPT, backend, clock() - started, name, tuple(steps))
    temporary = [s for s in steps if s.verdict == TEMPORARY]
    return Outcome(TEMPORARY if temporary else REJECT, temporary[0].name if temporary else None,
                   clock() - started, username, tuple(steps))


def format_outcome(outcome: Outcome, mechanism: str) -> str:
    """The lines printed: each step, what the server logged meanwhile, then the verdict
    with who decided and the time."""
    lines = [f"  {s.name}: {s.verdict} ({s.seconds * 1000:.1f} ms)" + (f": {s.detail}" if s.detail else "")
             for s in outcome.steps]
    lines += [f"  logged: {note}" for note in outcome.notes]
    by = f" by {outcome.decided_by}" if outcome.decided_by else " (no backend accepted)"
    word = {ACCEPT: "ACCEPT", REJECT: "REJECT", TEMPORARY: "TEMPORARY FAILURE"}[outcome.verdict]
    lines.append(f"{word}: {outcome.username} via {mechanism}{by} in {outcome.seconds * 1000:.1f} ms")
    return "\n".join(lines)


def ip_address(text: str) -> str:
    """``--remote-ip``'s value, refused unless it is an IPv4 or IPv6 address: a typo would
    otherwise be checked as the client's address (``allow_nets`` silently not matching)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saslsmtp-authtest",
        description="Check a password as the server would; exit 0 accept, 1 reject, 2 temporary.",
        epilog="The password is prompted for on a terminal, else read as one line of standard input.")
    parser.add_argument("-c", "--config", default="etc/saslsmtp.toml",
                        help="the TOML configuration (default: etc/saslsmtp.toml)")
    parser.add_argument("-m", "--mechanism", type=str.upper, default="PLAIN",
                        choices=PASSWORD_MECHANISMS, help="PLAIN (default) or LOGIN")
    parser.add_argument("--remote-ip", default="127.0.0.1", type=ip_address,
                        help="client address the backends see (default: 127.0.0.1)")
    parser.add_argument("--tls", action="store_true", help="pretend the session is under TLS")
    parser.add_argument("--version", action="store_true", help="print the versions and exit")
    parser.add_argument("user", metavar="USER", nargs="?", help="the login to check")
    return parser


def read_password(stdin: TextIO, getpass: Callable[[str], str]) -> str | None:
    isatty = getattr(stdin, "isatty", None)
    if callable(isatty) and isatty():
        return getpass("Password: ")
    line = stdin.readline()
    return line.rstrip("\n").rstrip("\r") if line else None


async def run(reactor: Any, config_path: str, mechanism: str, user: str, password: str,
              remote_ip: str, tls: bool, out: TextIO, err: TextIO) -> int:
    """Wire the configuration, check, print, tear down; returns the exit status."""
    from saslsmtp.serving import start_runners, stop_wiring
    from saslsmtp.service import load, wire
    try:
        config = load(config_path)
        wiring = wire(config, reactor)
    except ConfigError as e:
        print(f"saslsmtp-authtest: configuration is not valid:\n{e}", file=err)
        return EX_CONFIG
    if mechanism not in config.auth.mechanisms:
        print(f"saslsmtp-authtest: {mechanism} is not in auth.mechanisms; the server would"
              " answer 504", file=err)
        return EXIT[REJECT]
    start_runners(wiring)
    try:
        outcome = await check_password(config, wiring, mechanism, user, password,
                                       remote_ip=remote_ip, tls=tls)
    finally:
        stop_wiring(wiring)
    print(format_outcome(outcome, mechanism), file=out)
    return EXIT[outcome.verdict]


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         getpass: Callable[[str], str] | None = None) -> int:
    """Run the command with its own reactor; returns the exit status."""
    stdin, stdout, stderr = standard_streams(stdin, stdout, stderr)
    args = parse_arguments(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):
        return EX_USAGE if args else 0
    if args.version:
        from saslsmtp.daemon import versions
        print(versions(), file=stdout)
        return 0
    if not args.user:
        print("saslsmtp-authtest: USER is required", file=stderr)
        return EX_USAGE
    try:
        password = read_password(stdin, getpass or getpass_module.getpass)
    except EOFError:  # Ctrl-D at the prompt
        print("\nsaslsmtp-authtest: no password given", file=stderr)
        return EX_USAGE
    except KeyboardInterrupt:  # Ctrl-C at the prompt: the shell's status, no traceback
        print("\nsaslsmtp-authtest: interrupted", file=stderr)
        return EXIT_INTERRUPTED
    if password is None:
        print("saslsmtp-authtest: no password on standard input", file=stderr)
        return EX_USAGE
    from twisted.internet import task
    status: list[int] = []

    async def body(reactor: Any) -> None:
        status.append(await run(reactor, args.config, args.mechanism, args.user, password,
                                args.remote_ip, args.tls, stdout, stderr))

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT[TEMPORARY]
    return status[0] if status else EXIT[TEMPORARY]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
