"""The ``type = "ldap"`` checker against a real OpenLDAP slapd (tests/slapd.py).

Each test builds an ``LdapChecker`` with a real ``ThreadPoolRunner`` on pytest-twisted's
reactor and talks to one module-wide slapd on loopback.  Tests that stop or pause slapd
bring it back in ``finally``.
"""

from __future__ import annotations

import re

import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ldap3
import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import globalLogPublisher, formatEvent

from saslsmtp.checkers import ldap as ldap_module
from saslsmtp.checkers.ldap import (Directory, Endpoint, LdapChecker, LdapOptions, escape_dn_value,
                                    escape_filter_value, from_config)
from saslsmtp.checkers.ldappool import IdlePool
from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.config import ConfigError, parse_config
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.threads import ThreadPoolRunner
from tests.slapd import (ALICE, BOB, ODD_DN, ODD_FILTER, PEOPLE, READER_DN, READER_PASSWORD,
                         REQUIRE_GROUP, SlapdServer, free_port, parse_operations,
                         running_slapd)

TEMPLATE = f"uid={{username}},{PEOPLE}"
TIMEOUT = 1.0
# The timeout tests allow this much on top of ``timeout`` (measured: about 2-5 ms).
MARGIN = 0.5

# RFC 4514 section 4 examples (attribute values) and RFC 4515 section 4 examples.
RFC4514_VALUES = [
    ('James "Jim" Smith, III', 'James \\"Jim\\" Smith\\, III'),
    ("Before\rAfter", "Before\\0dAfter"),
    ("Sales+J. Smith", "Sales\\+J. Smith"),
    (" Sue ", "\\ Sue\\ "),
    ("#hash", "\\#hash"),
    ("a=b;c<d>e\\f", "a\\=b\\;c\\<d\\>e\\\\f"),
    ("nul\x00", "nul\\00"),
    ("Lu\u010di\u0107", "Lu\u010di\u0107"),
]
RFC4515_VALUES = [
    ("Parens R Us (for all your parenthetical needs)",
     "Parens R Us \\28for all your parenthetical needs\\29"),
    ("*", "\\2a"),
    ("C:\\MyFile", "C:\\5cMyFile"),
    ("\x00\x00\x00\x04", "\\00\\00\\00\\04"),
]


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    """One seeded slapd for the whole module."""
    yield from running_slapd()


@pytest.fixture
def make_checker(slapd: SlapdServer) -> Iterator[Callable[..., LdapChecker]]:
    """Factory: ``make_checker(**options)`` -> a checker on a fresh runner, stopped afterwards.

    Defaults: the plain URL, ``timeout = TIMEOUT``, 4 threads, DN template mode.
    """
    from twisted.internet import reactor
    made: list[LdapChecker] = []

    def make(directory_kwargs: dict[str, Any] | None = None, **options: Any) -> LdapChecker:
        values: dict[str, Any] = {"url": (slapd.url,), "timeout": TIMEOUT, "threads": 4}
        if "search_base" not in options:
            values["user_dn"] = TEMPLATE
        values.update(options)
        config = LdapOptions(**values)
        runner = ThreadPoolRunner(reactor, "ldap-test", config.threads)
        checker = LdapChecker("test", Directory(config, **(directory_kwargs or {})), runner)
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.stop()


def search_options(**more: Any) -> dict[str, Any]:
    """Search-then-bind by uid with the reader service account."""
    return {"search_base": PEOPLE, "search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
            "search_dn": READER_DN, "search_password": READER_PASSWORD, **more}


async def outcome(checker: LdapChecker, username: str | bytes, password: str | bytes) -> str:
    """'accept', 'reject' or 'tempfail' for one login; checks the avatar id on accept."""
    user = username.encode("utf-8") if isinstance(username, str) else username
    pw = password.encode("utf-8") if isinstance(password, str) else password
    try:
        avatar = await checker.requestAvatarId(PasswordCredentials(user, pw))
    except UnauthorizedLogin:
        return "reject"
    except TemporaryFailure:
        return "tempfail"
    assert avatar == user
    return "accept"


class LogCapture:
    """Collects formatted twisted.logger events while installed."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event) + repr(event.get("log_failure", "")))


@pytest.fixture
def captured_log() -> Iterator[LogCapture]:
    """Every log event emitted during the test, formatted."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


# ---- escaping (pure) ------------------------------------------------------


@pytest.mark.parametrize("value,escaped", RFC4514_VALUES)
def test_escape_dn_value_rfc4514(value: str, escaped: str) -> None:
    """DN values are escaped per RFC 4514 section 2.4 (its section 4 examples included)."""
    assert escape_dn_value(value) == escaped


@pytest.mark.parametrize("value,escaped", RFC4515_VALUES)
def test_escape_filter_value_rfc4515(value: str, escaped: str) -> None:
    """Filter values are escaped per RFC 4515 (its section 4 examples)."""
    assert escape_filter_value(value).lower() == escaped.lower()


@pytest.mark.parametrize("url,endpoint", [
    ("ldap://127.0.0.1", Endpoint("127.0.0.1", 389, False)),
    ("ldaps://ldap.example.test", Endpoint("ldap.example.test", 636, True)),
    ("LDAP://[::1]:3389/", Endpoint("::1", 3389, False)),
])
def test_endpoint_parse(url: str, endpoint: Endpoint) -> None:
    """Server URLs: scheme picks TLS and the default port."""
    assert Endpoint.parse(url) == endpoint


@pytest.mark.parametrize("url", ["http://x", "ldap://", "ldap://h/dc=x", "ldapi:///run/s",
                                 "ldap://u@h"])
def test_endpoint_parse_rejects(url: str) -> None:
    """Anything but ``ldap[s]://host[:port]`` is refused."""
    with pytest.raises(ValueError):
        Endpoint.parse(url)


def test_credentials_in_an_ldap_url_are_refused_without_repeating_them(tmp_path: Path) -> None:
    """``ldap://cn=admin:PASSWORD@host`` is refused by --check (as any URL with a user
    name was), which now says where the service account goes and no longer prints the
    URL with its password; an unescaped ``/`` in the password changes nothing."""
    import os
    import subprocess
    from tests.support import ROOT, twistd_command, write_config
    secret = "Ldap-Url-Secret-7"
    config = write_config(tmp_path, f'[backends.dir]\ntype = "ldap"\nurl = ['
                                    f'"ldap://cn=admin:{secret}@127.0.0.1",'
                                    f' "ldaps://cn=admin:x/{secret}@127.0.0.1:636"]\n'
                                    'user_dn = "uid={username},dc=example,dc=test"\n')
    out = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1, out.stdout
    for shown in ("'ldap://cn=admin:***@127.0.0.1'", "'ldaps://cn=admin:***@127.0.0.1:636'"):
        assert (f"backends.dir.url: not an ldap:// or ldaps:// server URL: {shown} (a user"
                " name or password in the URL is not used: the service account goes in"
                " search_dn and search_password)") in out.stderr
    assert secret not in out.stdout + out.stderr


# ---- DN template ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_template_bind(make_checker: Callable[..., LdapChecker]) -> None:
    """Template bind: right password accepts, wrong password and unknown user reject."""
    checker = make_checker()
    assert await outcome(checker, "alice", ALICE.password) == "accept"  # {SSHA} stored
    assert await outcome(checker, "bob", BOB.password) == "accept"  # non-ASCII password
    assert await outcome(checker, "alice", "wrong") == "reject"
    assert await outcome(checker, "alice", BOB.password) == "reject"
    assert await outcome(checker, "nobody", "whatever") == "reject"


@pytest_twisted.ensureDeferred
async def test_template_escapes_dn_specials(make_checker: Callable[..., LdapChecker]) -> None:
    """A uid full of DN specials (``,=+\\"``) reaches its own entry, so escaping is right."""
    checker = make_checker()
    assert await outcome(checker, ODD_DN.uid, ODD_DN.password) == "accept"
    assert await outcome(checker, ODD_DN.uid, "wrong") == "reject"


@pytest.mark.parametrize("username", [
    "alice,ou=people,dc=example,dc=test", "alice+uid=alice", "\\", "=", ",", "alice\\",
    "alice\x00", "#alice", "alice,", "uid=alice", "*", "alice)(uid=*",
])
@pytest_twisted.ensureDeferred
async def test_template_injection_rejected(make_checker: Callable[..., LdapChecker],
                                           username: str) -> None:
    """DN injection attempts are rejected as wrong credentials (never a 454 from a bad DN)."""
    assert await outcome(make_checker(), username, ALICE.password) == "reject"


@pytest_twisted.ensureDeferred
async def test_directory_matching_rules_apply(make_checker: Callable[..., LdapChecker]) -> None:
    """Name matching is the directory's: uid is caseIgnoreMatch in OpenLDAP, which also
    drops leading and trailing spaces, so these are alice (and reported as typed)."""
    checker = make_checker()
    for typed in ("ALICE", " alice", "alice "):
        assert await outcome(checker, typed, ALICE.password) == "accept"


# ---- search then bind -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_search_then_bind(make_checker: Callable[..., LdapChecker]) -> None:
    """Search-then-bind with the reader account: ok, wrong password, unknown user."""
    checker = make_checker(**search_options())
    assert await outcome(checker, "alice", ALICE.password) == "accept"
    assert await outcome(checker, "bob", BOB.password) == "accept"
    assert await outcome(checker, "alice", "wrong") == "reject"
    assert await outcome(checker, "nobody", "whatever") == "reject"


@pytest_twisted.ensureDeferred
async def test_search_by_mail_and_ambiguity(make_checker: Callable[..., LdapChecker]) -> None:
    """A filter on mail finds the unique entry; two entries with one address reject."""
    checker = make_checker(**search_options(search_filter="(mail={username})"))
    assert await outcome(checker, ALICE.mail, ALICE.password) == "accept"
    assert await outcome(checker, "shared@example.test", "twin-pw") == "reject"


@pytest_twisted.ensureDeferred
async def test_search_anonymous(make_checker: Callable[..., LdapChecker]) -> None:
    """Without search_dn the search is anonymous (this directory allows it)."""
    checker = make_checker(search_base=PEOPLE, search_filter="(uid={username})")
    assert await outcome(checker, "alice", ALICE.password) == "accept"


@pytest_twisted.ensureDeferred
async def test_search_escapes_filter_specials(make_checker: Callable[..., LdapChecker]) -> None:
    """A uid with ``*()`` in it is found exactly, so the filter value is escaped."""
    checker = make_checker(**search_options())
    assert await outcome(checker, ODD_FILTER.uid, ODD_FILTER.password) == "accept"


@pytest.mark.parametrize("username", [
    "*", "al*", "*ice", "a*e", "*)(uid=*", "alice)(|(uid=*", "alice)(uid=*", "alice)",
    "(uid=alice)", "alice\x00", "\\61lice", "alice\\",
])
@pytest_twisted.ensureDeferred
async def test_search_injection_rejected(make_checker: Callable[..., LdapChecker],
                                         username: str) -> None:
    """Filter injection attempts with alice's password are rejected.

    Unescaped, ``al*`` would find exactly alice and log in as her, ``\\61lice`` would be
    ``alice``, and the broken filters would be a 454, not a 535.
    """
    assert await outcome(make_checker(**search_options()), username, ALICE.password) == "reject"


@pytest_twisted.ensureDeferred
async def test_wrong_service_password_is_temporary(
        make_checker: Callable[..., LdapChecker], captured_log: LogCapture) -> None:
    """A refused service-account bind is our configuration problem: 454, not 535."""
    checker = make_checker(**search_options(search_password="not-the-reader-password"))
    try:
        await checker.requestAvatarId(PasswordCredentials(b"alice", ALICE.password.encode()))
    except TemporaryFailure as e:
        assert "search_password" in str(e)
        assert "not-the-reader-password" not in str(e)
        assert ALICE.password not in str(e)
    else:
        pytest.fail("expected TemporaryFailure")


@pytest_twisted.ensureDeferred
async def test_connections_kept_open_and_reused(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """Five search-then-bind logins on one thread: slapd accepts two connections in all
    (the reader's, bound once, and one for the users, re-bound five times); nothing is
    unbound, and the pooled connection does not keep the last password."""
    made: list[Any] = []

    def connection(*args: Any, **kwargs: Any) -> Any:
        conn = ldap3.Connection(*args, **kwargs)
        made.append(conn)
        return conn

    checker = make_checker(directory_kwargs={"connection_factory": connection},
                           **search_options(threads=1))
    lines = len(slapd.log_text().splitlines())
    for user in (ALICE, BOB, ALICE, BOB, ALICE):
        assert await outcome(checker, user.uid, user.password) == "accept"
    log = slapd.log_text().splitlines()[lines:]
    operations = parse_operations(log)
    binds = [o.text for o in operations if o.kind == "BIND"]
    assert sum(f'dn="{READER_DN}"' in b for b in binds) == 1
    assert sum(f'dn="{ALICE.dn}"' in b for b in binds) == 3
    assert sum(f'dn="{BOB.dn}"' in b for b in binds) == 2
    assert sum(" ACCEPT from " in line for line in log) == 2
    assert not [o for o in operations if o.kind == "UNBIND"]
    assert len(made) == 2 and not any(c.closed for c in made)
    for conn in made:  # ldap3 keeps the password in .password and, decoded, in .request
        assert conn.password is None
        state = repr(vars(conn))
        assert not any(pw in state for pw in (ALICE.password, BOB.password, READER_PASSWORD))


@pytest_twisted.ensureDeferred
async def test_template_logins_reuse_a_bounded_set_of_connections(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """40 concurrent DN-template logins, right and wrong passwords mixed, on 4 threads:
    slapd accepts at most 4 connections (the pool), every login gets its verdict."""
    from twisted.internet.defer import ensureDeferred, gatherResults
    checker = make_checker(threads=4, pool_size=4)
    before = len(slapd.accept_lines())
    results = await gatherResults([ensureDeferred(outcome(
        checker, "alice" if i % 2 else "bob",
        (ALICE.password if i % 2 else BOB.password) if i % 3 else "wrong"))
        for i in range(40)])
    assert results == ["accept" if i % 3 else "reject" for i in range(40)]
    assert 1 <= len(slapd.accept_lines()) - before <= 4


def test_failed_bind_on_a_pooled_connection_leaves_it_anonymous(slapd: SlapdServer) -> None:
    """alice binds, then bob's wrong password on the same pooled connection: the
    connection is anonymous afterwards (WHOAMI says so), not still alice; bob's identity
    read after his right password is bob's, not alice's."""
    directory = Directory(LdapOptions(url=(slapd.url,), user_dn=TEMPLATE, timeout=TIMEOUT,
                                      threads=1, pool_size=1, identity_attribute="uid"))
    try:
        pool = directory._user_pools[directory.endpoints[0]]
        assert directory.verify("alice", ALICE.password.encode()).identity == "alice"
        [conn] = [i.conn for i in pool._idle]
        with pytest.raises(UnauthorizedLogin):
            directory.verify("bob", b"wrong")
        assert [i.conn for i in pool._idle] == [conn]  # kept: the same connection
        assert conn.extend.standard.who_am_i() in (None, "")  # anonymous, not alice
        assert directory.verify("bob", BOB.password.encode()).identity == "bob"
        assert [i.conn for i in pool._idle] == [conn]
    finally:
        directory.close()
    assert conn.closed


@pytest_twisted.ensureDeferred
async def test_searches_run_as_the_service_account_only(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """Search-then-bind after failed and successful user binds, one thread: every search
    for a user runs on a connection bound as the reader; every search of a user's own
    entry on a connection bound as that user, right after the bind."""
    checker = make_checker(**search_options(threads=1, require_filter=REQUIRE_GROUP))
    lines = len(slapd.log_text().splitlines())
    for user, password, verdict in ((ALICE, "wrong", "reject"),
                                    (ALICE, ALICE.password, "accept"),
                                    (BOB, "wrong", "reject"),
                                    (ALICE, ALICE.password, "accept"),
                                    (BOB, BOB.password, "reject")):  # not in the group
        assert await outcome(checker, user.uid, password) == verdict
    operations = parse_operations(slapd.log_text().splitlines()[lines:])
    searches = [o for o in operations if o.kind == "SRCH"]
    finds = [o for o in searches if f'base="{PEOPLE}"' in o.text]
    own = [o for o in searches if f'base="{PEOPLE}"' not in o.text]
    assert len(finds) == 5 and all(o.bound_as == READER_DN for o in finds)
    assert len(own) == 3
    assert all(o.bound_as in o.text for o in own), own


@pytest_twisted.ensureDeferred
async def test_broken_pooled_connection_is_replaced(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """A pooled connection that the server has dropped (slapd restarted) is closed and the
    login goes on over a new one: no 454, and the pool holds only live connections."""
    made: list[Any] = []

    def connection(*args: Any, **kwargs: Any) -> Any:
        made.append(ldap3.Connection(*args, **kwargs))
        return made[-1]

    checker = make_checker(threads=1, directory_kwargs={"connection_factory": connection})
    pool = checker.directory._user_pools[checker.directory.endpoints[0]]
    assert await outcome(checker, "alice", ALICE.password) == "accept"
    [stale] = [i.conn for i in pool._idle]
    slapd.stop()
    slapd.start()
    assert await outcome(checker, "alice", ALICE.password) == "accept"
    assert stale.closed
    [fresh] = [i.conn for i in pool._idle]
    assert made == [stale, fresh] and not fresh.closed


def test_idle_pool_bounds_order_and_expiry() -> None:
    """``IdlePool``: at most ``size`` kept (the surplus closed), last given first taken,
    closed or too-long-idle connections closed instead of handed out, ``shut`` closes
    the idle ones and any given back later."""
    class Conn:
        def __init__(self, name: str) -> None:
            self.name, self.closed = name, False

    now = [0.0]
    closed: list[str] = []
    pool = IdlePool(2, lambda c: closed.append(c.name), clock=lambda: now[0], max_idle=10)
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    for conn in (a, b, c):
        pool.give(conn)
    assert closed == ["c"] and len(pool) == 2
    assert pool.take() is b and pool.take() is a and pool.take() is None
    pool.give(a)
    now[0] = 11.0
    pool.give(b)
    assert closed == ["c", "a"] and pool.take() is b
    b.closed = True
    pool.give(b)
    assert closed == ["c", "a", "b"]
    pool.give(c)
    pool.shut()
    assert closed[-1] == "c" and len(pool) == 0
    pool.give(a)
    assert closed[-1] == "a" and len(pool) == 0
    with pytest.raises(ValueError):
        IdlePool(0, lambda c: None)


# ---- empty password ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_empty_password_rejected_without_bind(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """An empty password is rejected up front: slapd's log shows no bind for it.

    bob's login afterwards proves the log segment is complete.
    """
    made: list[Any] = []

    def connection(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs.get("user"))
        return ldap3.Connection(*args, **kwargs)

    for checker in (make_checker(directory_kwargs={"connection_factory": connection}),
                    make_checker(directory_kwargs={"connection_factory": connection},
                                 **search_options())):
        before = len(slapd.bind_lines())
        assert await outcome(checker, "alice", b"") == "reject"
        assert made == []
        assert await outcome(checker, "bob", BOB.password) == "accept"
        binds = slapd.bind_lines()[before:]
        assert any(f'dn="{BOB.dn}"' in b for b in binds)
        assert not any(f'dn="{ALICE.dn}"' in b or 'BIND dn=""' in b for b in binds)
        made.clear()


def test_directory_refuses_empty_password_itself() -> None:
    """``Directory.verify`` refuses an empty password too, before any connection."""
    def no_connection(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no connection may be made")

    directory = Directory(LdapOptions(url=("ldap://127.0.0.1:1",), user_dn=TEMPLATE),
                          connection_factory=no_connection)
    with pytest.raises(UnauthorizedLogin):
        directory.verify("alice", b"")


@pytest_twisted.ensureDeferred
async def test_empty_or_undecodable_username_rejected(
        make_checker: Callable[..., LdapChecker]) -> None:
    """An empty or non-UTF-8 username is rejected without reaching the directory."""
    checker = make_checker()
    assert await outcome(checker, b"", ALICE.password) == "reject"
    assert await outcome(checker, b"\xff\xfe", ALICE.password) == "reject"


# ---- require_filter --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_require_filter(make_checker: Callable[..., LdapChecker]) -> None:
    """Group membership via memberOf: alice (member) passes, bob (right password) fails."""
    for options in ({}, search_options()):
        checker = make_checker(require_filter=REQUIRE_GROUP, **options)
        assert await outcome(checker, "alice", ALICE.password) == "accept"
        assert await outcome(checker, "bob", BOB.password) == "reject"
        assert await outcome(checker, "alice", "wrong") == "reject"


# ---- identity_attribute ----------------------------------------------------


async def avatar(checker: LdapChecker, username: str, password: str) -> bytes:
    """The avatar id (the session identity) the checker gives for one login."""
    return await checker.requestAvatarId(PasswordCredentials(username.encode("utf-8"),
                                                             password.encode("utf-8")))


@pytest_twisted.ensureDeferred
async def test_identity_attribute_names_the_user(make_checker: Callable[..., LdapChecker]) -> None:
    """With identity_attribute = "uid" the identity is the directory's uid, whatever was
    typed: a mail address (search by mail) or another case/spacing (DN template); without
    it, the name as typed."""
    by_mail = make_checker(**search_options(search_filter="(mail={username})",
                                            identity_attribute="uid"))
    assert await avatar(by_mail, ALICE.mail, ALICE.password) == b"alice"
    assert await avatar(by_mail, BOB.mail, BOB.password) == b"bob"
    template = make_checker(identity_attribute="uid")
    assert await avatar(template, " ALICE", ALICE.password) == b"alice"
    assert await avatar(make_checker(), " ALICE", ALICE.password) == b" ALICE"
    with pytest.raises(UnauthorizedLogin):
        await avatar(by_mail, ALICE.mail, "wrong")


@pytest_twisted.ensureDeferred
async def test_identity_attribute_with_require_filter_and_missing_values(
        make_checker: Callable[..., LdapChecker], captured_log: LogCapture) -> None:
    """One search serves both; an attribute the entry lacks refuses the login (logged),
    it never falls back to the typed name."""
    checker = make_checker(require_filter=REQUIRE_GROUP, identity_attribute="cn")
    assert await avatar(checker, "ALICE", ALICE.password) == b"alice"
    assert await outcome(checker, "bob", BOB.password) == "reject"
    lacking = make_checker(identity_attribute="displayName")
    assert await outcome(lacking, "alice", ALICE.password) == "reject"
    assert any("identity_attribute displayName has 0 values" in line
               for line in captured_log.lines)


# ---- TLS -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ldaps_and_start_tls(slapd: SlapdServer,
                                   make_checker: Callable[..., LdapChecker]) -> None:
    """ldaps:// and StartTLS with the test CA log in; slapd sees the bind encrypted."""
    ca = str(slapd.ca_file)
    for checker in (make_checker(url=(slapd.tls_url,), ca_file=ca),
                    make_checker(start_tls=True, ca_file=ca)):
        before = len(slapd.bind_lines())
        assert await outcome(checker, "bob", BOB.password) == "accept"
        done = [b for b in slapd.bind_lines()[before:] if f'dn="{BOB.dn}" mech=SIMPLE' in b]
        assert len(done) == 1 and "ssf=256" in done[0]


@pytest_twisted.ensureDeferred
async def test_tls_verification(slapd: SlapdServer,
                                make_checker: Callable[..., LdapChecker]) -> None:
    """Unknown CA and wrong host name are temporary failures; verify_hostname=false
    skips only the name check."""
    ca = str(slapd.ca_file)
    by_name = slapd.tls_url.replace("127.0.0.1", "localhost")  # cert names 127.0.0.1 only
    assert await outcome(make_checker(url=(slapd.tls_url,)), "bob", BOB.password) == "tempfail"
    assert await outcome(make_checker(start_tls=True), "bob", BOB.password) == "tempfail"
    assert await outcome(make_checker(url=(by_name,), ca_file=ca), "bob",
                         BOB.password) == "tempfail"
    assert await outcome(make_checker(url=(by_name,), ca_file=ca, verify_hostname=False),
                         "bob", BOB.password) == "accept"
    assert await outcome(make_checker(url=(slapd.tls_url,), verify_hostname=False), "bob",
                         BOB.password) == "tempfail"


# ---- server down, restarted, hung ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_down_then_restarted(slapd: SlapdServer, make_checker: Callable[..., LdapChecker],
                                   captured_log: LogCapture) -> None:
    """slapd stopped -> temporary failure; started again -> the same checkers accept.

    The search checker's warm service connection goes stale; the first login after the
    restart must still succeed (a broken connection is never stuck in the pool).
    No password reaches the failure messages or the log.
    """
    template = make_checker()
    search = make_checker(**search_options())
    assert await outcome(search, "alice", ALICE.password) == "accept"  # warm service connection
    slapd.stop()
    try:
        for checker in (template, search):
            try:
                await checker.requestAvatarId(
                    PasswordCredentials(b"alice", ALICE.password.encode()))
            except TemporaryFailure as e:
                assert ALICE.password not in str(e) and READER_PASSWORD not in str(e)
                assert "refused" in str(e).lower()
            else:
                pytest.fail("expected TemporaryFailure while slapd is down")
    finally:
        slapd.start()
    assert await outcome(template, "alice", ALICE.password) == "accept"
    assert await outcome(search, "alice", ALICE.password) == "accept"
    # A restart between two logins: the stale pooled connection is replaced in-request.
    slapd.stop()
    slapd.start()
    assert await outcome(search, "alice", ALICE.password) == "accept"
    text = "\n".join(captured_log.lines)
    assert ALICE.password not in text and READER_PASSWORD not in text


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_unresponsive_server_times_out(slapd: SlapdServer,
                                             make_checker: Callable[..., LdapChecker]) -> None:
    """A SIGSTOPped slapd (TCP accepted, no answer) -> temporary failure within timeout.

    Both modes, both with warm pooled connections; the one that timed out is discarded.
    After SIGCONT the same checkers accept again.
    """
    template = make_checker()
    search = make_checker(**search_options())
    assert await outcome(search, "alice", ALICE.password) == "accept"
    assert await outcome(template, "alice", ALICE.password) == "accept"
    warm = [i.conn for c in (template, search) for p in c.directory._user_pools.values()
            for i in p._idle]
    assert len(warm) == 2
    slapd.pause()
    try:
        for checker in (template, search):
            started = time.monotonic()
            assert await outcome(checker, "alice", ALICE.password) == "tempfail"
            elapsed = time.monotonic() - started
            assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + MARGIN, elapsed
    finally:
        slapd.resume()
    assert warm[0].closed  # the template's timed-out connection is discarded
    assert await outcome(template, "alice", ALICE.password) == "accept"
    assert await outcome(search, "alice", ALICE.password) == "accept"


# ---- failover ------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """``ldap://`` URL of a socket that accepts TCP connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"ldap://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest_twisted.ensureDeferred
async def test_failover(slapd: SlapdServer, make_checker: Callable[..., LdapChecker],
                        blackhole: str) -> None:
    """Several URLs: a refused or hung first server fails over to the next one.

    The hung one costs ``timeout`` once, then it is tried last (the next login is quick).
    """
    dead = f"ldap://127.0.0.1:{free_port()}"
    assert await outcome(make_checker(url=(dead, slapd.url)), "alice",
                         ALICE.password) == "accept"
    for options in ({}, search_options()):
        checker = make_checker(url=(blackhole, slapd.url), **options)
        started = time.monotonic()
        assert await outcome(checker, "alice", ALICE.password) == "accept"
        first = time.monotonic() - started
        started = time.monotonic()
        assert await outcome(checker, "alice", ALICE.password) == "accept"
        second = time.monotonic() - started
        assert TIMEOUT * 0.9 <= first <= TIMEOUT + MARGIN, first
        assert second < TIMEOUT / 2, second
    assert await outcome(make_checker(url=(dead, blackhole)), "alice",
                         ALICE.password) == "tempfail"


def test_busy_answer_on_a_pooled_connection_fails_over(slapd: SlapdServer) -> None:
    """A re-bind on a pooled connection answered busy (51) moves on to the next server
    (a temporary state of that server, not a verdict), and the busy connection is closed."""
    busy: list[bool] = []

    class Connection(ldap3.Connection):  # type: ignore[misc]
        def bind(self, *args: Any, **kwargs: Any) -> bool:
            if busy and not self.server.ssl:
                self.result = {"result": 51, "description": "busy"}
                return False
            return bool(super().bind(*args, **kwargs))

    directory = Directory(LdapOptions(url=(slapd.url, slapd.tls_url), user_dn=TEMPLATE,
                                      ca_file=str(slapd.ca_file), timeout=TIMEOUT),
                          connection_factory=Connection)
    try:
        plain, tls = directory.endpoints
        directory.verify("alice", ALICE.password.encode())
        [pooled] = [i.conn for i in directory._user_pools[plain]._idle]
        busy.append(True)
        directory.verify("alice", ALICE.password.encode())
        assert pooled.closed and len(directory._user_pools[tls]) == 1
        assert directory._servers.ordered() == [tls, plain]
    finally:
        directory.close()


def test_down_server_is_retried_after_a_while() -> None:
    """A failed endpoint goes last for DOWN_SECONDS, then is first again (injected clock)."""
    now = [100.0]
    directory = Directory(LdapOptions(url=("ldap://a", "ldap://b"), user_dn=TEMPLATE),
                          clock=lambda: now[0])
    a, b = directory.endpoints
    directory._servers.mark(a, up=False)
    assert directory._servers.ordered() == [b, a]
    now[0] += ldap_module.DOWN_SECONDS + 0.1
    assert directory._servers.ordered() == [a, b]


# ---- threads, wiring --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ldap3_runs_in_the_backend_pool(make_checker: Callable[..., LdapChecker]) -> None:
    """Every ldap3 connection is made on a thread of the backend's own pool."""
    threads: list[str] = []

    def connection(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return ldap3.Connection(*args, **kwargs)

    checker = make_checker(directory_kwargs={"connection_factory": connection},
                           **search_options())
    assert await outcome(checker, "alice", ALICE.password) == "accept"
    assert len(threads) == 2
    assert all("ldap-test" in name for name in threads), threads
    assert threading.main_thread().name not in threads


@pytest_twisted.ensureDeferred
async def test_concurrent_logins_bounded(make_checker: Callable[..., LdapChecker]) -> None:
    """16 logins at once with threads=2: all answered, never more than 2 in flight."""
    from twisted.internet.defer import gatherResults, ensureDeferred
    active = [0]
    peak = [0]
    lock = threading.Lock()
    real_verify = Directory.verify

    class Counting(Directory):
        def verify(self, username: str, password: bytes) -> str:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                return real_verify(self, username, password)
            finally:
                with lock:
                    active[0] -= 1

    checker = make_checker(**search_options(threads=2))
    checker.directory = Counting(checker.directory.options)
    results = await gatherResults([
        ensureDeferred(outcome(checker, "alice" if i % 2 else "bob",
                               ALICE.password if i % 2 else BOB.password)) for i in range(16)])
    assert results == ["accept"] * 16
    assert peak[0] == 2
    checker.directory.close()


def test_pool_size_defaults_to_threads() -> None:
    """Without ``pool_size`` each pool keeps ``threads`` connections; with it, that many."""
    default = Directory(LdapOptions(url=("ldap://a",), user_dn=TEMPLATE, threads=6))
    assert {p.size for p in (*default._user_pools.values(),
                             *default._service_pools.values())} == {6}
    set_ = Directory(LdapOptions(url=("ldap://a",), user_dn=TEMPLATE, threads=6, pool_size=2))
    assert {p.size for p in set_._user_pools.values()} == {2}


def test_from_config_uses_a_dedicated_runner() -> None:
    """With ``client = "ldap3"``, ``from_config`` asks deps for ``ldap-<name>`` with
    ``threads`` workers."""
    asked: list[tuple[str, int]] = []

    class Runner:
        stopped = False

        def run(self, f: Any, *a: Any, **kw: Any) -> Any:
            raise AssertionError("not called here")

        def stop(self) -> None:
            self.stopped = True

    runner = Runner()

    def make_runner(name: str, threads: int) -> Runner:
        asked.append((name, threads))
        return runner

    deps = BackendDeps(reactor=None, hash_runner=None, make_runner=make_runner)  # type: ignore
    options = LdapOptions(url=("ldap://127.0.0.1",), user_dn=TEMPLATE, threads=3,
                          client="ldap3")
    checker = from_config("directory", options, deps)
    assert asked == [("ldap-directory", 3)]
    checker.stop()
    assert runner.stopped


def test_repr_has_no_secret() -> None:
    """The checker's repr names the servers, never the service password."""
    options = LdapOptions(url=("ldap://127.0.0.1",), search_base=PEOPLE,
                                search_filter="(uid={username})", search_dn=READER_DN,
                                search_password="s3cr3t-service")
    checker = LdapChecker("dir", Directory(options), None)  # type: ignore[arg-type]
    assert "s3cr3t-service" not in repr(checker)
    assert "ldap://127.0.0.1:389" in repr(checker)


# ---- configuration -------------------------------------------------------------------


LDAP_TOML = """
[auth]
mechanisms = ["PLAIN"]
backends = ["dir"]

[backends.dir]
type = "ldap"
{body}
"""


def test_config_url_string_or_list() -> None:
    """``url`` may be one string or a list (failover order)."""
    one = parse_config(LDAP_TOML.format(body='url = "ldap://a"\nuser_dn = "uid={username},o=x"'))
    assert one.backends["dir"].options.url == ("ldap://a",)
    two = parse_config(LDAP_TOML.format(
        body='url = ["ldap://a", "ldaps://b:1636"]\nuser_dn = "uid={username},o=x"'))
    assert two.backends["dir"].options.url == ("ldap://a", "ldaps://b:1636")


@pytest.mark.parametrize("body,needle", [
    ('url = "http://a"\nuser_dn = "uid={username},o=x"', "backends.dir.url"),
    ('url = "ldaps://a"\nstart_tls = true\nuser_dn = "uid={username},o=x"', "start_tls"),
    ('url = "ldap://a"\nuser_dn = "uid={username},o=x"\nthreads = 0', "backends.dir.threads"),
    ('url = "ldap://a"\nuser_dn = "uid={username},o=x"\npool_size = 0', "backends.dir.pool_size"),
    ('url = "ldap://a"\nuser_dn = "uid={username},o=x"\nsearch_dn = "cn=r"', "search_dn"),
    ('url = "ldap://a"\nsearch_base = "o=x"\nsearch_filter = "(uid={username})"\n'
     'search_dn = "cn=r"', "search_password"),
    ('url = "ldap://a"\nuser_dn = "uid={username},o=x"\nca_file = "/nonexistent/ca.pem"',
     "ca_file"),
    ('url = "ldap://a"\nuser_dn = "uid={username},o=x"\nrequire_filter = "memberOf=x"',
     "require_filter"),
])
def test_config_problems(body: str, needle: str) -> None:
    """Bad ldap options are startup errors naming the key."""
    with pytest.raises(ConfigError) as info:
        parse_config(LDAP_TOML.format(body=body), "test.toml")
    assert needle in str(info.value)


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_queued_logins_fail_fast_when_directory_hangs(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """threads=1 and a hung slapd: 3 logins at once all fail within ``timeout`` (+ margin),
    not one after another (3 x timeout): the queued ones do not start at all."""
    from twisted.internet.defer import ensureDeferred, gatherResults
    checker = make_checker(threads=1)
    slapd.pause()
    try:
        started = time.monotonic()
        results = await gatherResults([
            ensureDeferred(outcome(checker, "alice", ALICE.password)) for _ in range(3)])
        elapsed = time.monotonic() - started
    finally:
        slapd.resume()
    assert results == ["tempfail"] * 3
    assert elapsed <= TIMEOUT + MARGIN, elapsed
    assert await outcome(checker, "alice", ALICE.password) == "accept"


def test_options_repr_hides_service_password() -> None:
    """``repr`` of the parsed options (and so of the whole Config) omits search_password."""
    config = parse_config(LDAP_TOML.format(
        body='url = "ldap://a"\nsearch_base = "o=x"\nsearch_filter = "(uid={username})"\n'
             'search_dn = "cn=r,o=x"\nsearch_password = "s3cr3t-service"'))
    assert config.backends["dir"].options.search_password == "s3cr3t-service"
    assert "s3cr3t-service" not in repr(config)


@pytest_twisted.ensureDeferred
async def test_outage_warned_once_and_recovery_logged(
        slapd: SlapdServer, make_checker: Callable[..., LdapChecker]) -> None:
    """slapd stopped: the first failed login warns, the next ones do not; started again:
    one info line says how long the backend was unreachable."""
    from twisted.logger import LogLevel, globalLogPublisher
    from tests.test_outage import LevelCapture

    checker = make_checker()
    capture = LevelCapture()
    globalLogPublisher.addObserver(capture)
    try:
        slapd.stop()
        try:
            for _ in range(3):
                assert await outcome(checker, "alice", ALICE.password) == "tempfail"
        finally:
            slapd.start()
        assert await outcome(checker, "alice", "wrong") == "reject"  # a verdict: reachable
        assert await outcome(checker, "alice", ALICE.password) == "accept"
    finally:
        globalLogPublisher.removeObserver(capture)
    [warned] = capture.at(LogLevel.warn)
    assert warned.startswith("backend test unreachable: no LDAP server answered")
    [recovered] = capture.at(LogLevel.info)
    assert re.fullmatch(r"backend test reachable again after \d+\.\d s", recovered), recovered


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback port whose server sends back what it gets: bytes that are no LDAP
    answer (ldap3's decoder trips over its own request's tags)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("mode", ["template", "search"])
@pytest_twisted.ensureDeferred
async def test_an_answer_that_is_not_ldap_is_a_temporary_failure_without_a_traceback(
        echo_port: int, captured_log: LogCapture, mode: str) -> None:
    """``url`` names a port that answers, but not in LDAP: 454 and the backend's one
    "unreachable" warning naming the cause; it was a KeyError from ldap3's decoder, logged
    as a critical "unexpected error" with a traceback at every login."""
    from twisted.internet import reactor
    options = search_options() if mode == "search" else {"user_dn": TEMPLATE}
    config = LdapOptions(url=(f"ldap://127.0.0.1:{echo_port}",), timeout=TIMEOUT, threads=2,
                         **options)
    runner = ThreadPoolRunner(reactor, "ldap-test", config.threads)
    checker = LdapChecker("garbled", Directory(config), runner)
    try:
        for _ in range(2):
            assert await outcome(checker, ALICE.uid, ALICE.password) == "tempfail"
    finally:
        checker.stop()
    text = "\n".join(captured_log.lines)
    assert "the answer is not LDAP (KeyError in ldap3's decoder)" in text
    assert "Traceback" not in text and "unexpected error" not in text, text
    assert ALICE.password not in text
