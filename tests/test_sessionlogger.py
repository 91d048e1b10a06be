"""The session logger emits Twisted's events, and the fast log text is byte for byte
Twisted's classic text for them (fail2ban filters and operators' greps depend on it)."""

from __future__ import annotations

import io
import time

import pytest
from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure

from saslsmtp.logs import _SecondClock, classic_text, format_message, make_observer

NOW = time.time()


def _failure() -> Failure:
    try:
        raise ValueError("boom")
    except ValueError:
        return Failure()


EVENTS = [
    dict(log_format="auth failed: client={client} user={user}", client="192.0.2.1",
         user="alice", log_level=LogLevel.info, log_namespace="saslsmtp.auth", log_time=NOW),
    dict(log_format="duration={d:.3f}s n={n!r}", d=0.12345, n="x", log_level=LogLevel.warn,
         log_namespace="saslsmtp", log_time=NOW + 1.7),
    dict(log_format="called {f()}", f=lambda: "result", log_level=LogLevel.info,
         log_namespace="n", log_time=NOW),
    dict(log_format="missing {nothere}", log_level=LogLevel.info, log_namespace="n",
         log_time=NOW),
    dict(log_format="two\nlines {a}", a="é", log_system="custom", log_time=NOW),
    dict(log_format="failed", log_failure=_failure(), log_level=LogLevel.critical,
         log_namespace="n", log_time=NOW),
    dict(log_format="no time or level"),
    dict(log_format=b"bytes format {a}", a=1, log_time=NOW),
    dict(log_format="attr {obj.real} item {d[k]}", obj=3, d={"k": "v"}, log_time=NOW),
    dict(log_time=NOW),  # no format: no line
    dict(log_format="", log_time=NOW),
]


@pytest.mark.parametrize("event", EVENTS)
def test_same_line_as_twisted(event: dict) -> None:
    """Each event gives exactly the line Twisted's formatter gives."""
    assert classic_text(event, _SecondClock()) == formatEventAsClassicLogText(event)


def test_format_message_falls_back_for_call_syntax() -> None:
    """``{f()}`` is Twisted's extension, not str.format's: the fallback handles it."""
    assert format_message(dict(log_format="{f()}", f=lambda: 7)) == "7"


def test_clock_recomputes_each_second() -> None:
    """The cached timestamp changes with the second, not within it."""
    clock = _SecondClock()
    first = clock(NOW)
    assert clock(int(NOW) + 0.999) == first
    assert clock(int(NOW) + 1.0) != first
    assert clock(None) == "-"


def test_text_observer_writes_twisted_lines() -> None:
    """The daemon's text observer writes the classic lines, filtered by level."""
    out = io.StringIO()
    observer = make_observer(out, "text", "info")
    shown = [e for e in EVENTS if "log_level" in e]
    for event in shown:
        observer(dict(event))
    observer(dict(log_format="hidden", log_level=LogLevel.debug, log_namespace="n",
                  log_time=NOW))
    expected = "".join(formatEventAsClassicLogText(e) or "" for e in shown)
    assert out.getvalue() == expected


def test_fast_logger_emits_what_twisteds_emits() -> None:
    """Same event keys and values as ``twisted.logger.Logger``; a bad level is still
    reported the Twisted way instead of being written."""
    from twisted.logger import Logger as TwistedLogger

    from saslsmtp.sessionlogger import Logger

    seen: list[dict] = []
    ours = Logger(namespace="n", observer=seen.append)
    theirs = TwistedLogger(namespace="n", observer=seen.append)
    ours.info("x={x}", x=1)
    theirs.info("x={x}", x=1)
    mine, stock = seen
    assert mine.keys() == stock.keys()
    assert {k: v for k, v in mine.items() if k not in ("log_time", "log_logger")} == \
        {k: v for k, v in stock.items() if k not in ("log_time", "log_logger")}
    seen.clear()
    ours.emit("not a level", "hello")
    assert len(seen) == 1 and seen[0]["log_level"] == LogLevel.critical
    assert "invalid log level" in seen[0]["log_format"]
