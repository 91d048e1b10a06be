"""``saslsmtp-passwd``: print a users-file line for a new password, like ``doveadm pw``.

    saslsmtp-passwd [--scheme S] [--rounds N] USER

The password is asked for twice on a terminal; otherwise one line is read from
standard input (so ``echo secret | saslsmtp-passwd alice`` works in scripts).  The
output is ``USER:{SCHEME}hash``, ready to append to the users file.

The default scheme is SHA512-CRYPT with 100000 rounds: every Dovecot (as ``{CRYPT}``
too), glibc's crypt(3) and most mail tools understand it, it needs no extra memory per
login (Argon2 uses 64 MiB each), and it takes about 0.1 s to check here.  ARGON2ID or
BLF-CRYPT are stronger choices when only saslsmtp and Dovecot read the file; YESCRYPT
(``{CRYPT}$y$``, Debian's /etc/shadow default) and SCRYPT (``{CRYPT}$7$``) come from the
system's libcrypt and are written as ``{CRYPT}``, the name Dovecot verifies them under;
CRAM-MD5 and SCRAM-* are needed for those challenge mechanisms (and are
password-equivalent).
"""

from __future__ import annotations

import argparse
import getpass as getpass_module
import sys
from typing import Any, Callable, Sequence, TextIO

from saslsmtp import libcrypt, passwords
from saslsmtp.commandline import parse_arguments, standard_streams

DEFAULT_SCHEME = "SHA512-CRYPT"

#: What ``--rounds`` may be for each scheme that has a cost (the range its verifier, here
#: and in Dovecot, accepts too); the other schemes have none and ignore it.  A value
#: outside is a usage error, told before the password is asked for.
_CRYPT_ROUNDS = range(1000, 1_000_000_000)
_ITERATIONS = range(1, 10_000_001)
ROUNDS: dict[str, range] = {
    "ARGON2ID": range(1, 2 ** 32), "ARGON2I": range(1, 2 ** 32),  # time cost (32 bits)
    "BLF-CRYPT": range(4, 32),  # log2 of the cost
    "YESCRYPT": range(1, 12), "SCRYPT": range(6, 12),  # libcrypt's ranges
    "SHA512-CRYPT": _CRYPT_ROUNDS, "SHA256-CRYPT": _CRYPT_ROUNDS,
    "PBKDF2": _ITERATIONS, "SCRAM-SHA-256": _ITERATIONS, "SCRAM-SHA-1": _ITERATIONS,
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (its --help lists every scheme)."""
    epilog = "schemes:\n" + "\n".join(
        f"  {name:<14} {passwords.MAKE_HELP.get(name, '')}" for name in passwords.MAKE_SCHEMES)
    epilog += ("\n\nThe password is prompted for twice on a terminal, else read as one line"
               "\nfrom standard input.  Append the output to the users file:"
               "\n  saslsmtp-passwd alice >> etc/users")
    parser = argparse.ArgumentParser(
        prog="saslsmtp-passwd",
        description="Print a users-file line (USER:{SCHEME}hash) for a new password.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", "--scheme", type=str.upper, default=DEFAULT_SCHEME,
                        choices=passwords.MAKE_SCHEMES, metavar="SCHEME",
                        help=f"password scheme (default {DEFAULT_SCHEME}; see the list below)")
    parser.add_argument("-r", "--rounds", type=int, default=None, metavar="N",
                        help="cost: crypt rounds, bcrypt log2 cost, yescrypt/scrypt cost,"
                             " Argon2 time cost, SCRAM/PBKDF2 iterations (default: per scheme;"
                             " outside the scheme's range: a usage error, exit 2)")
    parser.add_argument("user", metavar="USER", help="the user name (the first field of the line)")
    return parser


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C

NOT_UTF8 = ("saslsmtp-passwd: the password is not valid UTF-8 (set the terminal's or the"
            " input's encoding to UTF-8)")


def _read_password(stdin: TextIO, stderr: TextIO, getpass: Callable[[str], str]) -> str | None:
    isatty = getattr(stdin, "isatty", None)
    if callable(isatty) and isatty():
        try:
            first = getpass("Password: ")
            second = getpass("Retype password: ")
        except EOFError:  # Ctrl-D at the prompt
            print("\nsaslsmtp-passwd: no password given", file=stderr)
            return None
        if first != second:
            print("saslsmtp-passwd: the passwords do not match", file=stderr)
            return None
        password = first
    else:
        try:
            line = stdin.readline()
        except UnicodeDecodeError:  # a stream decoding strictly (a UTF-8 locale, not C)
            print(NOT_UTF8, file=stderr)
            return None
        if not line:
            print("saslsmtp-passwd: no password on standard input", file=stderr)
            return None
        password = line.rstrip("\n").rstrip("\r")
    if not password:
        print("saslsmtp-passwd: empty password refused", file=stderr)
        return None
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 (surrogateescape'd by the stream)
        print(NOT_UTF8, file=stderr)
        return None
    return password


def _user_problem(user: str) -> str | None:
    if not user:
        return "the user name is empty"
    if ":" in user or any(c in user for c in "\r\n\0"):
        return "a user name cannot contain ':' or line breaks"
    if user.lstrip().startswith("#"):
        return "a user name cannot start with '#' (it would be a comment)"
    return None


def _rounds_problem(scheme: str, rounds: int | None) -> str | None:
    allowed = ROUNDS.get(scheme)
    if rounds is None or allowed is None:
        return None
    if rounds not in allowed:
        return f"--rounds for {scheme} must be between {allowed.start} and {allowed.stop - 1}"
    return None


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None,
         getpass: Callable[[str], str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 failure, 2 usage error, 130
    interrupted)."""
    stdin, stdout, stderr = standard_streams(stdin, stdout, stderr)
    getpass = getpass_module.getpass if getpass is None else getpass
    args = parse_arguments(build_parser(), argv, stdout, stderr)
    if isinstance(args, int):
        return args
    problem = _user_problem(args.user)
    if problem:
        print(f"saslsmtp-passwd: {problem}", file=stderr)
        return 2
    problem = _rounds_problem(args.scheme, args.rounds)
    if problem:
        print(f"saslsmtp-passwd: {problem}", file=stderr)
        return 2
    try:
        return _make_line(args, stdin, stdout, stderr, getpass)
    except KeyboardInterrupt:  # Ctrl-C at the prompt or while hashing: no traceback
        print("\nsaslsmtp-passwd: interrupted", file=stderr)
        return EXIT_INTERRUPTED


def _make_line(args: Any, stdin: TextIO, stdout: TextIO, stderr: TextIO,
               getpass: Callable[[str], str]) -> int:
    """Read the password, hash it, print the line; the exit status."""
    password = _read_password(stdin, stderr, getpass)
    if password is None:
        return 1
    scheme = args.scheme
    if scheme == "PLAIN" and (":" in password or password != password.strip()):
        print("saslsmtp-passwd: using {PLAIN.B64}: the password contains ':' or surrounding"
              " spaces", file=stderr)
        scheme = "PLAIN.B64"
    try:
        field = passwords.make_hash(scheme, password, rounds=args.rounds, username=args.user)
    except (ValueError, libcrypt.LibcryptMissing) as e:  # never contain the password
        print(f"saslsmtp-passwd: {e}", file=stderr)
        return 1
    print(f"{args.user}:{field}", file=stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
