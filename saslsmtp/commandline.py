"""What the command-line tools (saslsmtp-passwd, saslsmtp-authtest, saslsmtp-cache) do
before their own work: take the standard streams unless given others, and parse the
arguments with argparse's help and errors written to those streams.

Each ``main`` accepts its streams and ``argv`` as arguments so that tests (and callers)
see everything the command writes, ``--help`` and usage errors included, and get an exit
status back instead of a ``SystemExit``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence, TextIO


def standard_streams(stdin: TextIO | None, stdout: TextIO | None,
                     stderr: TextIO | None) -> tuple[TextIO, TextIO, TextIO]:
    """The streams given, the process's own for those that are ``None``."""
    return (sys.stdin if stdin is None else stdin, sys.stdout if stdout is None else stdout,
            sys.stderr if stderr is None else stderr)


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                    stdout: TextIO, stderr: TextIO) -> argparse.Namespace | int:
    """``argv`` (``sys.argv[1:]`` when ``None``) parsed by ``parser``; or, where argparse
    would exit (``--help``, a usage error), the status it exits with (0 or 2), for the
    command to turn into its own."""
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            return parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:
        return int(e.code or 0)
