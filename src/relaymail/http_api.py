"""The back-office JSON API under /api/v1, and its OpenAPI 3.1 document.

Every route is one `ApiRoute` in `API_ROUTES`; relaymail.http registers them
and `openapi_document` describes them from the same table, so the document
lists exactly the routes served. Requests carry `Authorization: Bearer
<[http] api_token>`; relaymail.http checks it before a handler runs.

Handlers check every input before touching the database and answer a bad
request with 400 and `{"error": MESSAGE, "field": NAME}`, NAME being the JSON
field, query parameter or path parameter at fault (null when no single one
is). The checks are relaymail.provision's, so the API accepts what the CLI
accepts. Unknown fields and query parameters are errors too, so a misspelt
option never falls back silently. Other failures: 404 for an unknown record,
409 for a conflict with stored data (relaymail.provision.ConflictError, an
action that does not apply to the message).

Each request runs in one database session, committed when the handler
returns and rolled back when it raises.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, TypeVar

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession

from . import __version__, provision, records
from .cli import buyer_record, order_record, seller_record, sender_record
from .config import Config
from .errors import InputError, NotFoundError
from .models import ORDER_STATUSES, Buyer, Order, Seller, SenderState, utcnow
from .store import Store

CONFIG_KEY = web.AppKey("config", Config)
STORE_KEY = web.AppKey("store", Store)

API_PREFIX = "/api/v1"
MAX_PAGE = 1000
DEFAULT_PAGE = 100

T = TypeVar("T")


class ApiError(Exception):
    """A request the API cannot serve: HTTP status, message, and the input field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


# --- JSON ------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def json_response(data: Any, status: int = 200) -> web.Response:
    """Return `data` as a JSON response; datetimes become ISO 8601 strings."""
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, default=_json_default))


def error_response(status: int, message: str, field: str | None = None) -> web.Response:
    """Return the API's error body {"error": ..., "field": ...} with `status`."""
    return json_response({"error": message, "field": field}, status=status)


# --- input checks ----------------------------------------------------------


async def _json_body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """Return the request's JSON object; reject other JSON, bad JSON and unknown fields."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body is a JSON {type(body).__name__}: expected an object")
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unknown field {name!r}: expected any of {', '.join(sorted(allowed))}", name)
    return body


def _string(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is missing: expected a string", name)
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} = {value!r}: expected a string", name)
    return value


def _boolean(body: dict[str, Any], name: str, required: bool = False) -> bool | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name} is missing: expected true or false", name)
        return None
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} = {value!r}: expected true or false", name)
    return value


def _string_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ApiError(400, f"{name} = {value!r}: expected a list of strings", name)
    return value


def _checked(field_name: str, check: Callable[..., T], *args: Any) -> T:
    """Run a relaymail.provision check; turn its InputError into a 400 naming `field_name`."""
    try:
        return check(*args)
    except InputError as exc:
        raise ApiError(400, str(exc), field_name) from None


def _path_id(request: web.Request, name: str) -> str:
    return _checked(name, provision.validate_id, request.match_info[name], name.replace("_", " "))


def _query(request: web.Request, allowed: set[str]) -> dict[str, str]:
    for name in request.query:
        if name not in allowed:
            raise ApiError(400, f"unknown query parameter {name!r}: expected any of {', '.join(sorted(allowed))}", name)
        if len(request.query.getall(name)) > 1:
            raise ApiError(400, f"query parameter {name!r} is given more than once: expected it once", name)
    return dict(request.query)


def _int_param(params: dict[str, str], name: str, default: int | None, minimum: int, maximum: int) -> int | None:
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name} = {text!r}: expected a whole number", name) from None
    if not minimum <= value <= maximum:
        raise ApiError(400, f"{name} = {value}: expected {minimum} to {maximum}", name)
    return value


async def in_session(request: web.Request, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `action` in one session and commit; the session rolls back if it raises."""
    async with request.app[STORE_KEY].session() as session:
        result = await action(session)
        await session.commit()
        return result


def _domain(request: web.Request) -> str:
    return request.app[CONFIG_KEY].relay.domain


# --- sellers and senders ---------------------------------------------------


async def get_seller(request: web.Request) -> web.Response:
    seller_id = _path_id(request, "seller_id")

    async def action(session: AsyncSession) -> dict[str, Any]:
        seller = await session.get(Seller, seller_id)
        if seller is None:
            raise NotFoundError(f"seller {seller_id!r} not found")
        return seller_record(seller)

    return json_response(await in_session(request, action))


async def put_seller(request: web.Request) -> web.Response:
    domain = _domain(request)
    seller_id = _path_id(request, "seller_id")
    body = await _json_body(request, {"business_name", "support_email", "senders", "locale", "block_notice"})
    business_name = _string(body, "business_name", required=True)
    support_email = _string(body, "support_email", required=True)
    senders = _string_list(body, "senders")
    locale = _string(body, "locale")
    block_notice = _boolean(body, "block_notice")

    _checked("business_name", provision.normalize_name, business_name, "business name")
    _checked("support_email", provision.normalize_address, support_email, "support email", domain)
    for address in senders:
        _checked("senders", provision.normalize_address, address, "sender address", domain)
    if locale is not None:
        _checked("locale", provision.normalize_locale, locale)

    async def action(session: AsyncSession) -> tuple[dict[str, Any], bool]:
        seller, created = await provision.add_seller(
            session, seller_id, business_name, support_email,
            domain=domain, senders=senders, locale=locale, block_notice=block_notice,
        )
        return seller_record(seller, created), created

    record, created = await in_session(request, action)
    return json_response(record, 201 if created else 200)


async def put_sender(request: web.Request) -> web.Response:
    domain = _domain(request)
    seller_id = _path_id(request, "seller_id")
    address = _checked("address", provision.normalize_address, request.match_info["address"], "sender address", domain)
    body = await _json_body(request, {"state"})
    state = _string(body, "state", required=True)
    states = (SenderState.APPROVED.value, SenderState.BLOCKED.value)
    if state not in states:
        raise ApiError(400, f"state = {state!r}: expected one of {', '.join(states)}", "state")

    async def action(session: AsyncSession) -> tuple[dict[str, Any], bool]:
        if state == SenderState.APPROVED.value:
            sender, created = await provision.add_sender(session, seller_id, address, domain=domain)
        else:
            sender, created = await provision.block_sender(session, seller_id, address)
        return sender_record(seller_id, sender, created), created

    record, created = await in_session(request, action)
    return json_response(record, 201 if created else 200)


# --- buyers ----------------------------------------------------------------


async def get_buyer(request: web.Request) -> web.Response:
    buyer_id = _path_id(request, "buyer_id")

    async def action(session: AsyncSession) -> dict[str, Any]:
        buyer = await session.get(Buyer, buyer_id)
        if buyer is None:
            raise NotFoundError(f"buyer {buyer_id!r} not found")
        return buyer_record(buyer)

    return json_response(await in_session(request, action))


async def put_buyer(request: web.Request) -> web.Response:
    domain = _domain(request)
    buyer_id = _path_id(request, "buyer_id")
    body = await _json_body(request, {"email", "name", "locale", "opted_out"})
    email = _string(body, "email", required=True)
    name = _string(body, "name")
    locale = _string(body, "locale")
    opted_out = _boolean(body, "opted_out")

    _checked("email", provision.normalize_address, email, "buyer email", domain)
    if name is not None:
        _checked("name", provision.normalize_name, name, "buyer name")
    if locale is not None:
        _checked("locale", provision.normalize_locale, locale)

    async def action(session: AsyncSession) -> tuple[dict[str, Any], bool]:
        buyer, created = await provision.add_buyer(
            session, buyer_id, email, domain=domain, name=name, locale=locale, opted_out=opted_out
        )
        return buyer_record(buyer, created), created

    record, created = await in_session(request, action)
    return json_response(record, 201 if created else 200)


async def put_opt_out(request: web.Request) -> web.Response:
    buyer_id = _path_id(request, "buyer_id")
    body = await _json_body(request, {"opted_out"})
    opted_out = _boolean(body, "opted_out", required=True)

    async def action(session: AsyncSession) -> dict[str, Any]:
        return buyer_record(await provision.set_opt_out(session, buyer_id, opted_out))

    return json_response(await in_session(request, action))


# --- pairs, aliases, orders ------------------------------------------------


def _pair_record(aliases: provision.PairAliases) -> dict[str, Any]:
    return {
        "pair_id": aliases.pair_id,
        "buyer_id": aliases.buyer_id,
        "seller_id": aliases.seller_id,
        "buyer_alias": aliases.buyer_alias,
        "seller_alias": aliases.seller_alias,
        "created": aliases.created,
    }


async def _show_pair(request: web.Request, buyer_alias: str | None, seller_alias: str | None) -> web.Response:
    domain = _domain(request)
    buyer_id = _path_id(request, "buyer_id")
    seller_id = _path_id(request, "seller_id")

    async def action(session: AsyncSession) -> dict[str, Any]:
        aliases = await provision.show_pair(
            session, buyer_id, seller_id, domain, buyer_alias=buyer_alias, seller_alias=seller_alias
        )
        return _pair_record(aliases)

    record = await in_session(request, action)
    return json_response(record, 201 if record["created"] else 200)


async def get_pair(request: web.Request) -> web.Response:
    return await _show_pair(request, None, None)


async def put_pair(request: web.Request) -> web.Response:
    domain = _domain(request)
    body = await _json_body(request, {"buyer_alias", "seller_alias"})
    buyer_alias = _string(body, "buyer_alias", required=True)
    seller_alias = _string(body, "seller_alias", required=True)
    _checked("buyer_alias", provision.parse_alias, buyer_alias, domain, "buyer alias")
    _checked("seller_alias", provision.parse_alias, seller_alias, domain, "seller alias")
    return await _show_pair(request, buyer_alias, seller_alias)


async def get_alias_orders(request: web.Request) -> web.Response:
    domain = _domain(request)
    alias = _checked("alias", provision.parse_alias, request.match_info["alias"], domain, "alias")

    async def action(session: AsyncSession) -> dict[str, Any]:
        return await records.alias_orders(session, alias, domain)

    return json_response(await in_session(request, action))


async def get_order(request: web.Request) -> web.Response:
    order_id = _path_id(request, "order_id")

    async def action(session: AsyncSession) -> dict[str, Any]:
        order = await session.get(Order, order_id)
        if order is None:
            raise NotFoundError(f"order {order_id!r} not found")
        record = order_record(order, False)
        record.pop("created")
        return record

    return json_response(await in_session(request, action))


async def put_order(request: web.Request) -> web.Response:
    order_id = _path_id(request, "order_id")
    body = await _json_body(request, {"buyer_id", "seller_id", "status", "placed_at"})
    buyer_id = _string(body, "buyer_id", required=True)
    seller_id = _string(body, "seller_id", required=True)
    status = _string(body, "status", required=True)
    placed_at_text = _string(body, "placed_at")

    _checked("buyer_id", provision.validate_id, buyer_id, "buyer id")
    _checked("seller_id", provision.validate_id, seller_id, "seller id")
    _checked("status", provision.normalize_status, status)
    placed_at = None
    if placed_at_text is not None:
        placed_at = _checked("placed_at", provision.parse_datetime, placed_at_text, "placed_at")

    async def action(session: AsyncSession) -> tuple[dict[str, Any], bool]:
        order, created = await provision.add_order(session, order_id, buyer_id, seller_id, status, placed_at)
        return order_record(order, created), created

    record, created = await in_session(request, action)
    return json_response(record, 201 if created else 200)


# --- messages --------------------------------------------------------------

MESSAGE_QUERY_PARAMS = {"seller", "pair", "alias", "order", "filter", "since", "until", "limit", "offset"}


def message_query(request: web.Request) -> records.MessageQuery:
    """Return the MessageQuery of GET /api/v1/messages, or raise ApiError naming the parameter."""
    domain = _domain(request)
    params = _query(request, MESSAGE_QUERY_PARAMS)
    seller = params.get("seller")
    order = params.get("order")
    alias = params.get("alias")
    since = params.get("since")
    until = params.get("until")
    if seller is not None:
        _checked("seller", provision.validate_id, seller, "seller id")
    if order is not None:
        _checked("order", provision.validate_id, order, "order id")
    return records.MessageQuery(
        seller_id=seller,
        pair_id=_int_param(params, "pair", None, 1, 2**63 - 1),
        alias=_checked("alias", provision.parse_alias, alias, domain, "alias") if alias is not None else None,
        order_id=order,
        kind=_checked("filter", records.normalize_filter, params.get("filter")),
        since=_checked("since", provision.parse_datetime, since, "since") if since else None,
        until=_checked("until", provision.parse_datetime, until, "until") if until else None,
        limit=_int_param(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE),
        offset=_int_param(params, "offset", 0, 0, 2**31 - 1) or 0,
    )


async def list_messages(request: web.Request) -> web.Response:
    query = message_query(request)

    async def action(session: AsyncSession) -> list[dict[str, Any]]:
        return [records.message_summary(m) for m in await records.list_messages(session, query)]

    items = await in_session(request, action)
    return json_response({"count": len(items), "limit": query.limit, "offset": query.offset, "messages": items})


def _queue_id(request: web.Request) -> str:
    return _checked("queue_id", records.parse_queue_id, request.match_info["queue_id"])


async def get_message(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)

    async def action(session: AsyncSession) -> dict[str, Any]:
        return await records.message_detail(session, queue_id)

    return json_response(await in_session(request, action))


async def post_no_response_needed(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)
    await _json_body(request, set())

    async def action(session: AsyncSession) -> dict[str, Any]:
        message, changed = await records.mark_no_response_needed(session, queue_id)
        return records.action_record(message, changed)

    return json_response(await in_session(request, action))


async def post_report(request: web.Request) -> web.Response:
    queue_id = _queue_id(request)
    body = await _json_body(request, {"reason", "note"})
    reason = _checked("reason", records.normalize_reason, _string(body, "reason", required=True))
    note = _checked("note", records.normalize_note, _string(body, "note"))

    async def action(session: AsyncSession) -> dict[str, Any]:
        message, changed = await records.report_message(session, queue_id, reason, note)
        return records.action_record(message, changed)

    return json_response(await in_session(request, action))


async def get_response_time(request: web.Request) -> web.Response:
    seller_id = _path_id(request, "seller_id")
    params = _query(request, {"days"})
    if params.get("days"):
        windows = [_checked("days", records.normalize_days, params["days"])]
    else:
        windows = list(records.RESPONSE_WINDOWS_DAYS)

    now = utcnow()

    async def action(session: AsyncSession) -> list[dict[str, Any]]:
        figures = []
        for days in windows:
            stats = (await records.response_time(session, seller_id, days, now)).as_dict()
            stats.pop("seller_id")
            figures.append(stats)
        return figures

    return json_response({"seller_id": seller_id, "windows": await in_session(request, action)})


# --- route table -----------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A query parameter as the OpenAPI document describes it."""

    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class ApiRoute:
    """One route: how it is served and how the OpenAPI document describes it.

    `response` names a schema in SCHEMAS (None: no JSON body described);
    `created` adds a 201 response for a new record besides 200.
    """

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    summary: str
    response: str | None
    body: str | None = None
    query: tuple[Param, ...] = ()
    created: bool = False
    auth: bool = True
    errors: tuple[int, ...] = (400, 404)
    content_type: str = "application/json"
    tag: str = "records"


MESSAGE_PARAMS = (
    Param("seller", "messages of this seller id"),
    Param("pair", "messages of this pair id", {"type": "integer", "minimum": 1}),
    Param("alias", "messages of the pair behind this alias (buyer or seller alias, with or without @domain)"),
    Param("order", "messages attributed to this order when they arrived (the pair's latest order then)"),
    Param(
        "filter",
        "needs-response: buyer messages awaiting the seller's reply; sent: the seller's messages to "
        "buyers; blocked: messages blocked by policy",
        {"type": "string", "enum": list(records.FILTERS)},
    ),
    Param("since", "received at or after this ISO 8601 date or time (UTC unless an offset is given)"),
    Param("until", "received before this ISO 8601 date or time (exclusive)"),
    Param("limit", f"at most this many messages (default {DEFAULT_PAGE})", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}),
    Param("offset", "skip this many messages first (default 0)", {"type": "integer", "minimum": 0}),
)

API_ROUTES: tuple[ApiRoute, ...] = (
    ApiRoute("GET", f"{API_PREFIX}/sellers/{{seller_id}}", get_seller, "Get a seller and its sender addresses", "Seller", tag="sellers"),
    ApiRoute(
        "PUT", f"{API_PREFIX}/sellers/{{seller_id}}", put_seller,
        "Create or update a seller; approves the senders listed (others keep their state)",
        "Seller", body="SellerInput", created=True, errors=(400,), tag="sellers",
    ),
    ApiRoute(
        "PUT", f"{API_PREFIX}/sellers/{{seller_id}}/senders/{{address}}", put_sender,
        "Approve or block a sender address of a seller", "Sender", body="SenderInput", created=True, tag="sellers",
    ),
    ApiRoute(
        "GET", f"{API_PREFIX}/sellers/{{seller_id}}/response-time", get_response_time,
        "Response-time figures of a seller over the last 7, 30 and 90 days (or one window)", "ResponseTime",
        query=(Param("days", "one window only", {"type": "integer", "enum": list(records.RESPONSE_WINDOWS_DAYS)}),),
    ),
    ApiRoute("GET", f"{API_PREFIX}/buyers/{{buyer_id}}", get_buyer, "Get a buyer", "Buyer", tag="buyers"),
    ApiRoute(
        "PUT", f"{API_PREFIX}/buyers/{{buyer_id}}", put_buyer, "Create or update a buyer",
        "Buyer", body="BuyerInput", created=True, errors=(400,), tag="buyers",
    ),
    ApiRoute(
        "PUT", f"{API_PREFIX}/buyers/{{buyer_id}}/opt-out", put_opt_out,
        "Record whether a buyer declined unsolicited messages from sellers", "Buyer", body="OptOutInput", tag="buyers",
    ),
    ApiRoute(
        "GET", f"{API_PREFIX}/pairs/{{buyer_id}}/{{seller_id}}", get_pair,
        "Get a pair's two aliases, creating the pair with fresh aliases if it is missing", "Pair",
        created=True, tag="pairs",
    ),
    ApiRoute(
        "PUT", f"{API_PREFIX}/pairs/{{buyer_id}}/{{seller_id}}", put_pair,
        "Create a pair with imported aliases, or check that they equal the stored ones", "Pair",
        body="PairImport", created=True, errors=(400, 404, 409), tag="pairs",
    ),
    ApiRoute(
        "GET", f"{API_PREFIX}/aliases/{{alias}}/orders", get_alias_orders,
        "The pair behind an alias and its orders, most recent first", "AliasOrders", tag="pairs",
    ),
    ApiRoute("GET", f"{API_PREFIX}/orders/{{order_id}}", get_order, "Get an order", "Order", tag="orders"),
    ApiRoute(
        "PUT", f"{API_PREFIX}/orders/{{order_id}}", put_order, "Create an order or update its status and date",
        "Order", body="OrderInput", created=True, errors=(400, 404, 409), tag="orders",
    ),
    ApiRoute(
        "GET", f"{API_PREFIX}/messages", list_messages, "List archived messages, newest first",
        "MessageList", query=MESSAGE_PARAMS,
    ),
    ApiRoute(
        "GET", f"{API_PREFIX}/messages/{{queue_id}}", get_message,
        "A message's record, deliveries, attempts and both versions of its bytes (base64)", "MessageDetail",
    ),
    ApiRoute(
        "POST", f"{API_PREFIX}/messages/{{queue_id}}/no-response-needed", post_no_response_needed,
        "Mark a buyer's message as needing no response", "ActionResult", errors=(400, 404, 409),
    ),
    ApiRoute(
        "POST", f"{API_PREFIX}/messages/{{queue_id}}/report", post_report,
        "Record a seller's report of a buyer's message", "ActionResult", body="ReportInput", errors=(400, 404, 409),
    ),
)

PATH_PARAM_DESCRIPTIONS = {
    "seller_id": "the marketplace's seller id",
    "buyer_id": "the marketplace's buyer id",
    "order_id": "the marketplace's order id",
    "address": "a sender e-mail address",
    "alias": "a buyer or seller alias, with or without @domain",
    "queue_id": "the message's queue id: 12 hexadecimal digits",
    "action": "no-response-needed or report",
    "token": "the signed token of the link",
}


# --- OpenAPI ---------------------------------------------------------------

_STRING = {"type": "string"}
_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_BOOLEAN = {"type": "boolean"}
_INTEGER = {"type": "integer"}


def _object(properties: dict[str, Any], required: list[str] | None = None, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


_SUMMARY_PROPERTIES = {
    "queue_id": _STRING,
    "received_at": _TIME,
    "direction": {"type": "string", "enum": ["buyer_to_seller", "seller_to_buyer", "to_operators", "notice", "unknown"]},
    "status": {"type": "string", "enum": ["queued", "delivered", "bounced", "blocked", "suppressed", "rejected", "held"]},
    "rule": _STRING,
    "reason": _STRING,
    "delivery_error": _STRING,
    "seller_id": _NULLABLE_STRING,
    "buyer_id": _NULLABLE_STRING,
    "pair_id": {"type": ["integer", "null"]},
    "order_id": _NULLABLE_STRING,
    "recipient_alias": _STRING,
    "subject": _STRING,
    "needs_response": _BOOLEAN,
    "no_response_needed_at": _NULLABLE_TIME,
    "reported_at": _NULLABLE_TIME,
    "report_reason": {"type": ["string", "null"], "enum": [*records.REPORT_REASONS, None]},
    "automatic": _BOOLEAN,
    "critical": _BOOLEAN,
    "thread_reply": _BOOLEAN,
    "size_bytes": _INTEGER,
    "finished_at": _NULLABLE_TIME,
}

_ATTEMPT = _object(
    {
        "started_at": _TIME,
        "finished_at": _NULLABLE_TIME,
        "result": {"type": "string", "enum": ["sent", "deferred", "bounced", "crashed"]},
        "host": _STRING,
        "reply_code": {"type": ["integer", "null"]},
        "reply_text": _STRING,
    }
)

_WINDOW = _object(
    {
        "days": {"type": "integer", "enum": list(records.RESPONSE_WINDOWS_DAYS)},
        "since": _TIME,
        "until": _TIME,
        "messages": _INTEGER,
        "answered": _INTEGER,
        "answered_within_24h": _INTEGER,
        "not_answered_within_24h": _INTEGER,
        "pending": _INTEGER,
        "share_not_answered_within_24h": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "average_response_s": {"type": ["number", "null"]},
    }
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _object({"error": _STRING, "field": _NULLABLE_STRING}, ["error", "field"]),
    "Seller": _object(
        {
            "id": _STRING,
            "business_name": _STRING,
            "support_email": _STRING,
            "locale": _STRING,
            "block_notice": _BOOLEAN,
            "senders": {"type": "array", "items": _object({"address": _STRING, "state": {"type": "string", "enum": ["approved", "blocked"]}})},
            "created": _BOOLEAN,
        }
    ),
    "SellerInput": _object(
        {
            "business_name": {"type": "string", "minLength": 1, "maxLength": provision.MAX_NAME_CHARS},
            "support_email": {"type": "string", "format": "email"},
            "senders": {"type": "array", "items": {"type": "string", "format": "email"}},
            "locale": {"type": "string", "examples": ["es-MX", "en"]},
            "block_notice": _BOOLEAN,
        },
        ["business_name", "support_email"],
    ),
    "Sender": _object({"seller_id": _STRING, "address": _STRING, "state": {"type": "string", "enum": ["approved", "blocked"]}, "created": _BOOLEAN}),
    "SenderInput": _object({"state": {"type": "string", "enum": ["approved", "blocked"]}}, ["state"]),
    "Buyer": _object(
        {"id": _STRING, "email": _STRING, "name": _NULLABLE_STRING, "locale": _STRING, "opted_out": _BOOLEAN, "created": _BOOLEAN}
    ),
    "BuyerInput": _object(
        {
            "email": {"type": "string", "format": "email"},
            "name": {"type": "string", "minLength": 1, "maxLength": provision.MAX_NAME_CHARS},
            "locale": _STRING,
            "opted_out": _BOOLEAN,
        },
        ["email"],
    ),
    "OptOutInput": _object({"opted_out": _BOOLEAN}, ["opted_out"]),
    "Pair": _object(
        {"pair_id": _INTEGER, "buyer_id": _STRING, "seller_id": _STRING, "buyer_alias": _STRING, "seller_alias": _STRING, "created": _BOOLEAN}
    ),
    "PairImport": _object({"buyer_alias": _STRING, "seller_alias": _STRING}, ["buyer_alias", "seller_alias"]),
    "AliasOrders": _object(
        {
            "alias": _STRING,
            "alias_role": {"type": "string", "enum": ["buyer_alias", "seller_alias"]},
            "pair_id": _INTEGER,
            "buyer_id": _STRING,
            "seller_id": _STRING,
            "buyer_alias": _STRING,
            "seller_alias": _STRING,
            "orders": {"type": "array", "items": _object({"id": _STRING, "status": _STRING, "placed_at": _TIME})},
        }
    ),
    "Order": _object(
        {"id": _STRING, "buyer_id": _STRING, "seller_id": _STRING, "status": {"type": "string", "enum": list(ORDER_STATUSES)}, "placed_at": _TIME, "created": _BOOLEAN}
    ),
    "OrderInput": _object(
        {"buyer_id": _STRING, "seller_id": _STRING, "status": {"type": "string", "enum": list(ORDER_STATUSES)}, "placed_at": _TIME},
        ["buyer_id", "seller_id", "status"],
    ),
    "MessageSummary": _object(_SUMMARY_PROPERTIES),
    "MessageList": _object(
        {
            "count": _INTEGER,
            "limit": _INTEGER,
            "offset": _INTEGER,
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/MessageSummary"}},
        }
    ),
    "MessageDetail": _object(
        {
            **_SUMMARY_PROPERTIES,
            "envelope_sender": _STRING,
            "header_from": _STRING,
            "client_address": _STRING,
            "original_message_id": _STRING,
            "relay_message_id": _STRING,
            "parent_queue_id": _NULLABLE_STRING,
            "report_note": _NULLABLE_STRING,
            "findings": _STRING,
            "deliveries": {
                "type": "array",
                "items": _object(
                    {
                        "recipient": _STRING,
                        "envelope_sender": _STRING,
                        "state": {"type": "string", "enum": ["queued", "sent", "bounced", "held"]},
                        "attempts": {"type": "array", "items": _ATTEMPT},
                        "last_error": _STRING,
                        "created_at": _TIME,
                        "finished_at": _NULLABLE_TIME,
                    }
                ),
            },
            "raw_base64": {"type": "string", "contentEncoding": "base64"},
            "delivered_raw_base64": {"type": ["string", "null"], "contentEncoding": "base64"},
        }
    ),
    "ReportInput": _object(
        {"reason": {"type": "string", "enum": list(records.REPORT_REASONS)}, "note": {"type": "string", "maxLength": records.MAX_NOTE_CHARS}},
        ["reason"],
    ),
    "ActionResult": _object(
        {
            "queue_id": _STRING,
            "no_response_needed_at": _NULLABLE_TIME,
            "reported_at": _NULLABLE_TIME,
            "report_reason": {"type": ["string", "null"]},
            "report_note": _NULLABLE_STRING,
            "changed": _BOOLEAN,
        }
    ),
    "ResponseTime": _object({"seller_id": _STRING, "windows": {"type": "array", "items": _WINDOW}}),
    "Health": _object({"status": {"type": "string", "enum": ["ok", "error"]}, "database": _STRING}),
}

ERROR_DESCRIPTIONS = {
    400: "invalid input; `field` names the parameter or field at fault",
    401: "missing or wrong bearer token",
    403: "the link is not valid",
    404: "no such record",
    409: "conflict with stored data, or an action that does not apply to the message",
    410: "the link has expired",
    503: "api_token not configured, or the database is unreachable",
}


def _operation(route: ApiRoute) -> dict[str, Any]:
    """Return the OpenAPI operation object of one route."""
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": PATH_PARAM_DESCRIPTIONS.get(name, name),
            "schema": {"type": "string"},
        }
        for name in _path_params(route.path)
    ]
    parameters += [
        {"name": param.name, "in": "query", "required": False, "description": param.description, "schema": param.schema}
        for param in route.query
    ]

    if route.response is None:
        success = {"description": "success", "content": {route.content_type: {"schema": {"type": "string"}}}}
    else:
        schema = {"$ref": f"#/components/schemas/{route.response}"}
        success = {"description": "success", "content": {route.content_type: {"schema": schema}}}
    responses: dict[str, Any] = {"200": success}
    if route.created:
        responses["201"] = {**success, "description": "created"}

    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    if route.content_type != "application/json":
        error_content = {route.content_type: {"schema": {"type": "string"}}}
    codes = set(route.errors)
    if route.auth:
        codes |= {401, 503}
    for code in sorted(codes):
        responses[str(code)] = {"description": ERROR_DESCRIPTIONS[code], "content": error_content}

    operation: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": parameters,
        "responses": responses,
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{route.body}"}}},
        }
    if not route.auth:
        operation["security"] = []
    return operation


def _path_params(path: str) -> list[str]:
    names = []
    for segment in path.split("/"):
        if segment.startswith("{") and segment.endswith("}"):
            names.append(segment[1:-1])
    return names


def openapi_document(routes: tuple[ApiRoute, ...], server_url: str) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of `routes`, served at `server_url`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relaymail",
            "version": __version__,
            "description": (
                "Back-office API of a relaymail relay: sellers and their senders, buyers, pairs and "
                "aliases, orders, the message archive, sellers' actions on messages and response "
                "times. Requests under /api/v1 need `Authorization: Bearer <token>` ([http] api_token)."
            ),
        },
        "servers": [{"url": server_url}],
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
    }
