"""Seller-to-buyer rules over SMTP on 127.0.0.1: opt-out, critical tag, daily limit, notices."""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

import pytest
from relayenv import BUYER, BUYER_ALIAS, BUYER_MESSAGE_ID, SELLER, RelayEnv
from sqlalchemy import select

from relaymail.models import Message, utcnow


async def started(tmp_path: Path, opted_out: bool = True, block_notice: bool = True) -> RelayEnv:
    relay_env = RelayEnv(tmp_path)
    await relay_env.start(provision_cast=False)
    await relay_env.provision_cast(opted_out=opted_out, block_notice=block_notice)
    return relay_env


@pytest.fixture
async def opted_out(tmp_path: Path):
    relay_env = await started(tmp_path)
    try:
        yield relay_env
    finally:
        await relay_env.stop()


def seller_message(subject: str, body: str = "Hola Juan.", extra_headers: str = "", sender: str = SELLER) -> bytes:
    return (
        f"From: Ventas <{sender}>\r\nTo: {BUYER_ALIAS}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <{abs(hash(subject + body))}@mail.example.com>\r\n"
        f"{extra_headers}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}\r\n"
    ).encode()


async def archived(env: RelayEnv) -> list[Message]:
    return [m for m in await env.messages() if m.direction == "seller_to_buyer"]


async def test_unsolicited_blocked_with_spanish_notice(opted_out: RelayEnv):
    outcome = await opted_out.send(SELLER, [BUYER_ALIAS], seller_message("Nuevos productos de temporada"))
    received = await opted_out.sink.wait_for(1)

    assert outcome.code == 250
    messages = await archived(opted_out)
    assert [m.status for m in messages] == ["blocked"]
    assert messages[0].rule == "opt_out"
    assert len(received) == 1
    notice = received[0]
    assert notice.mail_from in ("", "<>")
    assert notice.rcpt_tos == [SELLER]
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied"
    human = parsed.get_body(("plain",)).get_content()
    assert "[Importante]" in human
    assert "bloque" in human.lower()
    assert BUYER_ALIAS in human
    status_part = next(p for p in parsed.walk() if p.get_content_type() == "message/delivery-status")
    status_text = status_part.as_string()
    assert "Action: failed" in status_text
    assert "Status: 5.7.1" in status_text
    assert f"rfc822; {BUYER_ALIAS}" in status_text
    assert BUYER.encode() not in notice.data.lower()


async def test_notices_off_means_no_notice(tmp_path: Path):
    relay_env = await started(tmp_path, block_notice=False)
    try:
        outcome = await relay_env.send(SELLER, [BUYER_ALIAS], seller_message("Oferta especial"))
        await relay_env.wait_idle()
        messages = await archived(relay_env)
    finally:
        await relay_env.stop()

    assert outcome.code == 250
    assert [m.status for m in messages] == ["blocked"]
    assert relay_env.sink.messages == []


async def test_thread_reply_reaches_opted_out_buyer(opted_out: RelayEnv):
    headers = f"In-Reply-To: <{BUYER_MESSAGE_ID}>\r\nReferences: <{BUYER_MESSAGE_ID}>\r\n"

    outcome = await opted_out.send(SELLER, [BUYER_ALIAS], seller_message("Re: Talla", extra_headers=headers))
    received = await opted_out.sink.wait_for(1)

    assert outcome.code == 250
    assert received[0].rcpt_tos == [BUYER]
    assert (await archived(opted_out))[0].rule == "thread_reply"


async def test_critical_tag_delivered_and_removed(opted_out: RelayEnv):
    data = seller_message("[IMPORTANTE] Programación de la entrega", "¿Qué día le conviene recibir su pedido 402-7781?")

    outcome = await opted_out.send(SELLER, [BUYER_ALIAS], data)
    received = await opted_out.sink.wait_for(1)
    parsed = email.message_from_bytes(received[0].data, policy=email.policy.default)

    assert outcome.code == 250
    assert received[0].rcpt_tos == [BUYER]
    assert parsed["Subject"] == "Programación de la entrega"
    assert "importante" not in parsed["Subject"].lower()


async def test_critical_tag_with_review_request_blocked(opted_out: RelayEnv):
    data = seller_message("[Importante] Su opinión", "¿Podría dejarnos una reseña de su compra?")

    outcome = await opted_out.send(SELLER, [BUYER_ALIAS], data)
    received = await opted_out.sink.wait_for(1)

    assert outcome.code == 250
    assert [m.status for m in await archived(opted_out)] == ["blocked"]
    assert received[0].rcpt_tos == [SELLER]
    assert received[0].mail_from in ("", "<>")


async def test_daily_limit_defers_601st(tmp_path: Path):
    relay_env = RelayEnv(tmp_path)
    await relay_env.start(provision_cast=False)
    try:
        await relay_env.provision_cast()
        async with relay_env.relay.store.session() as session:
            from relaymail.models import Order

            order = await session.get(Order, "402-7781")
            await session.delete(order)
            for index in range(600):
                session.add(Message(queue_id=f"F{index:011d}", direction="seller_to_buyer", seller_id="S1", status="delivered", raw=b"", received_at=utcnow()))
            await session.commit()

        outcome = await relay_env.send(SELLER, [BUYER_ALIAS], seller_message("Uno más"))
    finally:
        await relay_env.stop()

    assert outcome.code == 450
    assert outcome.text.startswith("4.7.1")
    assert "600" in outcome.text
    assert "America/Mexico_City" in outcome.text


async def test_blocked_messages_do_not_count(tmp_path: Path):
    relay_env = await started(tmp_path, opted_out=False)
    try:
        async with relay_env.relay.store.session() as session:
            for index in range(600):
                session.add(Message(queue_id=f"B{index:011d}", direction="seller_to_buyer", seller_id="S1", status="blocked", raw=b"", received_at=utcnow()))
            await session.commit()

        outcome = await relay_env.send(SELLER, [BUYER_ALIAS], seller_message("Hola"))
    finally:
        await relay_env.stop()

    assert outcome.code == 250


async def test_disallowed_attachment_rejected(opted_out: RelayEnv):
    program = base64.encodebytes(b"MZ\x90\x00" + b"\x00" * 200).decode().replace("\n", "\r\n")
    data = (
        f"From: Ventas <{SELLER}>\r\nTo: {BUYER_ALIAS}\r\nSubject: [Importante] Dirección de envío\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nConfirme su dirección, por favor.\r\n"
        "--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"guia.pdf\"\r\n\r\n"
        f"{program}\r\n--b1--\r\n"
    ).encode()

    outcome = await opted_out.send(SELLER, [BUYER_ALIAS], data)

    assert outcome.code == 554
    assert outcome.text.startswith("5.7.1")
    assert "guia.pdf" in outcome.text
    assert opted_out.sink.messages == []


async def test_buyer_message_marked_needs_response(tmp_path: Path):
    from relayenv import SELLER_ALIAS

    relay_env = await started(tmp_path, opted_out=False)
    try:
        data = f"From: {BUYER}\r\nTo: {SELLER_ALIAS}\r\nSubject: Duda\r\n\r\n¿Tienen talla M?\r\n".encode()
        auto = f"From: {BUYER}\r\nTo: {SELLER_ALIAS}\r\nSubject: Fuera de la oficina\r\nAuto-Submitted: auto-replied\r\n\r\nVuelvo el lunes.\r\n".encode()
        await relay_env.send(BUYER, [SELLER_ALIAS], data)
        await relay_env.send(BUYER, [SELLER_ALIAS], auto)
        async with relay_env.relay.store.session() as session:
            rows = list(await session.scalars(select(Message).where(Message.direction == "buyer_to_seller").order_by(Message.id)))
    finally:
        await relay_env.stop()

    assert [r.needs_response for r in rows] == [True, False]
    assert [r.automatic for r in rows] == [False, True]


async def test_content_redact_replaces_phone(tmp_path: Path):
    relay_env = RelayEnv(tmp_path, extra='\n[policy.content]\nphones = "redact"\nemails = "flag"\n')
    await relay_env.start()
    try:
        body = "Llámenos al +52 951 555 0142 o escriba a otra.tienda@example.org."
        outcome = await relay_env.send(SELLER, [BUYER_ALIAS], seller_message("[Importante] Dirección de envío", body))
        received = await relay_env.sink.wait_for(1)
        messages = await archived(relay_env)
    finally:
        await relay_env.stop()

    text = email.message_from_bytes(received[0].data, policy=email.policy.default).get_body(("plain",)).get_content()
    assert outcome.code == 250
    assert "555 0142" not in text
    assert "otra.tienda@example.org" in text
    assert "emails" in messages[0].findings
    assert "phones" in messages[0].findings
