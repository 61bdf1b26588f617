"""Bounce addresses: the envelope sender of every delivery the relay makes.

A bounce address is `bounce+<queue id>.<index>.<expiry day>.<mac>@<domain>`,
all lower case because remote MTAs may fold the case of local parts. The mac
is a truncated HMAC-SHA256 over the other fields with `[relay] bounce_secret`,
so only relaymail can mint one; `verify_bounce_address` returns the delivery it
names, or None when the token is malformed, forged or expired.

Limits: the report arriving at a bounce address is archived against its
delivery but not yet parsed into a delivery status.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

BOUNCE_PREFIX = "bounce+"
TOKEN_LIFETIME_DAYS = 14
MAC_BYTES = 10


@dataclass(frozen=True)
class BounceToken:
    queue_id: str
    index: int
    expires_day: int


def make_bounce_address(secret: str, domain: str, queue_id: str, index: int, now_s: float | None = None) -> str:
    """Return the bounce address for recipient `index` of message `queue_id`."""
    today = int((now_s if now_s is not None else time.time()) // 86400)
    payload = f"{queue_id.lower()}.{index}.{today + TOKEN_LIFETIME_DAYS}"
    return f"{BOUNCE_PREFIX}{payload}.{_mac(secret, payload)}@{domain}"


def is_bounce_local_part(local_part: str) -> bool:
    return local_part.lower().startswith(BOUNCE_PREFIX)


def verify_bounce_address(secret: str, local_part: str, now_s: float | None = None) -> BounceToken | None:
    """Return the token in a bounce address local part, or None if invalid or expired."""
    local_part = local_part.lower()
    if not local_part.startswith(BOUNCE_PREFIX):
        return None

    fields = local_part[len(BOUNCE_PREFIX):].split(".")
    if len(fields) != 4:
        return None
    queue_id, index, expires, mac = fields
    if not (queue_id.isalnum() and index.isdigit() and expires.isdigit()):
        return None

    payload = f"{queue_id}.{index}.{expires}"
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None

    today = int((now_s if now_s is not None else time.time()) // 86400)
    if int(expires) < today:
        return None
    return BounceToken(queue_id=queue_id.upper(), index=int(index), expires_day=int(expires))


def _mac(secret: str, payload: str) -> str:
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:MAC_BYTES]
    return base64.b32encode(digest).decode().lower()
