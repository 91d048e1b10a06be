"""Test certificates, made fresh with ``cryptography``: a CA and leaf certificates it signs.

Generic on purpose, for any test that needs TLS on loopback::

    ca = make_ca(tmp_path)                                    # ca.cert_path for clients
    good = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    wrong = issue_cert(ca, tmp_path, names=["wrong.example"])  # valid, for another host
    bare = issue_cert(ca, tmp_path, names=["localhost"], san=False)  # CN only, no SAN
    alice = issue_client_cert(ca, tmp_path, cn="alice")       # clientAuth, for EXTERNAL
    stale = issue_client_cert(ca, tmp_path, cn="alice", valid_days=(-10, -1))  # expired
    ctx = server_ssl_context(good)        # stdlib ssl, e.g. for aiosmtpd
    opts = twisted_server_options(good)   # Twisted CertificateOptions, e.g. for listenSSL

``names`` may mix DNS names and IP addresses; each becomes a DNS or IP subjectAltName,
and the first one is also the subject CN.  Keys are ECDSA P-256 (fast to generate).
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_counter = itertools.count(1)


@dataclass(frozen=True)
class CA:
    """A certificate authority: its PEM certificate file and its signing key."""

    cert_path: str
    key_path: str
    certificate: x509.Certificate
    private_key: Any


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate: ``cert_path`` (PEM, leaf only), ``key_path`` (PEM, unencrypted),
    ``chain_path`` (leaf followed by the CA certificate)."""

    cert_path: str
    key_path: str
    chain_path: str
    certificate: x509.Certificate


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(path: Path, key: Any) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_ca(tmp: str | Path, name: str = "saslsmtp test CA") -> CA:
    """A self-signed CA certificate (with ``name`` as CN) and key written under ``tmp``."""
    tmp = Path(tmp)
    n = next(_counter)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"ca{n}.pem", tmp / f"ca{n}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return CA(str(cert_path), str(key_path), cert, key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_cert(ca: CA, tmp: str | Path, names: Sequence[str] = ("localhost", "127.0.0.1"),
               san: bool = True, cn: str | None = None, days: int = 30,
               key_type: str = "ecdsa-p256",
               valid_days: tuple[float, float] | None = None) -> IssuedCert:
    """A server certificate signed by ``ca`` for ``names`` (DNS names and/or IPs).

    ``san=False`` leaves out the subjectAltName extension entirely (CN only), the
    certificate that service-identity refuses and Twisted's verifier lets through.
    ``key_type`` is ``"ecdsa-p256"`` (the default: fast to make) or ``"rsa2048"``.
    ``valid_days=(start, end)``, days from now, replaces the usual "5 minutes ago to
    ``days`` from now" (``(-10, -1)``: expired; ``(1, 30)``: not valid yet).
    """
    tmp = Path(tmp)
    n = next(_counter)
    key: Any
    if key_type == "rsa2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unknown key_type {key_type!r}")
    common_name = cn if cn is not None else (names[0] if names else "no-name")
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca.certificate.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() + datetime.timedelta(days=valid_days[0]) if valid_days
                                 else _now() - datetime.timedelta(minutes=5))
               .not_valid_after(_now() + datetime.timedelta(days=valid_days[1] if valid_days else days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca.private_key.public_key()), critical=False))
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
    return _written(ca, tmp, f"cert{n}", builder.sign(ca.private_key, hashes.SHA256()), key)


def issue_client_cert(ca: CA, tmp: str | Path, cn: str | None = "alice", email: str | None = None,
                      valid_days: tuple[int, int] = (-1, 30)) -> IssuedCert:
    """A TLS client certificate (clientAuth) signed by ``ca``: subject CN ``cn`` (``None``:
    no CN, an O only), an e-mail subjectAltName ``email`` if given, valid from
    ``valid_days[0]`` to ``valid_days[1]`` days from now (``(-10, -1)``: expired,
    ``(1, 30)``: not yet valid).  ``chain_path`` holds the leaf and the CA."""
    tmp = Path(tmp)
    n = next(_counter)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = (x509.NameAttribute(NameOID.COMMON_NAME, cn) if cn is not None
               else x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name"))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([subject]))
               .issuer_name(ca.certificate.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(_now() + datetime.timedelta(days=valid_days[0]))
               .not_valid_after(_now() + datetime.timedelta(days=valid_days[1]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if email is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                                        critical=False)
    return _written(ca, tmp, f"client{n}", builder.sign(ca.private_key, hashes.SHA256()), key)


def _written(ca: CA, tmp: Path, stem: str, cert: x509.Certificate, key: Any) -> IssuedCert:
    """``cert`` and ``key`` as PEM files in ``tmp``: the leaf, its key, the leaf + CA."""
    cert_path, key_path, chain_path = (tmp / f"{stem}.pem", tmp / f"{stem}.key",
                                       tmp / f"{stem}-chain.pem")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    chain_path.write_bytes(pem + ca.certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return IssuedCert(str(cert_path), str(key_path), str(chain_path), cert)


def server_ssl_context(issued: IssuedCert) -> ssl.SSLContext:
    """A stdlib server-side ``SSLContext`` presenting ``issued`` (e.g. for aiosmtpd)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.chain_path, issued.key_path)
    return context


def twisted_server_options(issued: IssuedCert) -> Any:
    """Twisted ``CertificateOptions`` presenting ``issued`` (for ``listenSSL`` / endpoints)."""
    from twisted.internet import ssl as tssl

    with open(issued.cert_path, "rb") as c, open(issued.key_path, "rb") as k:
        private = tssl.PrivateCertificate.loadPEM(c.read() + k.read())
    return private.options()
