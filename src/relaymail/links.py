"""One-click links for sellers: signed, expiring URLs that act on one buyer message.

A seller who never logs in still needs two actions on a buyer's message: mark it
"no response needed" (it leaves the response-time figures) and report it. Each
buyer message delivered to a seller carries one link per action, to the relay's
HTTP server (`[http] public_url`):

    {public_url}/links/{action}/{QUEUEID}.{expires}.{signature}

`expires` is a Unix time in seconds, `[http] link_ttl_s` after the link was
made. `signature` is HMAC-SHA256 over the action, the queue id and `expires`,
cut to 128 bits and written in unpadded base64url. The HMAC key is derived from
`[http] link_secret` for this use alone, so the secret can never sign anything
else. A link therefore works for one message and one action only, and anyone
holding it can use it until it expires: it is a bearer credential, like the
links of password-reset mails. Opening it (GET) changes nothing, because link
scanners of mail providers fetch every URL; the page's form (POST) acts.

    seller_links(config, queue_id, locale)  the two (label, url) pairs for a message
    link_url(config, action, queue_id)      one URL
    verify_token(secret, action, token)     the queue id, or LinkError

Limits: a link cannot be revoked before it expires, except by changing
`link_secret`, which revokes every link at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from .config import Config
from .errors import RelaymailError
from .i18n import N_, translator

NO_RESPONSE_NEEDED = "no-response-needed"
REPORT = "report"
ACTIONS = (NO_RESPONSE_NEEDED, REPORT)
LINK_PATH_PREFIX = "/links"

LABELS = {
    NO_RESPONSE_NEEDED: N_("No response needed"),
    REPORT: N_("Report this message"),
}

SIGNATURE_BYTES = 16
_KEY_CONTEXT = b"relaymail one-click link v1"
_TOKEN_RE = re.compile(r"([0-9A-F]{12})\.([0-9]{1,12})\.([A-Za-z0-9_-]{22})")


class LinkError(RelaymailError):
    """A link token that cannot be used.

    `expired` distinguishes an expired link from an invalid one. An expired link's
    signature was valid, so its `queue_id` is set and can be trusted.
    """

    def __init__(self, message: str, expired: bool = False, queue_id: str | None = None):
        super().__init__(message)
        self.expired = expired
        self.queue_id = queue_id


@dataclass(frozen=True)
class LinkClaim:
    """The grant of a valid token: one action on one message until `expires_at` (Unix seconds)."""

    action: str
    queue_id: str
    expires_at: int


def _signature(secret: str, action: str, queue_id: str, expires_at: int) -> str:
    key = hmac.new(secret.encode(), _KEY_CONTEXT, hashlib.sha256).digest()
    signed = f"{action}\n{queue_id}\n{expires_at}".encode()
    digest = hmac.new(key, signed, hashlib.sha256).digest()[:SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def make_token(secret: str, action: str, queue_id: str, expires_at: int) -> str:
    """Return the token for `action` on message `queue_id`, valid until `expires_at`.

    Raises ValueError for an unknown action, a queue id that is not 12
    hexadecimal digits, or an empty secret.
    """
    if action not in ACTIONS:
        raise ValueError(f"unknown link action {action!r}: expected one of {', '.join(ACTIONS)}")
    if not secret:
        raise ValueError("link secret is empty: set [http] link_secret")
    queue_id = queue_id.upper()
    if not re.fullmatch(r"[0-9A-F]{12}", queue_id):
        raise ValueError(f"queue id {queue_id!r} is not 12 hexadecimal digits")
    return f"{queue_id}.{expires_at}.{_signature(secret, action, queue_id, expires_at)}"


def verify_token(secret: str, action: str, token: str, now: float | None = None) -> LinkClaim:
    """Return what `token` grants for `action`, or raise LinkError.

    The signature is checked before the expiry time, so an altered token is
    reported as invalid even when its (altered) time has passed.
    """
    match = _TOKEN_RE.fullmatch(token)
    if not secret or action not in ACTIONS or match is None:
        raise LinkError("the link is not valid")

    queue_id, expires_text, signature = match.groups()
    expires_at = int(expires_text)
    expected = _signature(secret, action, queue_id, expires_at)
    if not hmac.compare_digest(signature, expected):
        raise LinkError("the link is not valid")

    current = time.time() if now is None else now
    if current >= expires_at:
        raise LinkError("the link has expired", expired=True, queue_id=queue_id)
    return LinkClaim(action=action, queue_id=queue_id, expires_at=expires_at)


def links_enabled(config: Config) -> bool:
    """Return True when messages get one-click links: the HTTP server is on and links are signed."""
    return config.http.enabled and bool(config.http.link_secret)


def link_url(config: Config, action: str, queue_id: str, now: float | None = None) -> str:
    """Return the signed URL for `action` on message `queue_id`, expiring after `[http] link_ttl_s`."""
    current = time.time() if now is None else now
    expires_at = int(current) + config.http.link_ttl_s
    token = make_token(config.http.link_secret, action, queue_id, expires_at)
    return f"{config.http.public_url.rstrip('/')}{LINK_PATH_PREFIX}/{action}/{token}"


def seller_links(config: Config, queue_id: str, locale: str | None, now: float | None = None) -> list[tuple[str, str]]:
    """Return the (label, url) pairs to put in a buyer message delivered to a seller.

    Labels are in the seller's `locale`. Returns [] when links are off (no
    `[http] link_secret`, or the HTTP server disabled), so callers can add
    whatever this returns.
    """
    if not links_enabled(config):
        return []
    _ = translator(locale)
    return [(_(LABELS[action]), link_url(config, action, queue_id, now)) for action in ACTIONS]
