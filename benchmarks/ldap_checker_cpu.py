#!/usr/bin/env python3
"""CPU per login of the ldap checker alone, in-process: no SMTP, no daemon.

    python3 benchmarks/ldap_checker_cpu.py                   # this tree, both modes
    git show OLD:saslsmtp/checkers/ldap.py > /tmp/old_ldap.py
    python3 benchmarks/ldap_checker_cpu.py --module-file /tmp/old_ldap.py   # another version

Starts a slapd (tests/slapd.py), builds an ``LdapChecker`` with a real ``ThreadPoolRunner``
(``--threads``) on the reactor (``--client twisted``: the Twisted-native client, no
threads), warms it up, then runs ``--logins`` logins as alice, 16 at a time, and prints
logins/s and the process CPU (user + system) per login: the client (ldap3 and the thread
hand-offs, or the Twisted client), the Deferreds, and nothing else.  ``--module-file`` loads
``Directory``/``LdapChecker``/``LdapOptions`` from another copy of ldap.py (e.g. from git)
to compare versions on the same slapd.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twisted.internet import defer, reactor  # noqa: E402

from saslsmtp.credentials import PasswordCredentials  # noqa: E402
from saslsmtp.threads import ThreadPoolRunner  # noqa: E402
from tests.slapd import ALICE, PEOPLE, READER_DN, READER_PASSWORD, running_slapd  # noqa: E402


def load(module_file: str | None) -> Any:
    if module_file is None:
        from saslsmtp.checkers import ldap
        return ldap
    spec = importlib.util.spec_from_file_location("ldap_under_test", module_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def measure(ldap: Any, url: str, mode: str, threads: int, logins: int,
                  client: str = "ldap3", pool_size: int | None = None) -> str:
    options: dict[str, Any] = {"url": (url,), "threads": threads, "timeout": 5.0,
                               "pool_size": pool_size}
    if mode == "template":
        options["user_dn"] = f"uid={{username}},{PEOPLE}"
    else:
        options.update(search_base=PEOPLE, search_dn=READER_DN, search_password=READER_PASSWORD,
                       search_filter="(&(objectClass=inetOrgPerson)(uid={username}))")
    if client == "twisted":
        from saslsmtp.checkers.ldaptwisted import TwistedDirectory, TwistedLdapChecker
        checker: Any = TwistedLdapChecker("bench", TwistedDirectory(
            ldap.LdapOptions(**options, client="twisted"), reactor))
    else:
        checker = ldap.LdapChecker("bench", ldap.Directory(ldap.LdapOptions(**options)),
                                   ThreadPoolRunner(reactor, "ldap-bench", threads))
    credentials = PasswordCredentials(ALICE.uid.encode(), ALICE.password.encode())

    async def worker(n: int) -> None:
        for _ in range(n):
            await checker.requestAvatarId(credentials)

    try:
        await defer.gatherResults([defer.ensureDeferred(worker(20)) for _ in range(16)])
        before, started = os.times(), time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(worker(logins // 16))
                                   for _ in range(16)])
        after, elapsed = os.times(), time.perf_counter() - started
    finally:
        checker.stop()
    n = logins // 16 * 16
    user, system = (after.user - before.user) / n * 1000, (after.system - before.system) / n * 1000
    return (f"{mode:8} {client} threads={threads} pool_size={pool_size}: "
            f"{n / elapsed:6.0f} logins/s, CPU {user + system:.3f} "
            f"ms/login (user {user:.3f}, system {system:.3f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module-file", help="another copy of saslsmtp/checkers/ldap.py")
    p.add_argument("--mode", action="append", choices=("template", "search"))
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--logins", type=int, default=4000)
    p.add_argument("--client", choices=("ldap3", "twisted"), default="ldap3",
                   help="twisted: the Twisted-native client (ldaptwisted.py), no threads")
    p.add_argument("--pool-size", type=int)
    args = p.parse_args()
    ldap = load(args.module_file)
    slapd_fixture = running_slapd()
    slapd = next(slapd_fixture)
    lines: list[str] = []

    async def everything() -> None:
        for mode in args.mode or ["template", "search"]:
            lines.append(await measure(ldap, slapd.url, mode, args.threads, args.logins,
                                       args.client, args.pool_size))

    def run() -> None:
        d = defer.ensureDeferred(everything())
        d.addErrback(lambda f: lines.append(f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    try:
        reactor.callWhenRunning(run)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
    finally:
        slapd_fixture.close()
    print(f"{args.module_file or 'this tree'}:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
