"""Prometheus metrics: what is counted, and the ``/metrics`` HTTP endpoint.

``Metrics(registry)`` owns every metric; the protocol, the backends and the limits call
its event methods (``connection_opened``, ``auth_finished``, ...) and never touch
prometheus_client themselves.  No label carries a user name or an address: label values
come from the configuration (listener, backend, limit names) or from small fixed sets
(results, mechanisms the server knows), so the series count stays bounded.

One process: pass a ``CollectorRegistry`` and serve it.  Several workers: the master
sets ``PROMETHEUS_MULTIPROC_DIR`` in the workers' environment (prometheus_client picks
its storage when it is imported, so it must be set before the worker starts), each
worker builds ``Metrics(None)`` (values go to files, nothing is registered), and the
master serves ``multiprocess_registry(path, reloads)``, which sums the files and adds the
reloads the master counts itself (``ReloadCounts``); it calls ``mark_dead(pid, path)``
when a worker ends so live gauges forget it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

#: ``auth_finished`` results: 235, 535, 454, 501 (client ``*``), refused by a limit.
AUTH_RESULTS = ("success", "failure", "tempfail", "aborted", "limited")
#: ``backend_finished`` results.
BACKEND_RESULTS = ("accept", "reject", "tempfail")
#: ``proxy_refused`` reasons: a peer not in ``proxy_trusted_networks``; no complete header
#: within the wait; bytes that cannot start a PROXY header; a v1 or v2 header that does
#: not parse.
PROXY_REFUSALS = ("untrusted", "timeout", "not_proxy", "invalid_v1", "invalid_v2")
#: Seconds; AUTH spans a thread-pool hash (~0.1 s) up to a slow remote backend (timeout 5-10 s).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: An IPv6 listener escapes its colons (``tcp6:587:interface=\:\:1``): backslashes are allowed.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:=/\\\[\]-]{1,64}$")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _bounded(value: str) -> str:
    """A label value from a bounded set, or ``other`` (never free text from a client)."""
    return value if _LABEL_VALUE.match(value) else "other"


class Metrics:
    """Every saslsmtp metric, registered in ``registry`` (``None``: registered nowhere,
    which is what a multi-process worker wants)."""

    def __init__(self, registry: CollectorRegistry | None, known_mechanisms: Any = None) -> None:
        #: Mechanism names the server knows; anything else is counted as ``other``.
        self.known_mechanisms = None if known_mechanisms is None else {m.upper() for m in known_mechanisms}
        self.connections = Counter("saslsmtp_connections", "Accepted connections.", ["listener"], registry=registry)
        self.sessions = Gauge("saslsmtp_sessions", "Open SMTP sessions per listener.", ["listener"],
                              multiprocess_mode="livesum", registry=registry)
        self.worker_sessions = Gauge(
            "saslsmtp_worker_sessions", "Open SMTP sessions per process (a pid label with workers).",
            multiprocess_mode="liveall", registry=registry)
        self.auth = Counter("saslsmtp_auth", "Finished AUTH exchanges.", ["mechanism", "result"], registry=registry)
        self.auth_duration = Histogram(
            "saslsmtp_auth_duration_seconds", "Time a backend took to decide a password check.",
            ["backend"], buckets=DURATION_BUCKETS, registry=registry)
        self.backend_requests = Counter(
            "saslsmtp_backend_requests", "Password checks per backend and their outcome.",
            ["backend", "result"], registry=registry)
        self.cache_hits = Counter("saslsmtp_auth_cache_hits", "AUTH answered from the cache.", registry=registry)
        self.cache_misses = Counter("saslsmtp_auth_cache_misses", "AUTH not in the cache.", registry=registry)
        self.cache_stale_hits = Counter(
            "saslsmtp_auth_cache_stale_hits", "AUTH accepted from a stale entry while the backends failed.",
            registry=registry)
        self.limit_rejections = Counter(
            "saslsmtp_limit_rejections", "Commands refused by a rate or concurrency limit.",
            ["limit"], registry=registry)
        self.script_errors = Counter(
            "saslsmtp_script_errors", "AUTH script calls that raised, timed out or returned junk.", registry=registry)
        self.tls_handshakes = Counter("saslsmtp_tls_handshakes", "Completed TLS handshakes.", registry=registry)
        self.tls_handshake_failures = Counter(
            "saslsmtp_tls_handshake_failures", "TLS handshakes that failed.", registry=registry)
        self.messages = Counter("saslsmtp_messages", "Messages accepted (250 after DATA).", registry=registry)
        self.message_bytes = Counter("saslsmtp_message_bytes", "Octets of accepted messages.", registry=registry)
        self.delivery_failures = Counter(
            "saslsmtp_delivery_failures", "Messages refused because delivery failed.", registry=registry)
        self.redis_unavailable = Counter(
            "saslsmtp_redis_unavailable", "Operations that found Redis unreachable.", registry=registry)
        self.proxy_refusals = Counter(
            "saslsmtp_proxy_refusals", "Connections a haproxy: listener closed without a session:"
            " an untrusted peer or no valid PROXY header.", ["listener", "reason"], registry=registry)
        self.reloads = Counter("saslsmtp_reloads", "Configuration reloads by result.", ["result"], registry=registry)
        self.tls_certificate_expiry = Gauge(
            "saslsmtp_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the served TLS certificate (Unix time), per certificate file.",
            ["file"], multiprocess_mode="livemin", registry=registry)
        self._certificate_file: str | None = None

    # -- events (the protocol and the backends call these) ----------------------------

    def connection_opened(self, listener: str) -> None:
        """A connection was accepted on ``listener`` (the ``server.listen`` string)."""
        self.connections.labels(_bounded(listener)).inc()
        self.sessions.labels(_bounded(listener)).inc()
        self.worker_sessions.inc()

    def session_closed(self, listener: str) -> None:
        """A connection counted by ``connection_opened(listener)`` is gone."""
        self.sessions.labels(_bounded(listener)).dec()
        self.worker_sessions.dec()

    def auth_finished(self, mechanism: str, result: str) -> None:
        """An AUTH exchange ended with ``result`` (one of ``AUTH_RESULTS``)."""
        if result not in AUTH_RESULTS:
            raise ValueError(f"unknown AUTH result {result!r}")
        name = mechanism.upper()
        if self.known_mechanisms is not None and name not in self.known_mechanisms:
            name = "other"
        self.auth.labels(_bounded(name), result).inc()

    def backend_finished(self, backend: str, result: str, seconds: float) -> None:
        """A backend answered a password check (``accept``/``reject``/``tempfail``)."""
        if result not in BACKEND_RESULTS:
            raise ValueError(f"unknown backend result {result!r}")
        self.backend_requests.labels(_bounded(backend), result).inc()
        self.auth_duration.labels(_bounded(backend)).observe(seconds)

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def cache_stale_hit(self) -> None:
        """``stale_if_error`` accepted a stale entry (after a miss the backends failed)."""
        self.cache_stale_hits.inc()

    def limit_rejected(self, limit: str) -> None:
        """``limit`` is the configured limit's name (e.g. ``auth_failures_per_ip``)."""
        self.limit_rejections.labels(_bounded(limit)).inc()

    def script_error(self) -> None:
        self.script_errors.inc()

    def tls_handshake(self, ok: bool) -> None:
        (self.tls_handshakes if ok else self.tls_handshake_failures).inc()

    def message_accepted(self, size: int) -> None:
        self.messages.inc()
        self.message_bytes.inc(size)

    def delivery_failed(self) -> None:
        self.delivery_failures.inc()

    def redis_down(self) -> None:
        self.redis_unavailable.inc()

    def proxy_refused(self, listener: str, reason: str) -> None:
        """A ``haproxy:`` listener closed a connection for ``reason`` (``PROXY_REFUSALS``)."""
        if reason not in PROXY_REFUSALS:
            raise ValueError(f"unknown PROXY refusal reason {reason!r}")
        self.proxy_refusals.labels(_bounded(listener), reason).inc()

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "invalid").inc()

    def tls_certificate(self, path: str | None, not_after: float | None) -> None:
        """The certificate now served: its file (a configured path, so a bounded set)
        and its notAfter; ``None`` when TLS is off.  Replaces the previous file's series;
        with workers that one is set to NaN instead (prometheus_client cannot remove a
        label in multi-process mode), on which no expiry alert fires."""
        previous, self._certificate_file = self._certificate_file, path
        if previous is not None and previous != path:
            if multiprocess_enabled():
                self.tls_certificate_expiry.labels(previous).set(float("nan"))
            else:
                self.tls_certificate_expiry.remove(previous)
        if path is not None and not_after is not None:
            self.tls_certificate_expiry.labels(path).set(not_after)


# -- multi-process mode ------------------------------------------------------------------


def multiprocess_enabled() -> bool:
    """Whether this process writes its metric values to ``PROMETHEUS_MULTIPROC_DIR``."""
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get("prometheus_multiproc_dir"))


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Create the directory, or empty it: values left by an earlier run would be summed."""
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def multiprocess_registry(path: str | Path, *own: Any) -> CollectorRegistry:
    """A registry that reads every worker's values from ``path`` at each scrape, beside
    the master's ``own`` collectors (``ReloadCounts``)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    for collector in own:
        registry.register(collector)
    return registry


class ReloadCounts:
    """``saslsmtp_reloads_total`` as the master of ``workers = N`` counts it: the master
    decides whether a SIGHUP is applied (the workers only follow), so one reload is one
    sample.  A collector of its own, not a ``Counter``: the master imported
    prometheus_client before its multi-process directory existed, so a ``Counter`` there
    would keep its value in memory, where the sum of the workers' files never looks."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def reloaded(self, ok: bool) -> None:
        result = "success" if ok else "invalid"
        self.counts[result] = self.counts.get(result, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("saslsmtp_reloads", "Configuration reloads by result.",
                                     labels=["result"])
        for result, count in sorted(self.counts.items()):
            family.add_metric([result], count)
        yield family


def mark_dead(pid: int, path: str | Path) -> None:
    """Forget a finished worker's live gauges (its counters keep counting in the sums)."""
    mark_process_dead(pid, str(path))


# -- the HTTP endpoint --------------------------------------------------------------------


def metrics_site(registry: CollectorRegistry) -> Any:
    """A twisted.web ``Site`` serving ``registry`` at ``/metrics`` (and 404 elsewhere)."""
    from prometheus_client.twisted import MetricsResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class QuietSite(Site):
        noisy = False

        def logPrefix(self) -> str:  # the listening port's start line names it
            return "saslsmtp metrics (/metrics)"

        def log(self, request: Any) -> None:  # no access log line per scrape
            pass

    class Root(Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            from twisted.web.pages import notFound
            return notFound()

    root = Root()
    root.putChild(b"metrics", MetricsResource(registry))
    return QuietSite(root)


def metrics_service(description: str, reactor: Any, registry: CollectorRegistry) -> Any:
    """A service listening on the ``[metrics] listen`` endpoint (binds in the privileged
    start, like the SMTP listeners)."""
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet import endpoints
    endpoint = endpoints.serverFromString(reactor, description)
    server = StreamServerEndpointService(endpoint, metrics_site(registry))
    server._raiseSynchronously = True  # a port in use stops the start
    return server
