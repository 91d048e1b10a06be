"""Client certificates asked for, never a reason to fail the handshake (``[tls] client_ca``).

Postfix (``smtpd_tls_ask_ccert``) and Dovecot ask for a client certificate and let the
session go on when the one sent does not verify: the certificate is then only
"unverified", and a client with an expired certificate, or one from another CA, can
still log in with a password.  OpenSSL would fail the handshake instead, so the context
accepts whatever certificate comes (``accept_any``) and the verdict is made here, by
``ClientCertificates.verdict``, the first time a mechanism asks, and kept for the
connection.

Why not keep OpenSSL's own verdict: pyOpenSSL sets it to "ok" when a verify callback
lets the handshake go on, and a resumed session (a ticket, a session ID) carries the
verdict of the handshake that made it, with no verification at all.  Verifying the
certificate here, against the ``client_ca`` store, for every connection (resumed or
not) and at the time it is used, gives one answer whatever the handshake was.  The
store checks what OpenSSL's handshake checks: the chain up to a ``client_ca`` CA, the
validity dates, and the TLS client purpose (a certificate only for servers is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence
from weakref import WeakKeyDictionary

from twisted.logger import Logger

log = Logger(namespace="saslsmtp.tls")


@dataclass(frozen=True)
class Verdict:
    """The client certificate of one connection: ``certificate`` (pyOpenSSL's X509) is
    the one the client sent, ``None`` when it sent none; ``error`` says why it did not
    verify (OpenSSL's words: ``"certificate has expired"``), ``None`` when it did."""

    certificate: Any = None
    error: str | None = None

    @property
    def verified(self) -> bool:
        return self.certificate is not None and self.error is None


NONE_SENT = Verdict()


def accept_any(conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """The handshake's verify callback: every certificate gets through; judged later."""
    return True


class ClientCertificates:
    """The ``client_ca`` trust store and each connection's verdict (computed once, kept as
    long as the connection is)."""

    def __init__(self, cas: Sequence[Any]) -> None:
        from OpenSSL import crypto
        self._store = crypto.X509Store()
        for ca in cas:  # cryptography certificates
            self._store.add_cert(crypto.X509.from_cryptography(ca))
        _client_purpose(self._store)
        self._verdicts: WeakKeyDictionary[Any, Verdict] = WeakKeyDictionary()

    def verdict(self, conn: Any) -> Verdict:
        """The verdict on ``conn``'s client certificate (an ``OpenSSL.SSL.Connection``
        after its handshake)."""
        known = self._verdicts.get(conn)
        if known is None:
            known = self._verdicts[conn] = self._judge(conn)
        return known

    def _judge(self, conn: Any) -> Verdict:
        from OpenSSL import crypto
        peer = conn.get_peer_certificate()
        if peer is None:
            return NONE_SENT
        # the intermediates the client sent (a resumed session has none: only the
        # certificate itself is kept in a session, so they belong in client_ca)
        chain = conn.get_peer_cert_chain() or None  # on a server, without the peer's own
        try:
            crypto.X509StoreContext(self._store, peer, chain).verify_certificate()
        except crypto.X509StoreContextError as e:
            return Verdict(peer, str(e) or "certificate verify failed")
        return Verdict(peer)


def _client_purpose(store: Any) -> None:
    """Make ``store`` check the TLS client purpose, as OpenSSL's server handshake does
    (pyOpenSSL has no call for it; its OpenSSL binding has ``X509_STORE_set_purpose``)."""
    try:
        from OpenSSL._util import lib
        lib.X509_STORE_set_purpose(store._store, lib.X509_PURPOSE_SSL_CLIENT)
    except (ImportError, AttributeError, TypeError):
        log.warn("cannot make the client_ca store check the TLS client purpose;"
                 " certificates are verified without it")


def checker_of(conn: Any) -> ClientCertificates | None:
    """The ``ClientCertificates`` of the context ``conn`` was made with (``tlscontext``
    attaches it), or ``None`` for a context that verifies in the handshake itself."""
    try:
        found = conn.get_context().get_app_data()
    except AttributeError:
        return None
    return found if isinstance(found, ClientCertificates) else None
