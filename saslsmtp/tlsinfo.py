"""What a TLS connection tells mechanisms: channel bindings and the client certificate.

* ``tls-exporter`` (RFC 9266) on TLS 1.3, ``tls-unique`` (RFC 5929) on TLS 1.2, and
  ``tls-server-end-point`` (RFC 5929 section 4.1) on both;
* the verified client certificate (only present when ``[tls] client_ca`` made OpenSSL
  verify it), with the identity mapped from its CN or e-mail SAN.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from twisted.logger import Logger

log = Logger(namespace="saslsmtp.tls")


def _connection(transport: Any) -> Any:
    get = getattr(transport, "getHandle", None)
    handle = get() if callable(get) else None
    return handle if hasattr(handle, "get_protocol_version_name") else None


def channel_bindings(conn: Any) -> dict[str, bytes]:
    """Channel-binding data of an ``OpenSSL.SSL.Connection`` after its handshake."""
    from cryptography.hazmat.primitives.serialization import Encoding
    out: dict[str, bytes] = {}
    version = conn.get_protocol_version_name()
    if version == "TLSv1.3":
        out["tls-exporter"] = conn.export_keying_material(b"EXPORTER-Channel-Binding", 32)
    elif version in ("TLSv1.2", "TLSv1.1", "TLSv1"):
        finished = conn.get_peer_finished()  # server side of a full handshake: the client's
        if finished:
            out["tls-unique"] = finished
    cert = conn.get_certificate()
    if cert is not None:
        c = cert.to_cryptography()
        algorithm = c.signature_hash_algorithm
        name = "sha256" if algorithm is None or algorithm.name in ("md5", "sha1") else algorithm.name
        out["tls-server-end-point"] = hashlib.new(name, c.public_bytes(Encoding.DER)).digest()
    return out


def client_certificate(conn: Any, identity_from: str = "cn") -> Mapping[str, object] | None:
    """The peer certificate OpenSSL verified, or ``None``; ``identity`` per ``identity_from``
    (``"cn"`` or ``"email"``: the first e-mail subjectAltName)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    peer = conn.get_peer_certificate()
    if peer is None:
        return None
    cert = peer.to_cryptography()
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


def tls_facts(transport: Any, identity_from: str = "cn") -> tuple[dict[str, bytes], Mapping[str, object] | None]:
    """(channel bindings, client certificate) of a TLS transport; empty when unknown."""
    conn = _connection(transport)
    if conn is None:
        return {}, None
    try:
        return channel_bindings(conn), client_certificate(conn, identity_from)
    except Exception:
        log.failure("could not read TLS connection facts")
        return {}, None
