#!/usr/bin/env python3
"""The benchmark's peer: aiosmtpd with an authenticator equivalent to saslsmtp's file backend.

One user (``bench`` / ``benchpass`` by default), AUTH PLAIN and LOGIN over plaintext
(``auth_require_tls=False``), AUTH required before MAIL (like saslsmtp's submission
mode), accepted mail discarded or, with ``--maildir``, stored durably the way saslsmtp's
Maildir delivery does; logging quietened. It runs ``SMTP`` directly on the main thread's
asyncio loop (what ``python -m aiosmtpd`` does), bound to loopback only::

    python3 benchmarks/aiosmtpd_peer.py PORT [--host 127.0.0.1] [--user U --password P]
                                             [--maildir DIR] [--tls-cert PEM --tls-key PEM]

With ``--tls-cert``/``--tls-key`` STARTTLS is offered (aiosmtpd's ``tls_context``, TLS 1.2
minimum like saslsmtp) but not required (``require_starttls=False``).

SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import itertools
import logging
import os
import signal
import socket
import ssl
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


class OneUserAuthenticator:
    """aiosmtpd authenticator accepting one username/password pair (constant-time compare)."""

    def __init__(self, user: bytes, password: bytes) -> None:
        self._user = user
        self._password = password

    def __call__(self, server: SMTP, session: Session, envelope: Envelope,
                 mechanism: str, auth_data: Any) -> AuthResult:
        """Accept ``auth_data`` when it is the configured LoginPassword."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user_ok = hmac.compare_digest(auth_data.login, self._user)
        password_ok = hmac.compare_digest(auth_data.password, self._password)
        if user_ok and password_ok:
            return AuthResult(success=True, handled=False, auth_data=auth_data.login)
        return AuthResult(success=False, handled=False)


class DiscardHandler:
    """Accept every message and throw it away."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Reply 250 without storing anything."""
        return "250 2.0.0 OK"


class MaildirHandler:
    """Store each message durably in a Maildir, as saslsmtp does, before the 250.

    Written to ``tmp/``, fsynced, renamed into ``new/``, directory fsynced; in the
    loop's default thread pool so the event loop never blocks on the disk.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    def _store(self, data: bytes) -> None:
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(_sequence)}.{self._host}"
        tmp = self._path / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._path / "new" / name)
        dirfd = os.open(self._path / "new", os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message, then reply 250."""
        data = envelope.original_content or b""
        await asyncio.get_running_loop().run_in_executor(None, self._store, data)
        return "250 2.0.0 OK"


_sequence = itertools.count()


def quieten_logging() -> None:
    """Silence aiosmtpd's per-session logging (it would dominate the measurement)."""
    for name in ("mail.log", "mail.debug", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger(name).propagate = False
    logging.disable(logging.ERROR)
    # Emitted by every SMTP() instance (one per connection) because AUTH is required
    # over plaintext; that is deliberate here (loopback benchmark).
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="benchpass")
    p.add_argument("--no-auth", action="store_true",
                   help="accept MAIL without AUTH (an upstream behind a relay)")
    p.add_argument("--maildir", type=Path, default=None,
                   help="store accepted mail durably in this Maildir (default: discard)")
    p.add_argument("--hostname", default="aiosmtpd.bench.test",
                   help="name in the greeting (avoids a getfqdn() DNS lookup)")
    p.add_argument("--tls-cert", type=Path, default=None,
                   help="PEM certificate: offer STARTTLS (not required)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("--host must be a loopback address")
    return args


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server context STARTTLS uses: the given certificate, TLS 1.2 minimum."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT."""
    authenticator = OneUserAuthenticator(args.user.encode(), args.password.encode())
    handler = MaildirHandler(args.maildir) if args.maildir else DiscardHandler()
    context = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None

    def factory() -> SMTP:
        return SMTP(handler, hostname=args.hostname, authenticator=authenticator,
                    auth_require_tls=False, auth_required=not args.no_auth,
                    tls_context=context, require_starttls=False)

    await serve_until_signalled(factory, args.host, args.port, "aiosmtpd peer")


async def serve_until_signalled(factory: Callable[[], SMTP], host: str, port: int,
                                name: str) -> None:
    """Listen with ``factory``, say so on stdout (the harness waits for the line), and
    stop at SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, host=host, port=port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{name} listening on {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    quieten_logging()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
