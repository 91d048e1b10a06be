"""Sender policy: which MAIL FROM a login may use, the map file, ``[submission]``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from saslsmtp.senders import (ALLOWED, SenderMap, SenderPolicy, SubmissionOptions,
                              check_sender_map, parse_sender_map, parse_submission)

MAP = b"""\
# who may send as what
alice: alice@example.test, Sales@Example.TEST
bob: @bob.example.test, bob@example.test
"""


def write_map(tmp_path: Path, data: bytes = MAP) -> SenderPolicy:
    path = tmp_path / "senders"
    path.write_bytes(data)
    return SenderPolicy("map", sender_map=SenderMap(str(path)))


def test_map_grants_addresses_and_domains(tmp_path):
    """Listed addresses and @domain entries are allowed; the domain compares
    case-insensitively, the local part exactly."""
    policy = write_map(tmp_path)
    assert policy.check("alice", "alice@EXAMPLE.test") == ALLOWED
    assert policy.check("alice", "Sales@example.test") == ALLOWED
    assert policy.check("bob", "anything@Bob.Example.Test") == ALLOWED
    assert not policy.check("alice", "Alice@example.test").allowed
    assert not policy.check("bob", "x@sub.bob.example.test").allowed


def test_refusal_reply_exact_bytes(tmp_path):
    """The refusal names the address and the login."""
    decision = write_map(tmp_path).check("alice", "bob@example.test")
    assert not decision.allowed and decision.reply is not None
    assert decision.reply.to_bytes() == (b"553 5.7.1 <bob@example.test>: Sender address rejected:"
                                         b" not owned by user alice\r\n")
    unknown = write_map(tmp_path).check("mallory", "alice@example.test")
    assert unknown.reply is not None and unknown.reply.code == 553


def test_map_is_reread_when_it_changes(tmp_path):
    """A changed file (new size or mtime) is read again at the next check."""
    policy = write_map(tmp_path)
    assert not policy.check("carol", "carol@example.test").allowed
    path = tmp_path / "senders"
    path.write_bytes(MAP + b"carol: carol@example.test\n")
    os.utime(path, ns=(1, 2_000_000_000_000_000_000))
    assert policy.check("carol", "carol@example.test") == ALLOWED


def test_unreadable_map_is_a_temporary_refusal(tmp_path):
    """A deleted map grants nothing: 451 4.3.0 (not a permanent 553)."""
    policy = write_map(tmp_path)
    assert policy.check("alice", "alice@example.test") == ALLOWED
    (tmp_path / "senders").unlink()
    decision = policy.check("alice", "alice@example.test")
    assert decision.reply is not None and decision.reply.to_bytes() == \
        b"451 4.3.0 Local error in processing; try again later\r\n"
    logged: list[str] = []  # and the operator learns why
    path = tmp_path / "senders"
    SenderPolicy("map", sender_map=SenderMap(str(path), log=logged.append)).check("a", "a@x")
    assert logged == [f"{path}: cannot read the sender map: No such file or directory;"
                      " MAIL answered 451"]


def test_login_and_any_policies_and_null_sender():
    """``login``: only the login itself (domain case-insensitive).  ``any``: everything.
    ``<>`` follows ``allow_null_sender`` whatever the policy."""
    login = SenderPolicy("login")
    assert login.check("alice@example.test", "alice@Example.Test") == ALLOWED
    assert not login.check("alice@example.test", "bob@example.test").allowed
    assert not login.check("alice", "alice@example.test").allowed
    assert login.check("alice", "") == ALLOWED
    strict = SenderPolicy("any", allow_null_sender=False)
    assert strict.check("alice", "x@y.test") == ALLOWED
    refused = strict.check("alice", "")
    assert refused.reply is not None and refused.reply.to_bytes() == \
        b"553 5.7.1 <>: Sender address rejected: not owned by user alice\r\n"


def test_reply_cannot_carry_injected_lines():
    """A login or address with CR/LF/space is shown with ``?`` instead."""
    decision = SenderPolicy("login").check("a\r\n250 ok", "x\r\ny@z.test")
    assert decision.reply is not None
    assert decision.reply.to_bytes() == (b"553 5.7.1 <x??y@z.test>: Sender address rejected:"
                                         b" not owned by user a??250?ok\r\n")


def test_map_problems_have_line_numbers(tmp_path):
    """``--check`` lists each unusable line by number; good lines still count."""
    data = (b"# comment\n\nalice: alice@example.test\nno colon here\n: x@y.test\n"
            b"bob:\ncarol: not-an-address\nalice: again@example.test\n\xff: x@y.test\n")
    parsed = parse_sender_map(data)
    assert list(parsed.grants) == ["alice"]
    assert parsed.problems == (
        (4, "no ':' (want user: addr1, addr2, @domain)"),
        (5, "empty user name"),
        (6, "no address for 'bob'"),
        (7, "not an address or @domain: 'not-an-address'"),
        (8, "duplicate user 'alice' (first on line 3)"),
        (9, "not valid UTF-8"),
    )
    path = tmp_path / "m"
    path.write_bytes(data)
    assert check_sender_map(str(path))[0] == (4, "no ':' (want user: addr1, addr2, @domain)")
    assert check_sender_map(str(tmp_path / "missing")) == [(None, "cannot read: No such file or directory")]


def test_parse_submission(tmp_path):
    """``[submission]``: defaults, relative map paths, and every problem reported."""
    problems: list[tuple[str, str]] = []
    report = lambda key, message: problems.append((key, message))  # noqa: E731
    assert parse_submission({}, report) == SubmissionOptions()
    (tmp_path / "senders").write_bytes(MAP)
    options = parse_submission({"sender_policy": "map", "sender_map": "senders",
                                "allow_null_sender": False}, report, tmp_path)
    assert options == SubmissionOptions("map", str(tmp_path / "senders"), False)
    assert problems == []
    assert parse_submission({"sender_policy": "owner", "allow_null_sender": "yes",
                             "extra": 1}, report) is None
    assert parse_submission({"sender_policy": "map"}, report) is None
    assert parse_submission({"sender_policy": "map", "sender_map": "nope"}, report,
                            tmp_path) is None
    assert problems == [
        ("submission.allow_null_sender", "must be a boolean"),
        ("submission.extra", "unknown key (known: allow_null_sender, sender_map, sender_policy)"),
        ("submission.sender_policy", 'must be "any", "login" or "map"'),
        ("submission.sender_map", 'is required with sender_policy = "map"'),
        ("submission.sender_map", f"no such file: {tmp_path / 'nope'}"),
    ]


def test_policy_from_options(tmp_path):
    """``from_options`` builds the map-backed policy and logs skipped lines by number."""
    (tmp_path / "senders").write_bytes(MAP + b"broken line\n")
    logged: list[str] = []
    policy = SenderPolicy.from_options(
        SubmissionOptions("map", str(tmp_path / "senders")), log=logged.append)
    assert policy.check("alice", "alice@example.test") == ALLOWED
    assert logged == [f"{tmp_path / 'senders'}:4: no ':' (want user: addr1, addr2, @domain)"
                      " (line skipped)"]
    with pytest.raises(ValueError):
        SenderPolicy("map")


def test_twistd_check_reports_sender_map_lines(tmp_path):
    """``twistd saslsmtp --check`` reads the sender map and names file and line of each
    unusable line; exit 1, no traceback."""
    import subprocess

    from tests.support import ROOT, twistd_command

    (tmp_path / "users").write_text("a:{PLAIN}b\n")
    (tmp_path / "senders").write_text("# senders\nalice: alice@example.test\nbob bob@x.test\n"
                                      "carol: carol\n")
    config = tmp_path / "c.toml"
    config.write_text('[auth]\nrequire_tls = false\nbackends = ["u"]\n[backends.u]\ntype = "file"\npath = "users"\n'
                      '[submission]\nsender_policy = "map"\nsender_map = "senders"\n')
    out = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    senders = tmp_path / "senders"
    assert out.stderr.splitlines() == [
        "saslsmtp: configuration is not valid:",
        f"{senders}:3: submission.sender_map: no ':' (want user: addr1, addr2, @domain)",
        f"{senders}:4: submission.sender_map: not an address or @domain: 'carol'",
    ] and "Traceback" not in out.stdout, out.stderr
