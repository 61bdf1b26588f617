"""DSNs (RFC 3464) to the original sender when a delivery fails for good: relaymail.dsn and the queue.

The end-to-end tests run the relay on 127.0.0.1 with an aiosmtpd sink behind it
(tests/relayenv.py), on SQLite and, when RELAYMAIL_TEST_POSTGRES_URL is set, on
PostgreSQL. The sink rejects the forwarded message and accepts the DSN, which
goes through the same smarthost.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from relayenv import BUSINESS, BUYER, BUYER_ALIAS, SELLER, SELLER_ALIAS, RelayEnv
from sink import Received, SinkHandler
from sqlalchemy import select, update

from relaymail import dsn
from relaymail.models import Buyer, Delivery, Message

NOW = datetime(2024, 3, 11, 16, 17, 5, tzinfo=timezone.utc)
DOMAIN = "marketplace.example"


# --- helpers ------------------------------------------------------------------------


class RejectingSink(SinkHandler):
    """Rejects DATA from a bounce address with `reply` and accepts the null sender (DSNs)."""

    def __init__(self, reply: str):
        super().__init__()
        self.rejection = reply
        self.rejected_count = 0

    async def handle_DATA(self, server, session, envelope):
        if envelope.mail_from not in ("", "<>") and self.rejection:
            self.rejected_count += 1
            return self.rejection
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 OK"


def simple_message(sender: str, to: str, subject: str = "Pregunta", body: str = "Hola.", extra_headers: str = "") -> bytes:
    return (
        f"From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <orig.{abs(hash(subject + body))}@client.test>\r\n"
        f"{extra_headers}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def status_fields(report: email.message.EmailMessage) -> dict[str, str]:
    """Return the per-recipient fields of a DSN's delivery-status part, lower-case names."""
    status_part = report.get_payload()[1]
    blocks = status_part.get_payload()
    return {name.lower(): " ".join(str(value).split()) for name, value in blocks[1].items()}


def human_text(report: email.message.EmailMessage) -> str:
    return " ".join(report.get_payload()[0].get_content().split())


def assert_absent(data: bytes, address: str) -> None:
    lowered = data.lower()
    assert address.lower().encode() not in lowered
    assert address.lower().replace("@", "%40").encode() not in lowered
    parsed = parse(data)
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            assert address.lower() not in part.get_content().lower()


@pytest.fixture
async def rejecting_env(tmp_path: Path, database_url: str):
    relay_env = RelayEnv(tmp_path, database_url=database_url)
    relay_env.sink.handler = RejectingSink("550 5.1.1 <juan.perez@example.net>: no such user here")
    await relay_env.start()
    try:
        yield relay_env
    finally:
        await relay_env.stop()


async def rows(env: RelayEnv, model, *where):
    async with env.relay.store.session() as session:
        return list(await session.scalars(select(model).where(*where).order_by(model.id)))


def build(**overrides) -> bytes:
    values = dict(
        locale="es-MX",
        sender_role="seller",
        notice_from=f"avisos@{DOMAIN}",
        to_address=SELLER,
        domain=DOMAIN,
        hostname=f"mx.{DOMAIN}",
        message_id=f"dsn.1@{DOMAIN}",
        final_recipient=BUYER_ALIAS,
        other_party_name="",
        original_subject="Su pedido",
        original_date="Mon, 11 Mar 2024 10:00:00 -0600",
        original_message_id="orig.1@mail.example.com",
        order_id="402-7781",
        failure=dsn.Failure("5.1.1", f"550 5.1.1 <{BUYER_ALIAS}>: no such user"),
        arrival_date=NOW,
        last_attempt_date=NOW,
        now=NOW,
        returned_headers=b"From: ventas@example.com\r\nSubject: Su pedido\r\n",
    )
    values.update(overrides)
    return dsn.build_dsn(dsn.DsnSpec(**values))


# --- building -------------------------------------------------------------------------


def test_dsn_structure():
    report = parse(build())
    parts = report.get_payload()

    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["To"] == SELLER
    assert report["In-Reply-To"] == "<orig.1@mail.example.com>"
    assert [part.get_content_type() for part in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    fields = status_fields(report)
    assert fields["final-recipient"] == f"rfc822; {BUYER_ALIAS}"
    assert fields["action"] == "failed"
    assert fields["status"] == "5.1.1"
    assert fields["diagnostic-code"].startswith("smtp; 550 5.1.1")
    assert "remote-mta" not in fields


def test_dsn_wire_format():
    data = build(original_subject="Ñandú " * 40, failure=dsn.Failure("5.1.1", "x" * 3000))

    assert data.count(b"\n") == data.count(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.split(b"\r\n\r\n", 1)[0].isascii()


def test_dsn_seller_in_spanish():
    text = human_text(parse(build()))

    assert f"Su mensaje para el comprador {BUYER_ALIAS} no se pudo entregar." in text
    assert "La dirección de correo electrónico del destinatario no existe" in text
    assert "Pedido: 402-7781" in text
    assert parse(build())["Subject"] == "Mensaje no entregado: Su pedido"


def test_dsn_buyer_in_english():
    report = parse(build(
        locale="en",
        sender_role="buyer",
        to_address=BUYER,
        final_recipient=SELLER_ALIAS,
        other_party_name=BUSINESS,
        failure=dsn.Failure("5.2.2", "552 5.2.2 mailbox full"),
    ))
    text = human_text(report)

    assert f"Your message to the seller {BUSINESS} <{SELLER_ALIAS}> could not be delivered." in text
    assert "The recipient's mailbox is full." in text
    assert "You can send the message again later." in text
    assert status_fields(report)["final-recipient"] == f"rfc822; {SELLER_ALIAS}"
    assert report.get_payload()[0]["Content-Language"] == "en"


def test_dsn_expiry_reason():
    text = human_text(parse(build(locale="en", failure=dsn.Failure("4.4.7", "", "X-Relaymail", hard=False))))

    assert "in the time allowed, so delivery was stopped" in text
    assert "Error reported" not in text


def test_dsn_rejects_header_injection():
    with pytest.raises(ValueError):
        build(to_address="ventas@example.com\r\nBcc: x@example.org")


# --- status and scrubbing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, text, hard, expired, status, reason",
    [
        (550, "mx.example replied 550 5.1.1 no such user", True, False, "5.1.1", dsn.REASON_ADDRESS),
        (550, "mx.example replied 550 mailbox unavailable", True, False, "5.0.0", dsn.REASON_REJECTED),
        (552, "mx.example replied 552 5.3.4 too big", True, False, "5.3.4", dsn.REASON_TOO_LARGE),
        (554, "mx.example replied 554 5.7.1 spam", True, False, "5.7.1", dsn.REASON_REJECTED),
        (451, "mx.example replied 451 4.3.0 busy to RCPT TO", False, True, "4.3.0", dsn.REASON_EXPIRED),
        (None, "connection to mx.example failed: refused", False, True, "4.4.7", dsn.REASON_EXPIRED),
        (None, "domain example.net does not exist (NXDOMAIN)", True, False, "5.1.2", dsn.REASON_ADDRESS),
        (None, "domain example.net accepts no mail (null MX, RFC 7505)", True, False, "5.1.10", dsn.REASON_ADDRESS),
    ],
)
def test_failure_status(code, text, hard, expired, status, reason):
    failure = dsn.failure_of(code, text, "mx.example", hard=hard, expired=expired)

    assert failure.status == status
    assert failure.hard is hard
    assert not failure.diagnostic.startswith("mx.example said")
    assert dsn.reason_of(failure.status, failure.hard)[0] == reason


def test_scrub_replaces_real_address_and_hides_hosts():
    text = (
        "host mx1.example.net[192.0.2.7] said: 550 5.1.1 <Juan.Perez@Example.NET>... User unknown; "
        'unknown user: "juan.perez"; juan.perez%40example.net; postmaster@example.net; '
        "2001:db8::25 at 10:15:00 https://support.example.com/?p=NoSuchUser"
    )

    scrubbed = dsn.scrub(text, [BUYER], BUYER_ALIAS, DOMAIN)

    assert "juan" not in scrubbed.lower()
    assert "example.net" not in scrubbed
    assert "192.0.2.7" not in scrubbed
    assert "2001:db8::25" not in scrubbed
    assert "support.example.com" not in scrubbed
    assert scrubbed.count(BUYER_ALIAS) == 3
    assert "10:15:00" in scrubbed
    assert "550 5.1.1" in scrubbed


def test_should_send_dsn_rules():
    base = dict(direction="seller_to_buyer", envelope_sender=SELLER, automatic=False, raw=b"From: a@b.example\r\n\r\nx")

    assert dsn.should_send_dsn(Message(**base))
    assert not dsn.should_send_dsn(Message(**{**base, "envelope_sender": ""}))
    assert not dsn.should_send_dsn(Message(**{**base, "envelope_sender": "<>"}))
    assert not dsn.should_send_dsn(Message(**{**base, "automatic": True}))
    assert not dsn.should_send_dsn(Message(**{**base, "direction": "notice"}))
    assert not dsn.should_send_dsn(Message(**{**base, "direction": "to_operators"}))
    assert not dsn.should_send_dsn(Message(**{**base, "raw": b"Auto-Submitted: auto-replied\r\n\r\nx"}))
    assert dsn.should_send_dsn(Message(**{**base, "raw": b"Auto-Submitted: no\r\n\r\nx"}))


# --- end to end ------------------------------------------------------------------------------


async def test_hard_failure_sends_dsn_to_seller(rejecting_env: RelayEnv):
    env = rejecting_env

    outcome = await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS, subject="Su pedido", body="Hola Juan."))
    received = await env.sink.wait_for(1, timeout_s=15)
    await env.wait_idle()

    assert outcome.code == 250
    assert len(received) == 1
    notice = received[0]
    assert notice.mail_from in ("", "<>")
    assert notice.rcpt_tos == [SELLER]
    report = parse(notice.data)
    assert report.get_content_type() == "multipart/report"
    assert report["Auto-Submitted"] == "auto-replied"
    fields = status_fields(report)
    assert fields["final-recipient"] == f"rfc822; {BUYER_ALIAS}"
    assert fields["status"] == "5.1.1"
    assert BUYER_ALIAS in fields["diagnostic-code"]
    assert "Su mensaje para el comprador" in human_text(report)
    assert_absent(notice.data, BUYER)
    assert b"127.0.0.1" not in notice.data


async def test_dsn_recorded_as_notice_child(rejecting_env: RelayEnv):
    env = rejecting_env

    await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS))
    await env.sink.wait_for(1, timeout_s=15)
    await env.wait_idle()
    messages = await rows(env, Message)

    assert [m.direction for m in messages] == ["seller_to_buyer", "notice"]
    original, notice = messages
    assert original.status == "bounced"
    assert notice.parent_id == original.id
    assert notice.rule == dsn.DSN_RULE
    assert notice.envelope_sender == ""
    deliveries = await rows(env, Delivery, Delivery.message_id == notice.id)
    assert [(d.recipient, d.envelope_sender, d.state) for d in deliveries] == [(SELLER, "", "sent")]


async def test_hard_failure_sends_dsn_to_buyer_in_locale(rejecting_env: RelayEnv):
    env = rejecting_env
    env.sink.handler.rejection = f"550 5.1.1 <{SELLER}>: mailbox unknown"
    async with env.relay.store.writing() as session:
        await session.execute(update(Buyer).where(Buyer.id == "B1").values(locale="en"))
        await session.commit()

    await env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS, subject="Talla", body="¿Tienen talla M?"))
    received = await env.sink.wait_for(1, timeout_s=15)

    assert len(received) == 1
    assert received[0].rcpt_tos == [BUYER]
    report = parse(received[0].data)
    assert status_fields(report)["final-recipient"] == f"rfc822; {SELLER_ALIAS}"
    assert f"Your message to the seller {BUSINESS} <{SELLER_ALIAS}>" in human_text(report)
    assert report["Subject"] == "Message not delivered: Talla"
    assert_absent(received[0].data, SELLER)


async def test_queue_lifetime_expiry_sends_dsn(tmp_path: Path):
    env = RelayEnv(tmp_path, extra="max_queue_lifetime_s = 2\n")
    env.sink.handler = RejectingSink("451 4.3.0 try again later")
    await env.start()
    try:
        await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS, subject="Lento"))
        received = await env.sink.wait_for(1, timeout_s=20)
        await env.wait_idle()
        deliveries = await rows(env, Delivery)
    finally:
        await env.stop()

    assert len(received) == 1
    assert env.sink.handler.rejected_count >= 2
    report = parse(received[0].data)
    assert status_fields(report)["status"].startswith("4.")
    assert status_fields(report)["action"] == "failed"
    assert "No fue posible comunicarse" in human_text(report)
    assert deliveries[0].state == "bounced"
    assert "lifetime" in deliveries[0].last_error


@pytest.mark.parametrize(
    "envelope_sender, extra_headers",
    [
        ("", ""),
        (SELLER, "Auto-Submitted: auto-generated\r\n"),
        (SELLER, "Precedence: bulk\r\n"),
    ],
    ids=["null-sender", "auto-submitted", "bulk"],
)
async def test_no_dsn_for_automatic_messages(rejecting_env: RelayEnv, envelope_sender: str, extra_headers: str):
    env = rejecting_env

    outcome = await env.send(envelope_sender, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS, extra_headers=extra_headers))
    await env.wait_idle()
    await asyncio.sleep(0.5)

    if outcome.code != 250:
        pytest.skip(f"the relay did not accept this automatic message ({outcome.code} {outcome.text})")
    messages = await rows(env, Message)
    assert [m.direction for m in messages] == ["seller_to_buyer"]
    assert messages[0].status == "bounced"
    assert env.sink.messages == []


async def test_failing_dsn_gets_no_dsn(tmp_path: Path):
    env = RelayEnv(tmp_path)
    env.sink.handler.reply = "550 5.1.1 nobody here"
    await env.start()
    try:
        await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS))
        await env.wait_idle()
        await asyncio.sleep(0.5)
        await env.wait_idle()
        messages = await rows(env, Message)
        deliveries = await rows(env, Delivery)
    finally:
        await env.stop()

    assert [m.direction for m in messages] == ["seller_to_buyer", "notice"]
    assert [d.state for d in deliveries] == ["bounced", "bounced"]


async def test_one_dsn_per_message(rejecting_env: RelayEnv):
    env = rejecting_env
    await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS))
    await env.sink.wait_for(1, timeout_s=15)
    await env.wait_idle()
    delivery = (await rows(env, Delivery))[0]

    def again(session):
        return dsn.queue_dsn(session, env.config, session.get(Delivery, delivery.id), dsn.Failure("5.1.1", "again"), NOW + timedelta(minutes=1))

    second = await env.relay.store.run(again, write=True)

    assert second is None
