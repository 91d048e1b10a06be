"""Wiring (saslsmtp.service): the startup checks read what each MechanismSpec declares it
needs, not lists of mechanism names."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import task

from saslsmtp.config import ConfigError
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.plain import Plain
from saslsmtp.service import check_servable, load, wire
from tests.support import write_config

HTTP_BACKEND = '[backends.api]\ntype = "http"\nurl = "http://127.0.0.1:9/auth"\n'


def test_startup_refuses_mechanisms_it_cannot_serve(tmp_path: Path) -> None:
    """With only an HTTP backend (no stored secrets, no token validation) and no client
    CA, each announced mechanism that could never succeed is one problem."""
    path = write_config(tmp_path, HTTP_BACKEND, mechanisms=[
        "PLAIN", "CRAM-MD5", "EXTERNAL", "OAUTHBEARER", "SCRAM-SHA-256"])
    with pytest.raises(ConfigError) as e:
        wire(load(str(path)), task.Clock())
    assert [p.message for p in e.value.problems] == [
        "CRAM-MD5 needs a stored secret (cram-md5 or plaintext) and no backend in"
        ' auth.backends can supply one (only type = "file" can)',
        "SCRAM-SHA-256 needs a stored secret (scram-sha-256 or plaintext) and no backend in"
        ' auth.backends can supply one (only type = "file" can)',
        'OAUTHBEARER needs a backend of type = "oauth2"',
        "EXTERNAL needs [tls] client_ca to verify client certificates",
    ]
    assert all(p.key == "auth.mechanisms" for p in e.value.problems)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1)
                if text.startswith("mechanisms"))
    assert {p.line for p in e.value.problems} == {line}  # at the key, as the parser's are


def test_checks_read_the_spec(tmp_path: Path) -> None:
    """A mechanism nobody has named before is checked from its spec alone."""
    config = load(str(write_config(tmp_path, HTTP_BACKEND)))
    spec = MechanismSpec("X-NEW", Plain, password=True, secret_kinds=("x-kind",),
                         token_validator=True, client_certificate=True)
    specs = {"X-NEW": spec}
    with pytest.raises(ConfigError) as e:
        check_servable(config, specs, specs, False, [], [])
    messages = [p.message for p in e.value.problems]
    assert [m.split(" needs ")[0] for m in messages] == ["X-NEW"] * 3
    assert "x-kind" in messages[0] and "oauth2" in messages[1] and "client_ca" in messages[2]
    # password=True is satisfied by the configured backend; without one, by a script.
    bare = MechanismSpec("X-PASSWORD", Plain, password=True)
    check_servable(config, {"X-PASSWORD": bare}, {"X-PASSWORD": bare}, False, [], [])
    # A mechanism the script serves is the script's business.
    check_servable(config, specs, {}, True, [], [])


def test_secret_lookup_asks_later_backends_in_the_callers_context() -> None:
    """A backend asked after an earlier one answered later (a thread, the network) still
    sees the caller's context variables (the fair hashing pool's client key)."""
    import contextvars

    from twisted.internet import defer

    from saslsmtp.sasl.outcome import Lookup, Secret, Session
    from saslsmtp.service import secret_resolver

    key: contextvars.ContextVar[str] = contextvars.ContextVar("key", default="")
    pending: defer.Deferred = defer.Deferred()
    seen: list[str] = []

    class Later:
        def lookup_secret(self, username: str, kinds: tuple) -> defer.Deferred:
            return pending

    class Second:
        def lookup_secret(self, username: str, kinds: tuple) -> defer.Deferred:
            seen.append(key.get())
            return defer.succeed(Secret("plaintext", b"pw"))

    resolve = secret_resolver([Later(), Second()])
    token = key.set("198.51.100.7")
    try:
        d = resolve(Lookup("alice", ("plaintext",)), Session())
    finally:
        key.reset(token)
    results: list = []
    d.addCallback(results.append)
    pending.callback(None)  # fires outside the caller's context
    assert seen == ["198.51.100.7"]
    assert results == [Secret("plaintext", b"pw")]


def test_dedicated_pools_start_their_threads_with_the_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ldap3 backend's pool has all ``threads`` running once the service started, so
    the reactor thread never starts one inside ``run``: ``Thread.start`` waits until the new
    thread gets the GIL, which under a burst of busy ldap3 threads cost the reactor about
    1 ms per thread (32 ms over the first 32 logins with ``threads = 32``)."""
    import threading

    from twisted.internet import reactor

    backend = ('[backends.directory]\ntype = "ldap"\nclient = "ldap3"\n'
               'url = "ldap://127.0.0.1:9"\nuser_dn = "uid={username},dc=example"\nthreads = 6\n')
    wiring = wire(load(str(write_config(tmp_path, backend))), reactor)
    [runner] = [r for r in wiring.runners if getattr(r, "pool", None) is not None
                and r.pool.name == "ldap-directory"]
    started_here: list[threading.Thread] = []
    real_start = threading.Thread.start

    def watched_start(thread: threading.Thread) -> None:
        if threading.current_thread() is threading.main_thread():
            started_here.append(thread)
        real_start(thread)

    release = threading.Event()
    for r in wiring.runners:
        r.start()
    try:
        assert len(runner.pool.threads) == 6
        monkeypatch.setattr(threading.Thread, "start", watched_start)
        for _ in range(6):
            runner.run(release.wait, 5)
        assert started_here == []
    finally:
        release.set()
        monkeypatch.undo()
        for r in wiring.runners:
            r.stop()  # joins the threads
