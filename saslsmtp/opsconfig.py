"""The operations keys of the configuration: ``[server]`` workers, worker_timeout, user,
group, log_format, log_level, log_rotate_size, control_socket, and the ``[metrics]`` table.

No Twisted here.  ``parse_ops(server_table, metrics_table, problem)`` reads the raw TOML
tables and reports each mistake through ``problem(dotted_key, message)``, so the main
parser adds the file and line like for every other key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

#: The ``[server]`` keys read here (the main parser skips them).
SERVER_KEYS = ("workers", "worker_timeout", "user", "group", "log_format", "log_level",
               "log_rotate_size", "control_socket")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
MAX_WORKERS = 256
#: twistd's own log file renames itself at this size; 0 leaves rotating to logrotate
LOG_ROTATE_SIZE = 1_000_000
#: seconds a worker's reactor may stand still before the master replaces the worker
#: (gunicorn's ``timeout`` is 30 s; an AUTH script's own limit, script_timeout, is 10 s)
WORKER_TIMEOUT = 60.0
#: the least ``worker_timeout`` (0 aside): a worker says it is alive 4 times per timeout
MIN_WORKER_TIMEOUT = 1.0

Problem = Callable[[str, str], None]


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where the Prometheus text format is served (``/metrics``)."""

    listen: str = "tcp:9125:interface=127.0.0.1"


@dataclass(frozen=True)
class OpsConfig:
    """How the daemon runs: processes, identity, logging, metrics."""

    workers: int = 1
    user: str | None = None
    group: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    metrics: MetricsConfig | None = None
    log_rotate_size: int = LOG_ROTATE_SIZE  # bytes; 0: only on SIGUSR1
    worker_timeout: float = WORKER_TIMEOUT  # seconds; 0: a stuck worker is never replaced
    control_socket: str | None = None  # where saslsmtp-ctl reaches the serving processes

    def worker_count(self, override: int | None = None, cpus: int | None = None) -> int:
        """Processes to run: ``override`` (``--workers``) wins; 0 means one per CPU."""
        n = self.workers if override is None else override
        return n if n > 0 else max(1, cpus if cpus is not None else (os.cpu_count() or 1))


def _string(table: dict[str, Any], key: str, prefix: str, problem: Problem) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problem(f"{prefix}.{key}", "must be a non-empty string")
        return None
    return value


def parse_ops(server: Any, metrics: Any, problem: Problem) -> OpsConfig:
    """Read the operations keys from the raw ``[server]`` and ``[metrics]`` tables."""
    server = server if isinstance(server, dict) else {}
    values: dict[str, Any] = {}
    workers = server.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int):
        problem("server.workers", "must be an integer (0 = one per CPU)")
    elif not 0 <= workers <= MAX_WORKERS:
        problem("server.workers", f"must be between 0 (one per CPU) and {MAX_WORKERS}")
    else:
        values["workers"] = workers
    timeout = server.get("worker_timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not (timeout == 0 or MIN_WORKER_TIMEOUT <= timeout < float("inf")):
            problem("server.worker_timeout", f"must be a number of seconds, at least"
                    f" {MIN_WORKER_TIMEOUT:g} (0: never replace a stuck worker)")
        else:
            values["worker_timeout"] = float(timeout)
    for key in ("user", "group"):
        value = _string(server, key, "server", problem)
        if value is not None:
            values[key] = value
    for key, allowed in (("log_format", LOG_FORMATS), ("log_level", LOG_LEVELS)):
        value = server.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or value.lower() not in allowed:
            problem(f"server.{key}", f"must be one of {', '.join(repr(a) for a in allowed)}")
        else:
            values[key] = value.lower()
    rotate_size = server.get("log_rotate_size")
    if rotate_size is not None:
        if isinstance(rotate_size, bool) or not isinstance(rotate_size, int) or rotate_size < 0:
            problem("server.log_rotate_size",
                    "must be a size in bytes (0: never by size, only on SIGUSR1)")
        else:
            values["log_rotate_size"] = rotate_size
    control = server.get("control_socket")
    if control is not None:
        if not isinstance(control, str) or not control.startswith("/"):
            problem("server.control_socket", "must be an absolute path for a UNIX socket")
        else:
            values["control_socket"] = control
    if metrics is not None:
        if not isinstance(metrics, dict):
            problem("metrics", "must be a table")
        else:
            for key in metrics:
                if key != "listen":
                    problem(f"metrics.{key}", "unknown key (known: listen)")
            listen = metrics.get("listen", MetricsConfig.listen)
            if not isinstance(listen, str) or ":" not in listen:
                problem("metrics.listen", 'must be an endpoint string like "tcp:9125:interface=127.0.0.1"')
            else:
                values["metrics"] = MetricsConfig(listen)
    return OpsConfig(**values)


def check_identity(ops: OpsConfig, problem: Problem) -> None:
    """``user`` and ``group`` must exist on this machine (checked at load, not at drop)."""
    import grp
    import pwd
    if ops.user is not None:
        try:
            pwd.getpwnam(ops.user)
        except KeyError:
            problem("server.user", f"no such user: {ops.user}")
    if ops.group is not None:
        try:
            grp.getgrnam(ops.group)
        except KeyError:
            problem("server.group", f"no such group: {ops.group}")
