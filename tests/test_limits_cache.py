"""``[auth.cache]`` wired in front of a real HTTP auth API (twisted.web on loopback): the
second login is served from the cache, a different password goes to the API, a stale
success accepts while the API fails (and says so), nothing secret is stored, and a
reload (SIGHUP) empties the cache of a running daemon."""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from tests.conftest import event_text
from tests.limitsnet import auth_plain, wait_for_log
from tests.support import free_port, smtp_login, start_daemon, start_server, write_config
from tests.upstreams import USERS, AuthAPI, WebServer

PASSWORD = USERS["alice"]


def api_backend(server: WebServer) -> str:
    return f'[backends.api]\ntype = "http"\nurl = "http://127.0.0.1:{server.port}/auth"\n'


@pytest_twisted.ensureDeferred
async def test_second_login_is_served_from_the_cache(tmp_path: Path) -> None:
    """Backend asked once for two logins; another password is checked again; after the
    ttl, an API answering 500 still lets the cached password in (stale_if_error), with
    a warning; the cache holds neither the password nor its plain hash."""
    api = AuthAPI()
    web = WebServer(api)
    web.start()
    events: list[str] = []

    def observe(event: dict) -> None:
        events.append(event_text(event))
    globalLogPublisher.addObserver(observe)
    server = await start_server(tmp_path, api_backend(web),
                                extra="[auth.cache]\nttl = 1\nstale_if_error = 300\n")
    try:
        started = time.monotonic()
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
        first = time.monotonic() - started
        started = time.monotonic()
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
        second = time.monotonic() - started
        assert len(api.requests) == 1
        print(f"\nfirst login {first * 1000:.1f} ms (API asked), second {second * 1000:.1f} ms"
              " (cache)")
        assert (await smtp_login(server.port, "alice", "another password"))[0] == 535
        assert len(api.requests) == 2  # a different password is never answered from cache
        cache = server.wiring.controls.cache
        stored = repr(list(cache._entries.items())).encode()
        for secret in (PASSWORD.encode(), hashlib.sha256(PASSWORD.encode()).digest(),
                       hashlib.sha256(PASSWORD.encode()).hexdigest().encode()):
            assert secret not in stored
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235  # refill
        await threads.deferToThread(time.sleep, 1.1)  # past the ttl
        api.mode = "500"
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
        assert (await smtp_login(server.port, "alice", "guess"))[0] == 454
        assert cache.stale_hits == 1
        assert any("stale" in e for e in events), events[-5:]
    finally:
        globalLogPublisher.removeObserver(observe)
        await server.stop()
        await web.stop()


@pytest_twisted.ensureDeferred
async def test_stale_logins_during_an_outage_are_one_warning_and_one_recovery_line(
        tmp_path: Path) -> None:
    """The API fails (500) past the ttl: each cached user still gets in, and the log says
    so once (a warning when the first stale success is used), not once per login; the
    logins after it are at debug, each with its user; the first verdict of the backends
    afterwards ends it with one info line that counts them."""
    api = AuthAPI()
    web = WebServer(api)
    web.start()
    events: list[tuple[str, str]] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("saslsmtp.limits"):
            events.append((event["log_level"].name, event_text(event)))
    server = await start_server(tmp_path, api_backend(web),
                                extra="[auth.cache]\nttl = 1\nstale_if_error = 300\n")
    globalLogPublisher.addObserver(observe)
    try:
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
        await threads.deferToThread(time.sleep, 1.1)  # past the ttl
        api.mode = "500"
        for _ in range(4):
            assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
        assert server.wiring.controls.cache.stale_hits == 4
        api.mode = "normal"
        assert (await smtp_login(server.port, "alice", PASSWORD))[0] == 235
    finally:
        globalLogPublisher.removeObserver(observe)
        await server.stop()
        await web.stop()
    warned = [text for level, text in events if level == "warn"]
    assert len(warned) == 1, warned
    assert "stale" in warned[0] and "until they answer again" in warned[0], warned[0]
    later = [text for level, text in events if level == "debug" and "stale" in text]
    assert len(later) == 3 and all("'alice'" in text for text in later), later
    [ended] = [text for level, text in events if level == "info" and "stale" in text]
    assert "4 logins accepted from stale entries" in ended, ended
    assert not any(PASSWORD in text for _, text in events)


@pytest_twisted.ensureDeferred
async def test_reload_flushes_the_cache_of_a_running_daemon(tmp_path: Path) -> None:
    """``kill -HUP``: the daemon re-reads its configuration and starts with an empty
    cache, so the next login asks the backend again."""
    api = AuthAPI()
    web = WebServer(api)
    web.start()
    port = free_port()
    config = write_config(tmp_path, api_backend(web), listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra="[auth.cache]\nttl = 300\n")
    daemon = await threads.deferToThread(start_daemon, config, port, tmp_path / "daemon.log")
    try:
        for _ in range(2):
            answer = await threads.deferToThread(auth_plain, port, "alice", PASSWORD)
            assert answer.code == 235
        assert len(api.requests) == 1
        daemon.process.send_signal(signal.SIGHUP)
        await threads.deferToThread(wait_for_log, daemon, "reloaded")
        answer = await threads.deferToThread(auth_plain, port, "alice", PASSWORD)
        assert answer.code == 235
        assert len(api.requests) == 2
    finally:
        await threads.deferToThread(daemon.stop)
        await web.stop()


@pytest_twisted.ensureDeferred
async def test_an_edited_users_file_outruns_the_cache(tmp_path: Path) -> None:
    """``[auth.cache]`` in front of a users file that is edited while the server runs (as
    the README says it is re-read when it changes): a changed password stops the old one
    at once, a removed user is refused, a user added after a cached "unknown" gets in,
    and a deleted file keeps no one alive through ``stale_if_error``.  Each was the
    cache's answer for up to ``ttl`` / ``negative_ttl`` before."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}first-pw\nbob:{PLAIN}bob-pw\n")
    server = await start_server(
        tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
        extra="[auth.cache]\nttl = 300\nnegative_ttl = 300\nstale_if_error = 3600\n")
    try:
        assert (await smtp_login(server.port, "alice", "first-pw"))[0] == 235
        assert (await smtp_login(server.port, "bob", "bob-pw"))[0] == 235
        assert (await smtp_login(server.port, "carol", "carol-pw"))[0] == 535  # unknown, cached
        users.write_text("alice:{PLAIN}second-pw\ncarol:{PLAIN}carol-pw\n")
        assert (await smtp_login(server.port, "alice", "first-pw"))[0] == 535
        assert (await smtp_login(server.port, "alice", "second-pw"))[0] == 235
        assert (await smtp_login(server.port, "bob", "bob-pw"))[0] == 535  # removed
        assert (await smtp_login(server.port, "carol", "carol-pw"))[0] == 235  # added
        assert (await smtp_login(server.port, "alice", "second-pw"))[0] == 235  # cached again
        users.unlink()
        assert (await smtp_login(server.port, "alice", "second-pw"))[0] == 454
    finally:
        await server.stop()
