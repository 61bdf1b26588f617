"""The HTTP server of `relaymail serve`, on the relay's event loop (aiohttp).

    /api/v1/...                 the back-office JSON API (relaymail.http_api), bearer token
    GET /api/v1/openapi.json    the OpenAPI 3.1 document of every route here (no token)
    GET /healthz                200 {"status": "ok"} when the database responds, else 503
    GET /metrics                Prometheus text format 0.0.4 (see `Metrics`)
    GET|POST /links/{action}/{token}
                                the pages of sellers' one-click links (relaymail.http_pages)

`start_http(config, store)` listens on `[http] listen` and returns an
`HttpServer` whose `stop()` closes it; with `[http] enabled = false` it
listens on nothing and `stop()` does nothing. The server shares the relay's
Store, so a request never opens a second database engine.

Authentication: every /api/v1 route except openapi.json needs
`Authorization: Bearer <[http] api_token>`, compared in constant time. A
missing or wrong token gets 401 with `WWW-Authenticate: Bearer`. With no
api_token configured, those routes answer 503 "api_token not configured",
while /healthz, /metrics and the link pages keep working.

Errors under /api/ are JSON `{"error": MESSAGE, "field": NAME or null}`: 400
invalid input, 401, 404 unknown record or route, 405, 409 conflict, 413 body
over 1 MiB, 503 database unreachable, 500 anything else (logged, with no
detail in the reply).

Logs: one line per request with the route's pattern (never its path, which
can hold a link token, nor the query string), the status and the time taken;
/healthz and /metrics only at DEBUG. aiohttp's own access log is off because it
would write the full path.

Limits: the metrics of archived messages count the whole archive with one
GROUP BY per scrape, cached for METRICS_CACHE_S; with several relay nodes on
one PostgreSQL database each node reports the same database-wide figures.
"""

from __future__ import annotations

import asyncio
import bisect
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from . import http_pages
from .config import Config
from .errors import InputError, NotFoundError, StoreError
from .http_api import (
    API_PREFIX,
    API_ROUTES,
    CONFIG_KEY,
    STORE_KEY,
    ApiError,
    ApiRoute,
    error_response,
    json_response,
    openapi_document,
)
from .links import LINK_PATH_PREFIX
from .log import fields
from .models import Delivery, DeliveryState, Message, utcnow
from .provision import ConflictError
from .store import Store

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
HEALTH_TIMEOUT_S = 5.0
HEALTH_LOG_INTERVAL_S = 60.0
METRICS_CACHE_S = 10.0
SHUTDOWN_TIMEOUT_S = 5.0
LATENCY_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 14400, 86400)
QUIET_PATHS = ("/healthz", "/metrics")

ROUTES_KEY = web.AppKey("routes", tuple)


class HttpServer:
    """A running HTTP server (or none, when disabled); `port` is the bound port."""

    def __init__(self, runner: web.AppRunner | None, port: int = 0):
        self.runner = runner
        self.port = port

    async def stop(self) -> None:
        """Stop listening and close open connections, waiting at most SHUTDOWN_TIMEOUT_S."""
        if self.runner is None:
            return
        await self.runner.cleanup()
        self.runner = None
        log.info(fields(event="http_stopped"))


async def start_http(config: Config, store: Store) -> HttpServer:
    """Listen on `[http] listen` with the app of `build_app`; return the running server.

    When the address cannot be bound (in use, say), logs an error and returns
    a server that listens nowhere, because mail relaying must not stop for
    its auxiliary HTTP server; /healthz then fails for monitors to notice.
    """
    if not config.http.enabled:
        log.info(fields(event="http_disabled", status="[http] enabled = false"))
        return HttpServer(None)

    host, _, port_text = config.http.listen.rpartition(":")
    host = host.strip("[]")
    runner = web.AppRunner(build_app(config, store), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port_text))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        log.error(fields(event="http_failed", address=config.http.listen, error=str(exc), status="not listening (relaying mail without the HTTP server)"))
        return HttpServer(None)

    port = int(port_text)
    server = getattr(site, "_server", None)
    if server is not None and server.sockets:
        port = server.sockets[0].getsockname()[1]
    api = "on" if config.http.api_token else "off (no api_token)"
    link_pages = "on" if config.http.link_secret else "off (no link_secret)"
    log.info(fields(event="http_listening", address=f"{host}:{port}", api=api, links=link_pages))
    return HttpServer(runner, port)


# --- application -----------------------------------------------------------


def _public_routes(config: Config, store: Store) -> tuple[ApiRoute, ...]:
    """Return the routes outside the API's token check, described like the API's."""

    async def openapi(request: web.Request) -> web.Response:
        return json_response(openapi_document(request.app[ROUTES_KEY], config.http.public_url.rstrip("/")))

    async def healthz(request: web.Request) -> web.Response:
        return await health(store)

    async def metrics(request: web.Request) -> web.Response:
        body = await request.app[METRICS_KEY].render()
        return web.Response(body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def link_page(request: web.Request) -> web.Response:
        return await http_pages.link_page(request, config, store)

    async def link_action(request: web.Request) -> web.Response:
        return await http_pages.link_action(request, config, store)

    # An unknown action fails the token check (403), like an altered token.
    link_path = f"{LINK_PATH_PREFIX}/{{action}}/{{token}}"
    return (
        ApiRoute("GET", f"{API_PREFIX}/openapi.json", openapi, "This OpenAPI document", None, auth=False, errors=(), tag="meta"),
        ApiRoute("GET", "/healthz", healthz, "Database reachability check", "Health", auth=False, errors=(503,), tag="meta"),
        ApiRoute(
            "GET", "/metrics", metrics, "Prometheus metrics (text format 0.0.4)", None,
            auth=False, errors=(), content_type="text/plain", tag="meta",
        ),
        ApiRoute(
            "GET", link_path, link_page,
            "One-click link page: the message and a confirmation form (changes nothing)", None,
            auth=False, errors=(403, 404, 410), content_type="text/html", tag="links",
        ),
        ApiRoute(
            "POST", link_path, link_action,
            "One-click link action: mark the message or record the report (form fields reason, note)", None,
            auth=False, errors=(400, 403, 404, 409, 410), content_type="text/html", tag="links",
        ),
    )


def build_app(config: Config, store: Store) -> web.Application:
    """Return the aiohttp application: the API, health, metrics and link pages."""
    app = web.Application(middlewares=[_request_log, _api_errors], client_max_size=MAX_REQUEST_BYTES)
    app[CONFIG_KEY] = config
    app[STORE_KEY] = store
    app[METRICS_KEY] = Metrics(store)

    routes = _public_routes(config, store) + API_ROUTES
    app[ROUTES_KEY] = routes
    for route in routes:
        handler = _with_token(config, route.handler) if route.auth else route.handler
        app.router.add_route(route.method, route.path, handler, name=route.handler.__name__)
    return app


def _with_token(config: Config, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    expected = config.http.api_token.encode()

    async def checked(request: web.Request) -> web.StreamResponse:
        if not expected:
            return error_response(503, "api_token not configured: set [http] api_token to use the API")
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            response = error_response(401, "missing or invalid bearer token: send Authorization: Bearer <api_token>")
            response.headers["WWW-Authenticate"] = 'Bearer realm="relaymail"'
            return response
        return await handler(request)

    checked.__name__ = handler.__name__
    return checked


def _route_pattern(request: web.Request) -> str:
    """Return the matched route's pattern, such as /links/{action}/{token}; "-" when none matched."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


@web.middleware
async def _request_log(request: web.Request, handler) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        log.log(level, fields(event="http", method=request.method, route=_route_pattern(request), code=status, time_s=f"{time.monotonic() - started:.3f}"))


@web.middleware
async def _api_errors(request: web.Request, handler) -> web.StreamResponse:
    """Turn errors under /api/ into the API's JSON error body."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.field)
    except InputError as exc:
        return error_response(400, str(exc))
    except NotFoundError as exc:
        return error_response(404, str(exc))
    except ConflictError as exc:
        return error_response(409, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except (StoreError, SQLAlchemyError, OSError) as exc:
        log.error(fields(event="http_error", route=_route_pattern(request), error=f"{type(exc).__name__}: {exc}"))
        return error_response(503, "database unavailable; try again later")
    except Exception:  # noqa: BLE001 - the catch-all boundary of the API
        log.exception(fields(event="http_error", route=_route_pattern(request)))
        return error_response(500, "internal error; see the relay's log")


# --- health ----------------------------------------------------------------

_last_health_log = 0.0


async def health(store: Store) -> web.Response:
    """Return 200 when `SELECT 1` succeeds within HEALTH_TIMEOUT_S, else 503.

    A failure is logged at most once per HEALTH_LOG_INTERVAL_S, because
    monitors poll this often during an outage.
    """
    global _last_health_log
    try:
        async with store.session() as session:
            await asyncio.wait_for(session.execute(text("SELECT 1")), timeout=HEALTH_TIMEOUT_S)
    except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
        now = time.monotonic()
        if now - _last_health_log >= HEALTH_LOG_INTERVAL_S:
            _last_health_log = now
            log.warning(fields(event="health", error=f"{type(exc).__name__}: {exc}", status="failed (database)"))
        return json_response({"status": "error", "database": type(exc).__name__}, status=503)
    return json_response({"status": "ok", "database": "ok"})


# --- metrics ---------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(values: dict[str, str]) -> str:
    if not values:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in values.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


class LatencyHistogram:
    """Time from acceptance to sending of deliveries sent since this server started.

    Each scrape reads the deliveries finished since the last one (by
    `finished_at`) and adds them to cumulative buckets, as a Prometheus
    histogram needs. Rows that share the newest finish time are remembered by
    id, so a row is never counted twice. The counts restart with the process.
    """

    def __init__(self, started_at: datetime, buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.buckets_s = buckets_s
        self.counts = [0] * len(buckets_s)
        self.total = 0
        self.sum_s = 0.0
        self.watermark = started_at
        self.at_watermark: set[int] = set()

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum_s += seconds
        index = bisect.bisect_left(self.buckets_s, seconds)
        for position in range(index, len(self.counts)):
            self.counts[position] += 1

    async def update(self, session) -> None:
        rows = await session.execute(
            select(Delivery.id, Delivery.created_at, Delivery.finished_at)
            .where(Delivery.state == DeliveryState.SENT.value, Delivery.finished_at >= self.watermark)
            .order_by(Delivery.finished_at, Delivery.id)
        )
        for delivery_id, created_at, finished_at in rows:
            if finished_at == self.watermark and delivery_id in self.at_watermark:
                continue
            self.observe(max(0.0, (finished_at - created_at).total_seconds()))
            if finished_at > self.watermark:
                self.watermark = finished_at
                self.at_watermark = {delivery_id}
            else:
                self.at_watermark.add(delivery_id)

    def lines(self, name: str) -> list[str]:
        out = [
            f"# HELP {name} Time from acceptance to sending of deliveries sent since this process started.",
            f"# TYPE {name} histogram",
        ]
        for bound, count in zip(self.buckets_s, self.counts):
            out.append(f'{name}_bucket{{le="{_number(float(bound))}"}} {count}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {_number(self.sum_s)}")
        out.append(f"{name}_count {self.total}")
        return out


class Metrics:
    """The /metrics exposition, read from the database at scrape time.

        relaymail_messages{direction,status,rule}   archived messages (gauge: purges lower it)
        relaymail_queue_deliveries{state}           deliveries queued or held
        relaymail_queue_due_deliveries              queued deliveries due now
        relaymail_queue_oldest_age_seconds          age of the oldest queued delivery (0 when none)
        relaymail_delivery_latency_seconds          histogram, see LatencyHistogram
        relaymail_metrics_scrape_errors_total       scrapes whose database reads failed

    `rule` is the rule that decided the message's fate, as the archive stores
    it: a policy rule such as "default", or a rejection cause such as "sender".
    Free-text reasons never become labels, because their values are unbounded.
    """

    def __init__(self, store: Store):
        self.store = store
        self.latency = LatencyHistogram(utcnow())
        self.lock = asyncio.Lock()
        self.scrape_errors = 0
        self._cached_at = -METRICS_CACHE_S
        self._message_rows: list[tuple[str, str, str, int]] = []

    async def render(self) -> str:
        """Return the exposition text; a database error (SQLAlchemyError, OSError) is counted and logged, not raised."""
        async with self.lock:
            try:
                queue = await self._read()
            except (SQLAlchemyError, OSError) as exc:
                self.scrape_errors += 1
                log.warning(fields(event="metrics", error=f"{type(exc).__name__}: {exc}", status="failed (database)"))
                queue = None
        return "\n".join(self._lines(queue)) + "\n"

    async def _read(self) -> dict[str, Any]:
        now = utcnow()
        async with self.store.session() as session:
            if time.monotonic() - self._cached_at >= METRICS_CACHE_S:
                rows = await session.execute(
                    select(Message.direction, Message.status, Message.rule, func.count())
                    .group_by(Message.direction, Message.status, Message.rule)
                )
                self._message_rows = [(d, s, r or "", int(c)) for d, s, r, c in rows]
                self._cached_at = time.monotonic()

            states = dict(
                (state, int(count))
                for state, count in await session.execute(
                    select(Delivery.state, func.count())
                    .where(Delivery.state.in_([DeliveryState.QUEUED.value, DeliveryState.HELD.value]))
                    .group_by(Delivery.state)
                )
            )
            due = await session.scalar(
                select(func.count()).select_from(Delivery).where(
                    Delivery.state == DeliveryState.QUEUED.value, Delivery.next_attempt_at <= now
                )
            )
            oldest = await session.scalar(
                select(func.min(Delivery.created_at)).where(Delivery.state == DeliveryState.QUEUED.value)
            )
            await self.latency.update(session)
        return {
            "states": states,
            "due": int(due or 0),
            "oldest_age_s": max(0.0, (now - oldest).total_seconds()) if oldest else 0.0,
        }

    def _lines(self, queue: dict[str, Any] | None) -> list[str]:
        out = ["# HELP relaymail_messages Messages in the archive by direction, status and rule.", "# TYPE relaymail_messages gauge"]
        for direction, status, rule, count in self._message_rows:
            out.append(f"relaymail_messages{_labels({'direction': direction, 'status': status, 'rule': rule})} {count}")

        if queue is not None:
            out += ["# HELP relaymail_queue_deliveries Deliveries in the queue by state.", "# TYPE relaymail_queue_deliveries gauge"]
            for state in (DeliveryState.QUEUED.value, DeliveryState.HELD.value):
                out.append(f"relaymail_queue_deliveries{_labels({'state': state})} {queue['states'].get(state, 0)}")
            out += [
                "# HELP relaymail_queue_due_deliveries Queued deliveries whose next attempt is due now.",
                "# TYPE relaymail_queue_due_deliveries gauge",
                f"relaymail_queue_due_deliveries {queue['due']}",
                "# HELP relaymail_queue_oldest_age_seconds Age of the oldest queued delivery, 0 when none.",
                "# TYPE relaymail_queue_oldest_age_seconds gauge",
                f"relaymail_queue_oldest_age_seconds {_number(round(queue['oldest_age_s'], 3))}",
            ]

        out += self.latency.lines("relaymail_delivery_latency_seconds")
        out += [
            "# HELP relaymail_metrics_scrape_errors_total Scrapes whose database reads failed.",
            "# TYPE relaymail_metrics_scrape_errors_total counter",
            f"relaymail_metrics_scrape_errors_total {self.scrape_errors}",
        ]
        return out


METRICS_KEY = web.AppKey("metrics", Metrics)
