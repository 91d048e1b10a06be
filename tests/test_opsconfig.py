"""``[server]`` workers/user/group/log_format/log_level/log_rotate_size and ``[metrics]``: defaults,
values, and every mistake reported as ``file:line: key: message``."""

from __future__ import annotations

import pytest

from saslsmtp.config import ConfigError, parse_config
from saslsmtp.opsconfig import MetricsConfig, OpsConfig

# (an http backend: nothing on disk to find)
BASE = '[auth]\nbackends = ["api"]\n[backends.api]\ntype = "http"\nurl = "http://127.0.0.1:1/auth"\n'


def test_defaults_are_one_process_text_logs_no_metrics() -> None:
    """Without the keys: today's single process, no privilege drop, no endpoint."""
    assert parse_config(BASE).ops == OpsConfig(1, None, None, "text", "info", None)


def test_values_are_read() -> None:
    """Every key lands in ``Config.ops``; case of the log words does not matter."""
    ops = parse_config('[server]\nworkers = 0\nuser = "nobody"\ngroup = "nogroup"\n'
                       'log_format = "JSON"\nlog_level = "debug"\n[metrics]\n'
                       'listen = "tcp:9125:interface=127.0.0.1"\n' + BASE).ops
    assert ops == OpsConfig(0, "nobody", "nogroup", "json", "debug",
                            MetricsConfig("tcp:9125:interface=127.0.0.1"))
    assert ops.worker_count(cpus=2) == 2
    assert ops.worker_count(override=3, cpus=2) == 3
    assert OpsConfig(workers=4).worker_count(cpus=2) == 4


def test_mistakes_name_file_line_and_key() -> None:
    """Wrong types, out-of-range counts, unknown users and keys are startup errors."""
    with pytest.raises(ConfigError) as e:
        parse_config('[server]\nworkers = "two"\nuser = "no-such-user-here"\n'
                     'group = "no-such-group-here"\nlog_format = "xml"\nlog_level = 3\n'
                     '[metrics]\nlisten = 9125\nport = 1\n' + BASE, "f.toml")
    text = str(e.value)
    assert "f.toml:2: server.workers: must be an integer (0 = one per CPU)" in text
    assert "f.toml:3: server.user: no such user: no-such-user-here" in text
    assert "f.toml:4: server.group: no such group: no-such-group-here" in text
    assert "f.toml:5: server.log_format: must be one of 'text', 'json'" in text
    assert "f.toml:6: server.log_level: must be one of" in text
    assert "f.toml:8: metrics.listen: must be an endpoint string" in text
    assert "f.toml:9: metrics.port: unknown key (known: listen)" in text
    with pytest.raises(ConfigError, match="server.workers: must be between 0"):
        parse_config('[server]\nworkers = -1\n' + BASE)


def test_log_rotate_size() -> None:
    """twistd's 1 MB unless set; 0 leaves rotating to logrotate (SIGUSR1 still rotates)."""
    assert parse_config(BASE).ops.log_rotate_size == 1_000_000
    assert parse_config('[server]\nlog_rotate_size = 0\n' + BASE).ops.log_rotate_size == 0
    assert parse_config('[server]\nlog_rotate_size = 52428800\n' + BASE).ops.log_rotate_size == 52428800
    for wrong in ("-1", '"50M"', "true", "1.5"):
        with pytest.raises(ConfigError) as e:
            parse_config(f'[server]\nlog_rotate_size = {wrong}\n' + BASE, "f.toml")
        assert ("f.toml:2: server.log_rotate_size: must be a size in bytes"
                " (0: never by size, only on SIGUSR1)") in str(e.value)


def test_worker_timeout() -> None:
    """60 s unless set; 0 turns the check off; below a second (or not a number) is refused."""
    assert parse_config(BASE).ops.worker_timeout == 60.0
    assert parse_config('[server]\nworker_timeout = 0\n' + BASE).ops.worker_timeout == 0.0
    assert parse_config('[server]\nworker_timeout = 2.5\n' + BASE).ops.worker_timeout == 2.5
    assert parse_config('[server]\nworker_timeout = 300\n' + BASE).ops.worker_timeout == 300.0
    for wrong in ("-1", "0.5", '"60s"', "true", "inf", "nan"):
        with pytest.raises(ConfigError) as e:
            parse_config(f'[server]\nworker_timeout = {wrong}\n' + BASE, "f.toml")
        assert ("f.toml:2: server.worker_timeout: must be a number of seconds, at least 1"
                " (0: never replace a stuck worker)") in str(e.value)


def test_the_control_socket_is_an_absolute_path() -> None:
    """``[server] control_socket``: off by default, an absolute path when set; a relative
    one (it would depend on the folder the command runs in) is a problem."""
    assert parse_config(BASE).ops.control_socket is None
    ops = parse_config('[server]\ncontrol_socket = "/run/saslsmtp/control.sock"\n' + BASE).ops
    assert ops.control_socket == "/run/saslsmtp/control.sock"
    for value in ('"control.sock"', "1"):
        with pytest.raises(ConfigError) as e:
            parse_config(f'[server]\ncontrol_socket = {value}\n' + BASE, "f.toml")
        assert "f.toml:2: server.control_socket: must be an absolute path for a UNIX socket" \
            in str(e.value)


def test_a_changed_control_socket_waits_for_a_restart() -> None:
    """A reload warns about a control socket that changed (the sockets are bound), not
    about the same path moved from ``[auth.cache]`` to ``[server]``."""
    from saslsmtp.serving import restart_only_changes
    old = parse_config('[auth.cache]\ncontrol_socket = "/run/s/a.sock"\n' + BASE)
    moved = parse_config('[server]\ncontrol_socket = "/run/s/a.sock"\n' + BASE)
    other = parse_config('[server]\ncontrol_socket = "/run/s/b.sock"\n' + BASE)
    none = parse_config(BASE)
    assert restart_only_changes(old, moved) == []
    assert restart_only_changes(moved, other) == ["server.control_socket"]
    assert restart_only_changes(none, other) == ["server.control_socket"]
    assert restart_only_changes(other, none) == ["server.control_socket"]
