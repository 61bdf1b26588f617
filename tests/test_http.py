"""The HTTP server inside `relaymail serve`: API, OpenAPI document, health, metrics, one-click links.

Each test runs a real relay (SMTP, queue, HTTP on 127.0.0.1) with its sink
(RelayEnv) and talks to it with aiohttp's client. Buyer messages go through
SMTP, so the links are made for messages the relay really archived.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import email.policy
import json
import logging
import re
import secrets
import time
from pathlib import Path

import aiohttp
import pytest
from relayenv import BUYER, BUYER_ALIAS, DOMAIN, SELLER, SELLER_ALIAS, RelayEnv
from sqlalchemy import select

from relaymail import config as config_module
from relaymail import links
from relaymail.http import LatencyHistogram, start_http
from relaymail.http_api import SCHEMAS
from relaymail.models import Message, utcnow

from conftest import free_port

API_TOKEN = secrets.token_hex(16)
LINK_SECRET = secrets.token_hex(16)


class HttpEnv:
    """A RelayEnv with the HTTP server on, and a client for it."""

    def __init__(self, relay_env: RelayEnv, port: int, client: aiohttp.ClientSession):
        self.relay_env = relay_env
        self.port = port
        self.client = client
        self.base = f"http://127.0.0.1:{port}"

    @property
    def config(self):
        return self.relay_env.config

    @property
    def store(self):
        return self.relay_env.relay.store

    async def api(self, method: str, path: str, *, token: str | None = API_TOKEN, **kwargs) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.client.request(method, f"{self.base}/api/v1{path}", headers=headers, **kwargs) as response:
            return response.status, await response.json()

    async def page(self, method: str, url: str, **kwargs) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.client.request(method, url, **kwargs) as response:
            return response.status, await response.text(), response


@pytest.fixture
async def http_env(tmp_path: Path):
    port = free_port()
    extra = (
        f'[http]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}/"\n'
        f'api_token = "{API_TOKEN}"\nlink_secret = "{LINK_SECRET}"\n'
    )
    relay_env = await RelayEnv(tmp_path, extra=extra).start()
    client = aiohttp.ClientSession()
    try:
        yield HttpEnv(relay_env, relay_env.relay.http.port, client)
    finally:
        await client.close()
        await relay_env.stop()


def buyer_message(subject: str = "Pregunta", body: str = "Hola, ¿cuándo llega?") -> bytes:
    return (
        f"From: Juan <{BUYER}>\r\nTo: {SELLER_ALIAS}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <{secrets.token_hex(4)}@client.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


async def send_buyer_message(env: HttpEnv, subject: str = "Pregunta") -> str:
    """Send a buyer message through SMTP, wait for its delivery; return its queue id."""
    data = buyer_message(subject)
    outcome = await env.relay_env.send(BUYER, [SELLER_ALIAS], data)
    assert outcome.code == 250, outcome.text
    await env.relay_env.wait_idle()
    return outcome.text.rsplit(" ", 1)[-1]


async def stored(env: HttpEnv, queue_id: str) -> Message:
    async with env.store.session() as session:
        return await session.scalar(select(Message).where(Message.queue_id == queue_id))


# --- health, metrics, server ---------------------------------------------------


async def test_healthz_ok(http_env: HttpEnv):
    async with http_env.client.get(f"{http_env.base}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok", "database": "ok"}


async def test_metrics_after_delivery(http_env: HttpEnv):
    await send_buyer_message(http_env)

    async with http_env.client.get(f"{http_env.base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()

    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) relaymail_\w+ .+", line), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples['relaymail_messages{direction="buyer_to_seller",status="delivered",rule="default"}'] == 1
    assert samples['relaymail_queue_deliveries{state="queued"}'] == 0
    assert samples["relaymail_queue_due_deliveries"] == 0
    assert samples["relaymail_delivery_latency_seconds_count"] == 1
    assert samples['relaymail_delivery_latency_seconds_bucket{le="+Inf"}'] == 1
    assert samples["relaymail_metrics_scrape_errors_total"] == 0


def test_latency_histogram_buckets_cumulative():
    histogram = LatencyHistogram(utcnow(), buckets_s=(1, 10))
    for seconds in (0.5, 1, 5, 50):
        histogram.observe(seconds)

    lines = histogram.lines("x")

    assert 'x_bucket{le="1"} 2' in lines
    assert 'x_bucket{le="10"} 3' in lines
    assert 'x_bucket{le="+Inf"} 4' in lines
    assert "x_sum 56.5" in lines
    assert "x_count 4" in lines


async def test_disabled_server_listens_nowhere(http_env: HttpEnv):
    config = dataclasses.replace(http_env.config, http=dataclasses.replace(http_env.config.http, enabled=False))

    server = await start_http(config, http_env.store)

    assert server.runner is None
    await server.stop()


async def test_api_off_without_token_config(http_env: HttpEnv):
    port = free_port()
    config = dataclasses.replace(
        http_env.config, http=dataclasses.replace(http_env.config.http, api_token="", listen=f"127.0.0.1:{port}")
    )
    server = await start_http(config, http_env.store)
    try:
        async with http_env.client.get(f"http://127.0.0.1:{port}/api/v1/messages", headers={"Authorization": "Bearer x"}) as response:
            assert response.status == 503
            assert (await response.json())["error"].startswith("api_token not configured")
        async with http_env.client.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        async with http_env.client.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
    finally:
        await server.stop()


async def test_port_in_use_logged(http_env: HttpEnv, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.ERROR, logger="relaymail.http")

    server = await start_http(http_env.config, http_env.store)

    assert server.runner is None
    assert "event=http_failed" in caplog.text
    await server.stop()


# --- authentication and errors ---------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", f"Basic {API_TOKEN}", "Bearer"])
async def test_api_requires_token(http_env: HttpEnv, header):
    headers = {"Authorization": header} if header is not None else {}

    async with http_env.client.get(f"{http_env.base}/api/v1/sellers/S1", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="relaymail"'
        body = await response.json()
    assert body["error"].startswith("missing or invalid bearer token")
    assert body["field"] is None


async def test_unknown_route_json_404(http_env: HttpEnv):
    status, body = await http_env.api("GET", "/nothing-here")

    assert status == 404
    assert body == {"error": "Not Found", "field": None}


async def test_wrong_method_json_405(http_env: HttpEnv):
    status, body = await http_env.api("DELETE", "/sellers/S1")

    assert status == 405
    assert body["error"] == "Method Not Allowed"


# --- sellers, buyers, pairs, orders ------------------------------------------------


async def test_seller_create_then_update(http_env: HttpEnv):
    body = {"business_name": "Café Ñu", "support_email": "Ayuda@Cafe.example", "senders": ["ventas@cafe.example"], "locale": "en"}

    created = await http_env.api("PUT", "/sellers/S7", json=body)
    updated = await http_env.api("PUT", "/sellers/S7", json={**body, "block_notice": False})
    fetched = await http_env.api("GET", "/sellers/S7")

    assert created[0] == 201
    assert created[1]["created"] is True
    assert created[1]["support_email"] == "ayuda@cafe.example"
    assert updated[0] == 200
    assert updated[1]["block_notice"] is False
    assert fetched == (200, {**{k: v for k, v in updated[1].items() if k != "created"}})


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"support_email": "a@b.example"}, "business_name", "business_name is missing"),
        ({"business_name": "X", "support_email": "not-an-address"}, "support_email", "invalid support email"),
        ({"business_name": "X", "support_email": f"x@{DOMAIN}"}, "support_email", "outside the marketplace domain"),
        ({"business_name": "A\r\nBcc: x", "support_email": "a@b.example"}, "business_name", "U+000D"),
        ({"business_name": "X", "support_email": "a@b.example", "senders": "a@b.example"}, "senders", "expected a list of strings"),
        ({"business_name": "X", "support_email": "a@b.example", "senders": ["bad"]}, "senders", "invalid sender address"),
        ({"business_name": "X", "support_email": "a@b.example", "locale": "Spanish"}, "locale", "invalid locale"),
        ({"business_name": "X", "support_email": "a@b.example", "block_notice": "no"}, "block_notice", "expected true or false"),
        ({"business_name": "X", "support_email": "a@b.example", "colour": "red"}, "colour", "unknown field 'colour'"),
    ],
)
async def test_seller_invalid_input(http_env: HttpEnv, body, field, fragment):
    status, error = await http_env.api("PUT", "/sellers/S8", json=body)

    assert status == 400
    assert error["field"] == field
    assert fragment in error["error"]


async def test_bad_json_and_bad_path_id(http_env: HttpEnv):
    async with http_env.client.put(
        f"{http_env.base}/api/v1/sellers/S8", data=b"{nope", headers={"Authorization": f"Bearer {API_TOKEN}"}
    ) as response:
        not_json = (response.status, await response.json())
    array = await http_env.api("PUT", "/sellers/S8", json=["x"])
    long_id = await http_env.api("GET", "/sellers/" + "x" * 65)

    assert not_json[0] == 400
    assert not_json[1]["error"].startswith("request body is not valid JSON")
    assert array[0] == 400
    assert array[1]["error"] == "request body is a JSON list: expected an object"
    assert long_id[0] == 400
    assert long_id[1]["field"] == "seller_id"


async def test_sender_approve_and_block(http_env: HttpEnv):
    approved = await http_env.api("PUT", "/sellers/S1/senders/Nuevo@Example.com", json={"state": "approved"})
    blocked = await http_env.api("PUT", f"/sellers/S1/senders/{SELLER}", json={"state": "blocked"})
    invalid = await http_env.api("PUT", "/sellers/S1/senders/x@example.com", json={"state": "maybe"})
    unknown = await http_env.api("PUT", "/sellers/S9/senders/x@example.com", json={"state": "approved"})

    assert approved[0] == 201
    assert approved[1] == {"seller_id": "S1", "address": "nuevo@example.com", "state": "approved", "created": True}
    assert blocked[0] == 200
    assert blocked[1]["state"] == "blocked"
    assert invalid[0] == 400
    assert invalid[1]["field"] == "state"
    assert unknown == (404, {"error": "seller 'S9' not found", "field": None})


async def test_buyer_create_and_opt_out(http_env: HttpEnv):
    created = await http_env.api("PUT", "/buyers/B7", json={"email": "eva@mail.example", "name": "Eva"})
    opted = await http_env.api("PUT", "/buyers/B7/opt-out", json={"opted_out": True})
    missing = await http_env.api("PUT", "/buyers/B7/opt-out", json={})
    fetched = await http_env.api("GET", "/buyers/B7")
    unknown = await http_env.api("GET", "/buyers/B404")

    assert created[0] == 201
    assert opted[1]["opted_out"] is True
    assert missing[0] == 400
    assert missing[1]["field"] == "opted_out"
    assert fetched[1]["opted_out"] is True
    assert unknown[0] == 404


async def test_pair_get_creates_once(http_env: HttpEnv):
    await http_env.api("PUT", "/buyers/B7", json={"email": "eva@mail.example"})

    first = await http_env.api("GET", "/pairs/B7/S1")
    second = await http_env.api("GET", "/pairs/B7/S1")

    assert first[0] == 201
    assert first[1]["created"] is True
    assert re.fullmatch(rf"[a-z0-9]{{15}}@{re.escape(DOMAIN)}", first[1]["buyer_alias"])
    assert second[0] == 200
    assert second[1] == {**first[1], "created": False}


async def test_pair_import_conflict(http_env: HttpEnv):
    same = await http_env.api("PUT", "/pairs/B1/S1", json={"buyer_alias": BUYER_ALIAS, "seller_alias": SELLER_ALIAS})
    other = await http_env.api("PUT", "/pairs/B1/S1", json={"buyer_alias": "a" * 15, "seller_alias": SELLER_ALIAS})
    malformed = await http_env.api("PUT", "/pairs/B1/S1", json={"buyer_alias": "short", "seller_alias": SELLER_ALIAS})

    assert same[0] == 200
    assert other[0] == 409
    assert "aliases never change" in other[1]["error"]
    assert malformed[0] == 400
    assert malformed[1]["field"] == "buyer_alias"


async def test_orders_and_alias_lookup(http_env: HttpEnv):
    created = await http_env.api(
        "PUT", "/orders/O-9", json={"buyer_id": "B1", "seller_id": "S1", "status": "Pending", "placed_at": "2024-03-01T10:00:00-06:00"}
    )
    fetched = await http_env.api("GET", "/orders/O-9")
    bad_status = await http_env.api("PUT", "/orders/O-9", json={"buyer_id": "B1", "seller_id": "S1", "status": "lost"})
    bad_date = await http_env.api("PUT", "/orders/O-9", json={"buyer_id": "B1", "seller_id": "S1", "status": "shipped", "placed_at": "ayer"})
    by_alias = await http_env.api("GET", f"/aliases/{BUYER_ALIAS}/orders")

    assert created[0] == 201
    assert created[1]["placed_at"] == "2024-03-01T16:00:00+00:00"
    assert fetched[1]["status"] == "pending"
    assert bad_status[1]["field"] == "status"
    assert bad_date[1]["field"] == "placed_at"
    assert by_alias[0] == 200
    assert [order["id"] for order in by_alias[1]["orders"]] == ["402-7781", "O-9"]
    assert by_alias[1]["alias_role"] == "buyer_alias"


# --- messages and seller actions ---------------------------------------------------


async def test_messages_list_detail_and_actions(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env, subject="¿Tiene talla M?")
    message = await stored(http_env, queue_id)

    waiting = await http_env.api("GET", "/messages", params={"seller": "S1", "filter": "needs-response"})
    detail = await http_env.api("GET", f"/messages/{queue_id.lower()}")
    marked = await http_env.api("POST", f"/messages/{queue_id}/no-response-needed")
    after = await http_env.api("GET", "/messages", params={"seller": "S1", "filter": "needs-response"})

    assert waiting[0] == 200
    assert [m["queue_id"] for m in waiting[1]["messages"]] == [queue_id]
    assert waiting[1]["messages"][0]["subject"] == "¿Tiene talla M?"
    assert detail[0] == 200
    assert base64.b64decode(detail[1]["raw_base64"]) == message.raw
    assert base64.b64decode(detail[1]["delivered_raw_base64"]) == message.delivered_raw
    assert detail[1]["deliveries"][0]["attempts"][0]["result"] == "sent"
    assert marked[0] == 200
    assert marked[1]["changed"] is True
    assert after[1]["count"] == 0


async def test_report_via_api(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env)

    invalid = await http_env.api("POST", f"/messages/{queue_id}/report", json={"reason": "rude"})
    missing = await http_env.api("POST", f"/messages/{queue_id}/report", json={})
    reported = await http_env.api("POST", f"/messages/{queue_id}/report", json={"reason": "spam", "note": "publicidad"})

    assert invalid[0] == 400
    assert invalid[1]["field"] == "reason"
    assert missing[1]["field"] == "reason"
    assert reported[0] == 200
    assert reported[1]["report_reason"] == "spam"
    assert (await stored(http_env, queue_id)).report_note == "publicidad"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"filter": "unread"}, "filter"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"since": "yesterday"}, "since"),
        ({"alias": "nobody@example.org"}, "alias"),
        ({"pair": "x"}, "pair"),
        ({"sort": "date"}, "sort"),
    ],
)
async def test_messages_invalid_query(http_env: HttpEnv, params, field):
    status, error = await http_env.api("GET", "/messages", params=params)

    assert status == 400
    assert error["field"] == field


async def test_message_errors(http_env: HttpEnv):
    bad_id = await http_env.api("GET", "/messages/xyz")
    unknown = await http_env.api("GET", "/messages/000000000000")
    not_found_action = await http_env.api("POST", "/messages/000000000000/no-response-needed")

    assert bad_id[0] == 400
    assert bad_id[1]["field"] == "queue_id"
    assert unknown == (404, {"error": "message 000000000000 not found", "field": None})
    assert not_found_action[0] == 404


async def test_action_on_seller_message_conflict(http_env: HttpEnv):
    data = (
        f"From: <{SELLER}>\r\nTo: {BUYER_ALIAS}\r\nSubject: Re: Pregunta\r\n"
        f"In-Reply-To: <mkt.20240311.b7c1e0@{DOMAIN}>\r\nMessage-ID: <s1@mail.example.com>\r\n\r\nSí.\r\n"
    ).encode()
    outcome = await http_env.relay_env.send(SELLER, [BUYER_ALIAS], data)
    queue_id = outcome.text.rsplit(" ", 1)[-1]

    status, error = await http_env.api("POST", f"/messages/{queue_id}/no-response-needed")

    assert status == 409
    assert "only a buyer's message to a seller" in error["error"]


async def test_response_time_endpoint(http_env: HttpEnv):
    await send_buyer_message(http_env)

    every = await http_env.api("GET", "/sellers/S1/response-time")
    one = await http_env.api("GET", "/sellers/S1/response-time", params={"days": "7"})
    invalid = await http_env.api("GET", "/sellers/S1/response-time", params={"days": "8"})
    unknown = await http_env.api("GET", "/sellers/S9/response-time")

    assert every[0] == 200
    assert [w["days"] for w in every[1]["windows"]] == [7, 30, 90]
    assert one[1]["windows"][0]["messages"] == 1
    assert one[1]["windows"][0]["pending"] == 1
    assert invalid[0] == 400
    assert invalid[1]["field"] == "days"
    assert unknown[0] == 404


# --- OpenAPI ---------------------------------------------------------------------


async def test_openapi_lists_every_route(http_env: HttpEnv):
    async with http_env.client.get(f"{http_env.base}/api/v1/openapi.json") as response:
        assert response.status == 200
        document = json.loads(await response.text())

    app = http_env.relay_env.relay.http.runner.app
    served = {(route.method.lower(), route.resource.canonical) for route in app.router.routes()}
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert document["openapi"] == "3.1.0"
    assert documented == served
    assert len(served) >= 20


async def test_openapi_refs_resolve(http_env: HttpEnv):
    async with http_env.client.get(f"{http_env.base}/api/v1/openapi.json") as response:
        text = await response.text()

    refs = set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', text))
    document = json.loads(text)
    assert refs
    assert refs <= set(document["components"]["schemas"])
    assert set(document["components"]["schemas"]) == set(SCHEMAS)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            names = re.findall(r"\{(\w+)\}", path)
            declared = [p["name"] for p in operation["parameters"] if p["in"] == "path"]
            assert declared == names, (method, path)
            assert operation["responses"], (method, path)


# --- one-click links -------------------------------------------------------------


def test_token_round_trip_and_tampering():
    now = time.time()
    token = links.make_token(LINK_SECRET, links.REPORT, "3f2a9c01b7de", int(now) + 60)
    queue_id, expires, signature = token.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")

    assert links.verify_token(LINK_SECRET, links.REPORT, token, now).queue_id == "3F2A9C01B7DE"
    for action, altered in [
        (links.NO_RESPONSE_NEEDED, token),
        (links.REPORT, f"{queue_id}.{int(expires) + 3600}.{signature}"),
        (links.REPORT, f"3F2A9C01B7DF.{expires}.{signature}"),
        (links.REPORT, f"{queue_id}.{expires}.{flipped}"),
        (links.REPORT, token + "x"),
    ]:
        with pytest.raises(links.LinkError, match="not valid") as caught:
            links.verify_token(LINK_SECRET, action, altered, now)
        assert caught.value.expired is False
    with pytest.raises(links.LinkError, match="not valid"):
        links.verify_token("another-secret-0123456789", links.REPORT, token, now)
    with pytest.raises(links.LinkError, match="expired") as caught:
        links.verify_token(LINK_SECRET, links.REPORT, token, now + 61)
    assert caught.value.queue_id == "3F2A9C01B7DE"


def test_seller_links_off_without_secret():
    config = config_module.from_dict(
        {"relay": {"domain": DOMAIN, "hostname": f"mx.{DOMAIN}", "bounce_secret": "x" * 16}}, base_dir=Path(".")
    )

    assert links.seller_links(config, "3F2A9C01B7DE", "es-MX") == []


async def test_seller_links_labels_and_urls(http_env: HttpEnv):
    spanish = links.seller_links(http_env.config, "3F2A9C01B7DE", "es-MX")
    english = links.seller_links(http_env.config, "3F2A9C01B7DE", "en")

    assert [label for label, _ in spanish] == ["No requiere respuesta", "Reportar este mensaje"]
    assert [label for label, _ in english] == ["No response needed", "Report this message"]
    assert spanish[0][1].startswith(f"{http_env.base}/links/no-response-needed/3F2A9C01B7DE.")
    assert spanish[1][1].startswith(f"{http_env.base}/links/report/3F2A9C01B7DE.")


async def test_link_get_shows_form_and_changes_nothing(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env, subject=f"Escríbame a {BUYER}")
    url = dict((a, u) for a, u in zip(links.ACTIONS, (u for _, u in links.seller_links(http_env.config, queue_id, "es-MX"))))

    status, text, response = await http_env.page("GET", url[links.NO_RESPONSE_NEEDED])

    assert status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert '<html lang="es-MX">' in text
    assert "No requiere respuesta" in text
    assert '<form method="post">' in text
    assert f"Escríbame a {BUYER_ALIAS}" in text
    assert BUYER not in text
    assert (await stored(http_env, queue_id)).no_response_needed_at is None


async def test_link_post_marks_message(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env)
    url = links.link_url(http_env.config, links.NO_RESPONSE_NEEDED, queue_id)

    status, text, _ = await http_env.page("POST", url)
    again, again_text, _ = await http_env.page("GET", url)

    assert status == 200
    assert "Listo: el mensaje quedó marcado como que no requiere respuesta." in text
    assert (await stored(http_env, queue_id)).no_response_needed_at is not None
    assert again == 200
    assert "ya se había marcado" in again_text


async def test_link_report_with_reason(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env)
    url = links.link_url(http_env.config, links.REPORT, queue_id)

    form_status, form_text, _ = await http_env.page("GET", url)
    bad, bad_text, _ = await http_env.page("POST", url, data={"reason": "rude"})
    status, text, _ = await http_env.page("POST", url, data={"reason": "abuse", "note": "Me insultó"})

    assert form_status == 200
    assert '<select id="reason" name="reason" required>' in form_text
    assert bad == 400
    assert "Elija un motivo" in bad_text
    assert status == 200
    assert "Listo: el mensaje se reportó." in text
    message = await stored(http_env, queue_id)
    assert (message.report_reason, message.report_note) == ("abuse", "Me insultó")


async def test_link_page_in_english_for_english_seller(http_env: HttpEnv):
    await http_env.api("PUT", "/sellers/S1", json={"business_name": "Shop", "support_email": SELLER, "locale": "en"})
    queue_id = await send_buyer_message(http_env)

    status, text, _ = await http_env.page("GET", links.link_url(http_env.config, links.REPORT, queue_id))

    assert status == 200
    assert '<html lang="en">' in text
    assert "Report this message" in text
    assert "Spam" in text
    assert "Abuse" in text


async def test_link_expired_or_altered(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env)
    expired = links.link_url(http_env.config, links.NO_RESPONSE_NEEDED, queue_id, now=time.time() - http_env.config.http.link_ttl_s - 1)
    valid = links.link_url(http_env.config, links.NO_RESPONSE_NEEDED, queue_id)
    altered = valid[:-2] + ("AA" if not valid.endswith("AA") else "BB")
    wrong_action = valid.replace("/no-response-needed/", "/report/")
    unknown_action = valid.replace("/no-response-needed/", "/delete/")

    for method in ("GET", "POST"):
        status, text, _ = await http_env.page(method, expired)
        assert status == 410
        assert "Este enlace ya venció." in text
        for url in (altered, wrong_action, unknown_action):
            status, text, _ = await http_env.page(method, url)
            assert status == 403, url
            assert "Este enlace no es válido." in text
    assert (await stored(http_env, queue_id)).no_response_needed_at is None


async def test_link_message_purged_404(http_env: HttpEnv):
    url = links.link_url(http_env.config, links.REPORT, "0123456789AB")

    status, text, _ = await http_env.page("GET", url)

    assert status == 404
    assert "ya no se conserva" in text


# --- configuration ---------------------------------------------------------------


def load_config(**sections) -> config_module.Config:
    data = {"relay": {"domain": DOMAIN, "hostname": f"mx.{DOMAIN}", "bounce_secret": "x" * 16}, **sections}
    return config_module.from_dict(data, base_dir=Path("."))


def test_http_config_defaults():
    config = load_config()

    assert config.http.enabled is True
    assert config.http.listen == "127.0.0.1:8025"
    assert config.http.public_url == "http://127.0.0.1:8025"
    assert config.http.api_token == ""
    assert config.http.link_secret == ""
    assert config.http.link_ttl_s == 30 * 86400
    assert config.archive.retention_days == 730


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"http": {"listen": "8025"}}, "http.listen = '8025': expected \"host:port\""),
        ({"http": {"listen": "127.0.0.1:70000"}}, "http.listen"),
        ({"http": {"public_url": "relay.example"}}, "http.public_url = 'relay.example'"),
        ({"http": {"public_url": "ftp://relay.example"}}, "http.public_url"),
        ({"http": {"public_url": "https://relay.example/?a=1"}}, "no query or fragment"),
        ({"http": {"public_url": "https://réle.example"}}, "ASCII"),
        ({"http": {"public_url": 'https://relay.example/"x'}}, "http.public_url"),
        ({"http": {"api_token": "short"}}, "http.api_token: expected empty (off) or a random string of at least 16"),
        ({"http": {"link_secret": "short"}}, "http.link_secret"),
        ({"http": {"link_ttl_s": 10}}, "http.link_ttl_s = 10: expected at least 60 seconds"),
        ({"http": {"enabled": "yes"}}, "http.enabled = 'yes': expected a boolean"),
        ({"http": {"port": 1}}, "http.port: unknown key"),
        ({"archive": {"retention_days": 0}}, "archive.retention_days = 0: expected at least 1"),
    ],
)
def test_http_config_invalid(section, fragment):
    with pytest.raises(config_module.ConfigError) as caught:
        load_config(**section)

    assert fragment in str(caught.value)


def test_http_config_port_zero_allowed():
    assert load_config(http={"listen": "127.0.0.1:0"}).http.listen == "127.0.0.1:0"


async def test_delivered_message_links_work(http_env: HttpEnv):
    queue_id = await send_buyer_message(http_env, subject="Talla del pedido")
    delivered = http_env.relay_env.sink.messages[-1].data
    parsed = email.message_from_bytes(delivered, policy=email.policy.default)
    plain = parsed.get_body(("plain",)).get_content()
    urls = re.findall(r"http://127\.0\.0\.1:\d+/links/[a-z-]+/\S+", plain)
    no_response_url = next(u for u in urls if "/no-response-needed/" in u)

    status, page, _ = await http_env.page("GET", no_response_url)
    before = await stored(http_env, queue_id)
    post_status, _, _ = await http_env.page("POST", no_response_url)
    after = await stored(http_env, queue_id)

    assert len(urls) == 2
    assert any("/report/" in u for u in urls)
    assert status == 200
    assert "<form" in page
    assert before.no_response_needed_at is None
    assert post_status == 200
    assert after.no_response_needed_at is not None
