#!/usr/bin/env python3
"""The TLS benchmark's peer: ``aiosmtpd_peer.py``'s one-user aiosmtpd, with STARTTLS.

Same authenticator and discarding handler as ``aiosmtpd_peer.py``; STARTTLS with the
given certificate through a standard-library ``ssl`` server context as
``ssl.create_default_context(Purpose.CLIENT_AUTH)`` makes it (its defaults: TLS 1.2+,
session tickets on), STARTTLS required before anything else and AUTH only over TLS
(like saslsmtp with ``require_tls``). Loopback only::

    python3 benchmarks/aiosmtpd_tls_peer.py PORT --cert CERT.pem --key KEY.pem

SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import ssl
import sys
from pathlib import Path

from aiosmtpd.smtp import SMTP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aiosmtpd_peer import (DiscardHandler, OneUserAuthenticator, quieten_logging,  # noqa: E402
                          serve_until_signalled)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The standard library's default server context with ``cert`` and ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--cert", type=Path, required=True, help="PEM certificate (leaf, then chain)")
    p.add_argument("--key", type=Path, required=True, help="PEM private key")
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="benchpass")
    p.add_argument("--hostname", default="aiosmtpd.bench.test")
    args = p.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        p.error("--host must be a loopback address")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Listen until SIGTERM/SIGINT; one TLS context for every connection."""
    authenticator = OneUserAuthenticator(args.user.encode(), args.password.encode())
    handler = DiscardHandler()
    context = server_context(args.cert, args.key)

    def factory() -> SMTP:
        return SMTP(handler, hostname=args.hostname, authenticator=authenticator,
                    tls_context=context, require_starttls=True, auth_require_tls=True,
                    auth_required=True)

    await serve_until_signalled(factory, args.host, args.port, "aiosmtpd TLS peer")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    quieten_logging()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
