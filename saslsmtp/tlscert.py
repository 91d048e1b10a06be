"""What an operator must hear about the server certificate before clients do.

A certificate that expired, is not valid yet, or does not name ``[server] hostname``
still loads: OpenSSL serves it and the handshake fails on the client, so the server
itself would say nothing.  ``certificate_warnings`` says it, for ``--check``, the start
and every reload; ``ExpiryWatch`` says it once a day while the served certificate is
within ``EXPIRY_WARNING_DAYS`` of its end (nobody runs ``--check`` every day).

These are warnings, never refusals: a client that does not verify (many scripts,
devices and MTAs with opportunistic TLS) still works with an expired certificate, and
refusing to start (or to reload) would turn a renewal late by an hour into an outage
for every client, while the running server would keep serving the same certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any, Callable

from twisted.internet import task
from twisted.logger import Logger

log = Logger(namespace="saslsmtp")

#: Days before its end from which a certificate is warned about.
EXPIRY_WARNING_DAYS = 14
#: How often a running server looks at its certificate (seconds).
WATCH_INTERVAL = 86400.0


def leaf_certificate(path: str) -> Any:
    """The first certificate of the PEM file ``path`` (raises ``OSError``, ``ValueError``)."""
    from cryptography import x509
    return x509.load_pem_x509_certificates(Path(path).read_bytes())[0]


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _left(seconds: float) -> str:
    days = int(seconds // 86400)
    if days >= 1:
        return f"in {days} day{'s' if days != 1 else ''}"
    return "in less than a day"


def validity_warning(certificate: Any, path: str, now: datetime.datetime) -> str | None:
    """Expired, not yet valid, or ending within ``EXPIRY_WARNING_DAYS``: one sentence."""
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if now > not_after:
        days = int((now - not_after).total_seconds() // 86400)
        ago = f"{days} day{'s' if days != 1 else ''} ago" if days else "less than a day ago"
        return (f"the certificate in {path} expired on {_when(not_after)} ({ago}): every client"
                " that verifies it fails the TLS handshake; renew it and reload (SIGHUP)")
    if now < not_before:
        return (f"the certificate in {path} is not valid before {_when(not_before)}: every client"
                " that verifies it fails the TLS handshake until then (is this machine's clock right?)")
    left = (not_after - now).total_seconds()
    if left <= EXPIRY_WARNING_DAYS * 86400:
        return (f"the certificate in {path} expires on {_when(not_after)}, {_left(left)}:"
                " renew it and reload (SIGHUP)")
    return None


def hostname_warning(certificate: Any, path: str, hostname: str) -> str | None:
    """``hostname`` not among the certificate's subjectAltNames (as clients check it)."""
    from cryptography import x509
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (verify_certificate_hostname,
                                               verify_certificate_ip_address)
    try:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            verify_certificate_hostname(certificate, hostname)
        else:
            verify_certificate_ip_address(certificate, str(address))
        return None
    except (VerificationError, CertificateError, ValueError):
        pass  # ValueError: a name service_identity cannot read; clients would refuse it too
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    named = f"it names {', '.join(names)}" if names else "it has no subjectAltName"
    return (f"the certificate in {path} does not cover server.hostname {hostname!r} ({named}):"
            " clients that check the name refuse the TLS handshake")


def certificate_warnings(certificate: Any, path: str, hostname: str,
                         now: datetime.datetime) -> list[str]:
    """Every warning about the server certificate ``certificate`` read from ``path``."""
    found = [validity_warning(certificate, path, now), hostname_warning(certificate, path, hostname)]
    return [w for w in found if w is not None]


def utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def served_certificate(options: Any) -> Any:
    """The leaf certificate a ``CertificateOptions`` serves, as a cryptography object."""
    certificate = getattr(options, "certificate", None)
    to_cryptography = getattr(certificate, "to_cryptography", None)
    return to_cryptography() if callable(to_cryptography) else certificate


class ExpiryWatch:
    """Once every ``interval`` seconds of ``clock``: a warning while the certificate
    ``current()`` returns (``(path, certificate)`` or ``None``) expires within
    ``EXPIRY_WARNING_DAYS`` or has expired.  ``current`` is asked each time, so a reload
    that brought a new certificate silences it."""

    def __init__(self, current: Callable[[], tuple[str, Any] | None], clock: Any,
                 interval: float = WATCH_INTERVAL) -> None:
        self.current = current
        self.clock = clock
        self.interval = interval
        self._loop: task.LoopingCall | None = None

    def check(self) -> str | None:
        """The warning logged now, if any."""
        served = self.current()
        if served is None:
            return None
        path, certificate = served
        warning = validity_warning(certificate, path, utc(self.clock.seconds()))
        if warning is not None:
            log.warn("{warning}", warning=warning)
        return warning

    def start(self) -> None:
        """The first look is one ``interval`` from now: the start has just warned."""
        loop = self._loop = task.LoopingCall(self.check)
        loop.clock = self.clock
        loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


# -- files that are not what [tls] needs: say what they are and what to do --------------


def certificate_file_problem(path: str, data: bytes) -> str:
    """Why ``data`` (the ``tls.certificate`` file) holds no PEM certificate, and the fix."""
    from cryptography import x509
    head = f"{path} holds no PEM certificate"
    if not data.strip():
        return f"{head}: the file is empty"
    if b"PRIVATE KEY-----" in data:
        return f"{head} but a private key: are tls.certificate and tls.private_key swapped?"
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        return f"{head} (a PEM file has -----BEGIN CERTIFICATE----- lines)"
    return (f"{head}: it is a DER (binary) certificate; convert it: openssl x509 -inform der"
            f" -in {path} -out {path}.pem")


def key_file_problem(path: str, data: bytes) -> str:
    """Why ``data`` (the ``tls.private_key`` file) holds no usable PEM private key."""
    from cryptography.hazmat.primitives.serialization import load_der_private_key
    head = f"{path} holds no PEM private key"
    if not data.strip():
        return f"{head}: the file is empty"
    if b"-----BEGIN CERTIFICATE-----" in data and b"PRIVATE KEY-----" not in data:
        return f"{head} but a certificate: are tls.certificate and tls.private_key swapped?"
    try:
        load_der_private_key(data, password=None)
    except TypeError:
        pass  # a DER key with a passphrase: DER all the same
    except Exception:
        return f"{head} (a PEM file has -----BEGIN PRIVATE KEY----- lines)"
    return (f"{head}: it is a DER (binary) key; convert it: openssl pkey -inform der"
            f" -in {path} -out {path}.pem")


def encrypted_key_problem(path: str) -> str:
    return (f"{path} is encrypted; it must not be: a server that starts unattended cannot"
            f" type its passphrase; write it without one: openssl pkey -in {path} -out {path}.plain"
            " (then chmod 0640 it, group the server's)")


def _kind(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    for cls, name in ((rsa.RSAPublicKey, "RSA"), (ec.EllipticCurvePublicKey, "ECDSA"),
                      (ed25519.Ed25519PublicKey, "Ed25519"), (ed448.Ed448PublicKey, "Ed448"),
                      (dsa.DSAPublicKey, "DSA")):
        if isinstance(key, cls):
            return name
    return type(key).__name__


def _spki(key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


def mismatch_problem(certificates: list[Any], key: Any, cert_path: str, key_path: str) -> str | None:
    """Why the key does not go with the first certificate (``None``: it does): a chain
    in the wrong order (the key's certificate is further down), or a key of another
    kind (an RSA key beside an ECDSA certificate)."""
    public = _spki(key.public_key())
    if _spki(certificates[0].public_key()) == public:
        return None
    head = f"{key_path} does not match the certificate in {cert_path}"
    for n, certificate in enumerate(certificates[1:], start=2):
        if _spki(certificate.public_key()) == public:
            return (f"{head}: it matches certificate {n} of {len(certificates)} there"
                    f" ({certificate.subject.rfc4514_string()}); the chain is in the wrong order:"
                    " the server's own certificate comes first, then the ones that issued it")
    cert_kind, key_kind = _kind(certificates[0].public_key()), _kind(key.public_key())
    if cert_kind != key_kind:
        return f"{head} (an {key_kind} key for an {cert_kind} certificate)"
    return head


def chain_order_warning(certificates: list[Any], path: str) -> str | None:
    """A chain whose certificates do not each issue the one before: clients that do not
    reorder it fail to verify."""
    for n in range(len(certificates) - 1):
        if certificates[n].issuer != certificates[n + 1].subject:
            return (f"the chain in {path} is not in order: certificate {n + 2} of"
                    f" {len(certificates)} ({certificates[n + 1].subject.rfc4514_string()}) did"
                    f" not issue certificate {n + 1} (issued by {certificates[n].issuer.rfc4514_string()});"
                    " put each certificate right before the one that issued it")
    return None
