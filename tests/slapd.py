"""A real OpenLDAP ``slapd`` for tests: temporary directory, free loopback ports, seeded users.

``SlapdServer.start()`` writes a ``slapd.conf`` (mdb database ``dc=example,dc=test``, the
memberof overlay, TLS with a throw-away CA) into a temporary directory, runs
``/usr/sbin/slapd`` in the foreground on ``ldap://127.0.0.1:<port>`` and
``ldaps://127.0.0.1:<tls_port>`` with the stats log on stderr (``slapd.log``), and seeds
the directory with ``ldapadd`` (``SEED_LDIF``: users, a ``cn=reader`` service account and a
``cn=mailusers`` group).  ``stop()``/``start()`` bring it down and up on the same ports and
database (for down/up tests); ``pause()``/``resume()`` SIGSTOP/SIGCONT it (the kernel still
accepts TCP connections, nothing answers: the timeout test).

``slapd_or_skip()`` finds the binaries; outside CI it skips, with ``CI=true`` it fails with
a message naming the Debian packages (``slapd``, ``ldap-utils``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


SLAPD = "/usr/sbin/slapd"
LDAPADD = "ldapadd"
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/x86_64-linux-gnu/ldap", "/usr/lib/aarch64-linux-gnu/ldap",
               "/usr/lib64/openldap", "/usr/lib/openldap", "/usr/libexec/openldap")
SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema")

SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "admin-secret"
PEOPLE = f"ou=people,{SUFFIX}"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader-secret"
GROUP_DN = f"cn=mailusers,ou=groups,{SUFFIX}"
REQUIRE_GROUP = f"(memberOf={GROUP_DN})"


@dataclass(frozen=True)
class SeedUser:
    """One seeded ``inetOrgPerson`` under ``ou=people``; ``dn_rdn`` is the escaped RDN value."""

    uid: str
    password: str
    mail: str
    in_group: bool = False
    ssha: bool = False
    dn_rdn: str = ""

    @property
    def dn(self) -> str:
        """The entry's DN as written in the LDIF."""
        return f"uid={self.dn_rdn or self.uid},{PEOPLE}"


ALICE = SeedUser("alice", "alice-pw", "alice@example.test", in_group=True, ssha=True)
BOB = SeedUser("bob", "bob pw \u00fcn\u00efc\u00f6de", "bob@example.test")
# Two entries share one mail address: a search for it must be rejected as ambiguous.
TWIN1 = SeedUser("twin1", "twin-pw", "shared@example.test")
TWIN2 = SeedUser("twin2", "twin-pw", "shared@example.test")
# DN specials in the uid, RDN written by hand per RFC 4514 (not by the code under test).
ODD_DN = SeedUser('dan,o=x+y\\z"', "odd-pw", "dan@example.test",
                  dn_rdn='dan\\,o\\=x\\+y\\\\z\\"')
# Filter specials in the uid: found only if the search filter is escaped per RFC 4515.
ODD_FILTER = SeedUser("st*r(1)", "star-pw", "star@example.test")
USERS = (ALICE, BOB, TWIN1, TWIN2, ODD_DN, ODD_FILTER)


def ssha(password: str, salt: bytes = b"saltsalt") -> str:
    """``{SSHA}`` userPassword value (base64 of SHA-1(password + salt) + salt)."""
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _ldif_value(name: str, value: str) -> str:
    """One LDIF attribute line; base64 (``::``) when the value is not safe ASCII."""
    if value.isascii() and value.isprintable() and not value.startswith((" ", ":", "<")):
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def seed_ldif() -> str:
    """The LDIF that ``ldapadd`` loads after the first start."""
    parts = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: reader\nuserPassword: {READER_PASSWORD}",
    ]
    for user in USERS:
        secret = ssha(user.password) if user.ssha else user.password
        parts.append("\n".join([
            _ldif_value("dn", user.dn), "objectClass: inetOrgPerson",
            _ldif_value("uid", user.uid), _ldif_value("cn", user.uid), "sn: Test",
            _ldif_value("mail", user.mail), _ldif_value("userPassword", secret)]))
    members = "\n".join(_ldif_value("member", u.dn) for u in USERS if u.in_group)
    parts.append(f"dn: {GROUP_DN}\nobjectClass: groupOfNames\ncn: mailusers\n{members}")
    return "\n\n".join(parts) + "\n"


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_dir(candidates: tuple[str, ...], marker: str) -> str | None:
    for d in candidates:
        if os.path.exists(os.path.join(d, marker)):
            return d
    return None


def slapd_or_skip() -> tuple[str, str]:
    """(module dir, schema dir); skip (fail when CI=true) if slapd or ldap-utils is missing."""
    module_dir = _find_dir(MODULE_DIRS, "back_mdb.la") or _find_dir(MODULE_DIRS, "back_mdb.so")
    schema_dir = _find_dir(SCHEMA_DIRS, "inetorgperson.schema")
    missing = [what for what, ok in (
        (SLAPD, os.access(SLAPD, os.X_OK)), ("ldapadd", shutil.which(LDAPADD)),
        ("back_mdb module", module_dir), ("OpenLDAP schema files", schema_dir)) if not ok]
    if missing:
        message = ("real-slapd tests need Debian packages slapd and ldap-utils "
                   f"(apt-get install slapd ldap-utils); missing: {', '.join(missing)}")
        from tests.conftest import require
        require(False, message)
    assert module_dir is not None and schema_dir is not None
    return module_dir, schema_dir


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for IP 127.0.0.1 only (no DNS names).

    Returns (ca.pem, server.pem, server.key).  ``localhost`` is deliberately absent, so
    ``ldaps://localhost`` fails the hostname check while ``ldaps://127.0.0.1`` passes it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "saslsmtp test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / "ca.pem", directory / "server.pem",
                                    directory / "server.key")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


@dataclass
class SlapdServer:
    """One slapd process in ``root``; restartable on the same ports and database."""

    root: Path
    module_dir: str
    schema_dir: str
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    paused: bool = False
    seeded: bool = False

    @property
    def url(self) -> str:
        """Plain LDAP URL (StartTLS available)."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """Implicit TLS URL."""
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> Path:
        """The CA that signed slapd's certificate."""
        return self.root / "ca.pem"

    @property
    def log_path(self) -> Path:
        """slapd's stats log (stderr of ``slapd -d stats``)."""
        return self.root / "slapd.log"

    def log_text(self) -> str:
        """Everything slapd logged so far."""
        return self.log_path.read_text(errors="replace")

    def _write_config(self) -> Path:
        ca, cert, key = make_ca_and_server_cert(self.root)
        (self.root / "db").mkdir(exist_ok=True)
        modules = [m for m in ("back_mdb", "memberof")
                   if any(os.path.exists(os.path.join(self.module_dir, m + ext))
                          for ext in (".la", ".so"))]
        schema = "\n".join(f"include {self.schema_dir}/{s}.schema"
                           for s in ("core", "cosine", "nis", "inetorgperson"))
        config = f"""{schema}
modulepath {self.module_dir}
{chr(10).join('moduleload ' + m for m in modules)}
pidfile {self.root}/slapd.pid
argsfile {self.root}/slapd.args
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {self.root}/db
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to *
    by * read
overlay memberof
"""
        path = self.root / "slapd.conf"
        path.write_text(config)
        return path

    def start(self) -> None:
        """Start slapd (first time: write config, seed with ldapadd); wait until it listens."""
        assert self.process is None, "slapd already running"
        config = self.root / "slapd.conf"
        if not config.exists():
            config = self._write_config()
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [SLAPD, "-d", "stats", "-f", str(config),
                 "-h", f"{self.url}/ {self.tls_url}/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        self._wait_listening()
        if not self.seeded:
            self._seed()
            self.seeded = True

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.process.returncode}:\n"
                                   + self.log_text()[-3000:])
            ready = 0
            for port in (self.port, self.tls_port):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    ready += 1
                except OSError:
                    pass
            if ready == 2:
                return
            time.sleep(0.02)
        raise RuntimeError("slapd did not start listening:\n" + self.log_text()[-3000:])

    def _seed(self) -> None:
        ldif = self.root / "seed.ldif"
        ldif.write_text(seed_ldif(), encoding="utf-8")
        done = subprocess.run(
            [LDAPADD, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD, "-f", str(ldif)],
            capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"ldapadd failed ({done.returncode}): {done.stderr}")

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL after 10 s) and wait for it to exit."""
        if self.process is None:
            return
        if self.paused:
            self.resume()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP slapd: connections are still accepted by the kernel, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True
        # kill() returns before every thread has stopped: a request sent at once (on a kept-open
        # connection, no connect first) could still be answered.  Wait until all are stopped.
        deadline = time.monotonic() + 5
        while not all(_thread_state(task) in ("T", "") for task in
                      Path(f"/proc/{self.process.pid}/task").iterdir()):
            if time.monotonic() > deadline:
                raise RuntimeError("slapd did not stop on SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT a paused slapd."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def bind_lines(self) -> list[str]:
        """The ``BIND dn=...`` lines of the stats log so far."""
        return [line for line in self.log_text().splitlines() if " BIND dn=" in line]

    def accept_lines(self) -> list[str]:
        """One ``ACCEPT from`` line per TCP connection slapd accepted so far."""
        return [line for line in self.log_text().splitlines() if " ACCEPT from " in line]

    def operations(self) -> list["Operation"]:
        """Every BIND, SRCH and UNBIND so far, each with the identity its connection had."""
        return parse_operations(self.log_text().splitlines())


@dataclass(frozen=True)
class Operation:
    """One operation from slapd's stats log: ``kind`` (BIND/SRCH/UNBIND), the connection,
    ``bound_as`` (the DN the connection was bound as when it ran: ``""`` is anonymous,
    after a failed bind too) and the rest of the line (``text``)."""

    conn: int
    kind: str
    bound_as: str
    text: str


_OP = re.compile(r"conn=(\d+) op=(\d+) (BIND dn=\"([^\"]*)\" method=|SRCH base=|UNBIND|"
                 r"RESULT tag=97 err=(\d+))")


def parse_operations(lines: list[str]) -> list[Operation]:
    """Replay a stats log: follow each connection's bind state (RFC 4511 4.2.1: a bind
    first makes the connection anonymous; only a successful one gives it an identity).

    Operations are ordered by their ``op=`` number on their connection, not by log line:
    slapd may log a bind's RESULT after the next operation's line when the client sends
    that operation as soon as the bind's answer arrives (the answer is written before the
    RESULT line)."""
    results: dict[tuple[int, int], str] = {}
    for line in lines:
        match = _OP.search(line)
        if match is not None and match.group(3).startswith("RESULT"):
            results[(int(match.group(1)), int(match.group(2)))] = match.group(5)
    binds: dict[int, list[tuple[int, str]]] = {}  # conn -> [(op, dn)] in op order
    done: list[Operation] = []
    for line in lines:
        match = _OP.search(line)
        if match is None:
            continue
        conn, op = int(match.group(1)), int(match.group(2))
        what = match.group(3)
        if what.startswith("BIND"):
            binds.setdefault(conn, []).append((op, match.group(4)))
            done.append(Operation(conn, "BIND", "", line[match.start():]))
        elif not what.startswith("RESULT"):
            earlier = [(o, dn) for o, dn in binds.get(conn, []) if o < op]
            bound_as = ""
            if earlier:
                last_op, dn = max(earlier)
                bound_as = dn if results.get((conn, last_op)) == "0" else ""
            done.append(Operation(conn, what.split()[0], bound_as, line[match.start():]))
    return done


def _thread_state(task: Path) -> str:
    """One thread's state letter from /proc (``T`` when stopped); "" once it is gone."""
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def running_slapd(kind: type = None):  # type: ignore[no-untyped-def, assignment]
    """Generator for a module-scoped fixture: a seeded slapd (``kind``: a ``SlapdServer``
    subclass, for another certificate say) in a temporary directory."""
    module_dir, schema_dir = slapd_or_skip()
    root = Path(tempfile.mkdtemp(prefix="saslsmtp-slapd-"))
    server = (kind or SlapdServer)(root=root, module_dir=module_dir, schema_dir=schema_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
