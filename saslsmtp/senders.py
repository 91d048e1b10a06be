"""Sender policy: may this login use this ``MAIL FROM`` address?  No Twisted, no I/O
beyond reading the map file.

``[submission]``::

    sender_policy = "login"     # "any" | "login" | "map"
    sender_map = "etc/senders"  # for "map"
    allow_null_sender = true    # MAIL FROM:<>

* ``any``: every address.  ``login``: the address must be the login itself.  ``map``:
  the address must be listed for the login in the map file, whose lines are
  ``user: addr1, addr2, @domain`` (``@domain``: any address at that domain); blank
  lines and lines starting with ``#`` are ignored.
* Addresses compare with the **domain case-insensitive** and the local part exact
  (RFC 5321 2.4: only the receiving host may fold a local part).  Logins compare exactly,
  as in the users file.  UTF-8 addresses (SMTPUTF8, RFC 6531) compare the same way, and a
  domain written with U-labels is the same domain as its A-labels: ``jörg@exämple.de``,
  ``jörg@EXÄMPLE.de`` and ``jörg@xn--exmple-cua.de`` are one address, in a MAIL, a
  login or the map (IDNA 2008 with the UTS 46 mapping, ``saslsmtp.domains``).  The
  local part is compared as the octets it is: ``jörg`` composed and decomposed differ.
* The map is re-read when its device, inode, size or mtime changes (the users file's
  pattern); a line that cannot be used is logged by number and skipped, the first line
  for a login wins.  A map that cannot be read refuses with ``451 4.3.0`` (a deleted map
  must not keep its grants alive).
* A refusal is ``553 5.7.1 <addr>: Sender address rejected: not owned by user <login>``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from saslsmtp.octets import config_lines
from saslsmtp.replies import REPLIES, SMTPReply
from saslsmtp.domains import domain_key

POLICIES = ("any", "login", "map")
_ADDRESS = re.compile(r"^[^\s@<>,:]+@[^\s@<>,:]+$")
_DOMAIN = re.compile(r"^@[^\s@<>,:]+$")
_SAFE = re.compile(r"[^\x21-\x7e]")


@dataclass(frozen=True)
class SubmissionOptions:
    """``[submission]``."""

    sender_policy: str = "any"
    sender_map: str | None = None
    allow_null_sender: bool = True


@dataclass(frozen=True)
class SenderDecision:
    """``allowed``, or the ``reply`` to send instead of the MAIL FROM's 250."""

    allowed: bool
    reply: SMTPReply | None = None


ALLOWED = SenderDecision(True)


def normalise(address: str) -> str:
    """``Local@Example.ORG`` -> ``Local@example.org``, ``jörg@EXÄMPLE.de`` ->
    ``jörg@xn--exmple-cua.de`` (the key addresses compare by)."""
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain_key(domain)}" if at else address


@dataclass(frozen=True)
class SenderGrants:
    """What one login may send as: exact addresses and whole domains (both normalised)."""

    addresses: frozenset[str]
    domains: frozenset[str]
    line: int

    def allows(self, address: str) -> bool:
        key = normalise(address)
        return key in self.addresses or key.rpartition("@")[2] in self.domains


@dataclass(frozen=True)
class ParsedSenderMap:
    """The usable lines of a map, and ``(line, problem)`` for every skipped one."""

    grants: Mapping[str, SenderGrants]
    problems: tuple[tuple[int, str], ...]


def parse_sender_map(data: bytes) -> ParsedSenderMap:
    """Parse map bytes; problems name the line and what is wrong."""
    grants: dict[str, SenderGrants] = {}
    problems: list[tuple[int, str]] = []
    for number, line in config_lines(data, problems):
        user, sep, rest = line.partition(":")
        user = user.strip()
        if not sep:
            problems.append((number, "no ':' (want user: addr1, addr2, @domain)"))
            continue
        if not user:
            problems.append((number, "empty user name"))
            continue
        items = [i.strip() for i in rest.split(",")]
        if not any(items):
            problems.append((number, f"no address for {user!r}"))
            continue
        bad = [i for i in items if not (_ADDRESS.match(i) or _DOMAIN.match(i))]
        if bad:
            problems.append((number, f"not an address or @domain: {bad[0]!r}"))
            continue
        if user in grants:
            problems.append((number, f"duplicate user {user!r} (first on line "
                                     f"{grants[user].line})"))
            continue
        grants[user] = SenderGrants(
            frozenset(normalise(i) for i in items if not i.startswith("@")),
            frozenset(domain_key(i[1:]) for i in items if i.startswith("@")), number)
    return ParsedSenderMap(grants, tuple(problems))


def check_sender_map(path: str) -> list[tuple[int | None, str]]:
    """For ``--check``: every problem of the map at ``path`` as ``(line, message)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return [(None, f"cannot read: {e.strerror}")]
    return list(parse_sender_map(data).problems)


class SenderMap:
    """The map file, re-read when it changes (``stat`` injectable for tests)."""

    def __init__(self, path: str, *, stat: Callable[[str], Any] = os.stat,
                 log: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._stat = stat
        self._log = log
        self._key: tuple[int, int, int, int] | None = None
        self._grants: Mapping[str, SenderGrants] = {}

    def report(self, message: str) -> None:
        """A problem with the map, to the log it was given (none: tests)."""
        if self._log is not None:
            self._log(message)

    def grants(self) -> Mapping[str, SenderGrants]:
        """The current grants; raises ``OSError`` if the file cannot be read."""
        st = self._stat(self.path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            with open(self.path, "rb") as f:
                parsed = parse_sender_map(f.read())
            if self._log is not None:
                for line, message in parsed.problems:
                    self._log(f"{self.path}:{line}: {message} (line skipped)")
            self._grants, self._key = parsed.grants, key
        return self._grants


def _safe(text: str) -> str:
    return _SAFE.sub("?", text)[:256]


def refusal(address: str, login: str) -> SMTPReply:
    """``553 5.7.1 <addr>: Sender address rejected: not owned by user <login>``."""
    return REPLIES["sender_not_owned"].with_text(
        f"<{_safe(address)}>: Sender address rejected: not owned by user {_safe(login)}")


class SenderPolicy:
    """Decides ``(login, MAIL FROM address)``; build it with ``from_options``."""

    def __init__(self, policy: str = "any", *, sender_map: SenderMap | None = None,
                 allow_null_sender: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown sender policy {policy!r}")
        if policy == "map" and sender_map is None:
            raise ValueError('sender_policy "map" needs a sender map')
        self.policy = policy
        self.sender_map = sender_map
        self.allow_null_sender = allow_null_sender

    @classmethod
    def from_options(cls, options: SubmissionOptions,
                     log: Callable[[str], None] | None = None) -> "SenderPolicy":
        sender_map = SenderMap(options.sender_map, log=log) if options.sender_map else None
        return cls(options.sender_policy, sender_map=sender_map,
                   allow_null_sender=options.allow_null_sender)

    def check(self, login: str, address: str) -> SenderDecision:
        """May ``login`` send as ``address`` (``""`` is the null sender ``<>``)?"""
        if address == "":
            return ALLOWED if self.allow_null_sender else SenderDecision(
                False, refusal("", login))
        if self.policy == "any":
            return ALLOWED
        if self.policy == "login":
            ok = "@" in login and normalise(address) == normalise(login)
            return ALLOWED if ok else SenderDecision(False, refusal(address, login))
        assert self.sender_map is not None
        try:
            grants = self.sender_map.grants()
        except OSError as e:  # every MAIL says 451 until it is readable: the log says why
            self.sender_map.report(f"{self.sender_map.path}: cannot read the sender map:"
                                   f" {e.strerror}; MAIL answered 451")
            return SenderDecision(False, REPLIES["local_error"])
        entry = grants.get(login)
        if entry is not None and entry.allows(address):
            return ALLOWED
        return SenderDecision(False, refusal(address, login))


def parse_submission(table: Any, problem: Callable[[str, str], None],
                     base: Path | None = None) -> SubmissionOptions | None:
    """The ``[submission]`` table (``None`` after reporting problems via ``problem``)."""
    if not isinstance(table, dict):
        problem("submission", "must be a table")
        return None
    ok = True
    values: dict[str, Any] = {}
    kinds = {"sender_policy": str, "sender_map": str, "allow_null_sender": bool}
    for key, value in table.items():
        if key not in kinds:
            problem(f"submission.{key}", f"unknown key (known: {', '.join(sorted(kinds))})")
            ok = False
        elif not isinstance(value, kinds[key]):
            problem(f"submission.{key}",
                    "must be a boolean" if kinds[key] is bool else "must be a string")
            ok = False
        else:
            values[key] = value
    if isinstance(values.get("sender_map"), str) and base is not None:
        values["sender_map"] = str((base / values["sender_map"]).resolve())
    options = SubmissionOptions(**values)
    if options.sender_policy not in POLICIES:
        problem("submission.sender_policy", 'must be "any", "login" or "map"')
        ok = False
    if options.sender_policy == "map":
        if not options.sender_map:
            problem("submission.sender_map", 'is required with sender_policy = "map"')
            ok = False
        elif not Path(options.sender_map).is_file():
            problem("submission.sender_map", f"no such file: {options.sender_map}")
            ok = False
    return options if ok else None
