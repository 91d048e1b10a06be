"""Configuration validation branches: each bad value is a startup problem naming file,
line and key, instead of a server that starts and then fails every connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from saslsmtp.config import ConfigError, load_config, parse_config
from saslsmtp.mechanisms import BUILTIN_NAMES

# a valid [auth] + backend, so only the table under test has problems
VALID_AUTH = '\n[auth]\nbackends = ["users"]\n\n[backends.users]\ntype = "file"\npath = "users"\n'


def problems(text: str, tmp_path: Path) -> list[str]:
    """The problems of a config file (with a users file beside it), as printed."""
    (tmp_path / "users").write_text("")
    with pytest.raises(ConfigError) as e:
        parse_config(text, str(tmp_path / "c.toml"), known_mechanisms=BUILTIN_NAMES)
    return [str(p) for p in e.value.problems]


def test_the_valid_base_parses(tmp_path: Path) -> None:
    """The base the other tests add one mistake to is itself fine."""
    (tmp_path / "users").write_text("")
    config = parse_config(VALID_AUTH, str(tmp_path / "c.toml"), known_mechanisms=BUILTIN_NAMES)
    assert config.auth.backends == ("users",)


@pytest.mark.parametrize(("line", "message"), [
    ('hostname = "mäil.example.test"', "server.hostname: 'm\xe4il.example.test' is not a domain name or address"
                                       " literal"),
    ('hostname = ""', "server.hostname: '' is not a domain name"),
    ('hostname = "mail example"', "server.hostname: 'mail example' is not a domain name"),
    ("max_recipients = 0", "server.max_recipients: must be at least 1"),
    ("idle_timeout = 0", "server.idle_timeout: must be positive"),
    ("idle_timeout = -5.0", "server.idle_timeout: must be positive"),
    ("max_message_size = 0", "server.max_message_size: must be positive"),
    ("listen = []", "server.listen: needs at least one endpoint"),
])
def test_server_values_that_would_break_every_connection(tmp_path: Path, line: str,
                                                          message: str) -> None:
    """A hostname that is not ASCII would crash each greeting, a zero idle timeout would
    close each connection at once, zero recipients would refuse every message."""
    found = problems(f"[server]\n{line}\n" + VALID_AUTH, tmp_path)
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'c.toml'}:2: {message}")


@pytest.mark.parametrize(("line", "message"), [
    ("hash_threads = 0", "auth.hash_threads: must be at least 1"),
    ("max_failures = 0", "auth.max_failures: must be at least 1"),
    ("failure_delay = -1.0", "auth.failure_delay: must not be negative"),
    ("script_timeout = 0", "auth.script_timeout: must be positive"),
    ("script_max_steps = 0", "auth.script_max_steps: must be at least 1"),
    ('mechanisms = ["PLAIN", "plain"]', "auth.mechanisms: lists a mechanism twice"),
    ('mechanisms = ["PL AIN"]', "auth.mechanisms: 'PL AIN' is not a SASL mechanism name"),
])
def test_auth_values(tmp_path: Path, line: str, message: str) -> None:
    """Each [auth] rule beyond the types (zero hash threads would hang every login)."""
    text = VALID_AUTH.replace("[auth]\n", f"[auth]\n{line}\n")
    found = problems(text, tmp_path)
    assert any(p.startswith(f"{tmp_path / 'c.toml'}:3: {message}") for p in found), found


def test_tls_table_problems(tmp_path: Path) -> None:
    """[tls] needs both files; client_ca must exist; client_identity is cn or email."""
    found = problems('[tls]\ncertificate = "missing.pem"\nclient_ca = "ca.pem"\n'
                     'client_identity = "uid"\n' + VALID_AUTH, tmp_path)
    f = tmp_path / "c.toml"
    assert found == [
        f'{f}:4: tls.client_identity: must be "cn" or "email"',
        f"{f}:3: tls.client_ca: no such file: {tmp_path / 'ca.pem'}",
        f"{f}:2: tls.certificate: no such file: {tmp_path / 'missing.pem'}",
        f"{f}:1: tls.private_key: is required in [tls]",
    ]


def test_tables_that_are_not_tables(tmp_path: Path) -> None:
    """A section, the backends table or one backend given as a value."""
    f = tmp_path / "c.toml"
    assert f"{f}:1: tls: must be a table" in problems("tls = 3\n" + VALID_AUTH, tmp_path)
    found = problems('backends = 3\n[auth]\nbackends = []\nscript = "x.py"\n', tmp_path)
    assert f"{f}:1: backends: must be a table of backend tables" in found
    found = problems("[backends]\nusers = 3\n" + VALID_AUTH.split("\n[backends.users]")[0],
                     tmp_path)
    assert f"{f}:2: backends.users: must be a table" in found


def test_backend_types(tmp_path: Path) -> None:
    """A backend without a type, or with an unknown one, names the choices."""
    f = tmp_path / "c.toml"
    choices = "type must be one of dovecot, file, http, ldap, oauth2, smtp"
    found = problems(VALID_AUTH.replace('type = "file"', 'type = "pam"'), tmp_path)
    assert f"{f}:6: backends.users.type: {choices}" in found
    found = problems(VALID_AUTH.replace('type = "file"\n', ""), tmp_path)
    assert f"{f}:5: backends.users: {choices}" in found


def test_mechanism_without_a_server(tmp_path: Path) -> None:
    """A mechanism that is neither built in nor served by a script."""
    found = problems(VALID_AUTH.replace("[auth]\n", '[auth]\nmechanisms = ["X-NEW"]\n'),
                     tmp_path)
    assert found == [f"{tmp_path / 'c.toml'}:3: auth.mechanisms: X-NEW is not built in and"
                     " no auth.script is set to serve it"]


def test_nobody_could_log_in(tmp_path: Path) -> None:
    """No backends and no script: refused rather than a server nobody can use."""
    found = problems("[auth]\nbackends = []\n", tmp_path)
    assert found == [f"{tmp_path / 'c.toml'}:2: auth.backends: is empty and no auth.script"
                     " is set: nobody could log in"]


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    """A missing file and a file that is not UTF-8 are one problem each, not a traceback."""
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path / "absent.toml"))
    assert [str(p) for p in e.value.problems] == [
        f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"]
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[server]\nhostname = "\xe9"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert [str(p) for p in e.value.problems] == [f"{bad}: is not UTF-8 text"]
