"""One SMTP reply for an LMTP end of data that answers once per recipient (RFC 2033 4.2).

Sans-I/O: recipients and their replies in, one ``LmtpVerdict`` out.  Our client gets one
reply for the whole message, and saslsmtp keeps no queue that could retry or bounce one
recipient later (what Postfix's own LMTP client does), so:

* every recipient got it -> the first ``250``;
* nobody got it -> the first failure, a temporary one preferred: a retry of the whole
  message delivers nothing twice;
* **some got it, some not** -> a **permanent** failure naming who got it and who did not.
  A ``250`` would lose the others silently; a ``4xx`` would make the client retry the
  whole message, and deliver it again to those who have it on every retry for as long as
  the failure lasts (a full mailbox: days).  A ``5xx`` ends the retries: the client's
  bounce (or its MUA's error) carries the text, and the sender resends to those named.
  Its code is the first permanent failure's, or ``554`` when every failure was temporary;
  its enhanced code is that failure's, in class 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from saslsmtp.replies import SMTPReply, clean_text

MAX_LISTED = 160  # characters of addresses in one line of the partial-delivery reply


@dataclass(frozen=True)
class LmtpVerdict:
    """The reply for our client and, for the log, who got the message and who did not."""

    reply: SMTPReply
    delivered: tuple[str, ...]
    failed: tuple[str, ...]

    @property
    def partial(self) -> bool:
        return bool(self.delivered and self.failed)


def combine(recipients: Sequence[str], replies: Sequence[SMTPReply]) -> LmtpVerdict:
    """``replies[i]`` is ``recipients[i]``'s (a recipient the upstream never answered gets
    the connection's failure, e.g. ``451 4.4.2``: it may or may not have the message)."""
    pairs = list(zip(recipients, replies))
    delivered = tuple(a for a, r in pairs if r.code < 400)
    failures = [(a, r) for a, r in pairs if r.code >= 400]
    failed = tuple(a for a, _ in failures)
    if not failures:
        return LmtpVerdict(replies[0], delivered, failed)
    permanent = [r for _, r in failures if r.code >= 500]
    temporary = [r for _, r in failures if r.code < 500]
    if not delivered:
        return LmtpVerdict((temporary or permanent)[0], delivered, failed)
    first = (permanent or temporary)[0]
    code = first.code if first.code >= 500 else 554
    enhanced = "5" + first.enhanced[1:] if first.enhanced else "5.0.0"
    text = "\n".join((
        first.text.split("\n")[0] or "Upstream reply",
        f"Not delivered to: {_listed(failed)}",
        f"Delivered to {len(delivered)} of {len(pairs)} recipients (do not resend to"
        f" them): {_listed(delivered)}"))
    return LmtpVerdict(SMTPReply(code, enhanced, text, "RFC 2033 4.2"), delivered, failed)


def _listed(addresses: Sequence[str]) -> str:
    """``a@x, b@x and 3 more``: bounded, printable."""
    shown: list[str] = []
    length = 0
    for address in addresses:
        address = clean_text(address)
        if shown and length + len(address) > MAX_LISTED:
            return ", ".join(shown) + f" and {len(addresses) - len(shown)} more"
        shown.append(address[:MAX_LISTED])
        length += len(address) + 2
    return ", ".join(shown)
