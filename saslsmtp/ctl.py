"""``saslsmtp-ctl --config F who|kick|flush``: the running server's sessions and auth cache.

Like Dovecot's ``doveadm who``, ``doveadm kick`` and ``doveadm auth cache flush``.  Every
request goes to every serving process's control socket (``saslsmtp.control``); the
answers are summed.  Exit status (sysexits): 0 done, 1 no server running, 64 usage, 75 a
process holds its socket but did not answer (``who`` and ``kick``: the list or the count
may miss that process's sessions), 77 permission denied, 78 no control socket or a bad
configuration.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any, Sequence, TextIO

from saslsmtp.commandline import parse_arguments
from saslsmtp.control import (EX_CONFIG, EX_NOPERM, EX_NOSERVER, EX_OK, EX_TEMPFAIL, EX_USAGE,
                              Answer, ControlProtocol, ask_all, control_setting, entries,
                              user_problem)
from saslsmtp.sessionctl import SessionInfo, Selector

#: answers of sockets nobody listens on any more (a dead worker's, an older run's)
GONE = (errno.ECONNREFUSED, errno.ENOENT)
#: the longest USER or ADDRESS a kick line can carry ("kick client " + it + "\n")
MAX_ARGUMENT_BYTES = ControlProtocol.MAX_LENGTH - len("kick client ") - 1


def plural(n: int, word: str) -> str:
    return f"1 {word}" if n == 1 else f"{n} {word}s"


class Reach:
    """The configured control sockets, asked for one command; the one-line reports of
    what went wrong go to ``stderr`` with ``prog``'s name."""

    def __init__(self, prog: str, stderr: TextIO) -> None:
        self.prog = prog
        self.stderr = stderr
        self.path = ""
        self.settings: Any = None

    def say(self, text: str) -> None:
        print(f"{self.prog}: {text}", file=self.stderr)

    def configure(self, config_path: str, hint: str = "") -> int | None:
        """Read the configuration: ``None`` when a control socket is set, else the exit
        status (its problem said)."""
        from saslsmtp.config import ConfigError
        from saslsmtp.service import load
        try:
            config = load(config_path)
        except ConfigError as e:
            for problem in e.problems:
                self.say(str(problem))
            return EX_CONFIG
        except OSError as e:
            self.say(f"{config_path}: {e.strerror}")
            return EX_CONFIG
        self.settings = config.section("auth.cache")
        setting = control_setting(config)
        if setting is None:
            self.say(f"{config_path} sets no [server] control_socket, so a running server"
                     f" cannot be reached{hint}")
            return EX_CONFIG
        self.path = setting[0]
        return None

    def ask(self, line: bytes, nothing: str) -> tuple[list[Answer], int]:
        """Every process's answer to ``line``: (the answers, and the exit status when no
        process answered, else ``EX_OK``, or ``EX_TEMPFAIL`` when one that is there did
        not).  ``nothing``: what did not happen, for the line saying so."""
        answers = ask_all(self.path, line)
        done = [a for a in answers if a.reply is not None]
        denied = [a for a in answers if a.errno in (errno.EACCES, errno.EPERM)]
        if not done and denied:  # one line: every socket says the same
            self.say("permission denied: run as root or as the server's user")
            return [], EX_NOPERM
        missed = [a for a in answers if a.reply is None and a.errno not in GONE]
        for answer in missed:
            self.say(f"{answer.path}: {answer.problem}")
        if done:
            return done, EX_TEMPFAIL if missed else EX_OK
        if any(a.reached for a in answers):  # running, but busy or stuck: not "not running"
            self.say(f"the server did not answer ({nothing}); try again")
            return [], EX_TEMPFAIL
        self.say(f"no saslsmtp server is running (nothing answers on {self.path})")
        return [], EX_NOSERVER


def sessions_of(answers: list[Answer], reach: Reach) -> tuple[list[SessionInfo], bool]:
    """The sessions every ``who`` answer lists; ``False`` when one could not be read."""
    found: list[SessionInfo] = []
    whole = True
    for answer in answers:
        try:
            found += [SessionInfo.from_json(item) for item in json.loads(answer.reply or "")]
        except (ValueError, TypeError, KeyError, AttributeError):
            reach.say(f"{answer.path}: an answer that is not a list of sessions (is"
                      " control_socket the server's?)")
            whole = False
    return sorted(found, key=lambda info: (info.since, info.pid)), whole


COLUMNS = ("PID", "CLIENT", "LISTENER", "USER", "MECHANISM", "TLS", "SINCE", "MESSAGES")


def printable(text: str) -> str:
    """``text`` as a terminal shows it harmlessly: a login name is the client's choice
    (a backend accepted it), so control characters and spaces are escaped."""
    return text if text.isprintable() and " " not in text else \
        text.encode("unicode_escape", "backslashreplace").decode("ascii").replace(" ", "\\x20")


def table(infos: list[SessionInfo]) -> str:
    """The human listing: one line per session under a header, columns aligned."""
    rows = [COLUMNS] + [tuple(printable(cell) for cell in (
        str(i.pid), i.address, i.listener or "-", i.user or "-", i.mechanism or "-",
        i.tls or "-", i.since_text, str(i.messages))) for i in infos]
    widths = [max(len(row[k]) for row in rows) for k in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def argument_problem(value: str | None, what: str) -> str | None:
    """Why a USER or ADDRESS cannot be sent on one line, or ``None``."""
    if value is None:
        return None
    if not value:
        return f"the {what} is empty"
    if any(c in value for c in "\r\n\0"):
        return f"a {what} cannot contain line breaks or NUL"
    if len(value.encode("utf-8", "surrogateescape")) > MAX_ARGUMENT_BYTES:
        return f"the {what} is longer than {MAX_ARGUMENT_BYTES} bytes"
    return None


def _selected(args: argparse.Namespace, reach: Reach) -> Selector | int:
    """The sessions ``args`` name (``--user``, ``--client``), once the arguments and the
    configuration are checked; else the exit status (the problem said)."""
    selector = Selector(user=args.user, client=args.client)
    problem = (argument_problem(args.user, "user name") or argument_problem(args.client, "address")
               or selector.problem())
    if problem:
        reach.say(problem)
        return EX_USAGE
    configured = reach.configure(args.config)
    return selector if configured is None else configured


def who(args: argparse.Namespace, reach: Reach, stdout: TextIO) -> int:
    selector = _selected(args, reach)
    if isinstance(selector, int):
        return selector
    answers, status = reach.ask(b"who", "no session was listed")
    if not answers:
        return status
    infos, whole = sessions_of(answers, reach)
    infos = [info for info in infos if selector.matches(info)]
    if args.json:
        print(json.dumps([dict(info.to_json(), since=info.since_text) for info in infos]),
              file=stdout)
    elif infos:
        print(table(infos), file=stdout)
    else:
        print("no open sessions", file=stdout)
    return status if whole else EX_TEMPFAIL


def kick(args: argparse.Namespace, reach: Reach, stdout: TextIO) -> int:
    if (args.user is None) == (args.client is None):
        reach.say("kick needs USER or --client ADDRESS (one of them)")
        return EX_USAGE
    selected = _selected(args, reach)
    if isinstance(selected, int):
        return selected
    kind, value = ("user", args.user) if args.user is not None else ("client", args.client)
    line = f"kick {kind} {value}".encode("utf-8", "surrogateescape")
    answers, status = reach.ask(line, "it may not have closed any session")
    if not answers:
        return status
    closed = dropped = 0
    for answer in answers:
        counts = (answer.reply or "").split()
        if len(counts) != 2 or not all(c.isdigit() for c in counts):
            reach.say(f"{answer.path}: unexpected answer {answer.reply!r}")
            status = EX_TEMPFAIL
            continue
        closed += int(counts[0])
        dropped += int(counts[1])
    processes = "1 process" if len(answers) == 1 else f"{len(answers)} processes"
    cache = f"; auth cache: {entries(dropped)} dropped" if kind == "user" else ""
    print(f"kicked {kind} {value}: {plural(closed, 'session')} closed in {processes}{cache}",
          file=stdout)
    return status


def flush(args: argparse.Namespace, reach: Reach, stdout: TextIO,
          hint: str = " (SIGHUP empties the whole cache)") -> int:
    refused = user_problem(args.user)
    if refused:
        reach.say(refused)
        return EX_USAGE
    configured = reach.configure(args.config, hint)
    if configured is not None:
        return configured
    line = b"flush" if args.user is None else b"flush " + args.user.encode("utf-8",
                                                                           "surrogateescape")
    answers, status = reach.ask(line, "nothing was flushed")
    done = [a for a in answers if a.dropped is not None]
    if not done:
        return status
    whom = f"user {args.user}" if args.user else "every user"
    dropped = sum(a.dropped or 0 for a in done)
    processes = "1 process" if len(done) == 1 else f"{len(done)} processes"
    off = "" if reach.settings.enabled else " (the cache is off in this configuration)"
    print(f"auth cache flushed for {whom}: {entries(dropped)} dropped in {processes}{off}",
          file=stdout)
    return EX_OK  # a worker that did not answer was named; the others were flushed


DESCRIPTION = """\
Sessions and auth cache of a running saslsmtp, like doveadm who, doveadm kick and doveadm
auth cache flush.  Every serving process (each worker) is asked through its control
socket: [server] control_socket in FILE (e.g. "/run/saslsmtp/control.sock", read at the
server's start); run as root or as the server's user."""

EPILOG = """\
commands:
  who [--user USER] [--client ADDRESS[/PREFIX]] [--json]
      every open session, oldest first: PID, CLIENT (the real one behind haproxy:),
      LISTENER, USER, MECHANISM, TLS, SINCE (UTC), MESSAGES; no password or message
  kick USER | kick --client ADDRESS[/PREFIX]
      closes those sessions with 421 4.7.0 (a message still arriving is discarded) and,
      for USER, first drops USER's entries in saslsmtp's auth cache.  A kick is no ban:
      change the password first, then kick.  A type = "dovecot" backend's own cache
      (Dovecot's auth_cache_size) is Dovecot's: it may accept the old password until
      its auth_cache_ttl passes; empty it with doveadm auth cache flush USER
  flush [USER]
      forgets the cached logins of every user, or of USER (any case)

exit status:
  0 done (also when no session matched), 1 no server is running, 64 usage,
  75 a process holds its socket but did not answer, 77 permission denied,
  78 no control socket in FILE, or FILE does not load

examples (a stolen account):
  saslsmtp-ctl --config /etc/saslsmtp/saslsmtp.toml who --user alice
  saslsmtp-passwd alice    # the new line replaces alice's in the users file
  doveadm auth cache flush alice    # only with a type = "dovecot" backend, on the
                                    # Dovecot host, as root: Dovecot's own auth cache
  saslsmtp-ctl --config /etc/saslsmtp/saslsmtp.toml kick alice

docs/operations.md, "Sessions: saslsmtp-ctl who and kick", says more."""


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` before the command or after it (``saslsmtp-ctl who --config F``
    said "required: --config" before); ``parsed`` checks that one was given."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="the running server's configuration file (required)")


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None, stdout: TextIO,
           stderr: TextIO) -> argparse.Namespace | int:
    """``parse_arguments``, and ``--config`` given somewhere (else 2, as argparse's own
    usage errors)."""
    args = parse_arguments(parser, argv, stdout, stderr)
    if isinstance(args, argparse.Namespace) and not hasattr(args, "config"):
        print(parser.format_usage().rstrip(), file=stderr)
        print(f"{parser.prog}: error: the following arguments are required: --config",
              file=stderr)
        return 2
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saslsmtp-ctl", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    who_cmd = commands.add_parser("who", help="list the open sessions of every process",
                                  description="List the open sessions of every process,"
                                  " oldest first (like doveadm who).")
    add_config(who_cmd)
    who_cmd.add_argument("--user", help="only sessions logged in as this user (any case)")
    who_cmd.add_argument("--client", metavar="ADDRESS[/PREFIX]",
                         help="only sessions from this address or network")
    who_cmd.add_argument("--json", action="store_true", help="a JSON list, for scripts")
    kick_cmd = commands.add_parser(
        "kick", help="close sessions (421 4.7.0), in every process",
        description="Close every session of USER, or from ADDRESS[/PREFIX], in every process"
        " (like doveadm kick): 421 4.7.0, a message still arriving is discarded.  A kick is"
        " no ban: change the password first.")
    add_config(kick_cmd)
    kick_cmd.add_argument("user", nargs="?", metavar="USER",
                          help="every session logged in as USER (any case); also drops"
                          " USER's entries in saslsmtp's auth cache (a Dovecot backend's own"
                          " cache: doveadm auth cache flush USER)")
    kick_cmd.add_argument("--client", metavar="ADDRESS[/PREFIX]",
                          help="every session from this address or network instead")
    flush_cmd = commands.add_parser(
        "flush", help="forget cached logins (all, or one user's)",
        description="Forget the auth cache's logins in every process (like doveadm auth"
        " cache flush): the next login asks the backends.")
    add_config(flush_cmd)
    flush_cmd.add_argument("user", nargs="?", metavar="USER", help="only this user (any case)")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command; returns the exit status (the module docstring)."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    args = parsed(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):
        return EX_USAGE if args else EX_OK
    reach = Reach("saslsmtp-ctl", stderr)
    command = {"who": who, "kick": kick, "flush": flush}[args.command]
    return command(args, reach, stdout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
