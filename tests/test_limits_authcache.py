"""The auth cache and CachingChecker, with an injected Clock and a counting fake backend."""

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.checkers.file import FileChecker
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure, UnknownUser
from saslsmtp.limits.authcache import AuthCache, CachingChecker
from saslsmtp.limits.settings import AuthCacheSettings
from saslsmtp.threads import SynchronousRunner


class Backend:
    """users: name -> password; ``down`` makes every call a TemporaryFailure."""

    credentialInterfaces = ()

    def __init__(self, users):
        self.users = dict(users)
        self.calls = 0
        self.down = False

    def requestAvatarId(self, c):
        self.calls += 1
        if self.down:
            return fail(TemporaryFailure("down"))
        name = c.username.decode()
        if name not in self.users:
            return fail(UnknownUser("unknown"))
        if self.users[name] != c.password.decode():
            return fail(UnauthorizedLogin("wrong"))
        return succeed(c.username)


def outcome(d):
    out = []
    d.addBoth(out.append)
    assert out
    r = out[0]
    if hasattr(r, "trap"):
        return type(r.value)
    return r


def login(checker, user, password):
    return outcome(checker.requestAvatarId(PasswordCredentials(user.encode(), password.encode())))


def make(ttl=300, negative_ttl=60, size=1000, stale_if_error=0, users=None):
    clock = Clock()
    backend = Backend(users or {"alice": "right", "bob": "pw"})
    cache = AuthCache(AuthCacheSettings(ttl, negative_ttl, size, stale_if_error), clock)
    return clock, backend, cache, CachingChecker(backend, cache, "users")


def test_success_is_reused_for_ttl():
    """The same password within ttl does not reach the backend; after ttl it does."""
    clock, backend, cache, checker = make()
    assert login(checker, "alice", "right") == b"alice"
    clock.advance(299)
    assert login(checker, "alice", "right") == b"alice"
    assert backend.calls == 1 and cache.hits == 1
    clock.advance(1)
    assert login(checker, "alice", "right") == b"alice"
    assert backend.calls == 2


def test_a_different_password_always_goes_to_the_backend():
    """A changed (or wrong) password is never answered from the cache..."""
    clock, backend, cache, checker = make()
    login(checker, "alice", "right")
    backend.users["alice"] = "new"
    assert login(checker, "alice", "new") == b"alice"
    assert backend.calls == 2


def test_a_rejection_drops_the_cached_user():
    """...and a rejection drops the entry: the old password goes to the backend again."""
    clock, backend, cache, checker = make()
    login(checker, "alice", "right")
    assert login(checker, "alice", "wrong") is UnauthorizedLogin
    assert len(cache) == 0
    backend.users["alice"] = "changed"
    assert login(checker, "alice", "right") is UnauthorizedLogin
    assert backend.calls == 3


def test_wrong_passwords_are_never_cached():
    """Each wrong password is checked by the backend."""
    clock, backend, cache, checker = make()
    for _ in range(3):
        assert login(checker, "alice", "nope") is UnauthorizedLogin
    assert backend.calls == 3 and len(cache) == 0


def test_negative_entries_for_unknown_users_only():
    """An unknown user is remembered for negative_ttl (then asked again); off with 0."""
    clock, backend, cache, checker = make(negative_ttl=60)
    assert login(checker, "mallory", "x") is UnknownUser
    assert login(checker, "mallory", "y") is UnknownUser
    assert backend.calls == 1
    clock.advance(60)
    backend.users["mallory"] = "y"
    assert login(checker, "mallory", "y") == b"mallory"
    clock, backend, cache, checker = make(negative_ttl=0)
    login(checker, "mallory", "x")
    login(checker, "mallory", "x")
    assert backend.calls == 2


def test_stale_if_error():
    """Backends down: a success stale for at most stale_if_error seconds still accepts
    (with this very password only); older, or with stale_if_error 0, the failure stands."""
    clock, backend, cache, checker = make(ttl=300, stale_if_error=600)
    login(checker, "alice", "right")
    backend.down = True
    clock.advance(800)
    assert login(checker, "alice", "right") == b"alice"
    assert cache.stale_hits == 1
    assert login(checker, "alice", "wrong") is TemporaryFailure
    clock.advance(100)  # 900 = ttl + stale_if_error
    assert login(checker, "alice", "right") is TemporaryFailure
    clock, backend, cache, checker = make(ttl=300, stale_if_error=0)
    login(checker, "alice", "right")
    backend.down = True
    clock.advance(301)
    assert login(checker, "alice", "right") is TemporaryFailure


def test_fresh_entries_answer_even_while_the_backend_is_down():
    """Within ttl the backend is not asked at all."""
    clock, backend, cache, checker = make()
    login(checker, "alice", "right")
    backend.down = True
    assert login(checker, "alice", "right") == b"alice"


def test_bounded_lru():
    """At most ``size`` entries; the least recently used goes first."""
    clock, backend, cache, checker = make(size=2, users={"a": "1", "b": "2", "c": "3"})
    login(checker, "a", "1")
    login(checker, "b", "2")
    login(checker, "a", "1")  # a is now the most recent
    login(checker, "c", "3")
    assert len(cache) == 2
    calls = backend.calls
    login(checker, "a", "1")
    assert backend.calls == calls
    login(checker, "b", "2")
    assert backend.calls == calls + 1


def test_flush():
    """flush(user) drops one user from every chain; flush() drops all."""
    clock, backend, cache, checker = make()
    other = CachingChecker(backend, cache, "other-chain")
    login(checker, "alice", "right")
    login(other, "alice", "right")
    login(checker, "bob", "pw")
    assert cache.flush("alice") == 2 and len(cache) == 1
    assert cache.flush() == 1 and len(cache) == 0


def test_chains_do_not_share_entries():
    """The chain id is part of the key."""
    clock, backend, cache, checker = make()
    login(checker, "alice", "right")
    other = CachingChecker(backend, cache, "other-chain")
    login(other, "alice", "right")
    assert backend.calls == 2


def test_no_password_in_the_cache():
    """Entries hold an HMAC under a per-process random key, not the password."""
    clock, backend, cache, checker = make(users={"alice": "s3cret-cache-pw"})
    login(checker, "alice", "s3cret-cache-pw")
    entry = next(iter(cache._entries.values()))
    assert b"s3cret-cache-pw" not in entry.fingerprint and len(entry.fingerprint) == 32
    other = AuthCache(cache.settings, clock)
    assert other.fingerprint("x") != cache.fingerprint("x")


def test_chain_reports_unknown_only_when_every_backend_does():
    """BackendChain raises UnknownUser only if every backend said so."""
    a, b = Backend({"alice": "1"}), Backend({"bob": "2"})
    chain = BackendChain([("a", a), ("b", b)])
    assert login(chain, "carol", "x") is UnknownUser
    assert login(chain, "alice", "x") is UnauthorizedLogin
    b.down = True
    assert login(chain, "carol", "x") is TemporaryFailure


def test_file_checker_tells_unknown_users_apart(tmp_path):
    """The passwd-file backend raises UnknownUser for a name it does not have."""
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}right\n")
    checker = FileChecker(str(users), SynchronousRunner())
    assert login(checker, "nobody", "x") is UnknownUser
    assert login(checker, "alice", "x") is UnauthorizedLogin
    assert not issubclass(UnauthorizedLogin, UnknownUser)
    assert login(checker, "alice", "right") == b"alice"


@pytest.mark.parametrize("ttl", [0, 300])
def test_enabled(ttl):
    """The cache is on only with ttl > 0."""
    assert AuthCacheSettings(ttl=ttl).enabled is (ttl > 0)
