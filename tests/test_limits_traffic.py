"""The limits' counters in ``/metrics`` of a real ``twistd -n saslsmtp`` (one process, and
a master with two workers) sharing a real Redis: after known traffic (logins that the
auth cache answers or not, a failure limit and a connection rate limit reached, then
Redis stopped), ``/metrics`` is scraped and parsed with prometheus_client's parser."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.limitsnet import PASSWORD, auth_plain, connect, users_toml
from tests.redis import start_redis
from tests.support import free_port, wait_for, workers_daemon, write_config
from tests.test_ops_traffic import scrape

LIMITS = """[limits]
store = "{url}"
auth_failures_per_ip = "2/1m"
connection_rate_per_ip = "3/1m"
[auth.cache]
ttl = 300
"""


def code(port: int, password: str, source: str) -> int:
    answer = auth_plain(port, "alice", password, source)
    assert answer is not None
    return answer.code


def redis_clients(redis) -> int:
    return redis.command("CLIENT", "LIST").count(b"cmd=") - 1  # minus this CLIENT LIST


@pytest.mark.parametrize("workers", [1, 2])
def test_limit_cache_and_redis_counters_after_known_traffic(tmp_path: Path, workers: int) -> None:
    """Known traffic, each client its own loopback address:

    * two logins (the first asks the backend, the second may be a cache hit), two wrong
      passwords (each asks the backend and drops the cached entry), a third guess from
      the same address refused unchecked: AUTH result ``limited``, rejection
      ``auth_failures_per_ip``;
    * four connections from one address at "3/1m": the fourth gets 421, rejection
      ``connection_rate_per_ip``;
    * Redis stopped: a login (2 Redis calls: admission, AUTH gate) and a wrong password
      (3: admission, gate, the failure) both answered as if no limit were set, 5
      ``saslsmtp_redis_unavailable_total``.

    With one process the cache counters are exact (1 hit, 5 misses); with two workers
    which worker serves a login is the kernel's choice, so hits + misses is exact (6
    lookups, the refused guess is never looked up) and hits at most 2."""
    redis = start_redis(tmp_path / "redis")
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, backends, mechanisms=["PLAIN"],
                          listen=[f"tcp:{port}:interface=127.0.0.1"], max_failures=100,
                          extra=LIMITS.format(url=redis.url)
                          + f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    log = tmp_path / "daemon.log"
    try:
        with workers_daemon(config, log, workers, "--workers", str(workers)) as proc:
            wait_for(lambda: redis_clients(redis) >= workers, what="every worker's Redis connection")
            assert code(port, PASSWORD, "127.0.0.81") == 235
            assert code(port, PASSWORD, "127.0.0.82") == 235
            assert [code(port, f"wrong-{i}", "127.0.0.83") for i in range(3)] == [535, 535, 454]
            banners = []
            for _ in range(4):
                sock, f, banner = connect(port, "127.0.0.90")
                banners.append(banner[:4])
                f.close()
                sock.close()
            assert banners == [b"220 ", b"220 ", b"220 ", b"421 "]

            before = len(log.read_text())
            redis.stop()
            # every process has seen its Redis connection close: it schedules a reconnect
            lost = re.compile(r"ClientService#info(?: worker=(\d+))?\] Scheduling retry \d+ to "
                              rf"connect <HostnameEndpoint 127\.0\.0\.1:{redis.port}>")
            wait_for(lambda: len(set(lost.findall(log.read_text()[before:]))) == workers,
                     what="every worker to see Redis go")
            assert code(port, PASSWORD, "127.0.0.84") == 235
            assert code(port, "wrong-down", "127.0.0.85") == 535

            def settled() -> dict | None:
                s = scrape(metrics_port)
                return s if s.get(("saslsmtp_auth_total", (("mechanism", "PLAIN"),
                                                           ("result", "failure")))) == 3 else None
            s = wait_for(settled, what="every AUTH counted")
            expected = {
                ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "success"))): 3,
                ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "failure"))): 3,
                ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "limited"))): 1,
                ("saslsmtp_limit_rejections_total", (("limit", "auth_failures_per_ip"),)): 1,
                ("saslsmtp_limit_rejections_total", (("limit", "connection_rate_per_ip"),)): 1,
                ("saslsmtp_redis_unavailable_total", ()): 5,
            }
            assert {key: s.get(key) for key in expected} == expected
            # no other limit refused anything
            assert sorted(dict(labels)["limit"] for name, labels in s
                          if name == "saslsmtp_limit_rejections_total") == [
                "auth_failures_per_ip", "connection_rate_per_ip"]
            hits = s[("saslsmtp_auth_cache_hits_total", ())]
            misses = s[("saslsmtp_auth_cache_misses_total", ())]
            if workers == 1:
                assert (hits, misses) == (1, 5)
            else:
                assert hits + misses == 6 and hits <= 2, (hits, misses)
            assert "Traceback" not in log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
    finally:
        redis.stop()
