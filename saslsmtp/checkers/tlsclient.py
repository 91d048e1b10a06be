"""Client-side TLS for backends that talk to servers (upstream SMTP, HTTPS APIs): fail closed.

Twisted's ``optionsForClientTLS`` checks the chain and the host name, but its verify
callback only catches ``service_identity.VerificationError``; service-identity >= 24
raises ``CertificateError`` for a leaf certificate *without any subjectAltName*, and
Twisted then logs and **accepts** it.  ``StrictClientTLS`` wraps
``optionsForClientTLS`` and installs its own verify callback on each connection, so a
trusted certificate that does not name the host (mismatch *or* no SAN at all) fails
the handshake.  ``verify_peer_identity`` is the same check after the handshake, for
transports whose TLS was set up by someone else (a ``tls:`` endpoint string).

A refused peer is refused again at every reconnect (Redis retries every few seconds, an
upstream is dialled per login): "refusing TLS peer HOST: WHY" is logged the first time,
when the reason changes, and then at most once a minute per host with the number of
refusals in between (``RepeatedWarning``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import service_identity
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER, Connection
from service_identity.cryptography import (verify_certificate_hostname,
                                           verify_certificate_ip_address)
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from saslsmtp.repeats import RepeatedWarning

if TYPE_CHECKING:  # a public name only in twisted.internet.ssl's documentation
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger()

#: Every refusal of every ``StrictClientTLS`` that logs its own: one line per host a minute.
REFUSALS = RepeatedWarning(time.monotonic)


class CertificateIdentityError(Exception):
    """The peer's certificate does not name the host we meant to reach."""


def load_trust_root(ca_file: str | None) -> "IOpenSSLTrustRoot":
    """The CAs in the PEM file ``ca_file`` (one or more), or the system trust store.

    Raises ``ValueError`` (with the path, never key material) when the file holds no
    certificate, ``OSError`` when it cannot be read.
    """
    if ca_file is None:
        return ssl.platformTrust()
    try:
        certificates = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except ValueError:
        raise ValueError(f"{ca_file}: no PEM certificate found") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates])


def verify_identity(certificate: x509.Certificate, hostname: str) -> None:
    """Raise ``CertificateIdentityError`` unless ``certificate``'s subjectAltName names
    ``hostname`` (a DNS name, or an IP address literal checked as an IP SAN)."""
    host = hostname.strip("[]")
    try:
        if isIPAddress(host) or isIPv6Address(host):
            verify_certificate_ip_address(certificate, host)
        else:
            verify_certificate_hostname(certificate, host)
    except service_identity.CertificateError:
        raise CertificateIdentityError(
            f"the certificate has no subjectAltName, so it cannot be valid for {host}") from None
    except service_identity.VerificationError:
        raise CertificateIdentityError(f"the certificate is not valid for {host}") from None


def verify_peer_identity(transport: Any, hostname: str) -> None:
    """After the handshake: the transport's peer certificate must name ``hostname``."""
    get = getattr(transport, "getPeerCertificate", None)
    peer = get() if get is not None else None
    if peer is None:
        raise CertificateIdentityError("the server presented no certificate")
    verify_identity(peer.to_cryptography(), hostname)


@implementer(IOpenSSLClientConnectionCreator)
class StrictClientTLS:
    """Client TLS for ``hostname`` trusting ``trust_root``; any identity doubt fails the
    handshake (no subjectAltName included), before a byte of application data.  The
    protocol's ``connectionLost`` gets the ``CertificateIdentityError``; ``warn=False``
    leaves the logging to a caller that reports that reason itself (once per outage);
    ``refusals`` decides when a refusal is logged again (default: ``REFUSALS``, shared)."""

    def __init__(self, hostname: str, trust_root: "IOpenSSLTrustRoot | None" = None, *,
                 warn: bool = True, refusals: RepeatedWarning | None = None) -> None:
        self.hostname = hostname
        self.warn = warn
        self.refusals = REFUSALS if refusals is None else refusals
        self._inner = ssl.optionsForClientTLS(hostname, trustRoot=trust_root)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        """Twisted's connection (SNI, chain checks), with our stricter verify callback."""
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT,
                              _strict_callback(tlsProtocol, self.hostname,
                                               self.refusals if self.warn else None))
        return connection

    def __repr__(self) -> str:
        return f"<StrictClientTLS {self.hostname}>"


def _strict_callback(tls_protocol: Any, hostname: str,
                     refusals: RepeatedWarning | None = REFUSALS) -> Callable[..., bool]:
    """An OpenSSL verify callback: the chain must verify, the leaf must name ``hostname``;
    a refusal is logged when ``refusals`` says it is due (``None``: never)."""
    protocol_ref = [tls_protocol]  # dropped after the leaf is checked (no reference cycle)

    def callback(connection: Connection, certificate: Any, errno: int, depth: int,
                 ok: int) -> bool:
        if not ok:
            return False  # OpenSSL reports the chain error itself
        if depth != 0:
            return True
        try:
            verify_identity(certificate.to_cryptography(), hostname)
        except CertificateIdentityError as e:
            left_out = refusals.due(hostname, str(e)) if refusals is not None else None
            if left_out == 0:
                log.warn("refusing TLS peer {host}: {why}", host=hostname, why=str(e))
            elif left_out is not None:
                log.warn("refusing TLS peer {host}: {why} ({count} more refusals since the"
                         " last report)", host=hostname, why=str(e), count=left_out)
            if protocol_ref:
                protocol_ref.pop().failVerification(Failure(e))
            return False
        except Exception:  # never let an exception escape into OpenSSL
            log.failure("while verifying a TLS peer certificate")
            return False
        protocol_ref.clear()
        return True

    return callback


@implementer(IPolicyForHTTPS)
class StrictHTTPSPolicy:
    """An ``Agent`` TLS policy like ``BrowserLikePolicyForHTTPS`` (chain + host name),
    trusting ``trust_root`` and refusing certificates without subjectAltName."""

    def __init__(self, trust_root: "IOpenSSLTrustRoot | None" = None) -> None:
        self._trust_root = trust_root

    def creatorForNetloc(self, hostname: bytes, port: int) -> StrictClientTLS:
        """The connection creator for one ``https://hostname:port``."""
        return StrictClientTLS(hostname.decode("ascii"), self._trust_root)
