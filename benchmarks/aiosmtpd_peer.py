#!/usr/bin/env python3
"""The benchmark's peer: aiosmtpd with an authenticator equivalent to saslsmtp's file backend.

One user (``bench`` / ``benchpass`` by default), AUTH PLAIN and LOGIN over plaintext
(``auth_require_tls=False``), AUTH required before MAIL (like saslsmtp's submission
mode), accepted mail discarded, logging quietened. It runs ``SMTP`` directly on the
main thread's asyncio loop (what ``python -m aiosmtpd`` does), bound to loopback only::

    python3 benchmarks/aiosmtpd_peer.py PORT [--host 127.0.0.1] [--user U --password P]

SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import signal
import sys
import warnings
from typing import Any

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
    p.add_argument("--hostname", default="aiosmtpd.bench.test",
                   help="name in the greeting (avoids a getfqdn() DNS lookup)")
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("--host must be a loopback address")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT."""
    authenticator = OneUserAuthenticator(args.user.encode(), args.password.encode())
    handler = DiscardHandler()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(handler, hostname=args.hostname, authenticator=authenticator,
                    auth_require_tls=False, auth_required=True)

    server = await loop.create_server(factory, host=args.host, port=args.port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiosmtpd peer listening on {args.host}:{args.port}", flush=True)
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
