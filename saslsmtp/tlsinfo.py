"""What a TLS connection tells mechanisms: channel bindings and the client certificate.

* ``tls-exporter`` (RFC 9266) on TLS 1.3, ``tls-unique`` (RFC 5929, resumption-aware) on TLS 1.2, and
  ``tls-server-end-point`` (RFC 5929 section 4.1) on both, each read only when asked for;
* the verified client certificate, with the identity mapped from its CN or e-mail SAN,
  or why the one the client sent did not verify (``saslsmtp.tlsclientcert`` judges it
  against ``[tls] client_ca``; a context without that verifies in the handshake);
* why a handshake failed (``handshake_error``), for the one log line an operator reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from twisted.logger import Logger

from saslsmtp.tlsclientcert import checker_of

log = Logger(namespace="saslsmtp.tls")


def _connection(transport: Any) -> Any:
    get = getattr(transport, "getHandle", None)
    handle = get() if callable(get) else None
    return handle if hasattr(handle, "get_protocol_version_name") else None


def session_reused(conn: Any) -> bool:
    """Whether ``conn``'s handshake resumed an earlier session (a ticket or session ID).
    pyOpenSSL has no public call for it; its OpenSSL binding has ``SSL_session_reused``."""
    try:
        from OpenSSL._util import lib
        return bool(lib.SSL_session_reused(conn._ssl))
    except (ImportError, AttributeError, TypeError):
        return False


def extended_master_secret(conn: Any) -> bool:
    """Whether ``conn``'s TLS 1.2 session uses the extended master secret (RFC 7627)."""
    try:
        from OpenSSL._util import lib
        return bool(lib.SSL_get_extms_support(conn._ssl) == 1)
    except (ImportError, AttributeError, TypeError):
        return False


def _verify_error(conn: Any) -> str | None:
    """OpenSSL's verdict on the client certificate of ``conn`` when it did not verify
    (``"certificate has expired"``), else ``None``.  pyOpenSSL has no call for it."""
    try:
        from OpenSSL._util import ffi, lib
        code = lib.SSL_get_verify_result(conn._ssl)
        if code == 0:  # X509_V_OK
            return None
        return str(ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace"))
    except (ImportError, AttributeError, TypeError):
        return None


def handshake_error(reason: Any, transport: Any = None) -> str | None:
    """OpenSSL's words for a failed handshake, from the ``Failure`` the connection was
    lost with (``"wrong version number"``: a client speaking plaintext to a TLS port;
    ``"tlsv1 alert unknown ca"``: the client refused our certificate; ``"certificate
    verify failed (client certificate: certificate has expired)"``: we refused the
    client's); ``None`` when it ended otherwise (the client closed, a timeout)."""
    from OpenSSL import SSL
    error = getattr(reason, "value", None)
    if not isinstance(error, SSL.Error):
        return None
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    words = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry and entry[-1]]
    why = "; ".join(dict.fromkeys(words)) or str(error) or type(error).__name__
    conn = _connection(transport)
    detail = _verify_error(conn) if conn is not None else None
    return f"{why} (client certificate: {detail})" if detail else why


class ChannelBindings(Mapping[str, bytes]):
    """Channel-binding data of an ``OpenSSL.SSL.Connection`` after its handshake, by type.

    Which types exist is known at once from the protocol version (and for TLS 1.2's
    ``tls-unique``, from whether a resumed session has the extended master secret:
    without it the type is not offered).  Each value is read from OpenSSL (a
    keying-material export, a hash of our certificate) only when a mechanism asks for
    it: PLAIN and LOGIN never do, a SCRAM -PLUS exchange asks for one.  A value that
    cannot be read is logged and missing (the mechanism then refuses the binding).
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._values: dict[str, bytes | None] = {}
        version = conn.get_protocol_version_name()
        names = []
        if version == "TLSv1.3":
            names.append("tls-exporter")
        elif version in ("TLSv1.2", "TLSv1.1", "TLSv1") and (
                not session_reused(conn) or extended_master_secret(conn)):
            # RFC 7627: a resumed session without the extended master secret can have
            # the same tls-unique as an attacker's own (the triple handshake attack)
            names.append("tls-unique")
        self._names = tuple(names) + ("tls-server-end-point",)

    def _read(self, name: str) -> bytes | None:
        conn = self._conn
        if name == "tls-exporter":
            return bytes(conn.export_keying_material(b"EXPORTER-Channel-Binding", 32))
        if name == "tls-unique":
            # RFC 5929 3.1: the first Finished of the latest handshake; that is the
            # client's in a full handshake, ours (the server's) in a resumed one.
            finished = conn.get_finished() if session_reused(conn) else conn.get_peer_finished()
            return bytes(finished) if finished else None
        cert = conn.get_certificate()
        if cert is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding
        c = cert.to_cryptography()
        algorithm = c.signature_hash_algorithm
        hash_name = "sha256" if algorithm is None or algorithm.name in ("md5", "sha1") else algorithm.name
        return hashlib.new(hash_name, c.public_bytes(Encoding.DER)).digest()

    def __getitem__(self, name: str) -> bytes:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._values:
            try:
                self._values[name] = self._read(name)
            except Exception:
                log.failure("could not read the TLS channel binding {name}", name=name)
                self._values[name] = None
        value = self._values[name]
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def channel_bindings(conn: Any) -> dict[str, bytes]:
    """Every channel binding of ``conn``, read now (``ChannelBindings`` reads on demand)."""
    return dict(ChannelBindings(conn))


def client_certificate(conn: Any, identity_from: str = "cn") -> Mapping[str, object] | None:
    """The client certificate of ``conn`` if it verified, else ``None``; ``identity`` per
    ``identity_from`` (``"cn"`` or ``"email"``: the first e-mail subjectAltName)."""
    checker = checker_of(conn)
    if checker is None:  # the handshake verified it (or failed)
        peer = conn.get_peer_certificate()
    else:
        verdict = checker.verdict(conn)
        peer = verdict.certificate if verdict.verified else None
    return None if peer is None else certificate_fields(peer.to_cryptography(), identity_from)


def certificate_error(conn: Any) -> str | None:
    """Why the client certificate of ``conn`` did not verify (OpenSSL's words: ``"certificate
    has expired"``), or ``None``: it verified, none was sent, or the handshake judged it."""
    checker = checker_of(conn)
    return None if checker is None else checker.verdict(conn).error


def certificate_fields(cert: Any, identity_from: str = "cn") -> Mapping[str, object]:
    """What mechanisms and scripts see of a client certificate (a cryptography one)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    try:
        emails = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name)
    except x509.ExtensionNotFound:
        emails = []
    identity = (emails[0] if emails else "") if identity_from == "email" else cn
    return {"identity": identity, "subject": cert.subject.rfc4514_string(), "cn": cn,
            "emails": tuple(emails), "serial": cert.serial_number}


@dataclass(frozen=True)
class TLSFacts:
    """What one AUTH exchange learns of the TLS connection: channel bindings (read on
    demand), the verified client certificate, or why the one sent did not verify."""

    channel_bindings: Mapping[str, bytes] = field(default_factory=dict)
    client_certificate: Mapping[str, object] | None = None
    certificate_error: str | None = None


NO_FACTS = TLSFacts()


def tls_facts(transport: Any, identity_from: str = "cn") -> TLSFacts:
    """The ``TLSFacts`` of a TLS transport; empty when unknown."""
    conn = _connection(transport)
    if conn is None:
        return NO_FACTS
    try:
        return TLSFacts(ChannelBindings(conn), client_certificate(conn, identity_from),
                        certificate_error(conn))
    except Exception:
        log.failure("could not read TLS connection facts")
        return NO_FACTS
