"""The configuration file: types, unknown keys, dangling names, line numbers, and the
shipped examples (so etc/ cannot go stale)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from saslsmtp.config import ConfigError, key_lines, load_config, parse_config
from saslsmtp.mechanisms import BUILTIN_NAMES

ETC = Path(__file__).resolve().parent.parent / "etc"
KNOWN = BUILTIN_NAMES


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), known_mechanisms=KNOWN)
    return [str(p) for p in e.value.problems]


def test_example_config_parses() -> None:
    config = load_config(str(ETC / "saslsmtp.toml"), known_mechanisms=KNOWN)
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.auth.mechanisms == ("PLAIN", "LOGIN")
    assert config.auth.require_tls is False  # the demo only; see the comment there
    assert config.backends["users"].options.path == str((ETC / "users").resolve())


def test_every_commented_backend_example_parses(tmp_path: Path) -> None:
    """Uncomment the example backend blocks of etc/saslsmtp.toml: they must parse."""
    text = (ETC / "saslsmtp.toml").read_text()
    head, marker, examples = text.partition("# ---- More backends")
    assert marker
    examples = examples.partition("# ---- Onward delivery")[0]  # tested in test_wire_config
    uncommented = head.splitlines()
    for line in (marker + examples).splitlines():
        m = re.match(r"^# (\[backends\.\w+\]|[a-z_]+ = .*)$", line)
        uncommented.append(m.group(1) if m else line)
    for name in ("directory", "upstream", "api", "dovecot"):
        assert f"[backends.{name}]" in uncommented
    # the ca_file examples name files that do not exist here; point them at a PEM CA
    from tests.tlsutil import make_ca
    body = "\n".join(uncommented)
    body = re.sub(r'ca_file = "[^"]+"', f'ca_file = "{make_ca(tmp_path).cert_path}"', body)
    config = parse_config(body, str(ETC / "saslsmtp.toml"), known_mechanisms=KNOWN)
    assert {"users", "directory", "upstream", "api", "dovecot"} <= set(config.backends)


def test_unknown_keys_wrong_types_dangling_names(tmp_path: Path) -> None:
    found = problems('[server]\nlisten = "tcp:25"\nmax_message_size = "big"\n\n[auth]\n'
                     'mechanisms = ["PLAIN", "NOPE"]\nbackends = ["users"]\nrequire_tls = 1\n'
                     '\n[backends.users]\ntype = "file"\npath = "missing-file"\ncolour = "red"\n'
                     '\n[typo]\nx = 1\n', tmp_path)
    f = tmp_path / "c.toml"
    assert f"{f}:3: server.max_message_size: must be an integer, not a string" in found
    assert f"{f}:8: auth.require_tls: must be a boolean, not an integer" in found
    assert any(p.startswith(f"{f}:13: backends.users.colour: unknown key") for p in found)
    assert any(p.startswith(f"{f}:12: backends.users.path: no such file") for p in found)
    assert f"{f}:6: auth.mechanisms: NOPE is not built in and no auth.script is set to serve it" in found
    assert any(p.startswith(f"{f}:15: typo: unknown section") for p in found)


def test_nan_and_inf_are_no_number_of_seconds(tmp_path: Path) -> None:
    """TOML's ``nan`` compares false with everything: every number option refuses it
    (and ``inf``), where it would otherwise pass every range check."""
    found = problems('[server]\nidle_timeout = nan\n[auth]\nbackends = ["u"]\n'
                     'script_timeout = inf\nfailure_delay = -nan\n[backends.u]\ntype = "file"\n'
                     'path = "u"\n[limits]\nauth_penalty_max = nan\n[auth.cache]\nttl = inf\n',
                     tmp_path)
    f = tmp_path / "c.toml"
    for expected in (f"{f}:2: server.idle_timeout: must be a finite number, not nan",
                     f"{f}:5: auth.script_timeout: must be a finite number, not inf",
                     f"{f}:6: auth.failure_delay: must be a finite number, not nan",
                     f"{f}:11: limits.auth_penalty_max: must be a number of seconds, 0 or more",
                     f"{f}:13: auth.cache.ttl: must be a number of seconds, 0 or more"):
        assert expected in found, found
    huge = problems(f'[server]\nidle_timeout = 1{"0" * 400}\n', tmp_path)  # no float holds it
    assert f"{f}:2: server.idle_timeout: must be a finite number, not an integer beyond any" \
           " float" in huge, huge


def test_the_unknown_key_hint_names_every_server_key(tmp_path: Path) -> None:
    """``worker = 2`` is pointed to ``workers``, which [server] also takes."""
    found = problems('[server]\nworker = 2\n', tmp_path)
    assert any("server.worker: unknown key (known: control_socket, group, hostname," in p and " workers)" in p
               for p in found), found


def test_no_mechanism_is_no_server(tmp_path: Path) -> None:
    """``mechanisms = []``: nobody could log in, and MAIL needs AUTH."""
    (tmp_path / "u").write_text("alice:{PLAIN}pw\n")
    found = problems('[auth]\nmechanisms = []\nbackends = ["u"]\n[backends.u]\ntype = "file"\n'
                     'path = "u"\n', tmp_path)
    assert found == [f"{tmp_path / 'c.toml'}:2: auth.mechanisms: is empty: nobody could log in"]
    found = problems('[auth]\nmechanisms = [1]\n', tmp_path)
    assert any("auth.mechanisms: must be an array of strings, not an array of integers" in p
               for p in found), found


def test_backend_type_must_be_known(tmp_path: Path) -> None:
    found = problems('[auth]\nbackends = ["x"]\n[backends.x]\ntype = "carrier-pigeon"\n', tmp_path)
    assert any("backends.x.type: type must be one of" in p for p in found)


def test_not_toml(tmp_path: Path) -> None:
    found = problems("[server\nhostname = 1\n", tmp_path)
    assert len(found) == 1 and "not valid TOML" in found[0] and ":1:" in found[0]


def test_relative_paths_and_string_listen(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = "tcp:2525"\n[auth]\nbackends = ["u"]\n'
                    '[backends.u]\ntype = "file"\npath = "users"\n[delivery]\npath = "mail"\n')
    config = load_config(str(path), known_mechanisms=KNOWN)
    assert config.server.listen == ("tcp:2525",)
    assert config.backends["u"].options.path == str(tmp_path / "users")
    assert config.delivery.path == str(tmp_path / "mail")


def test_mechanism_names_are_case_insensitive(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    path = tmp_path / "c.toml"
    path.write_text('[auth]\nmechanisms = ["plain", "Login"]\nbackends = ["u"]\n'
                    '[backends.u]\ntype = "file"\npath = "users"\n')
    assert load_config(str(path), known_mechanisms=KNOWN).auth.mechanisms == ("PLAIN", "LOGIN")


def test_key_lines() -> None:
    lines = key_lines('a = 1\n[server]\n# c\nhostname = "x"\n[backends.users]\npath = "p"\n')
    assert lines == {"a": 1, "server": 2, "server.hostname": 4, "backends.users": 5,
                     "backends.users.path": 6}


def test_config_is_frozen() -> None:
    config = load_config(str(ETC / "saslsmtp.toml"), known_mechanisms=KNOWN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.auth.require_tls = True  # type: ignore[misc]


# ---- backend options: the rules live beside each checker, errors keep their line ----

#: (backend table body, the key named, words of the message).  The third line of each
#: body, line 6 of the file (the table starts on line 3), is the bad key.
BAD_BACKEND_OPTIONS = [
    ('type = "file"\ndefault_scheme = "CRYPT"\npath = "nope"', "path", "no such file"),
    ('type = "ldap"\nuser_dn = "uid={username},dc=x"\nurl = "ldap://h#frag"', "url",
     "not an ldap:// or ldaps:// server URL"),
    ('type = "ldap"\nuser_dn = "uid={username},dc=x"\nurl = ["ldap://a", "ldap://h:99999"]',
     "url", "not an ldap:// or ldaps:// server URL: 'ldap://h:99999'"),
    ('type = "ldap"\nurl = "ldap://h"\nuser_dn = "uid=x"', "user_dn", "must contain {username}"),
    ('type = "ldap"\nsearch_base = "dc=x"\nstart_tls = "yes"', "start_tls", "must be a boolean"),
    ('type = "ldap"\nurl = "ldap://h"\nidentity_attribute = "u id"',
     "identity_attribute", "must be an attribute name"),
    ('type = "smtp"\nhost = "h"\nport = 70000', "port", "must be 1 to 65535"),
    ('type = "smtp"\nhost = "h"\ntimeout = 0', "timeout", "must be positive"),
    ('type = "smtp"\nhost = "h"\nendpoint = "bogus:x"', "endpoint",
     "'bogus:x' is not a Twisted client endpoint string (Unknown endpoint type: 'bogus')"),
    ('type = "smtp"\nhost = "h"\nendpoint = "tcp:h"', "endpoint",
     "is not a Twisted client endpoint string"),
    ('type = "smtp"\nhost = "h"\nhelo = "a b\\r\\nRSET"', "helo",
     "'a b\\r\\nRSET' is not a domain name or address literal"),
    ('type = "http"\nurl = "http://x"\ntimeout = nan', "timeout", "must be a finite number, not nan"),
    ('type = "smtp"\nhost = "h"\nca_file = "c.toml"', "ca_file", "holds no PEM certificate"),
    ('type = "oauth2"\njwks_url = "https://x"\nca_file = "c.toml"', "ca_file",
     "holds no PEM certificate"),
    ('type = "dovecot"\nsocket = "/s"\nservice = "a\\tb"', "service", "is not a service name"),
    ('type = "http"\ntimeout = 1\nurl = "ftp://x"', "url", "http:// or https://"),
    ('type = "http"\nurl = "http://x"\nheaders = { X = "a\\nb" }', "headers", "line break"),
    ('type = "dovecot"\ntimeout = 1\nsocket = "tcp:host"', "socket", "tcp:HOST:PORT"),
    ('type = "dovecot"\nsocket = "/s"\ntimeout = -1', "timeout", "must be positive"),
    ('type = "oauth2"\nintrospection_url = "https://x"\nalgorithms = ["HS256"]', "algorithms",
     "'HS256' is not allowed"),
    ('type = "oauth2"\njwks_url = "https://x"\nleeway = -1', "leeway", "must not be negative"),
    ('type = "oauth2"\naudience = "a"\njwks_file = "c.toml"', "jwks_file", "c.toml: not JSON"),
    ('type = "oauth2"\njwks_url = "https://x"\ncolour = 1', "colour", "unknown key"),
]


@pytest.mark.parametrize("body,key,words", BAD_BACKEND_OPTIONS,
                         ids=[f"{b.split(chr(34))[1]}-{k}" for b, k, _ in BAD_BACKEND_OPTIONS])
def test_bad_backend_option_names_file_line_and_key(tmp_path: Path, body: str, key: str,
                                                    words: str) -> None:
    """Each backend type's options class reports a bad key; the file reader adds file:line."""
    found = problems(f'[auth]\nbackends = ["b"]\n[backends.b]\n{body}\n', tmp_path)
    f = tmp_path / "c.toml"
    assert any(p.startswith(f"{f}:6: backends.b.{key}: ") and words in p for p in found), found


def test_backend_option_rules_without_the_file() -> None:
    """The same rules hold for keyword arguments: an OptionsError that names the key."""
    from saslsmtp.checkers.ldap import LdapOptions
    from saslsmtp.checkers.registry import BackendDeps, checker_from_options
    from saslsmtp.options import OptionsError

    with pytest.raises(OptionsError) as e:
        LdapOptions(url="ldap://h#frag", user_dn="uid={username}")
    assert e.value.key == "url" and "ldap://h#frag" in str(e.value)
    assert LdapOptions(url="ldap://h", user_dn="uid={username}").url == ("ldap://h",)
    deps = BackendDeps(reactor=None, hash_runner=None, make_runner=None)  # type: ignore[arg-type]
    with pytest.raises(OptionsError) as e:
        checker_from_options("http", "api", deps, url="http://x", colour="red")
    assert e.value.key == "colour"


def test_sections_table_reaches_every_section(tmp_path: Path) -> None:
    """Config.section() returns each registered section; the core ones are attributes too."""
    from saslsmtp.config import SECTIONS

    config = load_config(str(ETC / "saslsmtp.toml"), known_mechanisms=KNOWN)
    assert set(SECTIONS) <= set(config.sections)
    assert config.section("server") is config.server and config.section("tls") is None


def test_a_new_section_plugs_in_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A section is an Options class and a SECTIONS line; a dotted name is a sub-table of
    another section (its parent does not call it an unknown key); problems keep file:line."""
    from dataclasses import dataclass
    from typing import Iterable

    from saslsmtp.config import SECTIONS, Section
    from saslsmtp.options import OptionProblem, Options

    @dataclass(frozen=True)
    class Cache(Options):
        size: int = 100

        def check(self) -> Iterable[OptionProblem]:
            return [OptionProblem("size", "must be positive")] if self.size <= 0 else []

    monkeypatch.setitem(SECTIONS, "auth.cache", Section(Cache))
    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    good = tmp_path / "good.toml"
    good.write_text('[auth]\nbackends = ["u"]\n[auth.cache]\nsize = 7\n'
                    '[backends.u]\ntype = "file"\npath = "users"\n')
    config = load_config(str(good), known_mechanisms=KNOWN)
    assert config.section("auth.cache") == Cache(size=7)
    assert config.auth.backends == ("u",)
    found = problems('[auth]\nbackends = ["u"]\n\n[auth.cache]\nsize = 0\n'
                     '[backends.u]\ntype = "file"\npath = "users"\n', tmp_path)
    assert found == [f"{tmp_path / 'c.toml'}:5: auth.cache.size: must be positive"]


@pytest.mark.parametrize("listen", ["ssl:465", "haproxy:ssl:465", "systemd:name=smtps:ssl=yes",
                                    "haproxy:systemd:port=465:ssl=yes"])
def test_implicit_tls_needs_a_tls_section(tmp_path: Path, listen: str) -> None:
    """``systemd:...:ssl=yes`` is implicit TLS as ``ssl:`` is: without [tls] the start
    would fail at the first connection."""
    (tmp_path / "u").write_text("alice:{PLAIN}pw\n")
    found = problems(f'[server]\nlisten = ["{listen}"]\n[auth]\nrequire_tls = false\n'
                     'backends = ["u"]\n[backends.u]\ntype = "file"\npath = "u"\n', tmp_path)
    assert found == [f"{tmp_path / 'c.toml'}:2: server.listen: an ssl: endpoint (or"
                     " systemd:...:ssl=yes) needs a [tls] section"]
