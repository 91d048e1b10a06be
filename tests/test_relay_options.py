"""``[delivery]`` for smtp/lmtp: frozen options, every problem with its key."""

from __future__ import annotations

import pytest

from saslsmtp.relay.options import MaildirDelivery, UpstreamDelivery, parse_delivery


def parse(table, base=None):
    problems: list[tuple[str, str]] = []
    result = parse_delivery(table, lambda k, m: problems.append((k, m)), base)
    return result, problems


def test_maildir_stays_the_default(tmp_path):
    """No table, or ``type = "maildir"``: the Maildir delivery as before."""
    assert parse({}) == (MaildirDelivery(), [])
    assert parse({"type": "maildir", "path": "mail"}, tmp_path) == (
        MaildirDelivery(path=str(tmp_path / "mail")), [])


def test_smtp_and_lmtp_options():
    """Every key, with its type; the host is parsed out of the endpoint."""
    options, problems = parse({"type": "smtp", "endpoint": "tcp:mx.example.test:10025",
                               "starttls": True, "xclient": True, "timeout": 5,
                               "final_timeout": 900, "pool_size": 2, "auth_param": True,
                               "trace_header": "X-Authenticated", "reuse_limit": 20})
    assert problems == []
    assert options == UpstreamDelivery(type="smtp", endpoint="tcp:mx.example.test:10025",
                                       starttls=True, xclient=True, timeout=5.0,
                                       final_timeout=900.0, pool_size=2, reuse_limit=20,
                                       auth_param=True, trace_header="X-Authenticated")
    assert options.host == "mx.example.test" and not options.lmtp
    assert isinstance(options.final_timeout, float)
    lmtp, problems = parse({"type": "lmtp", "endpoint": "unix:/run/dovecot/lmtp"})
    assert problems == [] and lmtp.lmtp and lmtp.host is None
    assert (lmtp.timeout, lmtp.final_timeout) == (60.0, 600.0)  # RFC 5321's 10 minutes
    assert lmtp.reuse_limit == 100  # 99 RSETs: below Postfix's smtpd_junk_command_limit
    v6, _ = parse({"type": "smtp", "endpoint": "tcp:[::1]:25"})
    assert v6.host == "::1"


@pytest.mark.parametrize("table, expected", [
    ({"type": "pigeon"}, [("delivery.type", 'must be "maildir", "smtp" or "lmtp"')]),
    ({"type": "smtp"}, [("delivery.endpoint", 'is required for type "smtp"')]),
    ({"type": "smtp", "endpoint": "127.0.0.1:25"},
     [("delivery.endpoint", 'must be "tcp:HOST:PORT" or "unix:/PATH"')]),
    ({"type": "smtp", "endpoint": "tcp:h:70000"}, [("delivery.endpoint", "port must be 1-65535")]),
    ({"type": "lmtp", "endpoint": "unix:/x", "starttls": True},
     [("delivery.starttls", "TLS to a UNIX socket is not supported")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "tls": True, "starttls": True},
     [("delivery.starttls", "tls (implicit) and starttls exclude each other")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "timeout": 0, "pool_size": -1},
     [("delivery.timeout", "must be positive"),
      ("delivery.pool_size", "must not be negative (0: no idle connections kept)")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "reuse_limit": 0},
     [("delivery.reuse_limit", "must be at least 1 (1: a new connection for every message)")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "reuse_limit": -3},
     [("delivery.reuse_limit", "must be at least 1 (1: a new connection for every message)")]),
    ({"type": "lmtp", "endpoint": "unix:/x", "reuse_limit": 2.5},
     [("delivery.reuse_limit", "must be an integer")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "reuse_limit": True},
     [("delivery.reuse_limit", "must be an integer")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "reuse_limit": "100"},
     [("delivery.reuse_limit", "must be an integer")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "timeout": "5", "xclient": 1},
     [("delivery.timeout", "must be a number"), ("delivery.xclient", "must be a boolean")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "path": "x"},
     [("delivery.path", "unknown key for type 'smtp' (known: auth_param, ca_file, endpoint,"
                        " final_timeout, helo, pool_size, reuse_limit, starttls, timeout, tls,"
                        " tls_hostname, trace_header, type, xclient)")]),
    ({"type": "maildir", "xclient": True},
     [("delivery.xclient", "unknown key for type 'maildir' (known: path, type)")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "ca_file": "/nonexistent/ca.pem"},
     [("delivery.ca_file", "no such file: /nonexistent/ca.pem")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "trace_header": "X Bad: x"},
     [("delivery.trace_header", "is not a header field name")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "timeout": float("nan")},
     [("delivery.timeout", "must be a finite number, not nan")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "final_timeout": float("inf")},
     [("delivery.final_timeout", "must be a finite number, not inf")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "final_timeout": -5, "timeout": True},
     [("delivery.timeout", "must be a number"), ("delivery.final_timeout", "must be positive")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "final_timeout": "600"},
     [("delivery.final_timeout", "must be a number")]),
    ({"type": "smtp", "endpoint": "tcp:h:1", "helo": "a b\r\nRSET"},
     [("delivery.helo", "'a b\\r\\nRSET' is not a domain name or address literal (ASCII"
                        " letters, digits, '-', '_' and '.'; write IDN names in punycode)")]),
])
def test_problems(table, expected):
    """Each mistake is reported with its dotted key; the result is then ``None``."""
    result, problems = parse(table)
    assert result is None and problems == expected


def test_config_file_reports_delivery_and_submission_problems_with_lines(tmp_path):
    """Through ``load_config``: problems carry file and line; ``[submission]`` is read;
    until the server drives the relay, ``type = "smtp"`` is refused by name."""
    from saslsmtp.config import ConfigError, load_config

    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    (tmp_path / "senders").write_text("a: a@example.test\n")
    base = '[auth]\nbackends = ["u"]\n[backends.u]\ntype = "file"\npath = "users"\n'
    path = tmp_path / "c.toml"
    path.write_text(base + '[submission]\nsender_policy = "map"\nsender_map = "senders"\n')
    config = load_config(str(path))
    assert config.submission.sender_map == str(tmp_path / "senders")
    assert config.delivery.type == "maildir"
    path.write_text(base + '[delivery]\ntype = "smtp"\nendpoint = "tcp:127.0.0.1:1"\n'
                    'timeout = -1\n[submission]\nsender_policy = "owner"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert [str(p) for p in e.value.problems] == [
        f"{path}:9: delivery.timeout: must be positive",
        f"{path}:11: submission.sender_policy: must be \"any\", \"login\" or \"map\"",
    ]
    path.write_text(base + '[delivery]\ntype = "lmtp"\nendpoint = "unix:/run/lmtp"\n')
    config = load_config(str(path))  # wired into the server: accepted
    assert config.delivery.type == "lmtp" and config.delivery.endpoint == "unix:/run/lmtp"
