"""Guards the type annotations made explicit: a stored value of the wrong type is a
server problem (454), never a crash; odd certificates and broken TLS handles give empty
TLS facts, never an error for the client."""

from __future__ import annotations

import pytest

from saslsmtp.sasl.cram_md5 import KINDS, CramMD5
from saslsmtp.sasl.outcome import Defer, Lookup, Secret, Session

RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"  # RFC 2195's example


@pytest.mark.parametrize("value", [1234, None, ("a", "b")])
def test_cram_md5_plaintext_secret_of_the_wrong_type_defers(value: object) -> None:
    """A "plaintext" secret that is neither str nor bytes cannot be hashed: Defer (454),
    never a crash or a 535 that blames the client."""
    mech = CramMD5(Session(hostname="postoffice.reston.mci.net"), random=lambda: 1896,
                   clock=lambda: 697170952.9)
    mech.start(None)
    assert mech.receive(RESPONSE) == Lookup("tim", KINDS)
    assert mech.resume(Secret("plaintext", value)) == Defer()


# -- TLS facts: certificates without SANs, handles that fail --------------------------

class _Peer:
    def __init__(self, cert: object) -> None:
        self._cert = cert

    def to_cryptography(self) -> object:
        return self._cert


class _Conn:
    def __init__(self, peer: object) -> None:
        self._peer = peer

    def get_peer_certificate(self) -> object:
        return self._peer


def test_client_certificate_without_subject_alt_names(tmp_path: object) -> None:
    """A client certificate with no SAN has no e-mail: ``identity_from="email"`` gives an
    empty identity (EXTERNAL then refuses it), ``"cn"`` the common name."""
    from saslsmtp.tlsinfo import client_certificate
    from tests.tlsutil import issue_cert, make_ca
    issued = issue_cert(make_ca(str(tmp_path)), str(tmp_path), san=False, cn="client-7")
    conn = _Conn(_Peer(issued.certificate))
    by_email = client_certificate(conn, "email")
    assert by_email is not None
    assert (by_email["identity"], by_email["cn"], by_email["emails"]) == ("", "client-7", ())
    by_cn = client_certificate(conn, "cn")
    assert by_cn is not None and by_cn["identity"] == "client-7"
    assert client_certificate(_Conn(None)) is None


def test_tls_facts_survive_a_failing_connection_object() -> None:
    """A TLS handle that raises while being read gives no facts instead of an error
    for the client (the failure is logged)."""
    from twisted.logger import globalLogPublisher

    from saslsmtp.tlsinfo import TLSFacts, tls_facts

    class Broken:
        def get_protocol_version_name(self) -> str:
            raise RuntimeError("handle gone")

    class Transport:
        def getHandle(self) -> Broken:
            return Broken()

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert tls_facts(Transport()) == TLSFacts()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_format") == "could not read TLS connection facts" for e in events)
    assert tls_facts(object()) == TLSFacts()  # not TLS at all
