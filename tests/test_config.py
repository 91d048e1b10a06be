"""The configuration file: types, unknown keys, dangling names, line numbers, and the
shipped examples (so etc/ cannot go stale)."""

from __future__ import annotations

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
    uncommented = head.splitlines()
    for line in (marker + examples).splitlines():
        m = re.match(r"^# (\[backends\.\w+\]|[a-z_]+ = .*)$", line)
        uncommented.append(m.group(1) if m else line)
    for name in ("directory", "upstream", "api", "dovecot"):
        assert f"[backends.{name}]" in uncommented
    # the ca_file examples name files that do not exist here; point them at one that does
    body = "\n".join(uncommented)
    body = re.sub(r'ca_file = "[^"]+"', f'ca_file = "{ETC / "users"}"', body)
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
    with pytest.raises(Exception):
        config.auth.require_tls = True  # type: ignore[misc]
