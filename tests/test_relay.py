"""End to end: a real SMTP client, relaymail on 127.0.0.1, and an aiosmtpd sink behind it."""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import logging
import re
from email.utils import getaddresses
from pathlib import Path

import pytest
from relayenv import (
    BUSINESS,
    BUYER,
    BUYER_ALIAS,
    BUYER_MESSAGE_ID,
    SELLER,
    SELLER_ALIAS,
    SELLER_MESSAGE_ID,
    RelayEnv,
    read_case,
)
from sqlalchemy import select

from relaymail.models import Delivery, DeliveryAttempt, Message

@pytest.fixture
async def env(tmp_path: Path):
    relay_env = await RelayEnv(tmp_path).start()
    try:
        yield relay_env
    finally:
        await relay_env.stop()


def simple_message(sender: str, to: str, subject: str = "Pregunta", extra_headers: str = "", body: str = "Hola.") -> bytes:
    text = (
        f"From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <m{abs(hash(body + subject))}@client.test>\r\n"
        f"{extra_headers}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    return text.encode()


def assert_wire_clean(data: bytes) -> None:
    """CRLF line endings only, no line over 998 octets (RFC 5322 section 2.1.1)."""
    assert data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def assert_absent(data: bytes, address: str) -> None:
    lowered = data.lower()
    assert address.lower().encode() not in lowered
    assert address.lower().replace("@", "%40").encode() not in lowered
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    for name, value in parsed.items():
        assert address.lower() not in str(value).lower(), name
    for part in parsed.walk():
        if part.get_content_maintype() == "text" and not part.is_attachment():
            assert address.lower() not in part.get_content().lower()


# --- recipients ---------------------------------------------------------------


async def test_unknown_alias_rejected_at_rcpt(env: RelayEnv):
    outcome = await env.send(BUYER, ["zzzzzzzzzzzzzzz@marketplace.example"], simple_message(BUYER, "x"))

    assert outcome.code == 550
    assert outcome.text.startswith("5.1.1")


async def test_outside_domain_is_relay_denied(env: RelayEnv):
    outcome = await env.send(BUYER, ["someone@example.org"], simple_message(BUYER, "x"))

    assert outcome.code == 550
    assert outcome.text.startswith("5.7.1")
    assert env.sink.messages == []


async def test_alias_matched_case_insensitively(env: RelayEnv):
    outcome = await env.send(BUYER, [SELLER_ALIAS.upper()], simple_message(BUYER, SELLER_ALIAS))

    assert outcome.code == 250


async def test_second_alias_deferred_to_own_transaction(env: RelayEnv, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="relaymail.receive")

    def send_two() -> tuple[int, int]:
        import smtplib

        with smtplib.SMTP("127.0.0.1", env.port) as client:
            client.ehlo()
            client.mail(BUYER)
            first = client.rcpt(SELLER_ALIAS)[0]
            second = client.rcpt(BUYER_ALIAS)[0]
            return first, second

    first, second = await asyncio.to_thread(send_two)

    assert first == 250
    assert second == 452
    assert any("second alias in one transaction (452 4.5.3)" in record.getMessage() for record in caplog.records)


async def test_alias_guessing_is_disconnected(env: RelayEnv):
    def guess() -> list[int]:
        import smtplib

        codes = []
        with smtplib.SMTP("127.0.0.1", env.port) as client:
            client.ehlo()
            client.mail(BUYER)
            try:
                for index in range(20):
                    codes.append(client.rcpt(f"{index:015d}@marketplace.example")[0])
            except smtplib.SMTPServerDisconnected:
                codes.append(-1)
        return codes

    codes = await asyncio.to_thread(guess)

    allowed = env.config.smtp.unknown_recipients_before_disconnect
    assert codes[:allowed] == [550] * allowed
    assert codes[allowed] in (421, -1)


async def test_ehlo_advertises_extensions(env: RelayEnv):
    def ehlo() -> str:
        import smtplib

        with smtplib.SMTP("127.0.0.1", env.port) as client:
            return client.ehlo()[1].decode()

    features = await asyncio.to_thread(ehlo)

    for keyword in ("SIZE 15728640", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert keyword in features


# --- sender checks --------------------------------------------------------------


async def test_buyer_to_seller_delivered_rewritten(env: RelayEnv):
    data = simple_message(BUYER, SELLER_ALIAS, body=f"Mi correo es {BUYER}, gracias.")

    outcome = await env.send(BUYER, [SELLER_ALIAS], data)
    received = await env.sink.wait_for(1)

    assert outcome.code == 250
    assert len(received) == 1
    assert received[0].rcpt_tos == [SELLER]
    assert received[0].mail_from.startswith("bounce+")
    assert received[0].mail_from.endswith("@marketplace.example")
    assert_absent(received[0].data, BUYER)
    assert_wire_clean(received[0].data)
    parsed = email.message_from_bytes(received[0].data, policy=email.policy.default)
    assert parsed["From"].addresses[0].addr_spec == BUYER_ALIAS
    assert parsed["From"].addresses[0].display_name == "Juan Pérez"
    assert "402-7781" in parsed.get_body(("plain",)).get_content()


async def test_stranger_cannot_write_to_seller_alias(env: RelayEnv):
    outcome = await env.send("other@example.org", [SELLER_ALIAS], simple_message("other@example.org", SELLER_ALIAS))

    assert outcome.code == 550
    assert outcome.text.startswith("5.7.1")


async def test_seller_cannot_write_to_seller_alias(env: RelayEnv):
    outcome = await env.send(SELLER, [SELLER_ALIAS], simple_message(SELLER, SELLER_ALIAS))

    assert outcome.code == 550


async def test_unapproved_sender_told_to_approve(env: RelayEnv):
    outcome = await env.send("rosa.martinez@example.com", [BUYER_ALIAS], simple_message("rosa.martinez@example.com", BUYER_ALIAS))

    assert outcome.code == 550
    assert outcome.text.startswith("5.7.1")
    assert "not approved" in outcome.text
    assert "approve" in outcome.text.split("not approved", 1)[1]


async def test_blocked_sender_rejected(env: RelayEnv):
    from relaymail import provision

    async with env.relay.store.session() as session:
        await provision.block_sender(session, "S1", SELLER)
        await session.commit()

    outcome = await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS))

    assert outcome.code == 550


async def test_other_sellers_sender_rejected(env: RelayEnv):
    from relaymail import provision

    async with env.relay.store.session() as session:
        await provision.add_seller(session, "S2", "Otra Tienda", "otra@example.org", domain="marketplace.example", senders=["otra@example.org"])
        await session.commit()

    outcome = await env.send("otra@example.org", [BUYER_ALIAS], simple_message("otra@example.org", BUYER_ALIAS))

    assert outcome.code == 550
    assert "another seller" in outcome.text


async def test_envelope_sender_does_not_authorize(env: RelayEnv):
    data = simple_message("other@example.org", BUYER_ALIAS)

    outcome = await env.send(SELLER, [BUYER_ALIAS], data)

    assert outcome.code == 550


async def test_two_from_headers_rejected(env: RelayEnv):
    data = simple_message(SELLER, BUYER_ALIAS, extra_headers=f"From: {SELLER}\r\n")

    outcome = await env.send(SELLER, [BUYER_ALIAS], data)

    assert outcome.code == 550
    assert "From header" in outcome.text


# --- threading ------------------------------------------------------------------


async def test_reply_threads_both_ways(env: RelayEnv):
    question = simple_message(BUYER, SELLER_ALIAS, subject="Talla", body="¿Tienen talla M?")
    await env.send(BUYER, [SELLER_ALIAS], question)
    first = (await env.sink.wait_for(1))[0]
    relay_id = email.message_from_bytes(first.data)["Message-ID"]
    original_id = email.message_from_bytes(question)["Message-ID"]

    reply = simple_message(SELLER, BUYER_ALIAS, subject="Re: Talla", extra_headers=f"In-Reply-To: {relay_id}\r\nReferences: {relay_id}\r\n", body="Sí.")
    outcome = await env.send(SELLER, [BUYER_ALIAS], reply)
    second = (await env.sink.wait_for(2))[1]
    parsed = email.message_from_bytes(second.data)

    assert outcome.code == 250
    assert parsed["In-Reply-To"] == original_id
    assert parsed["References"] == original_id
    assert parsed["Message-ID"].endswith("@marketplace.example>")
    assert second.rcpt_tos == [BUYER]


async def test_unknown_reference_dropped(env: RelayEnv):
    data = simple_message(BUYER, SELLER_ALIAS, extra_headers="In-Reply-To: <nobody@else.example>\r\n")

    await env.send(BUYER, [SELLER_ALIAS], data)
    received = (await env.sink.wait_for(1))[0]

    assert b"nobody@else.example" not in received.data
    assert b"In-Reply-To" not in received.data


# --- protocol -------------------------------------------------------------------


async def test_loop_rejected_554_546(env: RelayEnv):
    received = "".join(f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 11 Mar 2024 10:00:00 -0600\r\n" for i in range(101))
    data = (received.encode() + simple_message(BUYER, SELLER_ALIAS))

    outcome = await env.send(BUYER, [SELLER_ALIAS], data)

    assert outcome.code == 554
    assert outcome.text.startswith("5.4.6")


@pytest.mark.parametrize("stray", [b"line\nnext", b"line\rnext", b"line\r\r\nnext"])
async def test_bare_cr_or_lf_rejected(env: RelayEnv, stray: bytes):
    data = simple_message(BUYER, SELLER_ALIAS).replace(b"Hola.", stray)

    outcome = await env.send(BUYER, [SELLER_ALIAS], data)

    assert outcome.code == 554
    assert outcome.text.startswith("5.5.2")


async def test_oversized_message_rejected(tmp_path: Path):
    relay_env = await RelayEnv(tmp_path, extra="").start()
    try:
        big = simple_message(BUYER, SELLER_ALIAS, body="x" * 900 + ("\r\n" + "y" * 900) * 20000)
        outcome = await relay_env.send(BUYER, [SELLER_ALIAS], big)
    finally:
        await relay_env.stop()

    assert outcome.code == 552


# --- the queue ------------------------------------------------------------------


async def test_accepted_row_committed_before_reply(tmp_path: Path):
    relay_env = await RelayEnv(tmp_path).start(run_queue=False)
    try:
        outcome = await relay_env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS))
        queue_id = outcome.text.rsplit(" ", 1)[-1]
        messages = await relay_env.messages()

        assert outcome.code == 250
        assert [m.queue_id for m in messages] == [queue_id]
        assert messages[0].delivered_raw
        assert relay_env.sink.messages == []

        await relay_env.restart(run_queue=True)
        received = await relay_env.sink.wait_for(1)
    finally:
        await relay_env.stop()

    assert len(received) == 1


async def test_soft_failure_retried(env: RelayEnv):
    env.sink.handler.reply = "451 4.3.0 try later"

    await env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS))
    await asyncio.sleep(0.5)
    env.sink.handler.reply = None
    received = await env.sink.wait_for(1, timeout_s=15)
    await env.wait_idle()

    assert len(received) == 1
    async with env.relay.store.session() as session:
        attempts = list(await session.scalars(select(DeliveryAttempt.result).order_by(DeliveryAttempt.id)))
    assert attempts[0] == "deferred"
    assert attempts[-1] == "sent"


async def test_hard_failure_bounced(env: RelayEnv):
    env.sink.handler.reply = "550 5.1.1 no such user"

    outcome = await env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS))
    await env.wait_idle()

    assert outcome.code == 250
    async with env.relay.store.session() as session:
        delivery = await session.scalar(select(Delivery))
        message = await session.scalar(select(Message))
    assert delivery.state == "bounced"
    assert "550" in delivery.last_error
    assert message.status == "bounced"


async def test_log_lines_carry_queue_id_and_no_address(env: RelayEnv, caplog: pytest.LogCaptureFixture):
    from relaymail.log import QueueIdFilter

    caplog.handler.addFilter(QueueIdFilter())
    caplog.set_level(logging.INFO)

    outcome = await env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS, body=f"soy {BUYER}"))
    await env.sink.wait_for(1)
    await env.wait_idle()
    queue_id = outcome.text.rsplit(" ", 1)[-1]

    lines = [r for r in caplog.records if r.name.startswith("relaymail")]
    for record in lines:
        text = record.getMessage().lower()
        assert BUYER not in text
        assert SELLER not in text
    message_lines = [r for r in lines if r.name in ("relaymail.receive", "relaymail.queue") and "event=queue_start" not in r.getMessage()]
    assert message_lines
    assert all(r.queue_id == queue_id for r in message_lines)


async def test_postmaster_goes_to_operators(env: RelayEnv):
    outcome = await env.send("anyone@example.org", ["postmaster@marketplace.example"], simple_message("anyone@example.org", "postmaster@marketplace.example"))
    received = await env.sink.wait_for(1)

    assert outcome.code == 250
    assert received[0].rcpt_tos == ["operators@ops.example"]


# --- the cases ------------------------------------------------------------------


async def test_case_01_comma_business_name(tmp_path: Path, shared_dir: Path):
    name = "Artesanías y Textiles Ñandú de Oaxaca, S.A. de C.V."
    relay_env = RelayEnv(tmp_path)
    await relay_env.start(provision_cast=False)
    try:
        await relay_env.provision_cast(business_name=name)
        outcome = await relay_env.send(SELLER, [BUYER_ALIAS], read_case(shared_dir, "01-from-name-comma-refold"))
        received = await relay_env.sink.wait_for(1)
    finally:
        await relay_env.stop()

    assert outcome.code == 250, outcome
    assert len(received) == 1
    data = received[0].data
    header_block = data.split(b"\r\n\r\n", 1)[0]
    from_value = re.search(rb"^From:(.*?)\r\n(?![ \t])", header_block, re.M | re.S).group(1)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    compat_pairs = getaddresses([email.message_from_bytes(data)["From"]])

    assert outcome.code == 250
    assert received[0].rcpt_tos == [BUYER]
    assert b"," not in from_value.split(b"<")[0].replace(b"=2C", b"")
    assert len(parsed["From"].addresses) == 1
    assert parsed["From"].addresses[0].display_name == name
    assert parsed["From"].addresses[0].addr_spec == SELLER_ALIAS
    assert len(compat_pairs) == 1
    assert compat_pairs[0][1] == SELLER_ALIAS
    assert "Ventas" not in str(parsed["From"])
    assert_absent(data, SELLER)
    body = parsed.get_body(("plain",))
    assert body.get_param("format") == "flowed"
    assert "Su pedido 402-7781 salió hoy por paquetería terrestre." in body.get_content()


@pytest.mark.parametrize("envelope_sender", [SELLER, "facturacion@erp-hosting.example.org"])
async def test_case_03_broken_from_rejected(env: RelayEnv, shared_dir: Path, envelope_sender: str):
    data = read_case(shared_dir, "03-malformed-from-unterminated-quote")

    first = await env.send(envelope_sender, [BUYER_ALIAS], data)
    second = await env.send(envelope_sender, [BUYER_ALIAS], data)
    await asyncio.sleep(0.3)

    assert first.code == 550
    assert first.text.startswith("5.7.1")
    assert "From header" in first.text
    assert "Error: (" not in first.text
    assert second == first
    assert env.sink.messages == []


async def test_case_05_header_allowlist(env: RelayEnv, shared_dir: Path):
    outcome = await env.send(SELLER, [BUYER_ALIAS], read_case(shared_dir, "05-header-leak-sender-receipts"))
    received = (await env.sink.wait_for(1))[0]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)

    assert outcome.code == 250
    for address in (SELLER, "rosa.martinez@example.com", "ventas+baja@example.com"):
        assert_absent(received.data, address)
    for header in (
        "Sender", "Reply-To", "Cc", "Disposition-Notification-To", "Return-Receipt-To", "X-Confirm-Reading-To",
        "Errors-To", "X-Original-Sender", "List-Unsubscribe", "Autocrypt", "Return-Path", "Authentication-Results",
        "DKIM-Signature",
    ):
        assert parsed[header] is None, header
    assert len(parsed.get_all("From")) == 1
    assert parsed["To"] == BUYER
    assert parsed["In-Reply-To"] == "<q0@example.net>"
    assert b"192.0.2.45" not in received.data
    assert b"laptop-rosa" not in received.data
    assert_wire_clean(received.data)


async def test_case_07_qp_reencoded(env: RelayEnv, shared_dir: Path):
    outcome = await env.send(SELLER, [BUYER_ALIAS], read_case(shared_dir, "07-qp-soft-breaks-reencode"))
    received = (await env.sink.wait_for(1))[0]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)

    assert outcome.code == 250
    assert_wire_clean(received.data)
    for part in parsed.walk():
        if part.get_content_type() in ("text/plain", "text/html"):
            assert part["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
            raw_lines = part.as_bytes().split(b"\n")
            assert b"=\n" not in received.data
    plain = parsed.get_body(("plain",)).get_content()
    assert "ya fue entregado a la paqueter\u00eda." in plain
    assert "en la tienda.  \nGracias" in plain.replace("\r\n", "\n")


async def test_case_09_smuggling_one_reply(env: RelayEnv, shared_dir: Path):
    stream = (shared_dir / "cases" / "09-smtp-smuggling-bare-lf" / "input.eml").read_bytes()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)

    async def reply() -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    await reply()
    for command in (b"EHLO mta.spam.example.org", b"MAIL FROM:<promo@spam.example.org>", f"RCPT TO:<{BUYER_ALIAS}>".encode(), b"DATA"):
        writer.write(command + b"\r\n")
        await writer.drain()
        await reply()
    writer.write(stream)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    final = await reply()
    after = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    assert final.startswith(b"554 5.5.2")
    assert after.startswith(b"221")
    assert b"250" not in after
    await asyncio.sleep(0.3)
    assert env.sink.messages == []


@pytest.mark.parametrize("envelope_sender", ["", SELLER])
async def test_case_12_auto_reply_once(env: RelayEnv, shared_dir: Path, envelope_sender: str):
    data = read_case(shared_dir, "12-auto-reply-loop")

    outcomes = [await env.send(envelope_sender, [BUYER_ALIAS], data) for _ in range(5)]
    await env.wait_idle()
    await asyncio.sleep(0.3)

    assert all(o.code == 250 for o in outcomes)
    assert len(env.sink.messages) == 1
    delivered = env.sink.messages[0]
    assert delivered.rcpt_tos == [BUYER]
    parsed = email.message_from_bytes(delivered.data, policy=email.policy.default)
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["X-MS-Exchange-Inbox-Rules-Loop"] is None
    assert_absent(delivered.data, SELLER)
    statuses = sorted(m.status for m in await env.messages())
    assert statuses.count("suppressed") == 4


async def test_case_12_unauthorized_no_notice(env: RelayEnv, shared_dir: Path):
    data = read_case(shared_dir, "12-auto-reply-loop").replace(b"From: Ventas <ventas@example.com>", b"From: asistente@example.com")

    outcome = await env.send("", [BUYER_ALIAS], data)
    await asyncio.sleep(0.3)

    assert outcome.code == 550
    assert outcome.text.startswith("5.7.1")
    assert env.sink.messages == []


async def test_case_14_attachments_byte_identical(env: RelayEnv, shared_dir: Path):
    outcome = await env.send(BUYER, [SELLER_ALIAS], read_case(shared_dir, "14-attachments-encoded-filenames"))
    received = (await env.sink.wait_for(1))[0]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    attachments = {part.get_filename(): part for part in parsed.iter_attachments()}

    assert outcome.code == 250
    assert received.rcpt_tos == [SELLER]
    assert_absent(received.data, BUYER)
    assert hashlib.sha256(attachments["Factura Ñandú A-0042.pdf"].get_content()).hexdigest() == "50802129dd36a5009ee23bc6b83276bb73adb09b7ac805b2c56c0a9a83a8f28e"
    csv = attachments["Guía de tallas Otoño-Invierno 2024.csv"].get_payload(decode=True)
    assert hashlib.sha256(csv).hexdigest() == "8991c6a714d626efa5dde12b5affee6b441a3772cbc687508a3a71677eaa850f"
    forwarded = attachments["aviso-paqueteria.eml"]
    assert forwarded.get_content_type() == "message/rfc822"
    inner = forwarded.get_content()
    assert "avisos@paqueteria.example.org" in inner["From"]
    assert ".Esta l" in inner.get_body(("plain",)).get_content()


async def test_case_14_seller_attachment_type_rejected(env: RelayEnv, shared_dir: Path):
    data = read_case(shared_dir, "14-attachments-encoded-filenames")
    data = data.replace(
        b"From: =?utf-8?Q?Juan_P=C3=A9rez?= <juan.perez@example.net>",
        b"From: =?utf-8?Q?Artesan=C3=ADas_=C3=91and=C3=BA?= <ventas@example.com>",
    )

    outcome = await env.send(SELLER, [BUYER_ALIAS], data)

    assert outcome.code == 554
    assert outcome.text.startswith("5.7.1")
    assert "aviso-paqueteria.eml" in outcome.text
    assert "PDF" in outcome.text or "pdf" in outcome.text


async def test_case_17_long_line_reencoded(env: RelayEnv, shared_dir: Path):
    source = read_case(shared_dir, "17-long-line-over-998")

    outcome = await env.send(SELLER, [BUYER_ALIAS], source)
    received = (await env.sink.wait_for(1))[0]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    html = parsed.get_body(("html",))

    assert outcome.code == 250
    assert_wire_clean(received.data)
    assert html["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    original_html = source.split(b"Content-Transfer-Encoding: 8bit\r\n\r\n")[2].split(b"\r\n--b17--")[0]
    assert hashlib.sha256(original_html).hexdigest().startswith("9ff5af018f930323")
    decoded = html.get_payload(decode=True)
    head, tail = original_html.split(b"<body>", 1)
    assert decoded.startswith(head + b"<body>")
    assert decoded.endswith(tail)


async def test_signed_part_with_address_rejected(env: RelayEnv):
    data = (
        f"From: Juan <{BUYER}>\r\nTo: {SELLER_ALIAS}\r\nSubject: Firmado\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/signed; protocol="application/pgp-signature"; micalg=pgp-sha256; boundary="s1"\r\n\r\n'
        f"--s1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nEscríbame a {BUYER}.\r\n"
        "--s1\r\nContent-Type: application/pgp-signature\r\n\r\n-----BEGIN PGP SIGNATURE-----\r\nAAAA\r\n-----END PGP SIGNATURE-----\r\n"
        "--s1--\r\n"
    ).encode()

    outcome = await env.send(BUYER, [SELLER_ALIAS], data)
    await asyncio.sleep(0.3)

    assert outcome.code == 554
    assert outcome.text.startswith("5.7.1")
    assert "signed" in outcome.text
    assert env.sink.messages == []
    statuses = [m.status for m in await env.messages()]
    assert statuses == ["rejected"]


async def test_rejected_sender_archived(env: RelayEnv):
    outcome = await env.send("other@example.org", [SELLER_ALIAS], simple_message("other@example.org", SELLER_ALIAS))

    messages = await env.messages()
    assert outcome.code == 550
    assert [m.status for m in messages] == ["rejected"]
    assert messages[0].rule == "sender"
    assert messages[0].pair_id is not None


async def test_delivered_mail_dkim_signed(tmp_path: Path):
    import dkim as dkimpy

    from relaymail import dkim

    key = dkim.generate_key(2048)
    key_path = tmp_path / "dkim.key"
    dkim.write_key(key_path, key)
    record = dkim.dns_record("s2026", "marketplace.example", key)
    published = record.value
    relay_env = RelayEnv(tmp_path, extra=f'\n[dkim]\nselector = "s2026"\nprivate_key_path = "{key_path}"\n')
    await relay_env.start()
    try:
        outcome = await relay_env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS, body="Hola."))
        received = await relay_env.sink.wait_for(1)
    finally:
        await relay_env.stop()

    def dns_lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s2026._domainkey.marketplace.example."
        return published.encode()

    assert outcome.code == 250
    assert received[0].data.startswith(b"DKIM-Signature:")
    assert dkimpy.verify(received[0].data, dnsfunc=dns_lookup)
    assert not dkimpy.verify(received[0].data.replace(b"Hola.", b"Hola!"), dnsfunc=dns_lookup)
