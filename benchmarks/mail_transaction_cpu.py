#!/usr/bin/env python3
"""saslsmtp's own CPU per mail transaction, in process: MAIL, RCPT, DATA and a ~2 KB body
through the daemon's protocol over ``StringTransport`` (``saslsmtp.testing.SMTPHarness``),
delivered into a Maildir on ``--dir`` (default /dev/shm, so the disk does not count) by
the real ``GroupCommit`` with an inline runner.  No sockets, no reactor, no threads: the
parsing, the transaction, the body reader, the sink and the batch's Python.

    python3 benchmarks/mail_transaction_cpu.py                     # best of 5 x 2,000
    python3 benchmarks/mail_transaction_cpu.py --profile tottime   # cProfile, top 30
    python3 benchmarks/mail_transaction_cpu.py --tree /tmp/old     # another checkout
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BODY = (b"From: a@example.test\r\nTo: b@example.test\r\nSubject: x\r\n\r\n"
        + (b"y" * 76 + b"\r\n") * 26 + b".\r\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--tree", type=Path, default=REPO, help="saslsmtp source tree to import")
    p.add_argument("--profile", choices=("tottime", "cumulative"))
    args = p.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    from saslsmtp.delivery import Maildir, MaildirRealm
    from saslsmtp.testing import SMTPHarness
    from saslsmtp.threads import SynchronousRunner

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="saslsmtp-mail-cpu-") as tmp:
        realm = MaildirRealm(Maildir(Path(tmp) / "mail", "mx.example.test"), SynchronousRunner())
        h = SMTPHarness(users={"tim": "tanstaaftanstaaf"}, realm=realm)
        h.login("tim", "tanstaaftanstaaf")
        h.take()

        def transactions(n: int) -> None:
            for _ in range(n):
                h.send(b"MAIL FROM:<tim@example.test>\r\n")
                h.send(b"RCPT TO:<a@example.test>\r\n")
                h.send(b"DATA\r\n")
                out = h.send(BODY)
                if not out.startswith(b"250 2.0.0 OK"):
                    raise SystemExit(f"unexpected reply: {out!r}")

        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            transactions(args.messages)
            profile.disable()
            pstats.Stats(profile).strip_dirs().sort_stats(args.profile).print_stats(30)
            return 0
        best = float("inf")
        for _ in range(args.repeat):
            start = time.process_time()
            transactions(args.messages)
            best = min(best, (time.process_time() - start) / args.messages)
    print(f"{args.tree}: {best * 1e6:.1f} us CPU per transaction (best of {args.repeat} x "
          f"{args.messages}, Maildir on {args.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
