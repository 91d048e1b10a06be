"""A real Postfix for tests, in its own folder, on a loopback high port, holding all mail.

``PostfixServer(root).start()`` writes ``main.cf``/``master.cf`` under ``root/etc`` and
runs ``postfix -c root/etc start`` (as root, which Postfix requires).  Everything is its
own: ``queue_directory``, ``data_directory``, the log (``maillog_file`` through
``postlogd``), ``inet_interfaces = 127.0.0.1`` and exactly one listener, an ``smtpd`` on
127.0.0.1:``port`` (never port 25).  Nothing leaves: every message is put on hold by
``smtpd_data_restrictions = static:HOLD`` and every transport is deferred.

* ``smtpd_authorized_xclient_hosts = 127.0.0.0/8``: the relay may send XCLIENT.
* ``smtpd_recipient_restrictions``: ``reject@example.test`` and ``blocked.example.test``
  are refused (554 5.7.1), everything else from loopback is accepted.

``main_settings`` are set in ``main.cf`` with ``postconf -e`` (replacing the ones above)
and ``master_extra`` is appended to ``master.cf``: the benchmark's Postfix peer turns on
SASL through Dovecot, delivery and TLS that way.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"

MASTER_CF = """\
# Written by tests/postfix.py; chroot off, one smtpd on a loopback high port, no port 25.
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
local     unix  - n n - - local
virtual   unix  - n n - - virtual
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
# Written by tests/postfix.py: a private Postfix that holds every message.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
smtpd_banner = $myhostname ESMTP test
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_client_port_logging = yes
smtpd_recipient_restrictions =
    check_recipient_access texthash:{etc}/recipient_access,
    permit_mynetworks, reject
smtpd_data_restrictions = check_client_access static:HOLD
defer_transports = smtp, relay, local, virtual, lmtp, error, discard
relay_domains = example.test
"""

RECIPIENT_ACCESS = """\
reject@example.test 554 5.7.1 test policy
blocked.example.test 554 5.7.1 test policy (domain)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostfixServer:
    """One private Postfix instance under ``root`` (``cleanup()`` stops it, removes it)."""

    def __init__(self, root: Path | None = None, *, main_settings: Mapping[str, str] = {},
                 master_extra: str = "") -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="saslsmtp-postfix-"))
        self.root.chmod(0o755)
        self.etc = self.root / "etc"
        self.port = free_port()
        self.running = False
        self.etc.mkdir(exist_ok=True)
        for name in ("queue", "data"):
            (self.root / name).mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix")
        (self.etc / "main.cf").write_text(MAIN_CF.format(root=self.root, etc=self.etc))
        (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port) + master_extra)
        (self.etc / "recipient_access").write_text(RECIPIENT_ACCESS)
        if main_settings:
            subprocess.run([POSTCONF, "-c", str(self.etc), "-e",
                            *(f"{key}={value}" for key, value in main_settings.items())],
                           check=True, capture_output=True, timeout=60)

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=60)

    def start(self, timeout: float = 30.0) -> None:
        """``postfix start`` and wait until the smtpd greets."""
        done = self._postfix("start")
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}\n{self.logs()}")
        self.running = True
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if s.recv(100).startswith(b"220 "):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postfix not ready within {timeout}s:\n{self.logs()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.running:
            self._postfix("stop")
            self.running = False

    def master_pid(self) -> int:
        """The ``master`` daemon's process id (``postfix start`` detaches it)."""
        return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])

    def logs(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        """The log once it contains ``text`` (postlogd writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the Postfix log:\n{self.logs()}")
            time.sleep(0.05)
        return self.logs()

    def headers(self, queue_id: str) -> str:
        """The headers of a queued message (``postcat -h``)."""
        return subprocess.run(["/usr/sbin/postcat", "-c", str(self.etc), "-hq", queue_id],
                              capture_output=True, text=True, timeout=30).stdout

    def held(self) -> list[str]:
        """Queue IDs in the hold queue."""
        hold = self.root / "queue" / "hold"
        return sorted(p.name for p in hold.rglob("*") if p.is_file()) if hold.exists() else []

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def usable() -> str | None:
    """Why this machine cannot run the test Postfix, or ``None``."""
    if not os.access(POSTFIX, os.X_OK):
        return "postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "postfix -c DIR start needs root"
    return None


def running_postfix() -> Iterator[PostfixServer]:
    """The body of a module's ``postfix`` fixture: a started test Postfix (skipped, or a
    failure in CI, where this machine cannot run one), cleaned up after the module."""
    from tests.conftest import require
    problem = usable()
    require(problem is None, problem or "")
    server = PostfixServer()
    server.start()
    yield server
    server.cleanup()
