#!/usr/bin/env python3
"""The server side of one full TLS handshake, in memory: stdlib ``ssl`` against pyOpenSSL.

No sockets, no SMTP: a Python ``ssl`` client and a server exchange the handshake through
memory BIOs, and only the server's ``do_handshake`` calls are timed. The servers are the
standard library's default server context (what aiosmtpd uses) and saslsmtp's own
context (``saslsmtp.tlscontext.server_options``, pyOpenSSL with the OpenSSL inside the
``cryptography`` wheel), for an RSA 2048 and an ECDSA P-256 certificate::

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/tls_handshake_cpu.py [-n 300]

It shows what the certificate's key costs and that both OpenSSL builds cost the same
per handshake: the difference between the servers' whole TLS sessions is elsewhere.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from tls import make_certificate  # noqa: E402


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def stdlib_server(cert: Path, key: Path) -> Callable[[], Any]:
    """A new server-side ``SSLObject`` per call (returns (obj, incoming, outgoing))."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def new() -> Any:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        return context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing
    return new


def handshake_stdlib(client: ssl.SSLContext, new_server: Callable[[], Any]) -> float:
    """Seconds the server spent in ``do_handshake`` for one full handshake."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out)
    s, s_in, s_out = new_server()
    spent = 0.0
    for _ in range(10):
        try:
            c.do_handshake()
            client_done = True
        except ssl.SSLWantReadError:
            client_done = False
        s_in.write(c_out.read())
        start = time.process_time()
        try:
            s.do_handshake()
            server_done = True
        except ssl.SSLWantReadError:
            server_done = False
        spent += time.process_time() - start
        c_in.write(s_out.read())
        if client_done and server_done:
            return spent
    raise RuntimeError("handshake did not finish")


def handshake_pyopenssl(client: ssl.SSLContext, context: Any) -> float:
    """The same against a pyOpenSSL server connection on ``context``."""
    from OpenSSL import SSL
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out)
    s = SSL.Connection(context, None)
    s.set_accept_state()
    spent = 0.0
    for _ in range(10):
        try:
            c.do_handshake()
            client_done = True
        except ssl.SSLWantReadError:
            client_done = False
        s.bio_write(c_out.read())
        start = time.process_time()
        try:
            s.do_handshake()
            server_done = True
        except SSL.WantReadError:
            server_done = False
        spent += time.process_time() - start
        out = b""
        while True:
            try:
                out += s.bio_read(65536)
            except SSL.WantReadError:
                break
        c_in.write(out)
        if client_done and server_done:
            return spent
    raise RuntimeError("handshake did not finish")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=300, help="handshakes per server and certificate")
    args = p.parse_args(argv)
    from saslsmtp.config import TLSConfig
    from saslsmtp.tlscontext import server_options
    client = client_context()
    print(f"client OpenSSL {ssl.OPENSSL_VERSION}; {args.n} handshakes each; "
          "ms of server CPU per full handshake (median of 5 batches)")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("rsa2048", "ecdsa-p256"):
            cert, key = make_certificate(kind, Path(tmp))
            py_context = server_options(TLSConfig(certificate=str(cert), private_key=str(key))).getContext()
            new_std = stdlib_server(cert, key)
            runs: dict[str, list[float]] = {"stdlib ssl": [], "saslsmtp (pyOpenSSL)": []}
            for _ in range(5):
                runs["stdlib ssl"].append(
                    sum(handshake_stdlib(client, new_std) for _ in range(args.n // 5)) / (args.n // 5))
                runs["saslsmtp (pyOpenSSL)"].append(
                    sum(handshake_pyopenssl(client, py_context) for _ in range(args.n // 5)) / (args.n // 5))
            for name, values in runs.items():
                print(f"  {kind:<11} {name:<22} {1000 * statistics.median(values):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
