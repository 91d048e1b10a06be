"""A reload (SIGHUP) of a real daemon with ``store = "memory"`` keeps the limits'
counters: an attacker gets no fresh budget because the operator reloaded.  Unchanged
limits continue where they were; a changed rate keeps the events counted so far and
measures them against the new limit; connection slots held by sessions older than the
reload are still counted and given back."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.limitsnet import PASSWORD, auth_plain, connect, daemon, users_toml, wait_for_log

LIMITS = 'store = "memory"\nauth_failures_per_ip = "3/1m"\nconnections_per_ip = 2\n'


def reload(server, count: int) -> None:
    server.process.send_signal(signal.SIGHUP)
    wait_for_log(server, "reloaded", count=count)


def codes(port: int, source: str, tries: int, tag: str) -> list[int]:
    """``tries`` distinct wrong passwords from ``source``: their AUTH reply codes."""
    return [auth_plain(port, "alice", f"{tag}-{i}", source).code for i in range(tries)]


def test_unchanged_limits_keep_counting_across_a_reload(tmp_path: Path) -> None:
    """Two failures, reload, one more failure: the fourth attempt is refused unchecked
    (3 per minute), as without the reload.  A connection opened before the reload
    still holds its slot (2 per address): one more fits, a third gets 421; once the old
    one closes, its slot is free again."""
    server = daemon(tmp_path, "d", LIMITS, users_toml(tmp_path, {"alice": PASSWORD}))
    try:
        assert codes(server.port, "127.0.0.71", 2, "before") == [535, 535]
        old, old_file, banner = connect(server.port, "127.0.0.72")
        assert banner.startswith(b"220")
        reload(server, 1)
        assert codes(server.port, "127.0.0.71", 2, "after") == [535, 454]
        assert auth_plain(server.port, "alice", PASSWORD, "127.0.0.70").code == 235
        second, second_file, banner = connect(server.port, "127.0.0.72")
        assert banner.startswith(b"220")
        third, third_file, banner = connect(server.port, "127.0.0.72")
        assert banner.startswith(b"421 4.7.0 Too many connections from 127.0.0.72"), banner
        for sock, f in ((third, third_file), (old, old_file)):
            f.close()
            sock.close()
        wait_for_log(server, "session end client=127.0.0.72", count=2)
        again, again_file, banner = connect(server.port, "127.0.0.72")
        assert banner.startswith(b"220"), banner
        for sock, f in ((again, again_file), (second, second_file)):
            f.close()
            sock.close()
    finally:
        server.stop()


def test_a_changed_rate_keeps_the_failures_counted_so_far(tmp_path: Path) -> None:
    """Three failures fill "3/1m"; the operator raises it to "6/1m" and reloads: the three
    still count, so three more are checked (535) and the next is refused (454)."""
    server = daemon(tmp_path, "d", LIMITS, users_toml(tmp_path, {"alice": PASSWORD}))
    try:
        assert codes(server.port, "127.0.0.73", 4, "before") == [535, 535, 535, 454]
        config = tmp_path / "d" / "saslsmtp.toml"
        config.write_text(config.read_text().replace('"3/1m"', '"6/1m"'))
        reload(server, 1)
        assert codes(server.port, "127.0.0.73", 4, "after") == [535, 535, 535, 454]
    finally:
        server.stop()
