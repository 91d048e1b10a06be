"""The server's TLS options: built once per configuration load, shared by every connection.

``server_options`` reads ``[tls]`` and returns Twisted ``CertificateOptions`` whose OpenSSL
context is made here, at load time, not at the first connection: a key that does not
match is a load error, and every STARTTLS and ``ssl:`` connection until the next reload
uses this one context (``CertificateOptions.getContext`` caches it).

What it sets beyond Twisted's defaults (TLS 1.2 floor, Twisted's cipher list, OpenSSL's
own key-exchange groups):

* **resumption**: session tickets (stateless; TLS 1.3 and TLS 1.2) and OpenSSL's
  in-process session cache (TLS 1.2 session IDs), so a returning client skips the
  certificate signature.  The ticket key is made by OpenSSL with the context: it is
  per process and per load, so a ticket resumes only on the worker that issued it and
  until the next reload (otherwise the client gets a full handshake; nothing fails).
  pyOpenSSL has no call to set a shared ticket key.
* ``OP_NO_RENEGOTIATION``: a TLS 1.2 client cannot make the server redo a handshake
  (RSA signatures on demand) inside a session.
* with ``client_ca``: its CAs' names in the certificate request (Twisted sends none), as
  Postfix and Dovecot do, so a client that chooses by them (GnuTLS-based ones such as
  msmtp, pickers that filter by issuer) sends one these CAs issued, or none.  A
  certificate that does not verify does not fail the handshake: it is judged per
  connection when a mechanism asks (``saslsmtp.tlsclientcert``), so its client can still
  log in with a password, and EXTERNAL says why it refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saslsmtp.config import TLSConfig
from saslsmtp.tlsclientcert import ClientCertificates, accept_any


def server_options(tls: TLSConfig) -> Any:
    """``CertificateOptions`` for ``[tls]`` with its context already made."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import SSL, crypto
    from twisted.internet import ssl
    certs = x509.load_pem_x509_certificates(Path(tls.certificate).read_bytes())
    key = load_pem_private_key(Path(tls.private_key).read_bytes(), password=None)
    verify: dict[str, Any] = {}
    client_cas: list[x509.Certificate] = []
    if tls.client_ca is not None:
        client_cas = x509.load_pem_x509_certificates(Path(tls.client_ca).read_bytes())
        # Twisted's trust store takes pyOpenSSL's X509; OpenSSL's CA list takes the
        # cryptography certificate (pyOpenSSL deprecates X509 there)
        verify = {"verify": True, "requireCertificate": False,
                  "caCerts": [crypto.X509.from_cryptography(c) for c in client_cas]}
    # pyOpenSSL converts cryptography keys and certificates; Twisted's annotations name only X509/PKey
    options = ssl.CertificateOptions(
        privateKey=key, certificate=certs[0], extraCertChain=certs[1:], **verify,  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        enableSessions=True, enableSessionTickets=True)
    context = options.getContext()  # made and cached now; no connection has used it yet
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    if tls.client_ca is not None:
        # ask for a certificate, never fail the handshake over it: the connection's
        # verdict is made against the same CAs when a mechanism asks (tlsinfo)
        context.set_verify(SSL.VERIFY_PEER, accept_any)
        context.set_app_data(ClientCertificates(client_cas))
    for ca in client_cas:
        context.add_client_ca(ca)  # its name in the certificate request
    return options
