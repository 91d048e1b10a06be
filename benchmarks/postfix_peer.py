#!/usr/bin/env python3
"""The benchmark's Postfix peer: a real Postfix smtpd doing SASL through a private Dovecot.

Built from the test suite's private instances (tests/postfix.py and tests/dovecot.py): its
own config, queue and log folders under a fresh temporary directory, one smtpd on a free
loopback port (never port 25), never the system instance.  Needs root (``postfix -c DIR
start``), like the tests that use it.

* **SASL**: ``smtpd_sasl_type = dovecot`` and ``smtpd_sasl_path`` = the Dovecot instance's
  private auth-client UNIX socket.  Dovecot's passdb is a passwd-file with the bench user
  as a ``{PLAIN}`` entry (what saslsmtp's users file holds), so Dovecot can serve PLAIN,
  LOGIN, CRAM-MD5 and SCRAM-SHA-256 from it (for SCRAM it derives the keys, 4096 PBKDF2
  rounds, on every login); ``auth_failure_delay = 0`` and no auth penalty, like
  saslsmtp's ``failure_delay = 0``; ``auth_verbose = no`` (Dovecot's default).
* **Mail**: accepted only after AUTH (``permit_sasl_authenticated``, then ``reject``) and
  delivered for real by Postfix's ``virtual(8)`` agent into one Maildir
  (``virtual_mailbox_maps = static:bench/``, any recipient domain routed to it): the queue
  file is fsynced before the 250, then qmgr hands it to ``virtual``, which writes, fsyncs
  and renames the Maildir file.  Delivery is asynchronous, so ``settle()`` waits for the
  queue to drain before the CPU is read.
* **TLS**: with a certificate, ``smtpd_tls_security_level = may`` (STARTTLS offered, not
  required) and a ``tlsmgr`` service.
* **Logging**: Postfix logs every session through ``postlogd`` into a file in its folder
  (its normal cost; there is no cheaper switch short of losing the log).
* **No reverse DNS**: ``smtpd_peername_lookup = no`` (saslsmtp and aiosmtpd do none).

``cpu_s()`` is the CPU of the whole instance: utime+stime+cutime+cstime, from
/proc/PID/stat, of every process descending from the Postfix ``master`` (smtpd, anvil,
cleanup, qmgr, trivial-rewrite, virtual, postlogd, tlsmgr ...) and from the Dovecot
master (auth, anvil, log, config ...).  A child that exited and was reaped by its parent
is in that parent's cutime/cstime, so a delta of the sum between two reads counts every
process that ran in between, alive or not, exactly once.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.dovecot import DOVECOT, DovecotServer  # noqa: E402
from tests.postfix import POSTFIX, PostfixServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def unusable() -> str | None:
    """Why this machine cannot run the Postfix peer, or ``None``."""
    for path, package in ((POSTFIX, "postfix"), (DOVECOT, "dovecot-core")):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian package {package})"
    if os.geteuid() != 0:
        return "postfix -c DIR start needs root"
    return None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after ``pid (comm)`` of /proc/PID/stat, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _comm(pid: int) -> str | None:
    """A process's command name, or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (one /proc scan)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def tree_cpu_s(roots: list[int]) -> float:
    """utime+stime+cutime+cstime summed over the process trees under ``roots``, in seconds."""
    total = 0
    for pid in descendants(roots):
        fields = _stat_fields(pid)
        if fields is not None:  # fields[11:15] are utime, stime, cutime, cstime
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def main_settings(dovecot: DovecotServer, root: Path, cert: Path | None,
                  key: Path | None) -> dict[str, str]:
    """What the peer changes in tests/postfix.py's main.cf."""
    nobody = pwd.getpwnam("nobody")
    settings = {
        "smtpd_banner": "$myhostname ESMTP",
        "smtpd_peername_lookup": "no",
        "smtpd_client_port_logging": "no",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "dovecot",
        "smtpd_sasl_path": dovecot.unix_socket,
        "smtpd_sasl_security_options": "noanonymous",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_recipient_restrictions": "permit_sasl_authenticated, reject",
        "smtpd_data_restrictions": "",
        "defer_transports": "",
        "relay_domains": "",
        "virtual_mailbox_domains": "static:all",
        "virtual_mailbox_base": f"{root}/mail",
        "virtual_mailbox_maps": "static:bench/",
        "virtual_uid_maps": f"static:{nobody.pw_uid}",
        "virtual_gid_maps": f"static:{nobody.pw_gid}",
        "virtual_minimum_uid": "1",
    }
    if cert is not None and key is not None:
        settings.update({
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_loglevel": "0",
        })
    return settings


MASTER_TLS = "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"


class PostfixPeer:
    """Postfix + Dovecot for the benchmark, with the harness's server interface.

    ``start()``, ``stop()``, ``alive()``, ``output_tail()``, ``cpu_s()`` (whole instance)
    and ``settle()`` (wait until the queue is empty after a mail run).
    """

    name = "postfix"

    def __init__(self, user: str, password: str, *, cert: Path | None = None,
                 key: Path | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="saslsmtp-bench-postfix-"))
        self.root.chmod(0o755)
        (self.root / "dovecot").mkdir()
        self.dovecot = DovecotServer(self.root / "dovecot", users=[(user, password)],
                                     mechanisms="plain login cram-md5 scram-sha-256",
                                     verbose=False)
        mail = self.root / "mail"
        mail.mkdir()
        shutil.chown(mail, "nobody", pwd.getpwnam("nobody").pw_gid)
        (self.root / "postfix").mkdir()
        self.postfix = PostfixServer(self.root / "postfix",
                                     main_settings=main_settings(self.dovecot, self.root, cert, key),
                                     master_extra=MASTER_TLS if cert is not None else "")
        self.port = self.postfix.port
        self.mailbox = mail / "bench"
        self.description = ("Postfix " + postfix_version() + " smtpd, SASL via Dovecot "
                            + dovecot_short_version() + " (passwd-file, {PLAIN}), mail "
                            "delivered by virtual(8) into a Maildir"
                            + (", STARTTLS offered (security level may)" if cert else ""))
        self._roots: list[int] = []
        self.seen: set[str] = set()  # names of the processes counted, for the report

    def start(self, timeout: float = 30.0) -> None:
        """Dovecot first (Postfix's smtpd connects to its socket), then Postfix."""
        self.dovecot.start(timeout=timeout)
        try:
            self.postfix.start(timeout=timeout)
            assert self.dovecot.process is not None
            self._roots = [self.postfix.master_pid(), self.dovecot.process.pid]
        except BaseException:
            self.dovecot.stop()
            raise

    def stop(self) -> None:
        """Stop both and remove the folder; idempotent."""
        self.postfix.stop()
        self.dovecot.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        """Both masters still running."""
        return bool(self._roots) and all(_stat_fields(pid) is not None for pid in self._roots)

    @property
    def pid(self) -> int:
        """The Postfix master's process id."""
        return self._roots[0]

    def processes(self) -> list[int]:
        """Every process of the instance right now."""
        return descendants(self._roots)

    def cpu_s(self) -> float:
        """CPU seconds of the whole instance so far (see the module docstring)."""
        pids = descendants(self._roots)
        self.seen.update(filter(None, (_comm(pid) for pid in pids)))
        return tree_cpu_s(self._roots)

    def queued(self) -> int:
        """Messages in Postfix's queue (maildrop, incoming, active, deferred)."""
        queue = self.postfix.root / "queue"
        return sum(1 for name in ("maildrop", "incoming", "active", "deferred")
                   if (queue / name).exists()
                   for p in (queue / name).rglob("*") if p.is_file())

    def settle(self, timeout: float = 60.0) -> float:
        """Wait until the queue is empty (every accepted message delivered); seconds waited."""
        start = time.monotonic()
        while self.queued() and time.monotonic() - start < timeout:
            time.sleep(0.05)
        return time.monotonic() - start

    def delivered(self) -> int:
        """Messages in the Maildir's new/."""
        new = self.mailbox / "new"
        return sum(1 for _ in new.iterdir()) if new.exists() else 0

    def output_tail(self, lines: int = 30) -> str:
        """The end of Postfix's and Dovecot's logs."""
        text = (self.postfix.logs() + "\n" + self.dovecot.logs()).splitlines()
        return "\n".join(text[-lines:]) or "(no output)"


def postfix_version() -> str:
    """``mail_version`` of the installed Postfix."""
    done = subprocess.run(["/usr/sbin/postconf", "-dh", "mail_version"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip() or "?"


def dovecot_short_version() -> str:
    """The installed Dovecot's version number."""
    from tests.dovecot import dovecot_version
    try:
        return dovecot_version().split()[0]
    except (OSError, subprocess.SubprocessError):
        return "?"
