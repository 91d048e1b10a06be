"""TLS peers refused the way an operator can read: a certificate without subjectAltName
(LDAP over ldaps://, both clients, against a real slapd) fails the login with the cause
named once and no traceback; a ``rediss://`` store whose certificate fails verification
never looks connected (txredisapi would pool the connection before its handshake)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from saslsmtp.checkers.ldap import LdapOptions, from_config
from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.threads import ThreadPoolRunner
from tests.slapd import ALICE, SlapdServer, running_slapd
from tests.test_checker_ldap import TEMPLATE, LogCapture, captured_log, outcome  # noqa: F401
from tests.redis import tls_redis
from tests.tlsutil import issue_cert, make_ca


@dataclass
class BareSlapd(SlapdServer):
    """slapd presenting a certificate for ``localhost`` in its CN only (no subjectAltName),
    signed by the CA in ``ca_file``."""

    def _write_config(self) -> Path:
        path = super()._write_config()
        (self.root / "bare").mkdir()
        ca = make_ca(self.root / "bare")
        bare = issue_cert(ca, self.root / "bare", names=["localhost"], san=False)
        shutil.copy(ca.cert_path, self.root / "ca.pem")
        shutil.copy(bare.cert_path, self.root / "server.pem")
        shutil.copy(bare.key_path, self.root / "server.key")
        return path


@pytest.fixture(scope="module")
def bare_slapd() -> Iterator[BareSlapd]:
    yield from running_slapd(BareSlapd)


@pytest.mark.parametrize("client", ["twisted", "ldap3"])
@pytest_twisted.ensureDeferred
async def test_ldaps_certificate_without_subject_alt_name(
        bare_slapd: BareSlapd, captured_log: LogCapture, client: str) -> None:
    """Two logins over ldaps://localhost to a CN-only certificate: each is a temporary
    failure, no traceback or critical event is logged (Twisted's verifier logged one per
    connection, then the login only said "connection closed by the server"), and the
    one unreachable warning names the cause."""
    from twisted.internet import reactor
    runners: list[ThreadPoolRunner] = []

    def make_runner(name: str, threads: int) -> ThreadPoolRunner:
        runners.append(ThreadPoolRunner(reactor, name, threads))
        runners[-1].start()
        return runners[-1]

    url = bare_slapd.tls_url.replace("127.0.0.1", "localhost")
    options = LdapOptions(url=(url,), user_dn=TEMPLATE, ca_file=str(bare_slapd.ca_file),
                          timeout=2.0, client=client)
    checker: Any = from_config("directory", options, BackendDeps(reactor, None, make_runner))  # type: ignore[arg-type]
    try:
        for _ in range(2):
            assert await outcome(checker, "alice", ALICE.password) == "tempfail"
    finally:
        checker.stop()
        for runner in runners:
            runner.stop()
    text = "\n".join(captured_log.lines)
    assert "Traceback" not in text and "CertificateError" not in text, text
    assert "while verifying" not in text, text
    warnings = [line for line in captured_log.lines if "backend directory unreachable" in line]
    assert len(warnings) == 1, text
    if client == "twisted":
        assert "the certificate has no subjectAltName, so it cannot be valid for localhost" \
            in warnings[0], warnings
    else:  # the standard library's words: the name is checked against subjectAltName only
        assert "Hostname mismatch, certificate is not valid for" in warnings[0], warnings
    assert ALICE.password not in text


# ---- rediss:// -------------------------------------------------------------------------


async def _watch_connected(store: Any, attempts: int, timeout: float = 10.0) -> list[bool]:
    """``store.connected`` at every reactor turn until ``attempts`` handshakes were tried."""
    from twisted.internet import reactor
    seen: list[bool] = []
    made = 0
    original = store._factory.buildProtocol

    def counting(addr: Any) -> Any:
        nonlocal made
        made += 1
        return original(addr)
    store._factory.buildProtocol = counting
    deadline = reactor.seconds() + timeout
    while made <= attempts and reactor.seconds() < deadline:
        seen.append(store.connected)
        await deferLater(reactor, 0, lambda: None)
    assert made > attempts, "the store did not retry"
    return seen


@pytest.mark.parametrize("names,san", [(["other.example"], True), (["localhost"], False)],
                         ids=["wrong-name", "no-san"])
@pytest_twisted.ensureDeferred
async def test_rediss_refused_certificate_is_never_connected(
        tmp_path: Path, captured_log: LogCapture, names: list[str], san: bool) -> None:
    """A certificate that fails verification (another name; no subjectAltName at all):
    over several reconnect attempts ``connected`` is never true, a call fails open
    and counts as unavailable, and nothing logs a traceback."""
    from twisted.internet import reactor

    from saslsmtp.limits.redisstore import RedisStore
    from saslsmtp.limits.settings import Rate
    proc, port, ca_file = tls_redis(tmp_path, names, san)
    try:
        store = RedisStore(f"rediss://localhost:{port}/0?ca_file={ca_file}", reactor,
                           reconnect_max_delay=0.05)
        try:
            seen = await _watch_connected(store, attempts=4)
            assert not any(seen), f"connected on {seen.count(True)} of {len(seen)} turns"
            assert (await store.hit("t", Rate(1, 60.0))).allowed  # fail open
            assert store.unavailable >= 1
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)
    text = "\n".join(captured_log.lines)
    assert "Traceback" not in text and "while verifying" not in text, text


@pytest_twisted.ensureDeferred
async def test_rediss_trusted_certificate_connects_after_the_handshake(tmp_path: Path) -> None:
    """The same store with a certificate that verifies: connected, and it counts."""
    from twisted.internet import reactor

    from saslsmtp.limits.redisstore import RedisStore
    from saslsmtp.limits.settings import Rate
    proc, port, ca_file = tls_redis(tmp_path, ["localhost"])
    try:
        store = RedisStore(f"rediss://localhost:{port}/0?ca_file={ca_file}", reactor,
                           reconnect_max_delay=0.2)
        try:
            deadline = reactor.seconds() + 10
            while not store.connected and reactor.seconds() < deadline:
                await deferLater(reactor, 0.02, lambda: None)
            assert store.connected
            assert [(await store.hit("t", Rate(1, 60.0))).allowed for _ in range(2)] == \
                [True, False]
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_a_refused_peer_is_logged_once_a_minute_not_per_reconnect(
        tmp_path: Path, captured_log: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``rediss://`` store retries a certificate without subjectAltName every 50 ms:
    one "refusing TLS peer" line for the first attempts, then, a minute later, one more
    that counts the refusals in between (the way Redis's fail-open warning is paced)."""
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from saslsmtp.checkers import tlsclient
    from saslsmtp.limits.redisstore import RedisStore
    from saslsmtp.repeats import RepeatedWarning
    minute = Clock()
    monkeypatch.setattr(tlsclient, "REFUSALS", RepeatedWarning(minute.seconds), raising=False)
    proc, port, ca_file = tls_redis(tmp_path, ["localhost"], False)

    def refusals() -> list[str]:
        return [line for line in captured_log.lines if "refusing TLS peer localhost" in line]
    try:
        store = RedisStore(f"rediss://localhost:{port}/0?ca_file={ca_file}", reactor,
                           reconnect_max_delay=0.05)
        try:
            await _watch_connected(store, attempts=5)
            assert len(refusals()) == 1, captured_log.lines
            assert "the certificate has no subjectAltName" in refusals()[0]
            minute.advance(61)
            await _watch_connected(store, attempts=2)
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)
    lines = refusals()
    assert len(lines) == 2, lines
    more = re.search(r"\((\d+) more refusals since the last report\)", lines[1])
    assert more is not None and int(more.group(1)) >= 4, lines


def test_repeated_warning_is_due_first_on_change_and_once_per_interval() -> None:
    """The pacing itself: per key, a changed text is due at once, the same one after the
    interval with the count of occurrences it left out."""
    from twisted.internet.task import Clock

    from saslsmtp.repeats import RepeatedWarning
    clock = Clock()
    paced = RepeatedWarning(clock.seconds, interval=60.0)
    assert paced.due("a", "no SAN") == 0
    assert [paced.due("a", "no SAN") for _ in range(3)] == [None, None, None]
    assert paced.due("b", "no SAN") == 0  # another peer is not silenced by the first
    assert paced.due("a", "expired") == 3  # a new reason at once, with what was left out
    clock.advance(59.9)
    assert paced.due("a", "expired") is None
    clock.advance(0.1)
    assert paced.due("a", "expired") == 1
