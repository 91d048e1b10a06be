"""``etc/systemd/saslsmtp.service``: systemd itself accepts every line, and the unit has
the hardening and reload wiring the README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_binary
from tests.support import ROOT

UNIT = ROOT / "etc" / "systemd" / "saslsmtp.service"
SHIPPED_TWISTD = "/usr/local/bin/twistd"


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` of ``text`` installed as ``saslsmtp.service``, with the
    twistd path pointing at this interpreter's twistd (verify checks the binary exists)."""
    analyze = require_binary("systemd-analyze", "systemd")
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.is_file(), f"{twistd} missing: twistd is installed with Twisted"
    unit = tmp_path / "saslsmtp.service"
    unit.write_text(text.replace(SHIPPED_TWISTD, str(twistd)))
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """No error and no warning (systemd only warns about an unknown value, exit 0)."""
    text = UNIT.read_text()
    assert SHIPPED_TWISTD in text
    result = verify(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported."""
    result = verify(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "KillMode" in result.stderr or "kill mode" in result.stderr


def test_hardening_and_reload_lines() -> None:
    """SIGHUP reload, no new privileges, read-only system but the Maildir, and only the
    capability to bind low ports."""
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for expected in ("ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ReadWritePaths=/var/mail/saslsmtp", "PrivateTmp=yes",
                     "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                     "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "KillMode=mixed"):
        assert expected in lines, expected
