"""Prometheus metrics: names, labels and values as a scraper sees them over HTTP, in one
process and summed across processes (multi-process mode)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads

from saslsmtp.metrics import (Metrics, mark_dead, metrics_site, multiprocess_registry,
                              prepare_multiprocess_dir)
from tests.support import ROOT


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(site, path: str = "/metrics") -> tuple[int, str]:
    """Serve ``site`` on a loopback port and GET ``path`` with urllib (in a thread)."""
    from twisted.internet import reactor
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port.getHost().port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
    try:
        return await threads.deferToThread(get)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_single_process_scrape_has_every_event() -> None:
    """Each event method moves exactly its series; no label holds a user or an address."""
    registry = CollectorRegistry()
    m = Metrics(registry, known_mechanisms=["PLAIN", "LOGIN"])
    m.connection_opened("tcp:2525:interface=127.0.0.1")
    m.connection_opened("tcp:2525:interface=127.0.0.1")
    m.connection_opened("haproxy:tcp:2526")
    m.session_closed("haproxy:tcp:2526")
    m.auth_finished("plain", "success")
    m.auth_finished("PLAIN", "failure")
    m.auth_finished("X-UNKNOWN-TO-US", "aborted")
    m.backend_finished("users", "accept", 0.02)
    m.backend_finished("users", "reject", 0.3)
    m.backend_finished("ldap", "tempfail", 5.0)
    m.cache_lookup(True)
    m.cache_lookup(False)
    m.cache_lookup(False)
    m.limit_rejected("auth_failures_per_ip")
    m.script_error()
    m.tls_handshake(True)
    m.tls_handshake(False)
    m.message_accepted(1000)
    m.message_accepted(24)
    m.delivery_failed()
    m.redis_down()
    status, text = await scrape(metrics_site(registry))
    assert status == 200
    s = samples(text)
    assert s[("saslsmtp_connections_total", (("listener", "tcp:2525:interface=127.0.0.1"),))] == 2
    assert s[("saslsmtp_connections_total", (("listener", "haproxy:tcp:2526"),))] == 1
    assert s[("saslsmtp_sessions", (("listener", "tcp:2525:interface=127.0.0.1"),))] == 2
    assert s[("saslsmtp_sessions", (("listener", "haproxy:tcp:2526"),))] == 0
    assert s[("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "success")))] == 1
    assert s[("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "failure")))] == 1
    assert s[("saslsmtp_auth_total", (("mechanism", "other"), ("result", "aborted")))] == 1
    assert s[("saslsmtp_backend_requests_total", (("backend", "users"), ("result", "accept")))] == 1
    assert s[("saslsmtp_backend_requests_total", (("backend", "ldap"), ("result", "tempfail")))] == 1
    assert s[("saslsmtp_auth_duration_seconds_count", (("backend", "users"),))] == 2
    assert s[("saslsmtp_auth_duration_seconds_bucket", (("backend", "users"), ("le", "0.025")))] == 1
    assert s[("saslsmtp_auth_duration_seconds_sum", (("backend", "ldap"),))] == 5.0
    assert s[("saslsmtp_auth_cache_hits_total", ())] == 1
    assert s[("saslsmtp_auth_cache_misses_total", ())] == 2
    assert s[("saslsmtp_limit_rejections_total", (("limit", "auth_failures_per_ip"),))] == 1
    assert s[("saslsmtp_script_errors_total", ())] == 1
    assert s[("saslsmtp_tls_handshakes_total", ())] == 1
    assert s[("saslsmtp_tls_handshake_failures_total", ())] == 1
    assert s[("saslsmtp_messages_total", ())] == 2
    assert s[("saslsmtp_message_bytes_total", ())] == 1024
    assert s[("saslsmtp_delivery_failures_total", ())] == 1
    assert s[("saslsmtp_redis_unavailable_total", ())] == 1
    label_names = {k for _, labels in s for k, _ in labels}
    assert label_names <= {"listener", "mechanism", "result", "backend", "limit", "le"}
    status, _ = await scrape(metrics_site(registry), "/other")
    assert status == 404


def test_results_are_a_closed_set() -> None:
    """A typo in a caller is a bug, not a new time series."""
    m = Metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        m.auth_finished("PLAIN", "ok")
    with pytest.raises(ValueError):
        m.backend_finished("users", "maybe", 0.1)


def test_two_registries_do_not_share_state() -> None:
    """No global registry: two Metrics in one process count separately."""
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a).script_error()
    Metrics(b)
    assert a.get_sample_value("saslsmtp_script_errors_total") == 1
    assert b.get_sample_value("saslsmtp_script_errors_total") == 0


WORKER = textwrap.dedent("""
    import sys
    from saslsmtp.metrics import Metrics
    m = Metrics(None)
    n = int(sys.argv[1])
    for _ in range(n):
        m.connection_opened("tcp:2525")
        m.auth_finished("PLAIN", "success")
        m.backend_finished("users", "accept", 0.01)
    m.message_accepted(100 * n)
    print("done", flush=True)
""")


@pytest_twisted.ensureDeferred
async def test_multiprocess_sums_two_writers_and_forgets_dead_gauges(tmp_path: Path) -> None:
    """Two processes write; the master-side registry sums counters and live gauges, and
    mark_dead drops a finished process from the live session gauge."""
    directory = prepare_multiprocess_dir(tmp_path / "metrics")
    (directory / "counter_99999.db").write_bytes(b"stale")  # from an earlier run: wiped
    prepare_multiprocess_dir(directory)
    assert not list(directory.iterdir())
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen([sys.executable, "-c", WORKER, "3"], env=env, stdout=subprocess.PIPE)
    second = subprocess.Popen([sys.executable, "-c", WORKER, "4"], env=env, stdout=subprocess.PIPE)
    assert first.wait(30) == 0 and second.wait(30) == 0
    registry = multiprocess_registry(directory)
    status, text = await scrape(metrics_site(registry))
    s = samples(text)
    assert status == 200
    assert s[("saslsmtp_connections_total", (("listener", "tcp:2525"),))] == 7
    assert s[("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "success")))] == 7
    assert s[("saslsmtp_auth_duration_seconds_count", (("backend", "users"),))] == 7
    assert s[("saslsmtp_message_bytes_total", ())] == 700
    assert s[("saslsmtp_sessions", (("listener", "tcp:2525"),))] == 7
    per_pid = {dict(labels)["pid"]: v for (name, labels), v in s.items()
               if name == "saslsmtp_worker_sessions"}
    assert per_pid == {str(first.pid): 3, str(second.pid): 4}
    mark_dead(first.pid, directory)
    s = samples((await scrape(metrics_site(registry)))[1])
    assert s[("saslsmtp_sessions", (("listener", "tcp:2525"),))] == 4
    assert s[("saslsmtp_connections_total", (("listener", "tcp:2525"),))] == 7


@pytest_twisted.ensureDeferred
async def test_a_served_session_is_counted(tmp_path: Path) -> None:
    """A real listener built like the daemon's: the connection is counted under its
    listener, the session gauge returns to 0 when it ends, each backend check is timed
    and counted with its outcome."""
    from twisted.internet import reactor

    from saslsmtp.serving import build_factory, listening_factory, start_runners, stop_wiring
    from saslsmtp.service import listener, load
    from tests.support import smtp_login, write_config
    (tmp_path / "a.passwd").write_text("nobody-here:{PLAIN}x\n")
    (tmp_path / "b.passwd").write_text("alice:{PLAIN}wonderland\n")
    config = load(str(write_config(tmp_path, (
        f'[backends.first]\ntype = "file"\npath = "{tmp_path / "a.passwd"}"\n'
        f'[backends.second]\ntype = "file"\npath = "{tmp_path / "b.passwd"}"\n'))))
    registry = CollectorRegistry()
    factory = build_factory(config, reactor, Metrics(registry))
    start_runners(factory.wiring)
    name = config.server.listen[0]
    endpoint, wrapped = listener(name, config, reactor, listening_factory(factory, name))
    port = await endpoint.listen(wrapped)
    try:
        assert (await smtp_login(port.getHost().port, "alice", "wonderland"))[0] == 235
        assert (await smtp_login(port.getHost().port, "alice", "wrong"))[0] == 535
        value = registry.get_sample_value
        assert value("saslsmtp_connections_total", {"listener": name}) == 2
        assert value("saslsmtp_backend_requests_total", {"backend": "first", "result": "reject"}) == 2
        assert value("saslsmtp_backend_requests_total", {"backend": "second", "result": "accept"}) == 1
        assert value("saslsmtp_backend_requests_total", {"backend": "second", "result": "reject"}) == 1
        assert value("saslsmtp_auth_duration_seconds_count", {"backend": "second"}) == 2
        from twisted.internet import task
        for _ in range(100):  # the server sees the close a moment after the client
            if value("saslsmtp_sessions", {"listener": name}) == 0:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert value("saslsmtp_sessions", {"listener": name}) == 0
    finally:
        await port.stopListening()
        stop_wiring(factory.wiring)


@pytest_twisted.ensureDeferred
async def test_backend_checks_behind_the_auth_cache_are_counted(tmp_path: Path) -> None:
    """With ``[auth.cache]`` the backends still answer each miss: those checks are
    counted and timed; a hit reaches no backend and is no backend request."""
    from twisted.cred.credentials import IUsernamePassword
    from twisted.internet import reactor

    from saslsmtp.credentials import PasswordCredentials
    from saslsmtp.limits.authcache import CachingChecker
    from saslsmtp.serving import build_factory, start_runners, stop_wiring
    from saslsmtp.service import load
    from tests.support import write_config
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    config = load(str(write_config(
        tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
        extra_auth="\n[auth.cache]\nttl = 300\n")))
    registry = CollectorRegistry()
    factory = build_factory(config, reactor, Metrics(registry))
    start_runners(factory.wiring)
    checker = factory.wiring.portal.checkers[IUsernamePassword]
    assert isinstance(checker, CachingChecker)
    try:
        for password in (b"wonderland", b"wonderland", b"wrong"):  # miss, hit, miss
            await checker.requestAvatarId(PasswordCredentials(b"alice", password)).addErrback(
                lambda f: None)
    finally:
        stop_wiring(factory.wiring)
    value = registry.get_sample_value
    assert value("saslsmtp_auth_cache_hits_total") == 1
    assert value("saslsmtp_backend_requests_total", {"backend": "users", "result": "accept"}) == 1
    assert value("saslsmtp_backend_requests_total", {"backend": "users", "result": "reject"}) == 1
    assert value("saslsmtp_auth_duration_seconds_count", {"backend": "users"}) == 2


def test_single_process_daemon_serves_metrics(tmp_path: Path) -> None:
    """``twistd -n saslsmtp`` with ``[metrics]`` and one process: /metrics counts the
    connection the client made."""
    import signal
    import socket as sockets

    from tests.support import free_port, start_daemon, wait_for, write_config
    port, metrics_port = free_port(), free_port()
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    daemon = start_daemon(config, port, tmp_path / "daemon.log")  # its probe is connection 1
    try:
        with sockets.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).startswith(b"220 ")

        def scraped() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                return samples(r.read().decode())
        listener = (("listener", f"tcp:{port}:interface=127.0.0.1"),)
        wait_for(lambda: scraped().get(("saslsmtp_connections_total", listener)) == 2
                 and scraped()[("saslsmtp_sessions", listener)] == 0, what="two counted, none open")
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(30) == 0
        # the start line says what listens there (it was "QuietSite starting on PORT")
        assert f"saslsmtp metrics (/metrics) starting on {metrics_port}" in daemon.log_text()
    finally:
        daemon.stop()


def test_the_limits_parts_get_the_process_metrics() -> None:
    """``attach_metrics`` hands the metrics to every part of the limits' controls that
    holds the null one (a part without a ``metrics`` attribute is left alone), so their
    one-line calls count."""
    from dataclasses import dataclass

    from saslsmtp.events import NO_METRICS
    from saslsmtp.serving import attach_metrics

    class Part:
        metrics = NO_METRICS

    @dataclass
    class Controls:
        limiter: Part
        store: Part
        cache: object

    registry = CollectorRegistry()
    m = Metrics(registry)
    controls = Controls(Part(), Part(), object())
    attach_metrics(controls, m)
    controls.limiter.metrics.limit_rejected("connections_per_ip")
    controls.store.metrics.redis_down()
    assert registry.get_sample_value("saslsmtp_limit_rejections_total",
                                     {"limit": "connections_per_ip"}) == 1
    assert registry.get_sample_value("saslsmtp_redis_unavailable_total") == 1
    NO_METRICS.limit_rejected("x")  # the null one counts nothing, anywhere
    assert registry.get_sample_value("saslsmtp_limit_rejections_total", {"limit": "x"}) is None
