"""Guards the type annotations made explicit: a stored value of the wrong type is a
server problem (454), never a crash."""

from __future__ import annotations

import pytest

from saslsmtp.sasl.cram_md5 import KINDS, CramMD5
from saslsmtp.sasl.outcome import Defer, Lookup, Secret, Session

RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"  # RFC 2195's example


@pytest.mark.parametrize("value", [1234, None, ("a", "b")])
def test_cram_md5_plaintext_secret_of_the_wrong_type_defers(value: object) -> None:
    """A "plaintext" secret that is neither str nor bytes cannot be hashed: Defer (454),
    never a crash or a 535 that blames the client."""
    mech = CramMD5(Session(hostname="postoffice.reston.mci.net"), random=lambda: 1896,
                   clock=lambda: 697170952.9)
    mech.start(None)
    assert mech.receive(RESPONSE) == Lookup("tim", KINDS)
    assert mech.resume(Secret("plaintext", value)) == Defer()
