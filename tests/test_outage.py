"""OutageLog: one warn when a backend stops answering, one info when it answers again."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from saslsmtp.checkers.outage import OutageLog
from saslsmtp.errors import TemporaryFailure


class LevelCapture:
    """(level name, formatted text) of every event of the backend log namespace."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "saslsmtp.backend":
            self.events.append((event["log_level"].name, formatEvent(event)))

    def at(self, level: LogLevel) -> list[str]:
        return [text for name, text in self.events if name == level.name]


@pytest.fixture
def outage_log() -> Iterator[LevelCapture]:
    """Backend outage events logged during the test."""
    capture = LevelCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


def test_one_warn_per_outage_and_recovery_with_its_duration(outage_log: LevelCapture) -> None:
    """Three failures warn once; the first verdict after them logs the outage's length."""
    clock = Clock()
    outages = OutageLog("dir", clock.seconds)
    outages.up()
    assert outage_log.events == []  # nothing to recover from
    for second in range(3):
        why = "Connection was refused by other side: 111: Connection refused."
        outages.watch(fail(TemporaryFailure(why))).addErrback(lambda f: None)
        clock.advance(10)
    assert outage_log.at(LogLevel.warn) == [
        "backend dir unreachable: Connection was refused by other side: 111: Connection"
        " refused; logins that need it get 454 until it"
        " answers again"]
    outages.watch(fail(UnauthorizedLogin("wrong password"))).addErrback(lambda f: None)
    assert outage_log.at(LogLevel.info) == ["backend dir reachable again after 30.0 s"]
    outages.watch(succeed(b"alice"))
    outages.watch(fail(TemporaryFailure("timeout"))).addErrback(lambda f: None)
    assert len(outage_log.at(LogLevel.warn)) == 2 and len(outage_log.at(LogLevel.info)) == 1
