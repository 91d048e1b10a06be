"""``[limits]`` / ``[auth.cache]`` parsing, rate windows, client keys."""

import ipaddress

import pytest

from saslsmtp.limits.redisurl import parse_redis_url
from saslsmtp.limits.settings import (AuthCacheSettings, LimitsSettings, Rate, client_key,
                                      parse_auth_cache, parse_limits, parse_rate)


def collect(parse, table):
    problems = []
    result = parse(table, lambda key, message: problems.append((key, message)))
    return result, problems


@pytest.mark.parametrize("text,rate", [
    ("60/1m", Rate(60, 60.0)), ("10/10m", Rate(10, 600.0)), ("20/1h", Rate(20, 3600.0)),
    ("5/30s", Rate(5, 30.0)), ("500/h", Rate(500, 3600.0)), ("1/d", Rate(1, 86400.0)),
    (" 3 / 2d ", Rate(3, 172800.0)),
])
def test_parse_rate(text, rate):
    """Windows are "N/unit" or "N/Nunit" with units s, m, h, d."""
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "60", "60/", "60/1", "60/1w", "0/1m", "5/0s", "-1/1m",
                                  "1.5/1m", "60/1m extra", "a/1m"])
def test_parse_rate_refuses(text):
    """Anything else is a ValueError with the text in it."""
    with pytest.raises(ValueError):
        parse_rate(text)


def test_rate_interval():
    """GCRA's emission interval is the window divided by the count."""
    assert Rate(10, 600.0).interval == 60.0
    assert str(Rate(10, 600.0)) == "10/600s"


def test_parse_limits_full_table():
    """Every contract key is converted to its typed value."""
    s, problems = collect(parse_limits, {
        "store": "redis://127.0.0.1:6379/0", "trusted_networks": ["127.0.0.0/8", "::1/128"],
        "ipv6_prefix": 56, "connections_per_ip": 20, "connection_rate_per_ip": "60/1m",
        "auth_failures_per_ip": "10/10m", "auth_failures_per_user": "20/1h",
        "messages_per_user": "500/1h", "recipients_per_user": "2000/1h",
        "auth_penalty_max": 15})
    assert problems == []
    assert s == LimitsSettings(
        store="redis://127.0.0.1:6379/0",
        trusted_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        ipv6_prefix=56, connections_per_ip=20, connection_rate_per_ip=Rate(60, 60.0),
        auth_failures_per_ip=Rate(10, 600.0), auth_failures_per_user=Rate(20, 3600.0),
        messages_per_user=Rate(500, 3600.0), recipients_per_user=Rate(2000, 3600.0),
        auth_penalty_max=15.0)


def test_parse_limits_defaults_are_off():
    """An empty table turns nothing on."""
    s, problems = collect(parse_limits, {})
    assert problems == [] and s == LimitsSettings()
    assert s.connections_per_ip is None and s.auth_failures_per_ip is None
    assert s.ipv6_prefix == 64 and s.store == "memory" and s.auth_penalty_max == 0.0


def test_parse_limits_reports_each_problem_by_key():
    """Each bad key is reported once, by its dotted name, and the rest still parses."""
    s, problems = collect(parse_limits, {
        "store": "mysql://x", "trusted_networks": ["10.0.0.0/8", "nonsense"], "ipv6_prefix": 129,
        "connections_per_ip": 0, "connection_rate_per_ip": "60/1w", "auth_failures_per_ip": 10,
        "messages_per_user": "5/1m", "colour": "blue", "auth_penalty_max": -1})
    keys = [k for k, _ in problems]
    assert keys == ["limits.store", "limits.trusted_networks", "limits.ipv6_prefix",
                    "limits.connections_per_ip", "limits.connection_rate_per_ip",
                    "limits.auth_failures_per_ip", "limits.colour", "limits.auth_penalty_max"]
    assert "nonsense" in dict(problems)["limits.trusted_networks"]
    assert "unknown key" in dict(problems)["limits.colour"]
    assert s.messages_per_user == Rate(5, 60.0)
    assert s.trusted_networks == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("url", ["redis://", "redis://h:99999/0", "redis://h/x", "unix://",
                                 "unix:///run/r.sock?db=x"])
def test_parse_limits_bad_redis_urls(url):
    """A store URL that cannot be connected to is a config problem, not a runtime one."""
    _, problems = collect(parse_limits, {"store": url})
    assert [k for k, _ in problems] == ["limits.store"]


def test_redis_urls():
    """redis://, rediss:// (TLS) and unix:// with credentials and db."""
    u = parse_redis_url("redis://:s%40cret@10.1.2.3:6380/4")
    assert (u.host, u.port, u.db, u.tls, u.password) == ("10.1.2.3", 6380, 4, False, "s@cret")
    assert "s@cret" not in repr(u) and "cret" not in u.describe()
    assert parse_redis_url("rediss://cache.example").tls
    assert parse_redis_url("rediss://cache.example").port == 6379
    assert parse_redis_url("rediss://c.example:6380/1?ca_file=/etc/ca.pem").ca_file == "/etc/ca.pem"
    with pytest.raises(ValueError):
        parse_redis_url("redis://c.example/0?ca_file=/etc/ca.pem")
    with pytest.raises(ValueError):
        parse_redis_url("rediss://c.example/0?verify=no")
    u = parse_redis_url("unix:///run/redis/redis.sock?db=2")
    assert (u.path, u.db, u.host) == ("/run/redis/redis.sock", 2, None)


def test_parse_auth_cache():
    """``[auth.cache]``: seconds and a size; off unless ttl > 0."""
    c, problems = collect(parse_auth_cache, {"ttl": 300, "negative_ttl": 60, "size": 1000,
                                             "stale_if_error": 3600})
    assert problems == [] and c == AuthCacheSettings(300.0, 60.0, 1000, 3600.0) and c.enabled
    assert not collect(parse_auth_cache, {})[0].enabled
    _, problems = collect(parse_auth_cache, {"ttl": "5m", "size": 0, "flavour": 1,
                                             "negative_ttl": True})
    assert [k for k, _ in problems] == ["auth.cache.ttl", "auth.cache.size",
                                        "auth.cache.flavour", "auth.cache.negative_ttl"]


@pytest.mark.parametrize("address,prefix,key", [
    ("192.0.2.7", 64, "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
    ("2001:db8::1", 128, "2001:db8::1"),
    ("::ffff:192.0.2.9", 64, "192.0.2.9"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("/run/socket", 64, "/run/socket"),
])
def test_client_key(address, prefix, key):
    """IPv4 as is; IPv6 grouped by prefix; mapped IPv4 folded; non-IP peers kept."""
    assert client_key(address, prefix) == key


def test_trusted_networks():
    """Trusted means inside a listed network, IPv4-mapped addresses included."""
    s, _ = collect(parse_limits, {"trusted_networks": ["127.0.0.0/8", "2001:db8::/32"]})
    assert s.is_trusted("127.0.0.1") and s.is_trusted("::ffff:127.0.0.2")
    assert s.is_trusted("2001:db8:ff::1")
    assert not s.is_trusted("192.0.2.1") and not s.is_trusted("::1")
    assert not s.is_trusted("unix-peer")


def test_commented_limits_and_cache_blocks_of_the_example_config_parse() -> None:
    """Uncomment etc/saslsmtp.toml's [limits] and [auth.cache] examples: they parse, and
    every key documented there is set."""
    import re
    from pathlib import Path

    from saslsmtp.config import parse_config
    from saslsmtp.mechanisms import BUILTIN_NAMES
    etc = Path(__file__).resolve().parent.parent / "etc" / "saslsmtp.toml"
    text = etc.read_text()
    head, marker, rest = text.partition("# ---- Abuse limits")
    block, more, tail = rest.partition("# ---- More backends")
    lines = [m.group(1) if (m := re.match(r"^# (\[[a-z.]+\]|[a-z_0-9]+ = .*)$", line)) else line
             for line in block.splitlines()]
    config = parse_config(head + marker + "\n".join(lines) + "\n" + more + tail, str(etc),
                          known_mechanisms=BUILTIN_NAMES)
    limits, cache = config.section("limits"), config.section("auth.cache")
    assert limits.store == "memory" and limits.connections_per_ip == 20
    assert str(limits.auth_failures_per_ip) == "10/600s" and limits.auth_penalty_max == 15
    assert cache.ttl == 300 and cache.negative_ttl == 60
