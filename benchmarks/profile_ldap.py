#!/usr/bin/env python3
"""Profile the saslsmtp daemon (ldap backend) under AUTH PLAIN load with py-spy.

    python3 benchmarks/profile_ldap.py --mode template -d 8     # needs py-spy (pip)

Starts a slapd (tests/slapd.py) and the daemon exactly as benchmarks/ldap_peers.py does,
runs smtp_auth_load.py at C=16 and ``py-spy record --format raw`` (collapsed stacks, GIL
and idle excluded) on the daemon at the same time, then prints the functions with the
most samples, self and inclusive.  The collapsed stacks stay in --output.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from ldap_peers import LOADGEN, saslsmtp_server  # noqa: E402

from tests.slapd import ALICE, SlapdServer, slapd_or_skip  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("template", "search"), default="template")
    p.add_argument("--duration", "-d", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--pool-size", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--output", default="/tmp/saslsmtp-ldap-profile.txt")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    module_dir, schema_dir = slapd_or_skip()
    with tempfile.TemporaryDirectory(prefix="saslsmtp-ldap-profile-") as tmp:
        work = Path(tmp)
        slapd = SlapdServer(root=work / "slapd", module_dir=module_dir, schema_dir=schema_dir)
        slapd.root.mkdir()
        (work / "saslsmtp").mkdir()
        slapd.start()
        server = saslsmtp_server(args.mode, slapd, work / "saslsmtp", args)
        try:
            server.start()
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.pid), "--format",
                                    "raw", "--output", args.output, "--duration",
                                    str(int(args.duration)), "--rate", "250", "--threads"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load = subprocess.run([sys.executable, str(LOADGEN), "--port", str(server.port),
                                   "--user", ALICE.uid, "--password", ALICE.password, "-c", "16",
                                   "--duration", str(args.duration)], capture_output=True,
                                  text=True, timeout=args.duration + 60)
            spy.wait(args.duration + 60)
            print(load.stdout)
        finally:
            server.stop()
            slapd.stop()
    self_count: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(args.output).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        self_count[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"{total} samples")
    for title, counter in (("self", self_count), ("inclusive", inclusive)):
        print(f"--- top {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {frame[:150]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
