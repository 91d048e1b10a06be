"""``saslsmtp-cache --config F flush [USER]``: the auth cache's flush, as before
``saslsmtp-ctl`` (``saslsmtp.ctl``) had ``who`` and ``kick`` too; the same as
``saslsmtp-ctl --config F flush [USER]``, kept for scripts written for it.  The control
sockets are ``saslsmtp.control``'s."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from saslsmtp.control import (CONTROL_NAME, EX_OK, EX_USAGE, Answer, CacheControlService,
                              ControlProtocol, ask, bind_problem, control_paths,
                              control_service, entries, user_problem, wiring_caches)
from saslsmtp.ctl import Reach, add_config, flush, parsed

__all__ = ["CONTROL_NAME", "Answer", "CacheControlService", "ControlProtocol", "ask",
           "bind_problem", "control_paths", "control_service", "entries", "main",
           "user_problem", "wiring_caches"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saslsmtp-cache", description="Flush the auth cache of a running saslsmtp"
        " (the same as saslsmtp-ctl flush).")
    add_config(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    flush_cmd = commands.add_parser("flush", help="forget cached logins (all, or one user's)")
    add_config(flush_cmd)
    flush_cmd.add_argument("user", nargs="?", help="only this user (any case)")
    return parser


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command; returns the exit status: 0 flushed, 1 no server running,
    64 usage (a USER that is empty or cannot be sent too), 75 a server holds the socket
    but did not answer, 77 permission denied, 78 configuration problem."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    args = parsed(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):
        return EX_USAGE if args else EX_OK
    return flush(args, Reach("saslsmtp-cache", stderr), stdout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
