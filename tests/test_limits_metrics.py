"""The limits' parts count into the process's metrics (``serving.attach_metrics`` hands
them the ``Metrics``): limit rejections by limit, auth cache hits, misses and stale hits, Redis
outages, and an AUTH refused by the failure limits counts as ``limited``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from saslsmtp.limits.build import AbuseControls, LateStore, build_controls
from saslsmtp.limits.settings import AuthCacheSettings
from saslsmtp.metrics import Metrics
from saslsmtp.serving import attach_metrics
from tests.test_limits_authcache import login, make
from tests.test_limits_limiter import result, settings


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_limit_rejections_are_counted_by_limit() -> None:
    """The third connection from one address over ``connections_per_ip = 2``."""
    clock = Clock()
    registry = CollectorRegistry()
    controls = build_controls(settings(connections_per_ip=2), AuthCacheSettings(), clock)
    attach_metrics(controls, Metrics(registry))
    for _ in range(3):
        result(controls.limiter.connection_made("192.0.2.1"))
    assert value(registry, "saslsmtp_limit_rejections_total", limit="connections_per_ip") == 1


def test_cache_hits_and_misses_are_counted() -> None:
    """First login: a miss (the backend answers); the same password again: a hit."""
    clock, backend, cache, checker = make()
    registry = CollectorRegistry()
    attach_metrics(AbuseControls(limiter=None, store=None, cache=cache),  # type: ignore[arg-type]
                   Metrics(registry))
    assert login(checker, "alice", "right") == b"alice"
    assert login(checker, "alice", "right") == b"alice"
    assert value(registry, "saslsmtp_auth_cache_misses_total") == 1
    assert value(registry, "saslsmtp_auth_cache_hits_total") == 1


def test_stale_hits_are_counted() -> None:
    """Backends down past the ttl, inside ``stale_if_error``: the lookup is a miss, the
    stale success that accepts is a stale hit."""
    clock, backend, cache, checker = make(ttl=300, stale_if_error=600)
    registry = CollectorRegistry()
    attach_metrics(AbuseControls(limiter=None, store=None, cache=cache),  # type: ignore[arg-type]
                   Metrics(registry))
    assert login(checker, "alice", "right") == b"alice"
    backend.down = True
    clock.advance(400)
    assert login(checker, "alice", "right") == b"alice"
    assert value(registry, "saslsmtp_auth_cache_misses_total") == 2
    assert value(registry, "saslsmtp_auth_cache_stale_hits_total") == 1


class OutagedStore:
    """Stands in for a ``RedisStore`` that finds Redis down once."""

    def __init__(self) -> None:
        self.metrics: Any = None

    def hit(self, key: str, rate: Any, cost: int = 1) -> "Deferred[Any]":
        self.metrics.redis_down()
        return succeed(None)


def test_a_late_store_hands_the_metrics_to_the_store_it_builds() -> None:
    """The Redis store is built at service start; it still counts its outages."""
    registry = CollectorRegistry()
    late = LateStore(OutagedStore)  # type: ignore[arg-type]
    late.metrics = Metrics(registry)
    late.start()
    late.hit("k", None)  # type: ignore[arg-type]
    assert value(registry, "saslsmtp_redis_unavailable_total") == 1
