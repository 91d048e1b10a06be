#!/usr/bin/env python3
"""Profile the AUTH hot path: whole SMTP sessions (EHLO, AUTH, QUIT) driven in process.

The daemon's real factory and protocol, built from a generated config exactly as
``twistd saslsmtp`` builds them, serve sessions over Twisted's ``StringTransport`` with
the daemon's own log observer writing to a file; so the figure is saslsmtp's own work
per session without the socket layer (which the null server and the load generator
measure).  Prints microseconds per session (best of five runs), then, with
``--profile``, the top functions by ``tottime`` or ``cumtime``.

    python3 benchmarks/profile_auth.py                       # AUTH PLAIN
    python3 benchmarks/profile_auth.py --mech LOGIN --profile cumtime
    python3 benchmarks/profile_auth.py --log-level warn      # without the two info lines
    python3 benchmarks/profile_auth.py --tree /tmp/old       # another checkout, to compare
    python3 benchmarks/profile_auth.py --waiting-backend     # the check answers a turn later

For a profile of the real daemon under load, run it under twistd's profiler and the
load generator (see benchmarks/README.md, "Profiles").
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import hmac
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# --tree DIR: profile another checkout's saslsmtp (e.g. the commit before a change)
_TREE = sys.argv[sys.argv.index("--tree") + 1] if "--tree" in sys.argv[:-1] else str(ROOT)
sys.path.insert(0, _TREE)

from twisted.internet import defer  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.error import ConnectionDone  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from saslsmtp.logs import make_observer  # noqa: E402
from saslsmtp.service import SubmissionFactory, load, wire  # noqa: E402
from saslsmtp.threads import SynchronousRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits_cpu import ALL_LIMITS  # noqa: E402  (every limit on, none reached)
from run import bench_toml  # noqa: E402


def build(workdir: Path, log_level: str, limits: bool = False) -> SubmissionFactory:
    log = open(workdir / "saslsmtp.log", "w")
    globalLogBeginner.beginLoggingTo([make_observer(log, "text", log_level)],
                                     redirectStandardIO=False)
    (workdir / "users").write_text("bench:{PLAIN}benchpass\n")
    (workdir / "saslsmtp.toml").write_text(bench_toml(
        "tcp:2525:interface=127.0.0.1", mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"),
        extra=ALL_LIMITS.format(store='"memory"') if limits else "",
        origin="benchmarks/profile_auth.py"))
    clock = Clock()
    wiring = wire(load(str(workdir / "saslsmtp.toml")), clock)
    wiring.blocking = SynchronousRunner()  # {PLAIN} never reaches the pool anyway
    return SubmissionFactory(wiring, clock)


class WaitingChecker:
    """A backend that answers later, as a network one does: the check is made at once,
    but its answer is held until ``release()`` (the harness calls it after each client
    line), so the AUTH step takes the path of a step that waits."""

    held: list[tuple[defer.Deferred, defer.Deferred]] = []

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.credentialInterfaces = inner.credentialInterfaces  # type: ignore[attr-defined]

    def requestAvatarId(self, credentials: object) -> defer.Deferred:
        answer: defer.Deferred = defer.Deferred()
        self.held.append((defer.maybeDeferred(self.inner.requestAvatarId, credentials),  # type: ignore[attr-defined]
                          answer))
        return answer

    @classmethod
    def release(cls) -> None:
        while cls.held:
            checked, answer = cls.held.pop()
            checked.chainDeferred(answer)


def waiting_backends(factory: SubmissionFactory) -> None:
    """Every checker of the factory's portal answers through ``WaitingChecker``."""
    checkers = factory.wiring.portal.checkers
    for interface, checker in list(checkers.items()):
        checkers[interface] = WaitingChecker(checker)


def feed(protocol: Any, line: bytes) -> None:
    protocol.dataReceived(line)
    WaitingChecker.release()


def session(factory: SubmissionFactory, mech: str) -> None:
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 2525))
    protocol.makeConnection(transport)
    feed(protocol, b"EHLO loadgen.localdomain\r\n")
    if mech == "LOGIN":
        feed(protocol, b"AUTH LOGIN\r\n")
        feed(protocol, base64.b64encode(b"bench") + b"\r\n")
        feed(protocol, base64.b64encode(b"benchpass") + b"\r\n")
    elif mech == "CRAM-MD5":
        feed(protocol, b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(transport.value().rsplit(b"334 ", 1)[1].split(b"\r\n")[0])
        digest = hmac.new(b"benchpass", challenge, "md5").hexdigest().encode()
        feed(protocol, base64.b64encode(b"bench " + digest) + b"\r\n")
    else:
        feed(protocol, b"AUTH PLAIN " + base64.b64encode(b"\0bench\0benchpass") + b"\r\n")
    feed(protocol, b"QUIT\r\n")
    if b"\r\n235 " not in transport.value():
        raise SystemExit(f"the session did not authenticate: {transport.value()!r}")
    transport.loseConnection()
    protocol.connectionLost(Failure(ConnectionDone()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mech", choices=("PLAIN", "LOGIN", "CRAM-MD5"), default="PLAIN")
    p.add_argument("--sessions", type=int, default=3000, help="sessions per timed run")
    p.add_argument("--log-level", default="info")
    p.add_argument("--profile", choices=("tottime", "cumtime"), help="print a profile")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--limits", action="store_true", help="every [limits] key on (memory store)")
    p.add_argument("--tree", default=str(ROOT), help="checkout whose saslsmtp is profiled")
    p.add_argument("--waiting-backend", action="store_true",
                   help="the password check answers after the AUTH line has been handled"
                        " (the path of a network backend), not at once")
    args = p.parse_args()
    factory = build(Path(tempfile.mkdtemp(prefix="saslsmtp-profile-")), args.log_level, args.limits)
    if args.waiting_backend:
        waiting_backends(factory)
    for _ in range(1000):  # warm caches (the users file, rendered replies)
        session(factory, args.mech)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(args.sessions):
            session(factory, args.mech)
        best = min(best, (time.perf_counter() - started) / args.sessions)
    print(f"AUTH {args.mech}: {best * 1e6:.1f} us per session (best of 5 x {args.sessions})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.sessions):
            session(factory, args.mech)
        profiler.disable()
        pstats.Stats(profiler).sort_stats(args.profile).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
