"""A real Dovecot LMTP server for tests (Debian's dovecot-lmtpd), in its own folder.

Built on ``tests.dovecot.DovecotServer`` (same lifecycle: ``start``, ``stop``,
``cleanup``), with another configuration: ``protocols = lmtp``, a UNIX socket
(``lmtp_socket``) and a TCP listener on 127.0.0.1:``port``, the users of the same
passwd-file (``alice``, ``bob``; anyone else is unknown: ``550 5.1.1`` at RCPT), and
Maildirs under ``root/mail/USER`` written as uid/gid 65534.
"""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path
from typing import Iterator

from tests.dovecot import (HASHED_PASSWORD, HASHED_USER, PLAIN_USER, DovecotServer,
                           require_dovecot)

LMTP = "/usr/lib/dovecot/lmtp"


class DovecotLmtpServer(DovecotServer):
    """Dovecot with only LMTP, delivering into real Maildirs."""

    def _write_files(self) -> None:
        self.lmtp_socket = str(self.root / "lmtp")
        self.mail_root = self.root / "mail"
        self.mail_root.mkdir(exist_ok=True)
        self.mail_root.chmod(0o1777)
        self.passwd_path.write_text(f"{PLAIN_USER[0]}:{{PLAIN}}{PLAIN_USER[1]}\n"
                                    f"{HASHED_USER[0]}:{HASHED_PASSWORD}\n")
        self.passwd_path.chmod(0o644)
        if os.geteuid() == 0:
            internal, login, uid = "dovecot", "dovenull", "65534"
        else:
            internal = login = pwd.getpwuid(os.geteuid()).pw_name
            uid = str(os.geteuid())
        self.config_path.write_text(f"""\
# Written by tests/dovecot_lmtp.py: an LMTP-only Dovecot 2.3 for saslsmtp's relay tests.
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = saslsmtp-lmtp-{self.port}
log_path = {self.log_path}
protocols = lmtp
ssl = no
default_internal_user = {internal}
default_login_user = {login}
postmaster_address = postmaster@example.test
hostname = lmtp.example.test
mail_location = maildir:{self.mail_root}/%n
first_valid_uid = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.passwd_path}
}}
userdb {{
  driver = static
  args = uid={uid} gid={uid} home={self.mail_root}/%n
}}
service lmtp {{
  unix_listener {self.lmtp_socket} {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
""")

    def _handshakes(self) -> bool:
        """True when the UNIX socket greets with 220."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(self.lmtp_socket)
                return s.recv(200).startswith(b"220 ")
        except OSError:
            return False

    def mailbox(self, user: str) -> list[bytes]:
        """Every message in ``user``'s INBOX (new/ and cur/)."""
        base = self.mail_root / user
        files = sorted(p for d in ("new", "cur") if (base / d).is_dir()
                       for p in (base / d).iterdir())
        return [Path(p).read_bytes() for p in files]


def running_lmtp() -> Iterator[DovecotLmtpServer]:
    """The body of a module's ``dovecot`` fixture: a started Dovecot LMTP server (skipped,
    or a failure in CI, without Dovecot's lmtp), cleaned up after the module."""
    from tests.conftest import require_binary
    require_dovecot()
    require_binary(LMTP, "dovecot-lmtpd")
    server = DovecotLmtpServer()
    server.start()
    yield server
    server.cleanup()
