"""The server certificate as the operator must hear about it: expired, not yet valid,
ending within 14 days, or not naming ``server.hostname`` is a warning at ``--check``, at
the start and at a reload (clients fail, the server would say nothing); the served
certificate's notAfter is a Prometheus gauge per file, updated at reload; a running
server repeats the expiry warning once a day."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp.metrics import Metrics
from saslsmtp.preflight import preflight
from saslsmtp.serving import ReloadableService, build_factory, stop_wiring
from saslsmtp.service import load
from saslsmtp.tlscert import ExpiryWatch, leaf_certificate
from tests.support import ROOT, check_here, free_port, twistd_command, workers_daemon, write_config
from tests.tlsutil import IssuedCert, issue_cert, make_ca

BACKEND = '[backends.users]\ntype = "file"\npath = "users"\n'
DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def tls_config(tmp_path: Path, cert: IssuedCert, hostname: str = "localhost") -> Path:
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    return write_config(tmp_path, BACKEND, tls=(cert.cert_path, cert.key_path), hostname=hostname)


def day(cert: IssuedCert, attribute: str) -> str:
    return getattr(cert.certificate, attribute).strftime("%Y-%m-%d")


CASES = [  # name, valid_days, names, expected warning (regex), or None
    ("expired", (-30, -2), ["localhost"], r"expired on {after} \S+ UTC \(2 days ago\): every"
     r" client that verifies it fails the TLS handshake; renew it and reload \(SIGHUP\)"),
    ("not yet valid", (2, 30), ["localhost"], r"is not valid before {before} \S+ UTC"),
    ("expires soon", (-1, 5.5), ["localhost"], r"expires on {after} \S+ UTC, in 5 days"),
    ("expires today", (-1, 0.5), ["localhost"], r"expires on {after} \S+ UTC, in less than a day"),
    ("other host", (-1, 60), ["mx.example.org"], r"does not cover server.hostname 'localhost'"
     r" \(it names mx.example.org\)"),
    ("valid", (-1, 60), ["localhost"], None),
    ("valid, IP", (-1, 60), ["127.0.0.1"], None),  # hostname below is the address
]


@pytest.mark.parametrize("name, valid_days, names, want", CASES, ids=[c[0] for c in CASES])
def test_preflight_warns_about_the_certificate(tmp_path: Path, name: str, valid_days: tuple,
                                               names: list[str], want: str | None) -> None:
    """Each case is a warning at the certificate's line (never a refusal: a client that
    does not verify still works), naming the file and the date; a good one says nothing."""
    cert = issue_cert(make_ca(tmp_path), tmp_path, names=names, valid_days=valid_days)
    config = tls_config(tmp_path, cert, hostname=names[0] if name == "valid, IP" else "localhost")
    warnings = preflight(load(str(config)), Clock())
    tls_warnings = [w for w in warnings if ": tls.certificate: " in w]
    if want is None:
        assert tls_warnings == [], warnings
        return
    assert len(tls_warnings) == 1, warnings
    pattern = want.format(after=day(cert, "not_valid_after_utc"), before=day(cert, "not_valid_before_utc"))
    assert re.search(pattern, tls_warnings[0]), tls_warnings[0]
    assert f"{config}:" in tls_warnings[0] and cert.cert_path in tls_warnings[0]
    assert "warning:" in tls_warnings[0]


def test_check_and_start_say_an_expired_certificate_and_still_start(tmp_path: Path) -> None:
    """``twistd --check`` exits 0 with the warning line (file, date); the start logs the
    same line and serves (a client that does not verify still works)."""
    cert = issue_cert(make_ca(tmp_path), tmp_path, names=["localhost"], valid_days=(-30, -3))
    config = tls_config(tmp_path, cert)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    check = subprocess.run(twistd_command(config, "--check"), cwd="/", env=env,
                           capture_output=True, text=True, timeout=60)
    after = day(cert, "not_valid_after_utc")
    want = re.compile(rf"{re.escape(str(config))}:\d+: tls.certificate: warning: the certificate in"
                      rf" {re.escape(cert.cert_path)} expired on {after} \S+ UTC \(3 days ago\)")
    assert check.returncode == 0, check.stdout + check.stderr
    assert want.search(check.stdout + check.stderr), check.stdout + check.stderr
    assert "Traceback" not in check.stdout + check.stderr
    config.write_text(config.read_text().replace("tcp:0:", f"tcp:{free_port()}:"))
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 1):  # "saslsmtp ready" once: it serves
        assert want.search(log.read_text()), log.read_text()
    assert "Traceback" not in log.read_text()


@pytest_twisted.ensureDeferred
async def test_reload_warns_and_the_gauge_follows_the_served_certificate(tmp_path: Path) -> None:
    """Start: the gauge holds the served notAfter under the file's name. A reload to a
    certificate that expires in 3 days logs the warning and moves the gauge; the daily
    watch repeats the warning each day (a Clock), and says nothing for a good one."""
    from twisted.internet import reactor
    ca = make_ca(tmp_path)
    good = issue_cert(ca, tmp_path, names=["localhost"], valid_days=(-1, 60))
    config = tls_config(tmp_path, good)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    factory = build_factory(load(str(config)), reactor, metrics)
    top = ReloadableService(factory, str(config), reactor, metrics)
    clock = Clock()
    clock.advance(time.time())  # the Clock's wall time is now, as the reactor's
    top.expiry_watch = ExpiryWatch(top.expiry_watch.current, clock)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)

    def gauge() -> str:
        return "\n".join(line for line in generate_latest(registry).decode().splitlines()
                         if line.startswith("saslsmtp_tls_certificate_expiry_timestamp_seconds{"))
    try:
        top.publish_certificate(factory.wiring)
        top.expiry_watch.start()
        expected = good.certificate.not_valid_after_utc.timestamp()
        assert gauge().startswith(
            f'saslsmtp_tls_certificate_expiry_timestamp_seconds{{file="{good.cert_path}"}} '), gauge()
        assert float(gauge().split()[-1]) == expected
        clock.advance(86400)
        assert not [e for e in events if "certificate" in formatEvent(e)]

        soon = issue_cert(ca, tmp_path, names=["localhost"], valid_days=(-1, 3.5))
        config.write_text(config.read_text().replace(good.cert_path, soon.cert_path)
                          .replace(good.key_path, soon.key_path))
        assert top.reloader.reload() is True
        lines = [formatEvent(e) for e in events]
        assert any(line.startswith("reload: ") and "tls.certificate: warning: the certificate in"
                   f" {soon.cert_path} expires on" in line and "in 3 days" in line
                   for line in lines), lines
        assert f'file="{soon.cert_path}"' in gauge() and good.cert_path not in gauge()
        assert float(gauge().split()[-1]) == soon.certificate.not_valid_after_utc.timestamp()

        events.clear()
        clock.advance(86400)  # one day later, at the wall clock of the Clock
        daily = [formatEvent(e) for e in events]
        assert len(daily) == 1 and f"the certificate in {soon.cert_path} expires on" in daily[0] \
            and "in 1 day:" in daily[0], daily  # two Clock days after the start
        assert all(e["log_level"].name == "warn" for e in events)
        clock.advance(43200)
        assert len(events) == 1  # once a day, not more
    finally:
        globalLogPublisher.removeObserver(events.append)
        top.expiry_watch.stop()
        top.reloader.stop()
        stop_wiring(factory.wiring)


def test_the_daily_watch_counts_days_on_its_clock(tmp_path: Path) -> None:
    """With a Clock a minute past the certificate's notAfter minus 20 days, looking each
    day: silent while more than 14 days are left, then "in 13 days" ... "in 1 day", "in
    less than a day", then "expired on" every day after."""
    cert = issue_cert(make_ca(tmp_path), tmp_path, names=["localhost"], valid_days=(-1, 60))
    certificate = leaf_certificate(cert.cert_path)
    clock = Clock()
    clock.advance(certificate.not_valid_after_utc.timestamp() - 20 * 86400 + 60)
    watch = ExpiryWatch(lambda: (cert.cert_path, certificate), clock)
    said: list[str | None] = []
    for _ in range(24):
        clock.advance(86400)
        said.append(watch.check())
    assert said[:5] == [None] * 5
    assert [re.sub(DATE, "DATE", s or "") for s in said[5:18]] == [
        f"the certificate in {cert.cert_path} expires on DATE, in {n} day{'s' if n != 1 else ''}:"
        " renew it and reload (SIGHUP)" for n in range(13, 0, -1)]
    assert said[18] and "in less than a day" in said[18]
    assert all(s and " expired on " in s for s in said[19:])


# -- the TLS files an operator gets wrong -----------------------------------------------


def mistakes(folder: Path) -> list[tuple[str, str, str, str, str]]:
    """(case, certificate file, key file, the key refused, the message): each mistake
    made with real files in ``folder``."""
    from cryptography.hazmat.primitives import serialization as s
    ca = make_ca(folder)
    ec = issue_cert(ca, folder, names=["localhost"])
    rsa = issue_cert(ca, folder, names=["localhost"], key_type="rsa2048")
    key = s.load_pem_private_key(Path(ec.key_path).read_bytes(), None)
    ca_pem = Path(ca.cert_path).read_bytes()
    (folder / "reversed.pem").write_bytes(ca_pem + Path(ec.cert_path).read_bytes())
    (folder / "secret.key").write_bytes(key.private_bytes(
        s.Encoding.PEM, s.PrivateFormat.PKCS8, s.BestAvailableEncryption(b"passphrase")))
    (folder / "cert.der").write_bytes(ec.certificate.public_bytes(s.Encoding.DER))
    (folder / "key.der").write_bytes(key.private_bytes(s.Encoding.DER, s.PrivateFormat.PKCS8,
                                                       s.NoEncryption()))
    (folder / "empty.pem").write_bytes(b"")
    f = str(folder)
    return [
        ("swapped", ec.key_path, ec.cert_path, "tls.certificate",
         f"{ec.key_path} holds no PEM certificate but a private key: are tls.certificate and"
         " tls.private_key swapped?"),
        ("chain in the wrong order", f"{f}/reversed.pem", ec.key_path, "tls.private_key",
         f"{ec.key_path} does not match the certificate in {f}/reversed.pem: it matches"
         " certificate 2 of 2 there (CN=localhost); the chain is in the wrong order: the"
         " server's own certificate comes first, then the ones that issued it"),
        ("key with a passphrase", ec.cert_path, f"{f}/secret.key", "tls.private_key",
         f"{f}/secret.key is encrypted; it must not be: a server that starts unattended cannot"
         f" type its passphrase; write it without one: openssl pkey -in {f}/secret.key -out"
         f" {f}/secret.key.plain"),
        ("DER certificate", f"{f}/cert.der", ec.key_path, "tls.certificate",
         f"{f}/cert.der holds no PEM certificate: it is a DER (binary) certificate; convert it:"
         f" openssl x509 -inform der -in {f}/cert.der -out {f}/cert.der.pem"),
        ("DER key", ec.cert_path, f"{f}/key.der", "tls.private_key",
         f"{f}/key.der holds no PEM private key: it is a DER (binary) key; convert it: openssl"
         f" pkey -inform der -in {f}/key.der -out {f}/key.der.pem"),
        ("empty certificate", f"{f}/empty.pem", ec.key_path, "tls.certificate",
         f"{f}/empty.pem holds no PEM certificate: the file is empty"),
        ("ECDSA certificate, RSA key", ec.cert_path, rsa.key_path, "tls.private_key",
         f"{rsa.key_path} does not match the certificate in {ec.cert_path} (an RSA key for an"
         " ECDSA certificate)"),
    ]


def mistake_config(folder: Path, cert: str, key: str) -> Path:
    (folder / "users").write_text("demo:{PLAIN}pw\n")
    return write_config(folder, BACKEND, tls=(cert, key), hostname="localhost")


def test_check_and_start_name_each_tls_file_mistake(tmp_path: Path) -> None:
    """``--check`` and a start exit 1 with one ``file:line: key: message`` line per
    mistake that says what the file is and what to do; no traceback, never "ready"."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = []
    for n, (name, cert, key, refused, message) in enumerate(mistakes(tmp_path)):
        folder = tmp_path / f"case{n}"
        folder.mkdir()
        config = mistake_config(folder, cert, key)
        line = next(i for i, text in enumerate(config.read_text().splitlines(), 1)
                    if text.startswith(refused.split(".")[1] + " ="))
        want = f"{config}:{line}: {refused}: {message}"
        runs.append((name, want, config, subprocess.Popen(
            twistd_command(config), cwd="/", env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    failures = []
    for name, want, config, proc in runs:
        started, _ = proc.communicate(timeout=60)
        for what, (status, out) in (("--check", check_here(config)),
                                    ("start", (proc.returncode, started))):
            if status != 1 or want not in out or "Traceback" in out or "ready" in out:
                failures.append(f"{name} ({what}): exit {status}, want {want!r} in:\n{out}")
    assert not failures, "\n\n".join(failures)


@pytest_twisted.ensureDeferred
async def test_a_reload_names_each_tls_file_mistake_and_keeps_serving(tmp_path: Path) -> None:
    """The same words at a SIGHUP reload, which keeps the running certificate."""
    from twisted.internet import reactor

    from saslsmtp.serving import Reloader, start_runners
    good = issue_cert(make_ca(tmp_path), tmp_path, names=["localhost"])
    live = tmp_path / "live"
    live.mkdir()
    config = mistake_config(live, good.cert_path, good.key_path)
    factory = build_factory(load(str(config)), reactor)
    start_runners(factory.wiring)
    reloader = Reloader(str(config), factory, reactor, clock=Clock())
    running = factory.wiring
    made = tmp_path / "files"
    made.mkdir()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    text = config.read_text()
    try:
        failures = []
        for name, cert, key, refused, message in mistakes(made):
            config.write_text(text.replace(good.cert_path, cert).replace(good.key_path, key))
            events.clear()
            kept = reloader.reload() is False and factory.wiring is running
            lines = [formatEvent(e) for e in events]
            if not kept or not any(line.startswith("reload refused, keeping the running"
                                                   " configuration: ") and f": {refused}: {message}"
                                   in line for line in lines):
                failures.append(f"{name}: kept={kept}, {lines}")
        assert not failures, "\n".join(failures)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reloader.stop()
        stop_wiring(factory.wiring)


def test_a_key_this_process_cannot_read_says_as_whom(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate readable and a key not (what a reload as the server's user meets):
    the problem names the error, the user that read, and the usual fix."""
    import pwd

    from saslsmtp.config import ConfigError
    good = issue_cert(make_ca(tmp_path), tmp_path, names=["localhost"])
    config = load(str(mistake_config(tmp_path, good.cert_path, good.key_path)))
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if str(self) == good.key_path:
            raise PermissionError(13, "Permission denied")
        return read_bytes(self)
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as e:
        preflight(config, Clock())
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert f"tls.private_key: cannot read {good.key_path}: Permission denied (read as {me}; a" \
           " reload reads as the server's user: give the file the server's group and chmod 0640)" \
        in str(e.value), str(e.value)


def test_the_gauge_with_workers_follows_a_reload_to_another_file(tmp_path: Path) -> None:
    """Two workers: /metrics shows the served certificate's notAfter under its file; a
    SIGHUP to another certificate file shows the new one, and the old file's series is
    NaN (prometheus_client cannot drop a label in multi-process mode; no alert fires on
    NaN), without a warning in the log."""
    import math
    import signal
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support import wait_for
    ca = make_ca(tmp_path)
    first = issue_cert(ca, tmp_path, names=["localhost"], valid_days=(-1, 40))
    second = issue_cert(ca, tmp_path, names=["localhost"], valid_days=(-1, 50))
    metrics_port = free_port()
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    config = write_config(tmp_path, BACKEND, tls=(first.cert_path, first.key_path),
                          hostname="localhost", listen=[f"tcp:{free_port()}:interface=127.0.0.1"],
                          extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    log = tmp_path / "daemon.log"

    def gauge() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {s.labels["file"]: s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "saslsmtp_tls_certificate_expiry_timestamp_seconds"}
    with workers_daemon(config, log, 2, "--workers", "2") as proc:
        assert gauge() == {first.cert_path: first.certificate.not_valid_after_utc.timestamp()}
        config.write_text(config.read_text().replace(first.cert_path, second.cert_path)
                          .replace(first.key_path, second.key_path))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("new sessions use it") == 2, what="the reload")
        after = gauge()
        # read while it runs: the test's end kills the master, and its workers, dying with
        # it, rightly warn that the master is gone
        text = log.read_text()
    assert after[second.cert_path] == second.certificate.not_valid_after_utc.timestamp()
    assert set(after) == {first.cert_path, second.cert_path} and math.isnan(after[first.cert_path])
    assert "#warn" not in text and "Traceback" not in text, text
