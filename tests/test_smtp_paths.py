"""RelaySMTP's fast path for MAIL and RCPT paths gives what aiosmtpd's own parser gives.

Each case runs through both parsers: plain <dot-atom@domain> paths take the
fast path, and every other form must fall back and give the same result.
"""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from relaymail.server import RelaySMTP

CASES = [
    "<buyer@example.net>",
    "<buyer@example.net> SIZE=100 BODY=8BITMIME",
    "<buyer@example.net>\tSMTPUTF8",
    "<buyer@example.net>  ",
    "<buyer@example.net> SIZE=1  ",
    " <First.Last+tag@Mail.Example.MX> RET=HDRS",
    "<buyer@example.net> (comment) SIZE=1",
    "<buyer@example.net>x",
    "<a..b@example.net>",
    "<.a@example.net>",
    "<a@example.net.>",
    "<a@example..net>",
    "<a@-example.net>",
    "<>",
    '<"quoted local"@example.net>',
    "buyer@example.net",
    "<@route.example:buyer@example.net>",
    "<buyer@[192.0.2.1]>",
    "<comprador@ejemplo.mx>",
    "<ñandú@ejemplo.mx>",
    "<buyer@example.net",
    "<" + "x" * 64 + "@example.net>",
    "<" + "x" * 65 + "@example.net>",
]


class _Handler:
    pass


@pytest.fixture(scope="module")
def parsers():
    reference = SMTP(_Handler())
    fast = RelaySMTP.__new__(RelaySMTP)
    fast.__dict__.update(reference.__dict__)
    return reference, fast


@pytest.mark.parametrize("path", CASES)
def test_fast_path_matches_aiosmtpd(parsers, path):
    reference, fast = parsers

    assert fast._getaddr(path) == SMTP._getaddr(reference, path)


def test_fast_path_skips_general_parser(parsers, monkeypatch):
    _reference, fast = parsers

    def fail(self, arg):
        raise AssertionError(f"general parser called for {arg!r}")

    monkeypatch.setattr(SMTP, "_getaddr", fail)

    assert fast._getaddr("<buyer@example.net> SIZE=10") == ("buyer@example.net", "SIZE=10")
