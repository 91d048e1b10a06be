"""The daemon's epoll loop, without a log context pushed for every event.

Twisted's ``EPollReactor.doPoll`` hands each ready socket to ``_doReadOrWrite`` through
``twisted.python.log.callWithLogger``: it asks the connection for its ``logPrefix()``,
builds a context dictionary and pushes and pops it on Twisted's context stack, so that a
*legacy* ``twisted.python.log`` message written while the event is handled names the
connection it came from.  That costs 1.2 µs per event, and an AUTH session has four or
five (the accept, EHLO, AUTH, QUIT): about 3% of the daemon's CPU per session.
saslsmtp's own lines go through ``twisted.logger`` with their own fields (client, user)
and never read that context.

``lean_dispatch(reactor)`` gives the reactor the same loop calling ``_doReadOrWrite``
directly.  ``_doReadOrWrite`` still catches and logs what a connection's ``doRead`` or
``doWrite`` raises and disconnects it, as before; anything raised past it (a
``connectionLost`` that fails) is logged here, naming the connection, and the loop goes
on to the next event, as ``callWithLogger`` did.  The one difference: a legacy traceback
logged from inside ``_doReadOrWrite`` shows ``[-]`` where it showed the connection's
prefix.

Only the daemon applies it (``SaslSmtpService.startService``), never a reactor that
embeds saslsmtp as a library, and only to Twisted's own ``EPollReactor`` with the
attributes this loop reads (checked on Twisted 24.7 to 26.x); any other reactor is left
as it is.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="saslsmtp.reactor")


def lean_dispatch(reactor: Any) -> bool:
    """Make ``reactor`` dispatch its epoll events without a log context; whether it did."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    handle = getattr(reactor, "_doReadOrWrite", None)
    if poller is None or not isinstance(selectables, dict) or handle is None:
        return False
    poll = poller.poll
    selectable_of = selectables.get

    def do_poll(timeout: float | None) -> None:
        """``EPollReactor.doPoll`` with ``_doReadOrWrite`` called directly."""
        try:
            # at most as many events as there are sockets, as Twisted asks
            ready = poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = selectable_of(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except Exception:
                    log.failure("handling an event of {connection}",
                                connection=_prefix(selectable))

    patched: Any = reactor  # an instance attribute: mainLoop calls self.doIteration(t)
    patched.doIteration = do_poll
    return True


def _prefix(selectable: Any) -> str:
    """What ``callWithLogger`` would have named the connection by."""
    try:
        return str(selectable.logPrefix())
    except Exception:
        return "(buggy logPrefix method)"
