"""The README's deployment recipe "In front of Postfix (XCLIENT)", followed as written:
its saslsmtp tables and its master.cf entry are read from README.md (only the port
10025 is swapped for a free one), and a real Postfix (tests/postfix.py: its own queue,
every message held, never port 25) runs that entry chrooted, as the recipe says.

The Postfix's own main.cf trusts no loopback client (``mynetworks`` elsewhere, no
``smtpd_authorized_xclient_hosts``): in production the clients XCLIENT names are remote,
so ``permit_mynetworks`` must not be what lets their mail through here.  swaks logs in to
saslsmtp and sends to a domain Postfix does not serve, which only an authenticated
client may relay to.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import require, require_binary
from tests.postfix import PostfixServer, free_port, usable
from tests.support import ROOT
from tests.test_wire_relay import PASSWORD, USER, daemon_config, run_daemon  # noqa: F401

RECIPE_PORT = "10025"


def recipe() -> tuple[str, str]:
    """The recipe's saslsmtp TOML and its Postfix master.cf entry, as README.md has them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**In front of Postfix (XCLIENT).**", 1)[1].split("\n**", 1)[0]
    toml, master = re.findall(r"```[a-z]*\n(.*?)```", section, re.DOTALL)
    assert toml.startswith("[delivery]\n") and "master.cf" in master, section
    assert RECIPE_PORT in toml and RECIPE_PORT in master
    return toml, master


def swaks(port: int, sender: str, to: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/swaks", "--server", f"127.0.0.1:{port}", "--ehlo",
                           "alice-laptop", "--from", sender, "--to", to, "--auth", "PLAIN",
                           "--auth-user", USER, "--auth-password", PASSWORD, "--header",
                           "Subject: recipe"], capture_output=True, text=True, timeout=60)


def test_the_postfix_recipe_as_written_delivers_with_the_login(tmp_path: Path,
                                                                 run_daemon) -> None:
    """Mail goes through: Postfix accepts a recipient at a domain it does not serve
    because the XCLIENT login counts as authenticated, holds the message, and logs the
    client's address and port, ``sasl_method=XCLIENT, sasl_username=<login>`` and the
    client's HELO, as the README says; swaks gets Postfix's 250.  The recipe's
    ``sender_policy = "login"`` refuses another sender before Postfix hears of it."""
    require_binary("/usr/bin/swaks", "swaks")
    problem = usable()
    require(problem is None, problem or "")
    toml, master = recipe()
    upstream_port = str(free_port())
    postfix = PostfixServer(main_settings={"mynetworks": "192.0.2.0/24",
                                           "smtpd_authorized_xclient_hosts": ""},
                            master_extra=master.replace(RECIPE_PORT, upstream_port))
    try:
        postfix.start()
        port = free_port()
        daemon = run_daemon(daemon_config(tmp_path, port,
                                          toml.replace(RECIPE_PORT, upstream_port)), port)
        sent = swaks(port, USER, "carol@elsewhere.test")
        assert sent.returncode == 0, sent.stdout + sent.stderr + postfix.logs()
        match = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", sent.stdout)
        assert match, sent.stdout
        queue_id = match.group(1)
        log = postfix.wait_for_log(f"{queue_id}: hold:")
        assert re.search(rf"{queue_id}: client=unknown\[127\.0\.0\.1\]:\d+,"
                         rf" sasl_method=XCLIENT, sasl_username={re.escape(USER)}\n", log), log
        assert re.search(rf"{queue_id}: hold: .* from=<{re.escape(USER)}>"
                         r" to=<carol@elsewhere\.test> proto=ESMTP helo=<alice-laptop>", log)
        assert queue_id in postfix.held()
        assert re.search(rf"message \S+ accepted: from=<{re.escape(USER)}> recipients=1"
                         rf" size=\d+ user={re.escape(USER)} reply=250 Ok: queued as"
                         rf" {queue_id}", daemon.log_text())

        refused = swaks(port, "bob@example.test", "carol@elsewhere.test")
        assert ("<** 553 5.7.1 <bob@example.test>: Sender address rejected: not owned by"
                f" user {USER}") in refused.stdout, refused.stdout
        assert "bob@example.test" not in postfix.logs()
    finally:
        postfix.cleanup()
