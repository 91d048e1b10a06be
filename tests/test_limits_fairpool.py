"""The fair expensive-work pool: round robin per client key, a per-key worker share,
bounded queues (PoolBusy = 454 at once), and the real thread pool behind it."""

import threading
import time

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.checkers.file import FileChecker
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.limits.fairpool import (CLIENT_KEY, FairScheduler, FairThreadPoolRunner, PoolBusy,
                                      client_key_set, default_workers)
from saslsmtp.passwords import make_hash


class FakeThreads:
    """Records started jobs; the test finishes them by hand."""

    def __init__(self):
        self.started = []  # (label, Deferred)

    def start(self, f, *args, **kwargs):
        d = Deferred()
        self.started.append((args[0] if args else None, d))
        return d

    def finish(self, index=0):
        label, d = self.started.pop(index)
        d.callback(label)
        return label


def labels(threads):
    return [label for label, _ in threads.started]


def test_round_robin_across_addresses():
    """A flood from one address does not delay a second address behind all of it."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=2, share=0.5)
    for i in range(10):
        pool.run_for("attacker", lambda x: x, f"a{i}")
    pool.run_for("victim", lambda x: x, "v0")
    pool.run_for("victim", lambda x: x, "v1")
    # attacker holds at most 1 of 2 workers; the victim gets the other at once
    assert labels(threads) == ["a0", "v0"]
    threads.finish(1)  # v0 done -> v1 (the attacker is at its share)
    assert labels(threads) == ["a0", "v1"]
    threads.finish(0)  # a0 done -> a1
    assert labels(threads) == ["v1", "a1"]


def test_one_address_never_exceeds_its_share():
    """With 4 workers and share 0.5, one key runs on at most 2, even when the rest are idle."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=4, share=0.5)
    for i in range(6):
        pool.run_for("one", lambda x: x, i)
    assert pool.running == 2 and pool.queued == 4
    pool.run_for("two", lambda x: x, "t")
    assert pool.running == 3


def test_results_and_errors_reach_the_caller():
    """The job's result or failure fires the caller's Deferred."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=1)
    got = []
    pool.run_for("k", lambda x: x, "first").addCallback(got.append)
    second = pool.run_for("k", lambda x: x, "second")
    errors = []
    second.addErrback(lambda f: errors.append(f.value))
    threads.finish()
    assert got == ["first"]
    _, d = threads.started.pop()
    d.errback(ValueError("boom"))
    assert isinstance(errors[0], ValueError)
    assert pool.running == 0 and pool.queued == 0


def test_bounded_queues_refuse_with_pool_busy():
    """Beyond the per-key bound, and beyond the total bound, run fails at once with
    PoolBusy (a TemporaryFailure: 454 4.7.0)."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=1, max_queued=4, max_queued_per_key=2)
    pool.run_for("a", lambda: 1)  # running
    pool.run_for("a", lambda: 1)
    pool.run_for("a", lambda: 1)  # two queued for a
    refused = []
    pool.run_for("a", lambda: 1).addErrback(lambda f: refused.append(f.value))
    assert isinstance(refused[0], PoolBusy) and isinstance(refused[0], TemporaryFailure)
    pool.run_for("b", lambda: 1)
    pool.run_for("c", lambda: 1)  # total queued: 4
    pool.run_for("d", lambda: 1).addErrback(lambda f: refused.append(f.value))
    assert len(refused) == 2 and pool.busy_refusals == 2
    assert pool.queued == 4


def test_cancelling_a_waiting_job_removes_it():
    """A client that disconnects while queued frees its queue place; the job never runs."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=1)
    pool.run_for("a", lambda x: x, "a0")
    waiting = pool.run_for("a", lambda x: x, "a1")
    waiting.addErrback(lambda f: f.trap(CancelledError))
    waiting.cancel()
    assert pool.queued == 0
    threads.finish()
    assert threads.started == [] and pool.running == 0


def test_run_reads_the_context_key():
    """run() (the BlockingRunner API) uses CLIENT_KEY, so existing callers get fairness
    when the protocol sets the key around portal.login."""
    threads = FakeThreads()
    pool = FairScheduler(threads.start, workers=2, share=0.5)
    with client_key_set("192.0.2.1"):
        for i in range(3):
            pool.run(lambda x: x, f"a{i}")
    assert CLIENT_KEY.get() == ""
    pool.run(lambda x: x, "nokey")
    assert labels(threads) == ["a0", "nokey"]


def test_client_key_set_restores_the_outer_key_even_when_the_block_raises():
    """Nested blocks see their own key; leaving one, normally or by an exception, puts
    back the key of the block around it."""
    with client_key_set("outer"):
        with pytest.raises(ZeroDivisionError):
            with client_key_set("inner"):
                assert CLIENT_KEY.get() == "inner"
                1 / 0
        assert CLIENT_KEY.get() == "outer"
        with client_key_set("second"):
            assert CLIENT_KEY.get() == "second"
        assert CLIENT_KEY.get() == "outer"
    assert CLIENT_KEY.get() == ""


def test_default_workers_leave_a_core():
    """One thread per CPU but one, at least one."""
    import os
    assert default_workers() == max(1, (os.cpu_count() or 2) - 1)


def test_every_hash_thread_starts_with_the_pool():
    """All its threads run once the pool starts, so ``run`` never starts one on the
    reactor thread (``Thread.start`` waits there for the GIL)."""
    from twisted.internet import reactor
    runner = FairThreadPoolRunner(reactor, "saslsmtp-hash-test", 3)
    runner.start()
    try:
        assert len(runner.pool.threads) == 3
    finally:
        runner.stop()


@pytest_twisted.inlineCallbacks
def test_real_threads_and_a_checker_through_inline_callbacks(tmp_path):
    """With real threads: work runs off the reactor thread, concurrency stays within the
    per-key share, and the key set around a BackendChain login reaches FileChecker's
    hashing after the chain's first yield."""
    from twisted.internet import reactor
    runner = FairThreadPoolRunner(reactor, "test-fair", 2, share=0.5)
    try:
        active, peak, lock = [0], [0], threading.Lock()

        def work(x):
            assert threading.current_thread() is not threading.main_thread()
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            return x * 2

        from twisted.internet.defer import gatherResults
        results = yield gatherResults([runner.run_for("one", work, i) for i in range(6)])
        assert results == [0, 2, 4, 6, 8, 10] and peak[0] == 1

        users = tmp_path / "users"
        users.write_text("alice:" + make_hash("SHA512-CRYPT", "right", rounds=1000) + "\n")
        seen = []
        original = runner.run_for

        def spy(key, f, *a, **k):
            seen.append(key)
            return original(key, f, *a, **k)
        runner.run_for = spy
        first = FileChecker(str(users), runner)
        chain = BackendChain([("first", first), ("second", first)])
        with client_key_set("198.51.100.7"):
            d = chain.requestAvatarId(PasswordCredentials(b"alice", b"wrong"))
        with pytest.raises(UnauthorizedLogin):
            yield d
        assert seen == ["198.51.100.7", "198.51.100.7"]
    finally:
        runner.stop()



@pytest_twisted.inlineCallbacks
def test_a_flood_of_real_hashes_does_not_starve_another_client(tmp_path):
    """Through FileChecker with real SHA512-CRYPT: 12 logins from one address are queued,
    then one from another address; the latter finishes before the flood's third job
    (with a plain FIFO pool it would finish last).  Order-based, so load cannot flake it."""
    from twisted.internet import reactor
    users = tmp_path / "users"
    users.write_text("alice:" + make_hash("SHA512-CRYPT", "right", rounds=200000) + "\n")
    runner = FairThreadPoolRunner(reactor, "test-fair-hash", 2, share=0.5)
    checker = FileChecker(str(users), runner)
    done = []

    def login(key, label):
        with client_key_set(key):
            d = checker.requestAvatarId(PasswordCredentials(b"alice", b"wrong"))
        return d.addBoth(lambda _: done.append(label))
    try:
        flood = [login("203.0.113.66", f"flood{i}") for i in range(12)]
        victim = login("192.0.2.10", "victim")
        from twisted.internet.defer import gatherResults
        yield gatherResults(flood + [victim])
        assert done.index("victim") < done.index("flood2"), done
    finally:
        runner.stop()
