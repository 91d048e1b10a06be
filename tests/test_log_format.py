"""``[server] log_format = "json"`` and ``log_level``: JSON lines from the observer and
from the real daemon (workers' events relayed with their pid), the level filter, and
the session-end line."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest
from twisted.logger import Logger, LogPublisher

from saslsmtp.logs import SessionSummary, make_observer, session_ended
from tests.support import alice_config, wait_for, worker_pids, workers_daemon
from tests.test_workers import Session


def logger_into(out: io.StringIO, log_format: str, level: str = "info") -> Logger:
    publisher = LogPublisher(make_observer(out, log_format, level))
    return Logger(namespace="saslsmtp.test", observer=publisher)


def test_json_lines_have_message_level_and_fields() -> None:
    """One parseable object per line, with the formatted message and the plain fields."""
    out = io.StringIO()
    log = logger_into(out, "json")
    log.info("AUTH {mechanism} ok user={user}", mechanism="PLAIN", user="alice", ip="192.0.2.1")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("script raised")
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["message"] == "AUTH PLAIN ok user=alice"
    assert (first["level"], first["namespace"]) == ("info", "saslsmtp.test")
    assert (first["user"], first["ip"], first["mechanism"]) == ("alice", "192.0.2.1", "PLAIN")
    assert first["time"].endswith("+00:00")
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_level_filter_drops_below_the_level() -> None:
    """``log_level = "warn"``: info and debug are dropped, warnings and errors kept."""
    out = io.StringIO()
    log = logger_into(out, "text", "warn")
    log.debug("debug line")
    log.info("info line")
    log.warn("warn line")
    log.error("error line")
    text = out.getvalue()
    assert "warn line" in text and "error line" in text
    assert "info line" not in text and "debug line" not in text


def test_session_end_line() -> None:
    """Client, user, mechanism, TLS version, messages, bytes and duration, as fields."""
    out = io.StringIO()
    log = logger_into(out, "json")
    session_ended(log, SessionSummary("192.0.2.7", "alice", "PLAIN", "TLSv1.3", 2, 4096, 1.23456))
    session_ended(log, SessionSummary("192.0.2.8", None, None, None, 0, 0, 0.5))
    done, idle = [json.loads(line) for line in out.getvalue().splitlines()]
    assert done["message"] == ("session end client=192.0.2.7 user=alice mechanism=PLAIN"
                               " tls=TLSv1.3 messages=2 bytes=4096 duration=1.235s")
    assert (done["client"], done["messages"], done["bytes"]) == ("192.0.2.7", 2, 4096)
    assert idle["message"].startswith("session end client=192.0.2.8 user=- mechanism=- tls=none")


def test_a_login_name_cannot_pass_for_more_fields_in_the_key_value_lines() -> None:
    """The session-end and message lines write ``user=NAME`` bare: a name with a space,
    a quote, a backslash or ``=`` (a users file, an HTTP API or a token claim may allow
    one) would read as more fields (``tls=TLSv1.3``), and ``-`` as no login.  Such a name
    is a JSON string in the text (the fail2ban line's quoting); the JSON field and a plain
    name stay as they were."""
    for log_format in ("text", "json"):
        out = io.StringIO()
        log = logger_into(out, log_format)
        for user in ('john doe tls=TLSv1.3 x="', "-", "back\\", "alice"):
            session_ended(log, SessionSummary("192.0.2.7", user, "PLAIN", None, 0, 0, 1.0))
        lines = out.getvalue().splitlines()
        if log_format == "json":
            records = [json.loads(line) for line in lines]
            assert [r["user"] for r in records] == ['john doe tls=TLSv1.3 x="', "-", "back\\", "alice"]
            lines = [r["message"] for r in records]
        assert [line[line.index("session end"):].split(" mechanism=")[0] for line in lines] == [
            'session end client=192.0.2.7 user="john doe tls=TLSv1.3 x=\\""',
            'session end client=192.0.2.7 user="-"',
            'session end client=192.0.2.7 user="back\\\\"',
            "session end client=192.0.2.7 user=alice"]


def test_the_message_line_quotes_such_a_login_name_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """``message ... accepted: ... user=NAME``, written by the transaction, over a real
    submission (a string transport)."""
    from twisted.logger import formatEvent
    from saslsmtp import transaction
    from saslsmtp.testing import SMTPHarness
    seen: list[str] = []
    monkeypatch.setattr(transaction.log, "observer", lambda event: seen.append(formatEvent(event)))
    h = SMTPHarness(users={"john doe size=1": "pw"})
    assert h.login("john doe size=1", "pw") == b"235 2.7.0 Authentication successful\r\n"
    h.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert h.send(b"\r\nbody\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    assert [line for line in seen if " accepted: " in line] == [
        'message - accepted: from=<a@example.test> recipients=1 size=8'
        ' user="john doe size=1" reply=250 OK: queued']


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_writes_json_lines(tmp_path: Path, workers: int) -> None:
    """The real daemon with log_format = "json": every stdout line is a JSON object; with
    workers, their events arrive in the master's log with ``worker_pid``."""
    config, port = alice_config(tmp_path, f'log_format = "json"\nlog_level = "info"\nworkers = {workers}\n')
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, workers) as proc:
        session = Session(port)
        assert session.login().startswith(b"235 ")
        session.close()
        wait_for(lambda: "auth succeeded: " in log.read_text(), what="the AUTH line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    auth = [r for r in records if r["message"].startswith("auth succeeded: client=")]
    assert len(auth) == 1 and auth[0]["level"] == "info"
    if workers > 1:
        assert auth[0]["worker_pid"] in worker_pids(log).values()


def test_a_relayed_worker_event_reads_as_the_worker_wrote_it() -> None:
    """A worker's ``RelayObserver`` line, rebuilt by ``relayed_event`` in the master and
    written as text and as JSON: the same message (braces in values stay literal), the
    level, namespace, time and fields, and a failure's traceback."""
    from twisted.logger import LogLevel, formatEvent

    from saslsmtp.logs import RelayObserver, relayed_event
    wire = io.StringIO()
    worker = Logger(namespace="saslsmtp.smtp", observer=LogPublisher(RelayObserver(wire)))
    worker.warn("AUTH {mechanism} ok user={user}", mechanism="PLAIN", user="a{b}c", ip="192.0.2.1")
    try:
        1 / 0
    except ZeroDivisionError:
        worker.failure("script raised")
    first, second = [relayed_event(line) for line in wire.getvalue().splitlines()]
    assert formatEvent(first) == "AUTH PLAIN ok user=a{b}c"
    assert (first["log_level"], first["log_namespace"]) == (LogLevel.warn, "saslsmtp.smtp")
    assert (first["user"], first["ip"]) == ("a{b}c", "192.0.2.1")
    assert formatEvent(second).startswith("script raised\nTraceback")
    assert "ZeroDivisionError" in formatEvent(second)
    text, as_json = io.StringIO(), io.StringIO()
    make_observer(text, "text")(first)
    make_observer(as_json, "json")(first)
    assert text.getvalue().endswith("AUTH PLAIN ok user=a{b}c\n")
    record = json.loads(as_json.getvalue())
    assert (record["message"], record["level"], record["user"]) == ("AUTH PLAIN ok user=a{b}c", "warn", "a{b}c")
    with pytest.raises(ValueError):
        relayed_event('["not", "an", "event"]')


def test_log_to_a_device_or_fifo_is_never_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--logfile=/dev/null`` (or a FIFO) must not be rotated: twistd's stock log file
    renames itself every megabyte, which would replace the device with a regular file,
    and SIGUSR1 is ignored there.  A regular file is rotated at 1 MB and on SIGUSR1, as
    by twistd's own observer.  A FIFO stands in for the device here (renaming the real
    /dev/null must never be risked)."""
    from saslsmtp import logs

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    made: list[dict[str, object]] = []

    def recorded(path: str, rotate_length: int | None) -> io.StringIO:
        made.append({"path": path, "rotateLength": rotate_length})
        return io.StringIO()

    monkeypatch.setattr(logs, "RotatingLogFile", recorded)
    monkeypatch.setattr(logs, "_TWISTD", {})
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        assert logs.use_for_twistd({"logfile": str(fifo)}, "text", "info") == "saslsmtp.logs.twistd_logger"
        logs.twistd_logger()
        assert made == [{"path": str(fifo), "rotateLength": None}]
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        monkeypatch.setattr(logs, "_TWISTD", {})
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        regular = tmp_path / "saslsmtp.log"
        regular.write_text("")
        assert logs.use_for_twistd({"logfile": str(regular)}, "text", "info") == "saslsmtp.logs.twistd_logger"
        logs.twistd_logger()
        assert made[1] == {"path": str(regular), "rotateLength": 1000000}
        assert callable(signal.getsignal(signal.SIGUSR1))
        # log_rotate_size = 0: never by size (logrotate's job), SIGUSR1 still rotates
        monkeypatch.setattr(logs, "_TWISTD", {})
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        logs.use_for_twistd({"logfile": str(regular)}, "text", "info", rotate_size=0)
        logs.twistd_logger()
        assert made[2] == {"path": str(regular), "rotateLength": None}
        assert callable(signal.getsignal(signal.SIGUSR1))
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_fast_text_lines_are_twisteds_lines() -> None:
    """``classic_text`` writes exactly what twisted's ``formatEventAsClassicLogText`` writes,
    for plain formats (its fast path) and for what it leaves to twisted: ``{name()}``
    calls, a missing key, a flattened event, a failure, bytes, no format at all."""
    from twisted.logger import LogLevel, formatEvent, formatEventAsClassicLogText
    from twisted.python.failure import Failure

    from saslsmtp.logs import _SecondClock, classic_text, format_message
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    base = {"log_time": 1764433162.75, "log_level": LogLevel.info, "log_namespace": "saslsmtp.session"}
    events = [
        {"log_format": "session end client={client} duration={duration:.3f}s", "client": "192.0.2.1",
         "duration": 0.01234},
        {"log_format": "repr {user!r} braces {{x}} attr {obj.real} item {d[k]}", "user": "a{b}",
         "obj": 3, "d": {"k": "v"}},
        {"log_format": "called {f()}", "f": lambda: "yes"},
        {"log_format": "missing {nothere}"},
        {"log_format": "two\nlines {x}", "x": 1, "log_system": "custom"},
        {"log_format": b"bytes {x}", "x": 2},
        {"log_format": "failed {x}", "x": 3, "log_failure": failure, "log_level": LogLevel.error},
        {"log_format": "positional {0}"},
        {"log_format": None},
        {"log_format": "{log_text}", "log_text": "relayed {not a field}"},
    ]
    clock = _SecondClock()
    for extra in events:
        event = dict(base, **extra)
        assert classic_text(event, clock) == formatEventAsClassicLogText(event), extra
        assert classic_text(event) == formatEventAsClassicLogText(event), extra
        assert format_message(event) == formatEvent(event), extra
    assert clock(None) == "-" and clock(1764433163.01) != clock(1764433162.99)


def test_level_floor_agrees_with_twisteds_predicate() -> None:
    """``LevelFloor`` passes exactly the events Twisted's ``LogLevelFilterPredicate`` with the
    same default level passes, for every level pair, and drops events without a level or
    a namespace as it does."""
    from twisted.logger import LogLevel, LogLevelFilterPredicate

    from saslsmtp.logs import LevelFloor
    for floor in LogLevel.iterconstants():
        ours, theirs = LevelFloor(floor.name), LogLevelFilterPredicate(defaultLogLevel=floor)
        for level in LogLevel.iterconstants():
            event = {"log_level": level, "log_namespace": "saslsmtp.smtp"}
            assert ours(event) is theirs(event), (floor, level)
        for event in ({"log_namespace": "x"}, {"log_level": LogLevel.critical}):
            assert ours(event) is theirs(event)


# ---- saslsmtp.redact: what messages may repeat of a URL or an exception --------------------

@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    ("ldap://cn=admin,dc=x:pw@ldap.example", "ldap://cn=admin,dc=x:***@ldap.example"),
    ("https://token@api.example/auth", "https://***@api.example/auth"),
    ("http://u:p/w@d@h:8080/auth?key=k1&x=2#f", "http://u:***@h:8080/auth?key=***&x=***#f"),
    ("https://api.example/auth", "https://api.example/auth"),
    ("http://[::1]:8080/auth", "http://[::1]:8080/auth"),
])
def test_url_for_humans(url: str, shown: str) -> None:
    """The userinfo's password (an unescaped / or @ in it included) and query values are
    masked; the user name, host, port and path stay."""
    from saslsmtp.redact import url_for_humans
    assert url_for_humans(url) == shown


def test_scrubbed_failure_keeps_type_and_frames() -> None:
    """The secret leaves the message in every form (text, repr, base64); the type, the
    frames and ``check()`` stay; a failure without the secret is returned as is."""
    import base64
    from twisted.python.failure import Failure
    from saslsmtp.redact import scrubbed_failure

    def parse(value: str) -> int:
        return int(value)

    secret = "p\u00e4ss'word"
    for message_of in (lambda: parse(secret), lambda: parse(base64.b64encode(secret.encode()).decode())):
        try:
            message_of()
        except ValueError:
            failure = Failure()
        clean = scrubbed_failure(failure, [secret])
        text = clean.getTraceback()
        assert "ValueError: invalid literal for int() with base 10: \"<redacted>\"" in text \
            or "ValueError: invalid literal for int() with base 10: '<redacted>'" in text
        assert "in parse" in text and clean.check(ValueError)
        assert secret not in text and "p\\xe4ss" not in text
    assert scrubbed_failure(failure, ["elsewhere"]) is failure


@pytest.mark.parametrize("level, lines", [
    ("warn", ["a warning"]),
    ("info", ["an info line", "a warning"]),
])
def test_syslog_lines_follow_log_level_and_leave_out_library_noise(
        monkeypatch: pytest.MonkeyPatch, level: str, lines: list[str]) -> None:
    """``--syslog`` keeps twistd's syslog observer (its ``--prefix``, its priorities) but
    behind ``log_level``: it sent every info and debug line, and txredisapi's repeated
    "Discarding dead connection." during a Redis outage, whatever the level."""
    from twisted.logger import LogLevel
    from twisted.python.syslog import SyslogObserver

    from saslsmtp import logs
    opened: list[str] = []
    sent: list[str] = []
    monkeypatch.setattr(SyslogObserver, "openlog", lambda self, prefix, *a: opened.append(prefix))
    monkeypatch.setattr(SyslogObserver, "syslog", lambda self, priority, text: sent.append(text))
    monkeypatch.setattr(logs, "_TWISTD", {})
    assert logs.use_for_twistd({"syslog": True, "prefix": "submission"}, "json", level) \
        == "saslsmtp.logs.twistd_syslog_logger"
    observer = logs.twistd_syslog_logger()
    assert opened == ["submission"]
    publisher = LogPublisher(observer)
    for what, at in (("a debug line", LogLevel.debug), ("an info line", LogLevel.info),
                     ("a warning", LogLevel.warn)):
        Logger(namespace="saslsmtp.test", observer=publisher).emit(at, what)
    # what txredisapi's log.msg("Discarding dead connection.") becomes
    publisher({"log_namespace": "log_legacy", "log_level": LogLevel.info, "isError": 0,
               "message": ("Discarding dead connection.",), "log_format": "{log_text}",
               "log_text": "Discarding dead connection.", "system": "-", "log_time": 0.0})
    assert sent == [f"[-] {line}" for line in lines]
