"""The pages that sellers' one-click links open: GET shows a form, POST acts.

    GET  /links/{action}/{token}   the message's subject and arrival time, and a
                                   confirmation form; changes nothing, because the
                                   link scanners of mail providers fetch every URL
    POST /links/{action}/{token}   marks the message "no response needed", or
                                   records the report (reason and optional note)

`action` is "no-response-needed" or "report" and the token comes from
relaymail.links. Pages are in the seller's locale (es-MX or en, as
relaymail.i18n picks it). An altered or malformed token gets 403, an expired
one 410, a message no longer in the archive 404, an action that does not apply
to the message 409, an invalid form 400, always as a short HTML page.

The subject shown is the one the seller received (from the delivered bytes),
so the page never shows the buyer's real address. Responses carry
`Cache-Control: no-store`, `Referrer-Policy: no-referrer` (the URL is a
credential) and a Content-Security-Policy that allows no scripts and no framing.
"""

from __future__ import annotations

import html
import logging
import zoneinfo
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

from aiohttp import web
from babel.dates import format_datetime

from . import links, records
from .config import Config
from .errors import InputError, NotFoundError
from .i18n import N_, resolve_locale, translator
from .log import fields, queue_id_var, set_queue_id
from .models import Message
from .provision import ConflictError
from .store import Store

log = logging.getLogger(__name__)

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
}

REASON_LABELS = {"spam": N_("Spam"), "abuse": N_("Abuse"), "other": N_("Other")}

TEXTS = {
    "title": N_("Buyer message"),
    "no_response_intro": N_(
        "Mark this buyer message as not needing a response? It will no longer count in your "
        "response-time figures."
    ),
    "no_response_button": N_("Mark as no response needed"),
    "no_response_done": N_("Done: the message is marked as not needing a response."),
    "no_response_already": N_("This message was already marked as not needing a response on {date}."),
    "report_intro": N_(
        "Report this buyer message to the marketplace, for example if you consider it spam. A "
        "reported message needs no response, and you do not need to delete it."
    ),
    "report_reason": N_("Reason"),
    "report_note": N_("Note (optional)"),
    "report_button": N_("Report message"),
    "report_done": N_("Done: the message was reported. Thank you."),
    "report_already": N_("This message was already reported on {date}. Sending the form again replaces the reason and note."),
    "report_invalid": N_("Choose a reason for the report, and write the note as plain text of at most 2000 characters."),
    "received": N_("Received: {date}"),
    "expired": N_("This link has expired. Links in messages work for a limited time."),
    "invalid": N_("This link is not valid. Open it again from the message, without changing it."),
    "not_found": N_("This message is no longer in the archive."),
    "not_applicable": N_("This action does not apply to this message."),
}


def _page(locale: str, title: str, body_html: str, status: int = 200) -> web.Response:
    lang = resolve_locale(locale).replace("_", "-")
    document = (
        "<!DOCTYPE html>\n"
        f'<html lang="{html.escape(lang)}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em}"
        "label{display:block;margin-top:1em}textarea{width:100%}button{margin-top:1em}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>\n"
    )
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


def _message_page(locale: str, status: int, text: str) -> web.Response:
    _ = translator(locale)
    return _page(locale, _(TEXTS["title"]), f"<p>{html.escape(text)}</p>", status)


def _format_time(value: datetime, locale: str, config: Config) -> str:
    zone = zoneinfo.ZoneInfo(config.policy.timezone)
    return format_datetime(value, format="medium", tzinfo=zone, locale=resolve_locale(locale))


def _delivered_subject(message: Message) -> str:
    """Return the Subject the seller received, decoded; "" when there is none."""
    data = message.delivered_raw
    if not data:
        return ""
    headers = BytesHeaderParser(policy=default_policy).parsebytes(data)
    try:
        return str(headers.get("Subject", "")).strip()
    except (ValueError, IndexError):
        return ""


async def _load(store: Store, queue_id: str) -> tuple[Message, str]:
    async with store.session() as session:
        message = await records.get_message(session, queue_id)
        seller = await records.message_seller(session, message)
    return message, seller.locale if seller is not None else ""


def _form(locale: str, action: str, message: Message, config: Config, notice: str = "") -> str:
    """Return the page body: the message's subject and time, any notice, and the form."""
    _ = translator(locale)
    parts = []
    subject = _delivered_subject(message)
    if subject:
        parts.append(f"<p>{html.escape(_('Subject: {subject}').format(subject=subject))}</p>")
    received = _(TEXTS["received"]).format(date=_format_time(message.received_at, locale, config))
    parts.append(f"<p>{html.escape(received)}</p>")
    if notice:
        parts.append(f"<p><strong>{html.escape(notice)}</strong></p>")

    if action == links.NO_RESPONSE_NEEDED:
        parts.append(f"<p>{html.escape(_(TEXTS['no_response_intro']))}</p>")
        parts.append(f'<form method="post"><button type="submit">{html.escape(_(TEXTS["no_response_button"]))}</button></form>')
        return "".join(parts)

    parts.append(f"<p>{html.escape(_(TEXTS['report_intro']))}</p>")
    options = "".join(
        f'<option value="{reason}"{" selected" if reason == message.report_reason else ""}>{html.escape(_(label))}</option>'
        for reason, label in REASON_LABELS.items()
    )
    parts.append(
        '<form method="post">'
        f'<label for="reason">{html.escape(_(TEXTS["report_reason"]))}</label>'
        f'<select id="reason" name="reason" required>{options}</select>'
        f'<label for="note">{html.escape(_(TEXTS["report_note"]))}</label>'
        f'<textarea id="note" name="note" rows="4" maxlength="{records.MAX_NOTE_CHARS}"></textarea>'
        f'<button type="submit">{html.escape(_(TEXTS["report_button"]))}</button></form>'
    )
    return "".join(parts)


def _already_notice(locale: str, action: str, message: Message, config: Config) -> str:
    _ = translator(locale)
    if action == links.NO_RESPONSE_NEEDED and message.no_response_needed_at is not None:
        return _(TEXTS["no_response_already"]).format(date=_format_time(message.no_response_needed_at, locale, config))
    if action == links.REPORT and message.reported_at is not None:
        return _(TEXTS["report_already"]).format(date=_format_time(message.reported_at, locale, config))
    return ""


def _verify(config: Config, request: web.Request) -> links.LinkClaim:
    action = request.match_info["action"]
    token = request.match_info["token"]
    return links.verify_token(config.http.link_secret, action, token)


async def link_page(request: web.Request, config: Config, store: Store) -> web.Response:
    """GET: show the message and the confirmation form; change nothing."""
    try:
        claim = _verify(config, request)
    except links.LinkError as exc:
        return await _link_error_page(store, exc)

    try:
        message, locale = await _load(store, claim.queue_id)
    except NotFoundError:
        return _message_page("", 404, translator("")(TEXTS["not_found"]))

    _ = translator(locale)
    notice = _already_notice(locale, claim.action, message, config)
    return _page(locale, _(links.LABELS[claim.action]), _form(locale, claim.action, message, config, notice))


async def link_action(request: web.Request, config: Config, store: Store) -> web.Response:
    """POST: perform the link's action on its message and show the result."""
    try:
        claim = _verify(config, request)
    except links.LinkError as exc:
        return await _link_error_page(store, exc)

    token = set_queue_id(claim.queue_id)
    try:
        form = await request.post()
        return await _act(store, config, claim, str(form.get("reason", "")), str(form.get("note", "")))
    finally:
        queue_id_var.reset(token)


async def _act(store: Store, config: Config, claim: links.LinkClaim, reason: str, note: str) -> web.Response:
    async with store.session() as session:
        try:
            message = await records.get_message(session, claim.queue_id)
        except NotFoundError:
            return _message_page("", 404, translator("")(TEXTS["not_found"]))
        seller = await records.message_seller(session, message)
        locale = seller.locale if seller is not None else ""
        _ = translator(locale)

        try:
            if claim.action == links.NO_RESPONSE_NEEDED:
                message, changed = await records.mark_no_response_needed(session, claim.queue_id)
                done = _(TEXTS["no_response_done"])
            else:
                message, changed = await records.report_message(session, claim.queue_id, reason, note)
                done = _(TEXTS["report_done"])
        except InputError:
            # Nothing was changed; leaving the block without a commit rolls the session back.
            notice = _(TEXTS["report_invalid"])
            return _page(locale, _(links.LABELS[claim.action]), _form(locale, claim.action, message, config, notice), 400)
        except ConflictError:
            return _message_page(locale, 409, _(TEXTS["not_applicable"]))
        await session.commit()

    log.info(fields(event="link_action", action=claim.action, changed=changed, status="done"))
    return _message_page(locale, 200, done)


async def _link_error_page(store: Store, exc: links.LinkError) -> web.Response:
    """Return the 403 (invalid) or 410 (expired) page.

    An invalid token names no trustworthy message, so its page is in the
    default locale. An expired token's page is in its seller's locale when
    the message is still archived.
    """
    if not exc.expired:
        return _message_page("", 403, translator("")(TEXTS["invalid"]))
    locale = ""
    if exc.queue_id is not None:
        try:
            _, locale = await _load(store, exc.queue_id)
        except NotFoundError:
            locale = ""
    return _message_page(locale, 410, translator(locale)(TEXTS["expired"]))
