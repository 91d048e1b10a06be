"""``[server] user``/``group`` without root: resolved by name, refused when unreachable."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from saslsmtp import privileges
from saslsmtp.privileges import Identity


def test_nothing_to_resolve_or_drop() -> None:
    """Neither user nor group: no identity, and dropping it changes nothing."""
    assert privileges.resolve(None, None) is None
    before = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
    assert privileges.drop(None) is None
    assert privileges.check(None) is None  # nothing to refuse
    assert (os.getresuid(), os.getresgid(), sorted(os.getgroups())) == before


def test_group_alone_keeps_the_current_user() -> None:
    """``group`` without ``user``: the current user, in that group."""
    me = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(os.getgid()).gr_name
    assert privileges.resolve(None, group) == Identity(me.pw_uid, os.getgid(), me.pw_name)


def test_unreachable_identity_is_refused_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root and not already that user: refuse to start (exit with the reason)."""
    monkeypatch.setattr(privileges.os, "getuid", lambda: 1000)
    monkeypatch.setattr(privileges.os, "getgid", lambda: 1000)
    with pytest.raises(SystemExit, match="ask for uid 65534 gid 65534, but the daemon runs"
                                          " as uid 1000 and is not root"):
        privileges.drop(Identity(65534, 65534, "nobody"))


def test_already_that_identity_without_root_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not root but already the configured user and group: nothing to change."""
    monkeypatch.setattr(privileges.os, "getuid", lambda: 1000)
    monkeypatch.setattr(privileges.os, "getgid", lambda: 1000)
    calls: list[str] = []
    monkeypatch.setattr(privileges.os, "setuid", lambda uid: calls.append("setuid"))
    privileges.drop(Identity(1000, 1000, "someone"))
    assert calls == []
