"""The shipped onward-delivery and sender-policy examples of etc/saslsmtp.toml parse,
each in place of the [delivery] table (so etc/ cannot go stale), and etc/senders is a
usable sender map."""

from __future__ import annotations

import re
from pathlib import Path

from saslsmtp.config import parse_config
from saslsmtp.mechanisms import BUILTIN_NAMES
from saslsmtp.relay.options import UpstreamDelivery
from saslsmtp.senders import check_sender_map

ETC = Path(__file__).resolve().parent.parent / "etc"


def example_blocks() -> tuple[str, dict[str, list[str]]]:
    """The config up to the examples, and each commented example table, uncommented."""
    text = (ETC / "saslsmtp.toml").read_text()
    head, marker, examples = text.partition("# ---- Onward delivery")
    assert marker
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in examples.splitlines():
        table = re.match(r"^# (\[\w+\])$", line)
        if table:
            current = [table.group(1)]
            blocks[f"{table.group(1)}{len(blocks)}"] = current
            continue
        key = re.match(r"^# ([a-z_]+ = .*)$", line)
        if key and current is not None:
            current.append(key.group(1))
        elif not line.startswith("#"):
            current = None
    return head, blocks


def test_delivery_and_submission_examples_parse() -> None:
    """Each [delivery] example replaces the Maildir table; [submission] is added."""
    head, blocks = example_blocks()
    deliveries = [b for name, b in blocks.items() if name.startswith("[delivery]")]
    [submission] = [b for name, b in blocks.items() if name.startswith("[submission]")]
    assert len(deliveries) == 2
    base = re.sub(r'\[delivery\]\ntype = "maildir".*\npath = "[^"]*"\n', "", head)
    seen = []
    for block in deliveries:
        body = base + "\n".join(block) + "\n\n" + "\n".join(submission) + "\n"
        config = parse_config(body, str(ETC / "saslsmtp.toml"), known_mechanisms=BUILTIN_NAMES)
        assert isinstance(config.delivery, UpstreamDelivery)
        seen.append((config.delivery.type, config.delivery.endpoint))
        if config.delivery.type == "smtp":  # every key shown, at its default
            assert (config.delivery.pool_size, config.delivery.reuse_limit) == (4, 100)
            assert "reuse_limit" in "\n".join(block)
        assert config.submission.sender_policy == "map"
        assert config.submission.sender_map == str((ETC / "senders").resolve())
    assert seen == [("smtp", "tcp:127.0.0.1:10025"), ("lmtp", "unix:/run/dovecot/lmtp")]


def test_example_sender_map_has_no_problems() -> None:
    """etc/senders parses without a skipped line."""
    assert check_sender_map(str(ETC / "senders")) == []


def test_a_retired_wiring_closes_its_upstream_client(tmp_path: Path) -> None:
    """After a reload (or at shutdown) the old wiring's upstream client says QUIT to its
    idle connections: ``stop_wiring`` closes it."""
    from twisted.internet import task

    from saslsmtp.config import load_config
    from saslsmtp.serving import stop_wiring
    from saslsmtp.service import wire
    users = tmp_path / "users"
    users.write_text("a:{PLAIN}b\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nlisten = ["tcp:0"]\n[auth]\nbackends = ["u"]\n'
                    f'[backends.u]\ntype = "file"\npath = "{users}"\n'
                    '[delivery]\ntype = "smtp"\nendpoint = "tcp:127.0.0.1:1"\n')
    wiring = wire(load_config(str(path), known_mechanisms=BUILTIN_NAMES), task.Clock())
    closed = []
    wiring.upstream.close = lambda: closed.append(True)
    stop_wiring(wiring)
    assert closed == [True]
