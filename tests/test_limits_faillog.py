"""The failed-AUTH log line and the shipped fail2ban filter, checked with the real
fail2ban-regex against lines our own formatter and twisted's text log produce."""

import subprocess

import pytest
from twisted.logger import Logger, formatEventAsClassicLogText

from saslsmtp.limits.faillog import (format_auth_failure, format_auth_success, log_auth_failure,
                                     log_auth_success)
from tests.conftest import require_binary
from tests.support import ROOT

FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "saslsmtp.conf"

HOSTILE = [
    "alice",
    "",
    'x" client=6.6.6.6 user="y',
    "a [x] auth failed: client=6.6.6.6 mechanism=PLAIN user=",
    'evil\nauth failed: client=6.6.6.6 mechanism=PLAIN user="z" reason="r"',
    "cr\rlf\r\nauth failed: client=6.6.6.6 mechanism=PLAIN user=\"q\" reason=",
    "back\\slash\\\" reason=\"spoof\" client=6.6.6.6",
    "ünïcødé\u2028\u0085user",
    "\x00\x1b[31mred",
    "6.6.6.6",
    "x" * 5000,
]


def test_line_format():
    """The exact format: client first, JSON-quoted username, our reason."""
    assert format_auth_failure("203.0.113.7", "plain", "alice") == (
        'auth failed: client=203.0.113.7 mechanism=PLAIN user="alice"'
        ' reason="invalid credentials"')
    assert format_auth_success("2001:db8::1", "LOGIN", "bob") == (
        'auth succeeded: client=2001:db8::1 mechanism=LOGIN user="bob"')


@pytest.mark.parametrize("user", HOSTILE)
def test_hostile_usernames_stay_one_token(user):
    """Whatever the username, the line is one ASCII line with one client= field before it."""
    line = format_auth_failure("203.0.113.7", "PLAIN", user, "invalid credentials")
    assert "\n" not in line and "\r" not in line and line.isascii() and line.isprintable()
    assert line.startswith("auth failed: client=203.0.113.7 mechanism=PLAIN user=\"")
    assert line.endswith(' reason="invalid credentials"')
    assert len(line) < 2000


def test_odd_inputs_are_normalised():
    """A client that is not an IP, or a mechanism outside the SASL alphabet, cannot inject."""
    assert format_auth_failure("1.2.3.4 client=6.6.6.6", "X Y", None).startswith(
        'auth failed: client=unknown mechanism=unknown user=""')
    assert "client=fe80::1 " in format_auth_failure("fe80::1%eth0", "PLAIN", "a")


ADDRESSES = ["1.2.3.4", "0.0.0.0", "255.255.255.255", "10.0.0.255", "192.168.1.10", "01.2.3.4",
             "1.2.3.04", "256.1.1.1", "1.2.3", "1.2.3.4.5", "1.2.3.4\n", " 1.2.3.4", "1.2.3.4 ",
             "::1", "::ffff:1.2.3.4", "2001:DB8::1", "fe80::1%eth0", "", "x", "1.2.3.-4"]


@pytest.mark.parametrize("address", ADDRESSES)
def test_the_client_field_is_what_ipaddress_makes_of_it(address):
    """The dotted-quad fast path writes exactly what ``ipaddress`` would (or "unknown")."""
    import ipaddress
    try:
        expected = str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        expected = "unknown"
    assert format_auth_success(address, "PLAIN", "a").startswith(
        f"auth succeeded: client={expected} mechanism=PLAIN ")


def twisted_lines(calls):
    """Lines exactly as twistd's text log writes them."""
    out = []
    logger = Logger(namespace="saslsmtp.auth",
                    observer=lambda e: out.append(formatEventAsClassicLogText(e)))
    for fn, args in calls:
        fn(*args, logger=logger)
    return out


def test_fail2ban_regex_matches_every_failure_and_no_success(tmp_path):
    """fail2ban-regex with the shipped filter finds every failure with the right address
    (including hostile usernames that embed fake failures) and never a success line."""
    binary = require_binary("fail2ban-regex", "fail2ban")
    failures = [(f"203.0.113.{i + 1}", user) for i, user in enumerate(HOSTILE)]
    failures.append(("2001:db8::7", "v6user"))
    calls = []
    for client, user in failures:
        calls.append((log_auth_failure, (client, "PLAIN", user)))
        calls.append((log_auth_success, ("198.51.100.1", "LOGIN", user)))
    lines = twisted_lines(calls)
    # the same failure as syslog/journal forwarding writes it
    lines.append("Nov 29 13:57:52 mx saslsmtp[1234]: [-] "
                 + format_auth_failure("192.0.2.44", "LOGIN", "bob") + "\n")
    # EXTERNAL's failures, whatever their reason, are failed AUTHs too
    for n, reason in enumerate(("no client certificate", "no identity in the client certificate",
                                "authorization identity not allowed", "identity not authorized")):
        lines.append(twisted_lines([(log_auth_failure, (f"192.0.2.{50 + n}", "EXTERNAL", "",
                                                        reason))])[0])
    log = tmp_path / "saslsmtp.log"
    log.write_text("".join(lines))
    run = subprocess.run([binary, "-o", "ip", str(log), str(FILTER)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    found = run.stdout.split()
    expected = [client for client, _ in failures] + ["192.0.2.44"] + [
        f"192.0.2.{50 + n}" for n in range(4)]
    assert found == expected
    assert "6.6.6.6" not in found and "198.51.100.1" not in found
