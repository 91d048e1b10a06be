"""Dropping root after the listeners are bound (``[server] user`` / ``group``)."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from twisted.logger import Logger

log = Logger(namespace="saslsmtp")


@dataclass(frozen=True)
class Identity:
    """Who to become: a user id, its group id, and the user name for supplementary groups."""

    uid: int
    gid: int
    name: str


def resolve(user: str | None, group: str | None) -> Identity | None:
    """The identity ``[server] user``/``group`` name (``group`` defaults to the user's
    primary group); ``None`` when neither is set."""
    if user is None and group is None:
        return None
    entry = pwd.getpwnam(user) if user is not None else pwd.getpwuid(os.getuid())
    gid = grp.getgrnam(group).gr_gid if group is not None else entry.pw_gid
    return Identity(entry.pw_uid, gid, entry.pw_name)


def check(identity: Identity | None) -> None:
    """Refuse to start when ``identity`` can never be reached: not root and not it."""
    if identity is not None and os.getuid() != 0 and (os.getuid(), os.getgid()) != (identity.uid, identity.gid):
        raise SystemExit(f"saslsmtp: server.user/group ask for uid {identity.uid} gid"
                         f" {identity.gid}, but the daemon runs as uid {os.getuid()} and is"
                         " not root, so it cannot switch")


def drop(identity: Identity | None) -> None:
    """Become ``identity`` for good (group first, then supplementary groups, then user).

    Not root: nothing can be changed, so it must already be that user, else this refuses
    to run as someone the administrator did not choose."""
    if identity is None:
        return
    check(identity)
    if os.getuid() != 0:
        return
    os.setgid(identity.gid)
    os.initgroups(identity.name, identity.gid)
    os.setuid(identity.uid)
    if os.getuid() == 0 and identity.uid != 0:  # pragma: no cover - defensive
        raise SystemExit("saslsmtp: could not drop root privileges")
    log.info("running as uid {uid} gid {gid}", uid=identity.uid, gid=identity.gid)
