"""Scripted mechanisms and ``auth.require_tls``: a custom mechanism is plaintext (hidden
before TLS, 538) unless the script's ``MECHANISMS`` declares it safe without TLS."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from twisted.internet import reactor

from saslsmtp.config import ConfigError
from saslsmtp.script import load_script
from saslsmtp.service import load, wire
from saslsmtp.testing import SMTPHarness
from tests.support import write_config

ONETIME = b"AUTH X-ONETIME " + base64.b64encode(b"alice 123456") + b"\r\n"

SCRIPT = '''
from saslsmtp.script import Accept
MECHANISMS = {declared}

def auth(arguments, context):
    return Accept(username="alice")
'''


def _script(tmp_path: Path, declared: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(SCRIPT.format(declared=declared))
    return path


def _harness(script: Path) -> SMTPHarness:
    h = SMTPHarness(script=script, mechanism_names=["X-ONETIME"], require_tls=True)
    return h


@pytest.mark.parametrize("declared", ['["X-ONETIME"]', '{"X-ONETIME": {}}',
                                      '{"X-ONETIME": {"plaintext": True}}'])
def test_undeclared_custom_mechanism_is_plaintext(tmp_path: Path, declared: str) -> None:
    """Without a declaration a custom mechanism is neither announced nor accepted before
    TLS under require_tls (538 5.7.11), like PLAIN."""
    h = _harness(_script(tmp_path, declared))
    assert b"X-ONETIME" not in h.send(b"EHLO client.example\r\n")
    assert h.send(ONETIME) == (b"538 5.7.11 Encryption required for requested"
                               b" authentication mechanism\r\n")


def test_custom_mechanism_declared_safe_without_tls(tmp_path: Path) -> None:
    """``{"plaintext": False}`` says the mechanism is safe in the clear: offered and run."""
    h = _harness(_script(tmp_path, '{"X-ONETIME": {"plaintext": False}}'))
    assert b"AUTH X-ONETIME" in h.send(b"EHLO client.example\r\n")
    assert h.send(ONETIME).startswith(b"235 ")


def test_custom_mechanism_declared_needs_tls(tmp_path: Path) -> None:
    """``needs_tls`` hides it before TLS even when ``require_tls`` is off."""
    h = SMTPHarness(script=_script(tmp_path, '{"X-ONETIME": {"plaintext": False, "needs_tls": True}}'),
                    mechanism_names=["X-ONETIME"], require_tls=False)
    assert b"X-ONETIME" not in h.send(b"EHLO client.example\r\n")
    assert h.send(ONETIME).startswith(b"538 5.7.11")


def test_daemon_wiring_treats_custom_mechanism_as_plaintext(tmp_path: Path) -> None:
    """The daemon's wiring builds the same specs as the harness."""
    script = _script(tmp_path, '{"X-ONETIME": {}, "X-SAFE": {"plaintext": False}}')
    config = load(str(write_config(tmp_path, mechanisms=["X-ONETIME", "X-SAFE", "PLAIN"],
                                   script=str(script), require_tls=True)))
    mechanisms = wire(config, reactor).mechanisms
    assert mechanisms["X-ONETIME"].plaintext and not mechanisms["X-ONETIME"].needs_tls
    assert not mechanisms["X-SAFE"].plaintext
    assert mechanisms["PLAIN"].plaintext


def test_script_taking_over_a_builtin_keeps_its_tls_needs(tmp_path: Path) -> None:
    """A script serving PLAIN itself (named in MECHANISMS) does not make PLAIN safe in the clear."""
    script = _script(tmp_path, '["PLAIN"]')
    config = load(str(write_config(tmp_path, mechanisms=["PLAIN"], script=str(script),
                                   require_tls=True)))
    assert wire(config, reactor).mechanisms["PLAIN"].plaintext


@pytest.mark.parametrize("declared, message", [
    ('{"X-ONETIME": {"plain": False}}', "unknown key"),
    ('{"X-ONETIME": {"plaintext": "no"}}', "True or False"),
    ('{"X-ONETIME": ["plaintext"]}', "a dict"),
])
def test_bad_declaration_is_a_startup_error(tmp_path: Path, declared: str, message: str) -> None:
    """A mistyped declaration stops startup with the script's file named."""
    with pytest.raises(ConfigError) as e:
        load_script(str(_script(tmp_path, declared)))
    assert message in str(e.value) and "script.py" in str(e.value)


def test_the_script_hears_why_a_client_certificate_did_not_verify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``client_certificate`` stays the verified certificate (``None`` here), and
    ``client_certificate_error`` says why the one the client sent did not verify."""
    import saslsmtp.peer
    from saslsmtp.tlsinfo import TLSFacts
    monkeypatch.setattr(saslsmtp.peer, "tls_facts", lambda transport, identity: TLSFacts(
        certificate_error="certificate has expired"))
    script = tmp_path / "script.py"
    script.write_text('''
from saslsmtp.script import Reject
MECHANISMS = {"X-CERT": {"plaintext": False}}

def auth(arguments, context):
    return Reject(reason=f"{arguments['client_certificate']} / {arguments['client_certificate_error']}")
''')
    h = SMTPHarness(script=script, mechanism_names=["X-CERT"], tls=True)
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH X-CERT =\r\n") == b"535 5.7.8 None / certificate has expired\r\n"
