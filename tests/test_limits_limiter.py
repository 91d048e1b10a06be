"""MemoryStore (GCRA, slots, bounded memory) and the Limiter's exact semantics, with an
injected Clock."""

import pytest
from twisted.internet.task import Clock

from saslsmtp.limits.limiter import IN_FLIGHT_RETRY, IN_FLIGHT_WAIT, Limiter, user_key
from saslsmtp.limits.settings import LimitsSettings, Rate, parse_limits
from saslsmtp.limits.store import MemoryStore, RateResult


def result(d):
    """The value of an already fired Deferred."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def settings(**table):
    problems = []
    s = parse_limits(table, lambda k, m: problems.append((k, m)))
    assert problems == []
    return s


# ---- MemoryStore -------------------------------------------------------------------

def test_gcra_burst_then_steady_rate():
    """A fresh key allows ``count`` at once, then one per ``period/count``: rolling."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(3, 60.0)
    assert [result(store.hit("k", rate)).allowed for _ in range(4)] == [True] * 3 + [False]
    denied = result(store.hit("k", rate))
    assert denied == RateResult(False, pytest.approx(20.0), 3)
    clock.advance(19.9)
    assert not result(store.hit("k", rate)).allowed
    clock.advance(0.1)
    assert result(store.hit("k", rate)).allowed
    assert not result(store.hit("k", rate)).allowed
    clock.advance(60)
    assert [result(store.hit("k", rate)).allowed for _ in range(4)] == [True] * 3 + [False]


def test_denied_hits_are_not_counted():
    """Hammering over the limit does not push the window further out."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(2, 10.0)
    for _ in range(2):
        store.hit("k", rate)
    for _ in range(100):
        assert not result(store.hit("k", rate)).allowed
    clock.advance(5)
    assert result(store.hit("k", rate)).allowed


def test_peek_counts_nothing():
    """peek says whether one more would pass, and never changes the count."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(2, 10.0)
    for _ in range(10):
        assert result(store.peek("k", rate)).allowed
    store.hit("k", rate)
    assert result(store.peek("k", rate)) == RateResult(True, 0.0, 2)
    store.hit("k", rate)
    assert not result(store.peek("k", rate)).allowed


def test_keys_expire_and_memory_is_bounded():
    """Entries vanish once their window has passed; at most max_keys are kept."""
    clock = Clock()
    store = MemoryStore(clock, max_keys=50)
    rate = Rate(5, 10.0)
    for i in range(200):
        store.hit(f"k{i}", rate)
    assert len(store) == 50
    clock.advance(11)
    for i in range(8):
        store.hit(f"n{i}", rate)  # each call sweeps a few expired entries
    assert len(store) < 50
    for _ in range(10):
        store.peek("x", rate)
    assert "k199" not in store._tats or store._tats["k199"] > clock.seconds()


def test_slots():
    """acquire takes at most ``limit`` slots per key; release is idempotent."""
    store = MemoryStore(Clock())
    assert result(store.acquire("c", 2, "a")) and result(store.acquire("c", 2, "b"))
    assert not result(store.acquire("c", 2, "c"))
    assert result(store.acquire("c", 2, "a"))  # a holder already in is still in
    store.release("c", "a")
    store.release("c", "a")
    assert store.held("c") == 1
    assert result(store.acquire("c", 2, "c"))
    store.release("c", "b")
    store.release("c", "c")
    assert store._slots == {}


# ---- Limiter: connections ----------------------------------------------------------

def test_concurrent_connections_per_ip():
    """The 21st concurrent connection gets 421 4.7.0 naming the address; a release frees a seat."""
    clock = Clock()
    limiter = Limiter(settings(connections_per_ip=2), MemoryStore(clock), clock)
    a = result(limiter.connection_made("192.0.2.1"))
    b = result(limiter.connection_made("192.0.2.1"))
    c = result(limiter.connection_made("192.0.2.1"))
    assert a.verdict.allowed and b.verdict.allowed and not c.verdict.allowed
    assert c.verdict.line() == "421 4.7.0 Too many connections from 192.0.2.1"
    assert result(limiter.connection_made("192.0.2.2")).verdict.allowed
    c.release()  # a refused admission holds nothing
    a.release()
    a.release()
    assert result(limiter.connection_made("192.0.2.1")).verdict.allowed
    assert not result(limiter.connection_made("192.0.2.1")).verdict.allowed
    assert limiter.rejects["connections_per_ip"] == 2


def test_ipv6_clients_share_their_prefix():
    """Two addresses of one /64 count together; the reply names the /64."""
    clock = Clock()
    limiter = Limiter(settings(connections_per_ip=1), MemoryStore(clock), clock)
    assert result(limiter.connection_made("2001:db8:0:1::a")).verdict.allowed
    refused = result(limiter.connection_made("2001:db8:0:1::b")).verdict
    assert refused.line() == "421 4.7.0 Too many connections from 2001:db8:0:1::/64"
    assert result(limiter.connection_made("2001:db8:0:2::a")).verdict.allowed


def test_connection_rate_per_ip():
    """New connections per rolling window; beyond: 421 with limit name connection_rate_per_ip."""
    clock = Clock()
    limiter = Limiter(settings(connection_rate_per_ip="3/1m"), MemoryStore(clock), clock)
    seen = [result(limiter.connection_made("192.0.2.1")) for _ in range(4)]
    assert [a.verdict.allowed for a in seen] == [True, True, True, False]
    assert seen[3].verdict.limit == "connection_rate_per_ip"
    assert seen[3].verdict.line() == "421 4.7.0 Too many connections from 192.0.2.1"
    clock.advance(20)
    assert result(limiter.connection_made("192.0.2.1")).verdict.allowed


def test_trusted_networks_are_never_limited_nor_counted():
    """Trusted clients pass every check and leave no counts behind."""
    clock = Clock()
    store = MemoryStore(clock)
    limiter = Limiter(settings(trusted_networks=["127.0.0.0/8"], connections_per_ip=1,
                               connection_rate_per_ip="1/1h", auth_failures_per_ip="1/1h",
                               auth_penalty_max=15), store, clock)
    for _ in range(5):
        assert result(limiter.connection_made("127.0.0.1")).verdict.allowed
        gate = result(limiter.auth_gate("127.0.0.1", "alice"))
        assert gate.verdict.allowed and gate.delay == 0
        limiter.auth_verdict(gate, False, "alice", b"wrong")
    assert len(store) == 0 and store._slots == {}


# ---- Limiter: AUTH failures ----------------------------------------------------------

def fail(limiter, ip, user, password):
    gate = result(limiter.auth_gate(ip, user))
    if gate.verdict.allowed:
        result(limiter.auth_verdict(gate, False, user, password))
    return gate


def test_auth_failures_per_ip():
    """After N failures from an address, its next AUTH is 454 4.7.0 unchecked."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="3/10m"), MemoryStore(clock), clock)
    gates = [fail(limiter, "192.0.2.1", f"user{i}", b"pw") for i in range(4)]
    assert [g.verdict.allowed for g in gates] == [True, True, True, False]
    assert gates[3].verdict.line() == "454 4.7.0 Temporary authentication failure"
    assert gates[3].verdict.limit == "auth_failures_per_ip"
    assert result(limiter.auth_gate("192.0.2.2", "user0")).verdict.allowed
    clock.advance(200)  # one failure's share of the window (600/3) has passed
    assert result(limiter.auth_gate("192.0.2.1", "someone")).verdict.allowed


def test_auth_failures_per_user_across_addresses():
    """Failures for one username from many addresses add up; other users are unaffected;
    case variants of the name share the counter."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_user="3/1h"), MemoryStore(clock), clock)
    for i, name in enumerate(["alice", "Alice", "ALICE"]):
        assert fail(limiter, f"192.0.2.{i}", name, b"guess").verdict.allowed
    refused = result(limiter.auth_gate("198.51.100.9", "alice"))
    assert not refused.verdict.allowed and refused.verdict.limit == "auth_failures_per_user"
    assert result(limiter.auth_gate("198.51.100.9", "bob")).verdict.allowed


def test_repeating_the_same_wrong_password_counts_once():
    """Same user+password from the same address: one failure, however often it is retried;
    a different password, or the same pair from another address, counts."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="2/1h"), MemoryStore(clock), clock)
    for _ in range(10):
        assert fail(limiter, "192.0.2.1", "alice", b"old-password").verdict.allowed
    assert fail(limiter, "192.0.2.1", "alice", b"other").verdict.allowed
    assert not result(limiter.auth_gate("192.0.2.1", "alice")).verdict.allowed
    # the user name is part of the fingerprint: (bob, old-password) is a new failure
    other = Limiter(settings(auth_failures_per_ip="2/1h"), MemoryStore(clock), clock)
    fail(other, "192.0.2.1", "alice", b"pw")
    fail(other, "192.0.2.1", "bob", b"pw")
    assert not result(other.auth_gate("192.0.2.1", "carol")).verdict.allowed


def test_a_success_clears_the_penalty_but_not_the_failures_already_counted():
    """Behind one address, a phone retries a saved wrong password while a laptop logs in
    now and then: the laptop's success clears the address's penalty (as Dovecot's), and
    the phone's retries still count once, so the household is never locked out."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="3/1h", auth_penalty_max=8.0),
                      MemoryStore(clock), clock)

    def attempt(user, password, success):
        gate = result(limiter.auth_gate("192.0.2.1", user))
        if gate.verdict.allowed:
            done = limiter.auth_verdict(gate, success, user, password)
            clock.advance(gate.delay)
            result(done)
        return gate

    for i in range(10):
        attempt("alice", b"old-password", False)  # a repeat adds no penalty either
        assert limiter.penalties.delay("192.0.2.1", 8.0) == (2.0 if i == 0 else 0.0)
        assert attempt("alice", b"right", True).verdict.allowed
        assert limiter.penalties.delay("192.0.2.1", 8.0) == 0.0
        clock.advance(60)
    attempt("alice", b"guess-1", False)
    attempt("alice", b"guess-2", False)
    assert not attempt("alice", b"right", True).verdict.allowed


def test_fingerprints_are_hmacs_not_passwords():
    """The limiter keeps only an HMAC under a random per-process key."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="5/1h"), MemoryStore(clock), clock)
    fail(limiter, "192.0.2.1", "alice", b"s3cret-value")
    stored = b"".join(m for p in limiter.penalties.records.values() for m in p.failed)
    assert b"s3cret-value" not in stored and len(stored) == 32
    again = Limiter(settings(), MemoryStore(clock), clock)
    assert again.penalties.fingerprint("alice", b"x") != limiter.penalties.fingerprint("alice", b"x")


def test_no_password_counts_every_failure():
    """Mechanisms that never show a password (CRAM-MD5, SCRAM) count each failure."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="2/1h"), MemoryStore(clock), clock)
    fail(limiter, "192.0.2.1", "alice", None)
    fail(limiter, "192.0.2.1", "alice", None)
    assert not result(limiter.auth_gate("192.0.2.1", "alice")).verdict.allowed


def test_success_does_not_reset_other_addresses_user_counter():
    """Alice logging in from home does not give an attacker fresh guesses at her name."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_user="2/1h"), MemoryStore(clock), clock)
    fail(limiter, "203.0.113.1", "alice", b"guess1")
    home = result(limiter.auth_gate("192.0.2.1", "alice"))
    result(limiter.auth_verdict(home, True, "alice", b"right"))
    fail(limiter, "203.0.113.2", "alice", b"guess2")
    assert not result(limiter.auth_gate("203.0.113.3", "alice")).verdict.allowed


def test_failure_counts_before_the_penalty_wait_ends():
    """The count happens when the verdict is known, not when the delayed reply goes out:
    cancelling the wait (the client hung up) does not undo it."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="1/1h", auth_penalty_max=15),
                      MemoryStore(clock), clock)
    gate = result(limiter.auth_gate("192.0.2.1", "alice"))
    result(limiter.auth_verdict(gate, False, "alice", b"a"))  # no penalty yet: fires at once
    assert not result(limiter.auth_gate("192.0.2.1", "x")).verdict.allowed
    # a second address with a penalty pending: cancel its wait, the count stands
    limiter = Limiter(settings(auth_failures_per_ip="2/1h", auth_penalty_max=15),
                      MemoryStore(clock), clock)
    fail(limiter, "192.0.2.9", "u", b"1")
    gate = result(limiter.auth_gate("192.0.2.9", "u"))
    assert gate.delay == 2.0
    waiting = limiter.auth_verdict(gate, False, "u", b"2")
    waiting.cancel()
    waiting.addErrback(lambda f: None)
    assert not result(limiter.auth_gate("192.0.2.9", "u")).verdict.allowed


def test_penalty_grows_applies_to_successes_and_resets_on_success():
    """2, 4, 8, then the cap; a success from the address waits too, then clears it."""
    clock = Clock()
    limiter = Limiter(settings(auth_penalty_max=10), MemoryStore(clock), clock)
    delays = []
    for i in range(5):
        gate = result(limiter.auth_gate("192.0.2.1", "alice"))
        delays.append(gate.delay)
        d = limiter.auth_verdict(gate, False, "alice", f"pw{i}".encode())
        clock.advance(gate.delay)
        assert result(d) is None
    assert delays == [0, 2.0, 4.0, 8.0, 10.0]
    gate = result(limiter.auth_gate("192.0.2.1", "alice"))
    assert gate.delay == 10.0
    d = limiter.auth_verdict(gate, True, "alice", b"right")
    fired = []
    d.addCallback(fired.append)
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    assert result(limiter.auth_gate("192.0.2.1", "alice")).delay == 0
    assert result(limiter.auth_gate("192.0.2.2", "alice")).delay == 0


def test_penalty_is_forgotten_after_an_hour():
    """An address that stopped failing is back to no delay."""
    clock = Clock()
    limiter = Limiter(settings(auth_penalty_max=15), MemoryStore(clock), clock)
    fail(limiter, "192.0.2.1", "a", b"1")
    assert limiter.penalty("192.0.2.1") == 2.0
    clock.advance(3601)
    assert limiter.penalty("192.0.2.1") == 0.0


# ---- Limiter: messages and recipients ---------------------------------------------

@pytest.mark.parametrize("count, interval", [
    (0, 10), (-1, 10), (True, 10), (1.5, 10), ("3", 10),
    (3, 0), (3, -5), (3, float("nan")), (3, float("inf")), (3, "10"), (3, True), (3, 10**400),
])
def test_script_rate_refuses_what_is_no_count_or_interval(count, interval):
    """The AUTH script's ``rate()``: a count that is not a positive integer, or an
    interval that is not a positive finite number, is a ``ValueError`` (the script's
    mistake, answered 454), never another exception."""
    clock = Clock()
    limiter = Limiter(settings(), MemoryStore(clock), clock)
    with pytest.raises(ValueError, match="rate\\(\\): (count|interval) must be"):
        limiter.rate("ns", "entry", count, interval)


def test_a_trusted_client_is_neither_limited_nor_counted_for_its_mail():
    """``trusted_networks`` (a webmail, an office) covers the per-user mail limits too:
    the user's mail from there is not counted, and is let through when the user is over
    the limit from elsewhere."""
    from saslsmtp.limits.session import ConnectionLimits
    clock = Clock()
    limiter = Limiter(settings(messages_per_user="1/1h", recipients_per_user="1/1h",
                               trusted_networks=["10.0.0.0/8"]), MemoryStore(clock), clock)
    trusted, outside = ConnectionLimits(limiter), ConnectionLimits(limiter)
    trusted.admit("10.1.2.3")
    outside.admit("192.0.2.5")
    for _ in range(3):
        assert result(trusted.mail_allowed("alice")).allowed
        assert result(trusted.recipient_allowed("alice")).allowed
        trusted.message_accepted("alice")
    assert result(outside.mail_allowed("alice")).allowed  # nothing counted so far
    outside.message_accepted("alice")
    assert not result(outside.mail_allowed("alice")).allowed
    assert result(trusted.mail_allowed("alice")).allowed


def test_messages_per_user_counts_accepted_messages():
    """MAIL peeks (452 4.7.1 when over), the accepted message counts."""
    clock = Clock()
    limiter = Limiter(settings(messages_per_user="2/1h"), MemoryStore(clock), clock)
    for _ in range(5):  # MAIL alone (aborted transactions) counts nothing
        assert result(limiter.mail_allowed("alice")).allowed
    result(limiter.message_accepted("alice"))
    result(limiter.message_accepted("alice"))
    v = result(limiter.mail_allowed("alice"))
    assert v.line() == "452 4.7.1 Too many messages, try again later"
    assert result(limiter.mail_allowed("bob")).allowed


def test_recipients_per_user():
    """Each accepted RCPT counts; beyond the limit 452 4.7.1."""
    clock = Clock()
    limiter = Limiter(settings(recipients_per_user="3/1h"), MemoryStore(clock), clock)
    got = [result(limiter.recipient_allowed("alice")) for _ in range(4)]
    assert [v.allowed for v in got] == [True, True, True, False]
    assert got[3].line() == "452 4.7.1 Too many recipients, try again later"
    clock.advance(1200)
    assert result(limiter.recipient_allowed("alice")).allowed


def test_everything_off_by_default():
    """With no limit keys every call allows and nothing is stored."""
    clock = Clock()
    store = MemoryStore(clock)
    limiter = Limiter(LimitsSettings(), store, clock)
    for _ in range(50):
        assert result(limiter.connection_made("192.0.2.1")).verdict.allowed
        gate = result(limiter.auth_gate("192.0.2.1", "a"))
        assert gate.verdict.allowed and gate.delay == 0
        result(limiter.auth_verdict(gate, False, "a", b"x"))
        assert result(limiter.mail_allowed("a")).allowed
        assert result(limiter.recipient_allowed("a")).allowed
    assert len(store) == 0


# ---- fail open, script rate() ------------------------------------------------------

class BrokenStore:
    def hit(self, *a, **k):
        from twisted.internet.defer import fail
        return fail(ConnectionError("down"))
    peek = hit
    acquire = hit
    release = hit


def test_a_failing_store_allows():
    """Store errors never refuse a client (fail open)."""
    clock = Clock()
    limiter = Limiter(settings(connections_per_ip=1, connection_rate_per_ip="1/1h",
                               auth_failures_per_ip="1/1h", auth_failures_per_user="1/1h",
                               messages_per_user="1/1h", recipients_per_user="1/1h"),
                      BrokenStore(), clock)
    admission = result(limiter.connection_made("192.0.2.1"))
    assert admission.verdict.allowed
    admission.release()
    gate = result(limiter.auth_gate("192.0.2.1", "a"))
    assert gate.verdict.allowed
    assert result(limiter.auth_verdict(gate, False, "a", b"x")) is None
    assert result(limiter.mail_allowed("a")).allowed
    assert result(limiter.recipient_allowed("a")).allowed
    assert result(limiter.message_accepted("a")) is None
    assert result(limiter.rate("ns", "e", 1, 60)) is True


def test_script_rate():
    """rate(namespace, entry, count, interval): True while within count per interval;
    namespaces and entries are separate and exact (no case folding)."""
    clock = Clock()
    limiter = Limiter(LimitsSettings(), MemoryStore(clock), clock)
    assert [result(limiter.rate("logins", "alice", 2, 60)) for _ in range(3)] == [True, True, False]
    assert result(limiter.rate("logins", "Alice", 2, 60)) is True
    assert result(limiter.rate("other", "alice", 2, 60)) is True
    clock.advance(30)
    assert result(limiter.rate("logins", "alice", 2, 60)) is True
    with pytest.raises(ValueError):
        limiter.rate("n", "e", 0, 60)
    with pytest.raises(ValueError):
        limiter.rate("n", "e", 1, 0)


def test_user_keys():
    """Usernames fold case; odd or long ones are hashed, never raw in a key."""
    assert user_key("Alice@Example.TEST") == "u:alice@example.test"
    assert user_key("a b").startswith("h:") and user_key("x\r\n").startswith("h:")
    assert user_key("y" * 500).startswith("h:") and len(user_key("y" * 500)) == 66


def test_cancelled_admission_gives_its_slot_back():
    """A connection lost while the store is still answering: cancelling the pending
    admission releases a slot that was taken after all."""
    from twisted.internet.defer import CancelledError, Deferred

    clock = Clock()
    memory = MemoryStore(clock)

    class SlowStore:
        pending = []

        def acquire(self, key, limit, holder):
            d = Deferred()
            self.pending.append(lambda: d.callback(result(memory.acquire(key, limit, holder))))
            return d

        def release(self, key, holder):
            return memory.release(key, holder)

    store = SlowStore()
    limiter = Limiter(settings(connections_per_ip=1), store, clock)
    d = limiter.connection_made("192.0.2.1")
    d.cancel()
    assert isinstance(result(d).value, CancelledError)
    store.pending.pop()()
    assert memory.held("conn:192.0.2.1") == 0
    d = limiter.connection_made("192.0.2.1")
    store.pending.pop()()
    assert result(d).verdict.allowed and memory.held("conn:192.0.2.1") == 1


def test_no_verdict_counts_nothing_but_waits():
    """success=None (gate refused, backend down, abort): no count, no penalty change,
    but the penalty wait still applies, so a refused or deferred AUTH is not faster."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="1/1h", auth_penalty_max=15),
                      MemoryStore(clock), clock)
    fail(limiter, "192.0.2.1", "alice", b"x")
    refused = result(limiter.auth_gate("192.0.2.1", "alice"))
    assert not refused.verdict.allowed and refused.delay == 2.0
    d = limiter.auth_verdict(refused, None)
    fired = []
    d.addCallback(fired.append)
    clock.advance(1.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [None]
    assert limiter.penalty("192.0.2.1") == 2.0
    other = Limiter(settings(auth_failures_per_ip="1/1h"), MemoryStore(clock), clock)
    for _ in range(3):
        gate = result(other.auth_gate("192.0.2.5", "bob"))
        result(other.auth_verdict(gate, None, "bob", b"pw"))
    assert result(other.auth_gate("192.0.2.5", "bob")).verdict.allowed


def test_attempts_in_flight_wait_for_room_and_only_failures_refuse():
    """Guesses admitted but not yet judged (a slow hash, a client that hung up) hold a
    place: with 2 allowed, a third parallel attempt waits instead of being refused; a
    success frees its place (the third goes on), a failure counts; an attempt that finds
    no room for ``IN_FLIGHT_WAIT`` seconds is refused, and one never judged lapses after
    a minute."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_ip="2/10m"), MemoryStore(clock), clock)
    first, second = (result(limiter.auth_gate("192.0.2.1", f"u{i}")) for i in range(2))
    third = limiter.auth_gate("192.0.2.1", "u2")
    assert first.verdict.allowed and second.verdict.allowed and not third.called
    result(limiter.auth_verdict(first, True, "u0", b"right"))  # a success frees its seat
    clock.advance(IN_FLIGHT_RETRY)
    assert result(third).verdict.allowed
    result(limiter.auth_verdict(second, False, "u1", b"wrong"))  # a failure counts: 1 of 2
    fourth = limiter.auth_gate("192.0.2.1", "u3")  # 1 failure + the third in flight
    clock.advance(IN_FLIGHT_RETRY)
    assert not fourth.called
    clock.advance(IN_FLIGHT_WAIT)
    assert not result(fourth).verdict.allowed  # nobody landed meanwhile: refused
    clock.advance(61)  # the third was never judged: it lapses
    assert result(limiter.auth_gate("192.0.2.1", "u5")).verdict.allowed


def test_an_abandoned_attempt_stops_counting_at_once():
    """An exchange the client aborts (``*`` after SCRAM's first step) gives its place
    back: the attempt waiting for it goes on at its next look."""
    clock = Clock()
    limiter = Limiter(settings(auth_failures_per_user="1/10m"), MemoryStore(clock), clock)
    first = result(limiter.auth_gate("192.0.2.1", "victim"))
    second = limiter.auth_gate("192.0.2.2", "victim")
    assert not second.called  # waits for the first
    limiter.abandoned(first)
    clock.advance(IN_FLIGHT_RETRY)
    assert result(second).verdict.allowed


# ---- the session's synchronous calls over the memory store ----------------------------

def test_admit_now_counts_the_rate_then_takes_a_slot():
    """``admit_now`` is one step for both connection limits, with the Redis script's
    answers: 2 admitted, 1 no free slot (the connection still counted against the rate),
    0 over the rate (nothing counted, no slot)."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(3, 60.0)
    codes = [store.admit_now("connrate:a", rate, "conn:a", 2, holder) for holder in (1, 2, 3)]
    assert codes == [2, 2, 1]
    assert store.held("conn:a") == 2
    assert store.admit_now("connrate:a", rate, "conn:a", 2, 4) == 0
    store.release_now("conn:a", 1)
    store.release_now("conn:a", 1)
    assert store.held("conn:a") == 1
    clock.advance(20)  # one event left the window
    assert store.admit_now("connrate:a", rate, "conn:a", 2, 5) == 2
    assert store.admit_now("connrate:b", None, "conn:b", None, 6) == 2 and store.held("conn:b") == 0


@pytest.mark.parametrize("rate", [Rate(1, 1.0), Rate(3, 60.0), Rate(7, 10.0), Rate(1000, 60.0)])
def test_admit_now_decides_the_rate_as_hit_does(rate: Rate) -> None:
    """``admit_now`` works the GCRA step out inline: over a run of events at uneven times
    it lets through exactly the events ``hit`` would, and leaves the same counter."""
    inline, reference = Clock(), Clock()
    fast, slow = MemoryStore(inline), MemoryStore(reference)
    gaps = [0.0, 0.0, 0.3, 0.001, 2.5, 0.0, 0.7, 9.9, 0.05, 0.0, 0.0, 31.0, 0.2, 0.2] * 6
    decisions = []
    for step, gap in enumerate(gaps):
        inline.advance(gap)
        reference.advance(gap)
        admitted = fast.admit_now("connrate:a", rate, "conn:a", None, step) == 2
        decisions.append(admitted)
        assert admitted is slow.hit_now("connrate:a", rate).allowed, step
        assert fast._tats.get("connrate:a") == slow._tats.get("connrate:a"), step
    assert True in decisions and (rate.count == 1000 or False in decisions)


def test_peek_used_agrees_with_peek():
    """``peek_used`` is ``peek`` in short: ``None`` when one more would not pass, else
    the events in the window with that one."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(3, 60.0)
    for n in range(4):
        peeked = result(store.peek("k", rate))
        assert store.peek_used("k", rate, clock.seconds()) == (peeked.used if peeked.allowed
                                                               else None)
        store.hit("k", rate)
    assert store.peek_used("k", rate, clock.seconds()) is None


def test_the_session_gets_its_answers_without_deferreds():
    """Over the memory store the connection's seat, the AUTH gate and a verdict with no
    penalty are plain values (no Deferred to chain); the seat is given back on release."""
    from saslsmtp.limits.session import ConnectionLimits
    from saslsmtp.limits.verdicts import Verdict
    clock = Clock()
    store = MemoryStore(clock)
    limiter = Limiter(settings(connections_per_ip=1, connection_rate_per_ip="100/1m",
                               auth_failures_per_ip="5/1m", auth_failures_per_user="5/1m"),
                      store, clock)
    limits = ConnectionLimits(limiter)
    verdict = limits.admit("192.0.2.1")
    assert isinstance(verdict, Verdict) and verdict.allowed
    assert not ConnectionLimits(limiter).admit("192.0.2.1").allowed
    attempt = limits.attempt("192.0.2.1", "PLAIN")
    assert attempt.admit("alice", "pw") is None
    assert attempt.judged(True, "alice") is None
    assert limiter._in_flight == {}
    limits.release()
    assert store.held("conn:192.0.2.1") == 0
    assert ConnectionLimits(limiter).admit("192.0.2.1").allowed
