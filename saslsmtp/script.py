"""The AUTH script: a Python module whose ``auth(arguments, context)`` decides each step.

What a script imports::

    from saslsmtp.script import Accept, Defer, Reject, Reply

``Accept``/``Reject``/``Defer``/``Reply`` are the same frozen values the built-in
mechanisms return (``saslsmtp.sasl.outcome``).  ``arguments`` (a read-only mapping):

* ``mechanism`` (upper case), ``state`` (0, then +1 after each ``Reply``),
  ``response`` (decoded bytes; ``None`` at state 0 without an initial response,
  ``b""`` for ``=``);
* ``username``, ``password``, ``authzid`` (str) for PLAIN and LOGIN, whose exchange the
  server runs itself (``state`` 0, ``response`` ``None``);
* ``remote_ip``, ``remote_port``, ``local_ip``, ``local_port``, ``helo``, ``tls`` (bool),
  ``hostname`` (the server's),
  ``channel_bindings`` (TLS channel-binding data by type), ``client_certificate`` (the
  verified one), ``client_certificate_error`` (why the one sent did not verify);
* ``backends``: ``await arguments["backends"].verify("name", username, password)``
  returns ``Verdict.ACCEPT``, ``Verdict.REJECT`` or ``Verdict.TEMPORARY``.

``context`` is a dict kept for the whole connection.  A script that returns nothing
rejects; one that raises, returns something else or runs past ``script_timeout`` defers
(454 4.7.0) and is logged in one line (its file:line, never the client's credentials; the
traceback at debug level); an exchange longer than ``script_max_steps`` is refused.  What
the script kept in ``context`` of a password or response is redacted from that line too,
also when it came from an earlier AUTH command of the connection (``Session.heard``
remembers the last few exchanges: ``saslsmtp.sasl.heard``).

A script runs in the reactor thread: what it does between two ``await``s holds every
connection of the process.  That time is measured (``time.monotonic``): a stretch of
``BLOCKING_WARNING`` seconds or more is logged as a warning, and a call that spent
``script_timeout`` in total that way defers like one that waited that long.

An optional module-level ``MECHANISMS`` lists the custom mechanisms the script serves;
when present, configuring any other non-built-in mechanism is a startup error.  It is a
list of names (``["X-MY-MECH"]``) or a dict of name -> TLS declaration
(``{"X-OTP": {"plaintext": False}}``): ``plaintext`` (secrets cross the wire: hidden before
TLS under ``require_tls``; default ``True`` for a custom mechanism) and ``needs_tls`` (never
offered without TLS; default ``False``).  A built-in the script takes over keeps the
built-in's values unless declared.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import linecache
import re
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.config import ConfigError, ConfigProblem
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.events import NO_METRICS
from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.settings import LimitsSettings
from saslsmtp.limits.store import MemoryStore
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.octets import as_text
from saslsmtp.redact import scrub, scrubbed_failure
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Accept, Defer, Reject, Reply, Secret, Session, Verify

__all__ = ["Accept", "Defer", "Reject", "Reply", "Verdict", "Backends", "AuthScript",
           "load_script", "ScriptMechanism", "ScriptPasswordChecker", "scripted_spec"]

log = Logger(namespace="saslsmtp.script")

RESULTS = (Accept, Defer, Reject, Reply)


class Verdict(str, enum.Enum):
    """What a backend said about a username and password."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPORARY = "temporary"


class Backends:
    """The configured backends, by name, for scripts: ``await backends.verify(...)``."""

    def __init__(self, checkers: Mapping[str, ICredentialsChecker]) -> None:
        self._checkers = dict(checkers)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._checkers)

    def verify(self, name: str, username: str | bytes, password: str | bytes,
               session: Session | None = None) -> "defer.Deferred[Verdict]":
        """Check ``username``/``password`` against backend ``name``."""
        checker = self._checkers.get(name)
        if checker is None:
            return defer.fail(KeyError(f"no backend named {name!r} (have: {', '.join(self._checkers)})"))
        creds = PasswordCredentials(_bytes(username), _bytes(password), session or Session())
        d = defer.maybeDeferred(checker.requestAvatarId, creds)

        def failed(f: Any) -> Verdict:
            if f.check(UnauthorizedLogin):
                return Verdict.REJECT
            if not f.check(TemporaryFailure):
                log.failure("backend {name} raised", failure=scrubbed_failure(f, [password]),
                            name=name)
            else:
                # as the chain does: any checker may quote the password in its message, and
                # one with an outage log has said so already (once per outage)
                level = log.debug if hasattr(checker, "outages") else log.info
                level("backend {name} failed temporarily: {why}", name=name,
                      why=scrub(str(f.value), [password]))
            return Verdict.TEMPORARY
        return d.addCallbacks(lambda _: Verdict.ACCEPT, failed)


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


#: What ``MECHANISMS = {"NAME": {...}}`` may declare per mechanism (``MechanismSpec`` fields).
DECLARABLE = ("plaintext", "needs_tls")


@dataclass(frozen=True)
class AuthScript:
    """A loaded script: its ``auth`` callable, the mechanisms it declares and what it
    declared about their TLS needs (name -> {``plaintext``/``needs_tls``: bool})."""

    path: str
    auth: Callable[..., Any]
    mechanisms: frozenset[str] | None  # None: serves any custom mechanism
    declarations: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)
    sender: Callable[..., Any] | None = None  # optional sender(arguments, context) for MAIL FROM

    def spec(self, name: str, runner: "ScriptRunner", builtin: MechanismSpec | None = None) -> MechanismSpec:
        """The spec for ``name`` served by this script: a custom mechanism is plaintext
        unless declared otherwise; a built-in taken over keeps its TLS needs; PLAIN and
        LOGIN stay the server's exchanges (the script gets their username and password)."""
        return scripted_spec(name, runner, builtin, self.declarations.get(name, {}))


def load_script(path: str, config_file: str = "<config>") -> AuthScript:
    """Import the script once; any problem is a ``ConfigError`` with file and line."""
    def problem(message: str, line: int | None = None, file: str = path) -> ConfigError:
        return ConfigError([ConfigProblem(file, "auth.script", line, message)])

    source_path = Path(path)
    try:  # bytes: Python decodes them (UTF-8, or a PEP 263 coding line) and says what's wrong
        source = source_path.read_bytes()
    except OSError as e:
        raise problem(f"cannot read: {e.strerror}") from None
    try:
        code = compile(source, str(source_path), "exec")
    except SyntaxError as e:
        raise problem(f"syntax error: {e.msg}", e.lineno) from None
    name = f"saslsmtp_auth_script_{abs(hash(str(source_path.resolve())))}"
    module = types.ModuleType(name)
    module.__file__ = str(source_path)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # sys.exit() too: a problem, not an exit
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(source_path):
                line = tb.tb_lineno
            tb = tb.tb_next
        if isinstance(e, SystemExit):
            raise problem(f"the script exited (SystemExit {e.code}) while loading", line) from None
        raise problem(f"raised {type(e).__name__} while loading: {e}", line) from None
    auth = getattr(module, "auth", None)
    if not callable(auth):
        raise problem("defines no callable auth(arguments, context)")
    declared = getattr(module, "MECHANISMS", None)
    mechanisms = None
    declarations: dict[str, dict[str, bool]] = {}
    if declared is not None:
        if not isinstance(declared, (list, tuple, set, frozenset, dict)) or not all(
                isinstance(m, str) for m in declared):
            raise problem("MECHANISMS must be a list of mechanism names, or a dict of"
                          " name -> {\"plaintext\": bool, \"needs_tls\": bool}")
        mechanisms = frozenset(m.upper() for m in declared)
        if isinstance(declared, dict):
            for name, flags in declared.items():
                declarations[name.upper()] = _declaration(name, flags, problem)
    sender = getattr(module, "sender", None)
    if sender is not None and not callable(sender):
        raise problem("sender must be a function sender(arguments, context)")
    return AuthScript(str(source_path), auth, mechanisms, declarations, sender)


def _declaration(name: str, flags: Any, problem: Callable[[str], ConfigError]) -> dict[str, bool]:
    """One ``MECHANISMS`` dict value, checked: only ``DECLARABLE`` keys, bool values."""
    if flags is None:
        return {}
    if not isinstance(flags, dict):
        raise problem(f"MECHANISMS[{name!r}] must be a dict such as {{\"plaintext\": False}}")
    for key, value in flags.items():
        if key not in DECLARABLE:
            raise problem(f"MECHANISMS[{name!r}]: unknown key {key!r} (known: {', '.join(DECLARABLE)})")
        if not isinstance(value, bool):
            raise problem(f"MECHANISMS[{name!r}][{key!r}] must be True or False")
    return dict(flags)


#: Seconds one synchronous stretch of a script (between two ``await``s) may hold the
#: reactor before it is logged as a warning: every connection of the process waited.
BLOCKING_WARNING = 0.5


class ScriptRunner:
    """Runs one step of the script: sync, ``async def``, Deferred or another awaitable;
    bounded in time (waiting, by ``clock``; holding the reactor, by ``monotonic``); every
    error becomes ``Defer`` (logged in one line), ``None`` becomes ``Reject``.

    ``rate`` is ``arguments["rate"]`` (``Limiter.rate``, the daemon's limits store);
    without one, a memory store on ``clock`` (library use and ``SMTPHarness``)."""

    def __init__(self, script: AuthScript, clock: Any, timeout: float, backends: Backends,
                 rate: Any = None, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.script = script
        self.clock = clock
        self.timeout = timeout
        self.backends = backends
        self.rate = rate if rate is not None else Limiter(LimitsSettings(), MemoryStore(clock),
                                                          clock).rate
        self.monotonic = monotonic
        self.metrics: Any = NO_METRICS  # script_error() (serving.instrument sets it)

    def arguments(self, session: Session, mechanism: str, **extra: Any) -> dict[str, Any]:
        """The ``arguments`` mapping for one call."""
        args: dict[str, Any] = {
            "mechanism": mechanism, "state": 0, "response": None,
            "remote_ip": session.remote_ip, "remote_port": session.remote_port,
            "local_ip": session.local_ip, "local_port": session.local_port,
            "helo": session.helo, "tls": session.tls, "hostname": session.hostname,
            "channel_bindings": dict(session.channel_bindings),
            "client_certificate": session.client_certificate,
            "client_certificate_error": session.client_certificate_error,
            "backends": _SessionBackends(self.backends, session),
            "rate": self.rate,
        }
        args.update(extra)
        return args

    def run(self, arguments: Mapping[str, Any], context: dict,
            function: Callable[..., Any] | None = None, *,
            earlier: Sequence[bytes] = ()) -> "defer.Deferred[Any]":
        """One call of ``auth`` (or ``function``, the script's ``sender``); fires with an
        ``Accept``/``Defer``/``Reject``/``Reply``.

        ``earlier`` is what the client said before this call, on this connection (the
        session's ``Heard``: the exchange's earlier steps and the last few exchanges before
        it): an error message quoting one of them, or what the script kept of one in
        ``context`` (the password of step 1, or of an earlier AUTH command, say), is logged
        with it redacted, as the current response is."""
        mechanism = arguments.get("mechanism")
        state = arguments.get("state")
        decide = function or self.script.auth
        what = "sender()" if function is not None else "auth()"
        step = "MAIL FROM" if function is not None else f"{mechanism} state {state}"
        watch = _Stopwatch(self.monotonic)

        def call() -> Any:
            result = watch.time(decide, types.MappingProxyType(dict(arguments)), context)
            if not inspect.iscoroutine(result) and not isinstance(result, defer.Deferred) \
                    and inspect.isawaitable(result):
                result = _awaited(result)  # any other awaitable: driven as a coroutine
            if inspect.iscoroutine(result):
                return defer.Deferred.fromCoroutine(_timed_stretches(result, watch))
            return result

        d = defer.maybeDeferred(call)
        d.addTimeout(self.timeout, self.clock)

        def held_too_long() -> bool:
            """Whether the call held the reactor past ``script_timeout`` (logged)."""
            if watch.blocked >= self.timeout:
                self.metrics.script_error()
                log.error("AUTH script {path}: {what} held the server for {held:.1f} s, past"
                          " script_timeout ({t:g} s) ({step}); answered as a temporary"
                          " failure. Every connection waited: await Deferreds instead of"
                          " blocking calls", path=self.script.path, what=what,
                          held=watch.blocked, t=self.timeout, step=step)
                return True
            if watch.longest >= BLOCKING_WARNING:
                log.warn("AUTH script {path}: {what} held the server for {held:.2f} s without"
                         " awaiting ({step}); every connection waited: await Deferreds"
                         " instead of blocking calls", path=self.script.path, what=what,
                         held=watch.longest, step=step)
            return False

        def checked(result: Any) -> Any:
            if held_too_long():
                return Defer()
            if result is None:
                return Reject()
            if isinstance(result, Reply) and not isinstance(result.payload, (bytes, str)):
                self.metrics.script_error()  # (bytes(5) would be five NULs to the client)
                log.error("AUTH script {path}: {what} returned Reply({kind}) ({step}); the"
                          " challenge must be bytes or str", path=self.script.path, what=what,
                          kind=type(result.payload).__name__, step=step)
                return Defer()
            if isinstance(result, RESULTS):
                return result
            self.metrics.script_error()
            log.error("AUTH script {path}: {what} returned {kind} ({step}); expected Accept,"
                      " Defer, Reject or Reply", path=self.script.path, what=what,
                      kind=type(result).__name__, step=step)
            return Defer()

        def failed(f: Failure) -> Defer:
            if f.check(defer.CancelledError):
                raise f.value  # the connection went away: nothing to answer
            if held_too_long():
                return Defer()
            if f.check(defer.TimeoutError):
                log.error("AUTH script {path}: {what} timed out after {t:g} s ({step});"
                          " answered as a temporary failure", path=self.script.path,
                          what=what, t=self.timeout, step=step)
            else:
                self._log_raised(f, decide, what, step, _secrets(arguments, context, earlier))
            self.metrics.script_error()
            return Defer()

        return d.addCallbacks(checked, failed)

    def _log_raised(self, f: Failure, decide: Callable[..., Any], what: str, step: str,
                    secrets: tuple[str | bytes, ...]) -> None:
        """One error line (the script's file:line, the exception, never a credential),
        and the traceback from the script's first frame at debug level."""
        code = getattr(decide, "__code__", None)
        files = {self.script.path, getattr(code, "co_filename", self.script.path)}
        frames = [(frame[0], frame[1], frame[2]) for frame in f.frames]
        mine = [i for i, (_, file, _) in enumerate(frames) if file in files]
        where = f"{frames[mine[-1]][1]}:{frames[mine[-1]][2]}" if mine else self.script.path
        error = f"{getattr(f.type, '__name__', f.type)}: {_message(f.value, secrets)}"
        log.error("AUTH script {where}: {what} raised {error} ({step}); answered as a"
                  " temporary failure", where=where, what=what, error=error, step=step)
        lines = ["Traceback (most recent call last):"]
        for function, file, line in frames[mine[0] if mine else 0:]:
            lines.append(f'  File "{file}", line {line}, in {function}')
            source = linecache.getline(file, line).strip()
            if source:
                lines.append(f"    {source}")
        lines.append(error)
        text = "\n".join(lines).replace("{", "{{").replace("}", "}}")
        log.debug("AUTH script {where}: where the error above came from\n" + text, where=where)

    def verify_password(self, request: Verify, session: Session) -> "defer.Deferred[Any]":
        """PLAIN and LOGIN: the script decides with the decoded username and password
        (and may ask the backends itself).  Fires with ``Accept`` (naming the user),
        ``Reject`` or ``Defer``; a ``Reply`` is a script error (``Defer``)."""
        mechanism = session.mechanism or "PLAIN"
        args = self.arguments(session, mechanism, username=request.username,
                              password=request.password, authzid=request.authzid)
        earlier = session.heard.said()  # the connection's earlier exchanges
        session.heard.begin()
        session.heard.add(request.password)

        def decide(result: Any) -> Any:
            if isinstance(result, Accept):
                return Accept(result.username or request.username, result.reason)
            if isinstance(result, Reply):
                self.metrics.script_error()
                log.error("AUTH script {path}: auth() returned Reply() ({mechanism} state 0);"
                          " only custom mechanisms can send challenges; answered as a"
                          " temporary failure", path=self.script.path, mechanism=mechanism)
                return Defer()
            return result
        return self.run(args, session.context, earlier=earlier).addCallback(decide)

    def check_sender(self, session: Session, login: str | None, address: str,
                     params: Any = ()) -> "defer.Deferred[Any]":
        """MAIL FROM when the script defines ``sender(arguments, context)``: fires with
        ``Accept``, ``Reject`` or ``Defer`` (``Reply`` is a script error: ``Defer``).
        ``arguments`` are those of ``auth`` plus ``username`` (the login), ``sender``
        (the address, ``""`` for ``<>``) and ``parameters`` (the MAIL parameters)."""
        assert self.script.sender is not None
        args = self.arguments(session, session.mechanism or "", username=login,
                              sender=address, parameters=tuple(params))

        def only_verdicts(result: Any) -> Any:
            if isinstance(result, Reply):
                self.metrics.script_error()
                log.error("AUTH script {path}: sender() returned Reply() (MAIL FROM); expected"
                          " Accept, Reject or Defer; answered as a temporary failure",
                          path=self.script.path)
                return Defer()
            return result
        return self.run(args, session.context, self.script.sender,
                        earlier=session.heard.said()).addCallback(only_verdicts)


class _Stopwatch:
    """The time one script call spent running in the reactor thread, stretch by stretch
    (the code between two ``await``s): nothing else in the process runs meanwhile."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.blocked = 0.0  # all stretches
        self.longest = 0.0  # the longest one

    def time(self, call: Callable[..., Any], *args: Any) -> Any:
        started = self._now()
        try:
            return call(*args)
        finally:
            spent = self._now() - started
            self.blocked += spent
            self.longest = max(self.longest, spent)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _timed_stretches(coroutine: Any, watch: _Stopwatch) -> Generator[Any, Any, Any]:
    """Drive ``coroutine`` for ``Deferred.fromCoroutine`` (which takes a generator too),
    timing each synchronous stretch with ``watch``; what it awaits and what it returns or
    raises pass through unchanged."""
    value: Any = None
    error: BaseException | None = None
    try:
        while True:
            if error is None:
                awaited = watch.time(coroutine.send, value)
            else:
                awaited = watch.time(coroutine.throw, error)
            try:
                value, error = (yield awaited), None
            except GeneratorExit:
                raise
            except BaseException as e:  # thrown in by the driver (a cancelled await): pass it on
                value, error = None, e
    except StopIteration as done:
        return done.value
    finally:
        coroutine.close()


_MESSAGE_LIMIT = 300
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def _secrets(arguments: Mapping[str, Any], context: Mapping[Any, Any] | None = None,
             earlier: Sequence[bytes] = ()) -> tuple[str | bytes, ...]:
    """What of the client's credentials an exception's text could quote: the password,
    this step's and the ``earlier`` steps' responses and their NUL-separated parts
    (PLAIN-like), and each text the script kept in ``context`` that is part of one of
    them (a password split off a response, decoded, stripped); ``scrub`` finds each as
    text, as ``repr`` shows it and in base64."""
    values: list[str | bytes] = []
    password = arguments.get("password")
    if isinstance(password, (str, bytes)):
        values.append(password)
    response = arguments.get("response")
    said = [r for r in (*earlier, response) if isinstance(r, bytes) and r]
    for words in said:
        values.append(words)
        values.extend(part for part in words.split(b"\0") if len(part) >= 3)
    if context:
        heard = [_raw(v) for v in values]
        values.extend(kept for kept in _kept_texts(context)
                      if len(_raw(kept)) >= 3 and any(_raw(kept) in h for h in heard))
    return tuple(values)


def _raw(text: str | bytes) -> bytes:
    return text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text


def _kept_texts(kept: Any, depth: int = 0) -> Iterator[str | bytes]:
    """The strings and bytes in ``kept`` (the script's ``context``): values of dicts and
    items of lists, tuples and sets, a few levels down."""
    if isinstance(kept, (str, bytes)):
        yield kept
    elif isinstance(kept, (bytearray, memoryview)):
        yield bytes(kept)
    elif depth < 4 and isinstance(kept, Mapping):
        for value in list(kept.values()):
            yield from _kept_texts(value, depth + 1)
    elif depth < 4 and isinstance(kept, (list, tuple, set, frozenset)):
        for value in list(kept):
            yield from _kept_texts(value, depth + 1)


def _message(error: Any, secrets: tuple[str | bytes, ...]) -> str:
    """An exception's text for one log line: each credential in it replaced by
    ``<redacted>`` (so a script's ``int(arguments["password"])`` logs what went wrong,
    never the password), flattened, capped."""
    try:
        text = str(error)
    except Exception:
        text = "(unprintable)"
    text = _UNPRINTABLE.sub(" ", scrub(text, secrets)).strip()
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


class _SessionBackends:
    """``arguments["backends"]``: ``verify`` with the connection's session attached."""

    def __init__(self, backends: Backends, session: Session) -> None:
        self._backends = backends
        self._session = session
        self.names = backends.names

    def verify(self, name: str, username: str | bytes, password: str | bytes) -> "defer.Deferred[Verdict]":
        return self._backends.verify(name, username, password, self._session)


class ScriptMechanism:
    """A custom mechanism served by the script, step by step (not sans-I/O: steps are
    Deferreds).  ``*`` and base64 are the engine's business; the script sees bytes."""

    def __init__(self, runner: ScriptRunner, session: Session) -> None:
        self._runner = runner
        self._session = session
        self._state = -1
        session.heard.begin()  # the client's responses (redacted from logs), by exchange

    def start(self, initial: bytes | None) -> "defer.Deferred[Any]":
        return self._call(initial)

    def receive(self, response: bytes) -> "defer.Deferred[Any]":
        return self._call(response)

    def resume(self, secret: Secret | None) -> "defer.Deferred[Any]":
        raise RuntimeError("a scripted mechanism never asks for a secret")

    def _call(self, response: bytes | None) -> "defer.Deferred[Any]":
        self._state += 1
        args = self._runner.arguments(self._session, self._session.mechanism,
                                      state=self._state, response=response)
        heard = self._session.heard
        d = self._runner.run(args, self._session.context, earlier=heard.said())
        if response:
            heard.add(response)

        def require_username(result: Any) -> Any:
            if isinstance(result, Accept) and not result.username:
                log.error("AUTH script {path}: Accept() for custom mechanism {mechanism} must"
                          " name the user (Accept(username=...))", path=self._runner.script.path,
                          mechanism=self._session.mechanism)
                return Defer()
            return result
        return d.addCallback(require_username)


def scripted_spec(name: str, runner: ScriptRunner, builtin: MechanismSpec | None = None,
                  declared: Mapping[str, bool] | None = None) -> MechanismSpec:
    """A ``MechanismSpec`` whose exchanges the script runs (client-first allowed, unless
    it takes over a server-first built-in).

    Its TLS needs are what the script ``declared``, else the taken-over ``builtin``'s,
    else those of a plaintext mechanism: an unknown mechanism might send a password.

    PLAIN and LOGIN (built-ins that end in ``Verify``) are not taken over even when
    ``MECHANISMS`` names them: the server runs their exchange and the script decides the
    password with ``username``/``password`` as documented (only the declared TLS needs
    apply).  Taking them over would hand the script raw bytes it was never told about."""
    builtin = builtin if builtin is not None else builtin_mechanisms().get(name)
    if builtin is not None and builtin.password:
        flags = dict(declared or {})
        return dataclasses.replace(builtin, plaintext=flags.get("plaintext", builtin.plaintext),
                                   needs_tls=flags.get("needs_tls", builtin.needs_tls))
    flags = {"plaintext": True, "needs_tls": False}
    if builtin is not None:
        flags = {"plaintext": builtin.plaintext, "needs_tls": builtin.needs_tls}
    flags.update(declared or {})
    # a server-first built-in (CRAM-MD5) stays server-first: its initial response is 501
    client_first = builtin.client_first if builtin is not None else True
    return MechanismSpec(name, lambda session: ScriptMechanism(runner, session),
                         plaintext=flags["plaintext"], needs_tls=flags["needs_tls"],
                         client_first=client_first)


@implementer(ICredentialsChecker)
class ScriptPasswordChecker:
    """PLAIN and LOGIN when a script is configured, as a cred checker (for a portal
    driven by stock Twisted protocols): ``AuthRejected``/``TemporaryFailure`` carry the
    script's ``Reject``/``Defer``.  ``SubmissionESMTP`` asks ``verify_password`` directly.

    The username and password may be ``str`` or UTF-8 ``bytes`` (``IUsernamePassword``
    allows both; ``UsernamePassword("alice", "pw")`` is common).  Bytes that are not UTF-8
    fail with ``UnauthorizedLogin`` (never replaced: two different passwords must not
    reach the script as one); anything else fails the Deferred with ``TypeError``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, runner: ScriptRunner) -> None:
        self.runner = runner

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[bytes | tuple[()]]":
        session = getattr(credentials, "session", None) or Session()
        try:
            request = _password_request(credentials)
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin("the username or password is not UTF-8"))
        except TypeError:
            return defer.fail()

        def decide(result: Any) -> bytes:
            if isinstance(result, Accept):
                name = result.username or request.username
                return name if isinstance(name, bytes) else name.encode("utf-8")
            if isinstance(result, Reject):
                raise AuthRejected(result)
            raise TemporaryFailure("AUTH script deferred", result)
        return self.runner.verify_password(request, session).addCallback(decide)


def _password_request(credentials: Any) -> Verify:
    """The ``Verify`` the AUTH engine attached to ``credentials``, else one made from
    their ``username``, ``password`` (and ``authzid``, if any) as text: ``UnicodeDecodeError``
    for bytes that are not UTF-8, ``TypeError`` (naming the field) for anything but
    ``str`` or bytes."""
    attached = getattr(credentials, "request", None)
    if isinstance(attached, Verify):
        return attached

    def text(field: str, default: Any = None) -> str:
        value = getattr(credentials, field, default)
        if field == "authzid" and value is None:
            return ""
        if not isinstance(value, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"credentials.{field} must be str or bytes, not"
                            f" {type(value).__name__}")
        return as_text(value)
    return Verify(text("username"), text("password"), text("authzid", b""))
