"""Bounce processing: relaymail.reports over a bounce corpus, bounce addresses over SMTP, undeliverable addresses.

The corpus tests read the bounce folders of the shared corpus in place and skip
when it is absent. The end-to-end tests run the relay on 127.0.0.1 with an
aiosmtpd sink behind it (tests/relayenv.py), on SQLite and, when
RELAYMAIL_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import smtplib
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import run_coroutine
from relayenv import BUYER, BUYER_ALIAS, DOMAIN, SELLER, SELLER_ALIAS, RelayEnv
from sink import Received, SinkHandler
from sqlalchemy import select

from relaymail import bounce, db, reports
from relaymail.models import BounceReport, Delivery, DeliveryAttempt, Message, UndeliverableAddress, utcnow
from relaymail.store import Store

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
BOUNCE_FOLDERS = ("flufl-bounce", "perl-bounceparser", "php-bounce-handler", "sisimai-set-of-emails")
# Share of the files with a message/delivery-status part that must yield a recipient address with a status.
MIN_DSN_RECOGNITION = 0.95
# Share of all the bounce corpus files that must yield a recipient address with a status.
MIN_ALL_RECOGNITION = 0.85


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        pytest.skip(f"bounce corpus {CORPUS} not found (the shared folder sits next to the repository)")
    files = []
    for folder in BOUNCE_FOLDERS:
        files.extend(path for path in sorted((CORPUS / folder).rglob("*")) if path.is_file())
    if not files:
        pytest.skip(f"no bounce corpus files under {CORPUS}")
    return files


def corpus_file(relative: str) -> bytes:
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"corpus file {path} not found")
    return path.read_bytes()


def recognised(report: reports.Report) -> bool:
    return any(item.address and item.status for item in report.recipients)


def to_crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# --- reports.parse over the corpus ------------------------------------------------------------


@pytest.fixture(scope="module")
def parsed_corpus() -> dict[str, tuple[bytes, reports.Report]]:
    return {str(path.relative_to(CORPUS)): (path.read_bytes(), reports.parse(path.read_bytes())) for path in corpus_files()}


def test_every_corpus_file_parsed(parsed_corpus):
    failed = [name for name, (_, report) in parsed_corpus.items() if "could not be parsed" in report.problem]

    assert len(parsed_corpus) > 1000
    assert failed == []


def test_dsn_files_recognised(parsed_corpus):
    dsn_files = {name: report for name, (raw, report) in parsed_corpus.items() if b"message/delivery-status" in raw.lower()}
    missed = sorted(name for name, report in dsn_files.items() if not recognised(report))

    assert len(dsn_files) > 500
    assert 1 - len(missed) / len(dsn_files) >= MIN_DSN_RECOGNITION, missed


def test_all_bounce_files_recognised(parsed_corpus):
    missed = sorted(name for name, (_, report) in parsed_corpus.items() if not recognised(report))

    assert 1 - len(missed) / len(parsed_corpus) >= MIN_ALL_RECOGNITION, missed


def test_line_endings_do_not_change_result(parsed_corpus):
    by_name: dict[str, dict[str, reports.Report]] = {}
    for name, (_, report) in parsed_corpus.items():
        parts = Path(name).parts
        if parts[0] == "sisimai-set-of-emails" and parts[2] in ("bsd", "dos", "mac"):
            by_name.setdefault(parts[-1], {})[parts[2]] = report
    compared = {name: found for name, found in by_name.items() if len(found) == 3}

    assert len(compared) > 50
    for name, found in compared.items():
        assert found["bsd"] == found["dos"] == found["mac"], name


@pytest.mark.parametrize(
    "name, kind, address, action, status",
    [
        ("flufl-bounce/dsn_05.txt", "dsn", "pkocmid@atlas.cz", "delayed", "4.4.1"),
        ("flufl-bounce/exim_01.txt", "bounce", "delangen@its.tudelft.nl", "failed", "5.1.1"),
        ("flufl-bounce/qmail_03.txt", "bounce", "crown@hbc.co.jp", "failed", "5.1.1"),
        ("flufl-bounce/microsoft_01.txt", "bounce", "djbennett@ikon.com", "failed", "5.1.1"),
        ("flufl-bounce/yahoo_01.txt", "bounce", "subscribe.motorcycles@listsociety.com", "failed", "4.4.1"),
        ("flufl-bounce/simple_03.txt", "bounce", "jacobus@geo.co.za", "delayed", "4.0.0"),
        ("perl-bounceparser/t/corpus/postfix-smtp-550.msg", "dsn", "luser@otherhost.invalid", "failed", "5.1.1"),
        ("sisimai-set-of-emails/maildir/bsd/rfc3464-01.eml", "dsn", "userunknown@bouncehammer.jp", "failed", "5.1.1"),
        ("sisimai-set-of-emails/maildir/bsd/lhost-gmail-01.eml", "bounce", "userunknown@example.jp", "failed", "5.1.1"),
        ("sisimai-set-of-emails/maildir/bsd/lhost-office365-01.eml", "bounce", "kijitora@example.com", "failed", "5.1.10"),
    ],
)
def test_known_files(name, kind, address, action, status):
    report = reports.parse(corpus_file(name))
    found = report.recipient_for(address)

    assert report.kind == kind
    assert found is not None
    assert found.address == address
    assert found.action == action
    assert found.status == status


@pytest.mark.parametrize(
    "name, kind",
    [
        ("php-bounce-handler/arf2.txt", "feedback"),
        ("sisimai-set-of-emails/maildir/bsd/arf-01.eml", "feedback"),
        ("sisimai-set-of-emails/maildir/bsd/arf-22.eml", "feedback"),
        ("sisimai-set-of-emails/maildir/bsd/rfc3834-02.eml", "auto_reply"),
        ("perl-bounceparser/t/corpus/autoreply.msg", "auto_reply"),
        ("sisimai-set-of-emails/maildir/not/is-not-bounce-01.eml", "unknown"),
    ],
)
def test_not_bounces_recognised(name, kind):
    report = reports.parse(corpus_file(name))

    assert report.kind == kind
    assert not report.is_bounce


def test_arf_names_complained_recipient():
    report = reports.parse(corpus_file("php-bounce-handler/arf2.txt"))

    assert report.feedback_type == "opt-out"
    assert [item.address for item in report.recipients] == ["user@example.com"]


# --- reports.parse on hostile input ------------------------------------------------------------------

HEADER = b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail\r\nContent-Type: text/plain\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"\x00" * 1000,
        HEADER + b"\n" * 2_000_000,
        HEADER + b" " * 2_000_000,
        HEADER + b"-" * 2_000_000,
        HEADER + b"<a@b.example>:\n" * 100_000,
        HEADER + b"550 " * 500_000,
        HEADER + b"a" * 2_000_000 + b"@",
        HEADER + b"a@" + b"a." * 500_000,
        b"Content-Type: text/html\r\n\r\n" + b"<script>" * 200_000,
        b"Content-Type: text/html\r\n\r\n" + b"<a " * 500_000,
        b"Content-Type: message/rfc822\r\n\r\n" * 3000,
        b"Content-Type: multipart/report; boundary=x\r\n\r\n"
        + b"--x\r\nContent-Type: message/delivery-status\r\n\r\nFinal-Recipient: rfc822; a@b.example\r\nAction: failed\r\n\r\n" * 900,
    ],
    ids=[
        "empty", "blank", "nul", "newlines", "spaces", "dashes", "angle-lines", "codes", "long-local-part",
        "long-domain", "unclosed-script", "unclosed-tags", "nested", "many-status-parts",
    ],
)
def test_hostile_input_parsed_quickly(raw: bytes):
    started = time.monotonic()
    report = reports.parse(raw)
    elapsed = time.monotonic() - started

    assert isinstance(report, reports.Report)
    assert len(report.recipients) <= reports.MAX_RECIPIENTS
    assert elapsed < 10, f"parse took {elapsed:.1f} s"


def test_random_bytes_never_raise():
    generator = random.Random(20261204)
    pieces = [b"Content-Type: multipart/report; boundary=b\r\n", b"--b\r\n", b"Final-Recipient: rfc822; x@y.example\r\n",
              b"Status: 5.1.1\r\n", b"<x@y.example>:\r\n", b"\r\n", b"550 ", b"\xff\xfe", b"=?utf-8?b?", b"Action: failed\n"]
    for _ in range(300):
        raw = b"".join(generator.choice(pieces) if generator.random() < 0.7 else bytes([generator.randrange(256)])
                       for _ in range(generator.randrange(1, 200)))
        assert isinstance(reports.parse(raw), reports.Report)


# --- bounce addresses over SMTP -----------------------------------------------------------------------


@pytest.fixture
async def env(tmp_path: Path, database_url: str):
    relay_env = await RelayEnv(tmp_path, database_url=database_url).start()
    try:
        yield relay_env
    finally:
        await relay_env.stop()


@pytest.fixture
async def any_store(database_url: str):
    """An open Store on a migrated database: SQLite, then PostgreSQL when configured."""
    await db.upgrade(database_url)
    opened = Store(database_url)
    try:
        yield opened
    finally:
        await opened.close()


def simple_message(sender: str, to: str, subject: str = "Pregunta", body: str = "Hola.") -> bytes:
    return (
        f"From: Someone <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <orig.{abs(hash(subject + body))}@client.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


def dsn_report(recipient: str, action: str = "failed", status: str = "5.1.1") -> bytes:
    return to_crlf(
        f"""From: Mail Delivery System <MAILER-DAEMON@mx.example.com>
To: someone@marketplace.example
Subject: Undelivered Mail Returned to Sender
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain

The mail system could not deliver your message.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com

Final-Recipient: rfc822; {recipient}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; 550 {status} <{recipient}>: mailbox unknown

--b1--
""".encode()
    )


async def delivered_message(env: RelayEnv, sender: str = BUYER, alias: str = SELLER_ALIAS) -> tuple[str, str]:
    """Send a message that the sink accepts; return its queue id and its bounce address."""
    outcome = await env.send(sender, [alias], simple_message(sender, alias))
    assert outcome.code == 250
    queue_id = outcome.text.rsplit(" ", 1)[-1]
    received = await env.sink.wait_for(1)
    await env.wait_idle()
    address = bounce.make_bounce_address(env.config.relay.bounce_secret, DOMAIN, queue_id, 0)
    assert received[0].mail_from == address
    return queue_id, address


async def all_rows(env: RelayEnv, model, *where):
    async with env.relay.store.session() as session:
        return list(await session.scalars(select(model).where(*where)))


def rcpt_reply(env: RelayEnv, address: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", env.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("")
        code, text = client.rcpt(address)
        return code, text.decode()


async def test_forged_token_rejected_at_rcpt(env: RelayEnv):
    _, address = await delivered_message(env)
    local, _, domain = address.partition("@")
    forged = local[:-4] + ("aaaa" if not local.endswith("aaaa") else "bbbb") + "@" + domain

    code, text = await asyncio.to_thread(rcpt_reply, env, forged)

    assert code == 550
    assert text.startswith("5.7.1")


async def test_expired_token_rejected_at_rcpt(env: RelayEnv):
    queue_id, _ = await delivered_message(env)
    thirty_days_ago = time.time() - 30 * 86400
    expired = bounce.make_bounce_address(env.config.relay.bounce_secret, DOMAIN, queue_id, 0, now_s=thirty_days_ago)

    code, text = await asyncio.to_thread(rcpt_reply, env, expired)

    assert code == 550
    assert text.startswith("5.7.1")


async def test_token_of_other_secret_rejected(env: RelayEnv):
    queue_id, _ = await delivered_message(env)
    other = bounce.make_bounce_address("another-secret-of-32-characters!", DOMAIN, queue_id, 0)

    code, text = await asyncio.to_thread(rcpt_reply, env, other)

    assert code == 550
    assert text.startswith("5.7.1")


async def test_valid_token_accepted_at_rcpt(env: RelayEnv):
    _, address = await delivered_message(env)

    code, _ = await asyncio.to_thread(rcpt_reply, env, address.upper())

    assert code == 250


async def test_late_bounce_bounces_delivery_and_sends_dsn(env: RelayEnv):
    queue_id, address = await delivered_message(env)

    outcome = await env.send("", [address], dsn_report(SELLER))
    received = await env.sink.wait_for(2)
    await env.wait_idle()

    assert outcome.code == 250
    delivery = (await all_rows(env, Delivery, Delivery.envelope_sender == address))[0]
    assert delivery.state == "bounced"
    assert "5.1.1" in delivery.last_error
    attempts = await all_rows(env, DeliveryAttempt, DeliveryAttempt.delivery_id == delivery.id)
    assert [a.result for a in attempts] == ["sent", "bounced"]
    original = (await all_rows(env, Message, Message.queue_id == queue_id))[0]
    assert original.status == "bounced"

    assert len(received) == 2
    notice = received[1]
    assert notice.mail_from in ("", "<>")
    assert notice.rcpt_tos == [BUYER]
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert f"rfc822; {SELLER_ALIAS}" in notice.data.decode()
    assert SELLER.encode() not in notice.data.lower()
    assert b"mx.example.com" not in notice.data

    rows = await all_rows(env, BounceReport)
    assert [(r.kind, r.action, r.status, r.recipient, r.effect) for r in rows] == [
        ("dsn", "failed", "5.1.1", SELLER, bounce.EFFECT_LATE_BOUNCE)
    ]


async def test_second_report_sends_no_second_dsn(env: RelayEnv):
    _, address = await delivered_message(env)

    await env.send("", [address], dsn_report(SELLER))
    await env.sink.wait_for(2)
    await env.send("", [address], dsn_report(SELLER))
    await env.wait_idle()
    await asyncio.sleep(0.3)

    assert len(env.sink.messages) == 2
    effects = [r.effect for r in await all_rows(env, BounceReport)]
    assert sorted(effects) == [bounce.EFFECT_LATE_BOUNCE, bounce.EFFECT_RECORDED]


async def test_delayed_report_recorded_only(env: RelayEnv):
    _, address = await delivered_message(env)

    outcome = await env.send("", [address], dsn_report(SELLER, action="delayed", status="4.4.1"))
    await asyncio.sleep(0.3)

    assert outcome.code == 250
    delivery = (await all_rows(env, Delivery, Delivery.envelope_sender == address))[0]
    assert delivery.state == "sent"
    rows = await all_rows(env, BounceReport)
    assert [(r.action, r.status, r.effect) for r in rows] == [("delayed", "4.4.1", bounce.EFFECT_RECORDED)]
    assert len(env.sink.messages) == 1


@pytest.mark.parametrize(
    "name, kind",
    [
        ("php-bounce-handler/arf2.txt", "feedback"),
        ("sisimai-set-of-emails/maildir/bsd/rfc3834-02.eml", "auto_reply"),
    ],
)
async def test_feedback_and_auto_reply_recorded_only(env: RelayEnv, name: str, kind: str):
    raw = to_crlf(corpus_file(name))
    _, address = await delivered_message(env)

    outcome = await env.send("", [address], raw)
    await asyncio.sleep(0.3)

    assert outcome.code == 250
    delivery = (await all_rows(env, Delivery, Delivery.envelope_sender == address))[0]
    assert delivery.state == "sent"
    rows = await all_rows(env, BounceReport)
    assert [(r.kind, r.effect) for r in rows] == [(kind, bounce.EFFECT_RECORDED)]
    assert len(env.sink.messages) == 1


async def test_report_for_missing_message_recorded(env: RelayEnv):
    address = bounce.make_bounce_address(env.config.relay.bounce_secret, DOMAIN, "ABCDEF012345", 0)

    outcome = await env.send("", [address], dsn_report(SELLER))

    assert outcome.code == 250
    rows = await all_rows(env, BounceReport)
    assert [(r.delivery_id, r.effect) for r in rows] == [(None, bounce.EFFECT_NO_DELIVERY)]


async def test_corpus_fed_to_bounce_address(env: RelayEnv):
    files = corpus_files()
    _, address = await delivered_message(env)

    def feed() -> list[tuple[str, int, str]]:
        replies = []
        with smtplib.SMTP("127.0.0.1", env.port, timeout=60) as client:
            client.ehlo("client.test")
            for path in files:
                try:
                    client.mail("")
                    code, _ = client.rcpt(address)
                    assert code == 250, path
                    code, text = client.data(to_crlf(path.read_bytes()))
                except smtplib.SMTPDataError as exc:
                    code, text = exc.smtp_code, exc.smtp_error
                replies.append((str(path.relative_to(CORPUS)), code, text.decode(errors="replace")))
                client.rset()
        return replies

    replies = await asyncio.to_thread(feed)
    await env.wait_idle()
    await asyncio.sleep(0.3)

    internal = [(name, code, text) for name, code, text in replies if code not in (250,) and not 500 <= code < 600]
    assert internal == []
    accepted = [name for name, code, _ in replies if code == 250]
    assert len(accepted) >= len(files) - 5
    rows = await all_rows(env, BounceReport)
    assert len(rows) == len(accepted)

    # The first hard bounce bounced the delivery and sent one DSN to the buyer; nothing else left.
    messages = env.sink.messages
    assert [m.rcpt_tos for m in messages] == [[SELLER], [BUYER]]
    assert messages[1].mail_from in ("", "<>")
    assert b"multipart/report" in messages[1].data
    assert SELLER.encode() not in messages[1].data.lower()
    assert sum(r.effect == bounce.EFFECT_LATE_BOUNCE for r in rows) == 1


# --- undeliverable addresses ----------------------------------------------------------------------------


class RejectingSink(SinkHandler):
    """Rejects DATA from a bounce address with `rejection` and accepts the null sender (DSNs)."""

    def __init__(self, rejection: str):
        super().__init__()
        self.rejection = rejection

    async def handle_DATA(self, server, session, envelope):
        if envelope.mail_from not in ("", "<>"):
            return self.rejection
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 OK"


async def rejecting_env(tmp_path: Path, rejection: str, database_url: str) -> RelayEnv:
    relay_env = RelayEnv(tmp_path, database_url=database_url)
    relay_env.sink.handler = RejectingSink(rejection)
    return await relay_env.start()


async def is_undeliverable(env: RelayEnv, address: str) -> bool:
    return await env.relay.store.run(lambda session: bounce.is_undeliverable(session, address))


async def test_hard_bounces_mark_address_undeliverable(tmp_path: Path, database_url: str):
    env = await rejecting_env(tmp_path, "550 5.1.1 no such user", database_url)
    try:
        marks = []
        for index in range(bounce.UNDELIVERABLE_AFTER):
            outcome = await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS, subject=f"m{index}"))
            assert outcome.code == 250
            await env.sink.wait_for(index + 1, timeout_s=15)
            await env.wait_idle()
            marks.append(await is_undeliverable(env, BUYER.upper()))
        listed = await bounce.undeliverable_addresses(env.relay.store)
    finally:
        await env.stop()

    assert marks == [False] * (bounce.UNDELIVERABLE_AFTER - 1) + [True]
    assert [row["address"] for row in listed] == [BUYER]
    assert listed[0]["hard_bounces"] == bounce.UNDELIVERABLE_AFTER
    assert listed[0]["last_status"] == "5.1.1"
    assert listed[0]["undeliverable"] is True


async def test_policy_rejections_do_not_count(tmp_path: Path, database_url: str):
    env = await rejecting_env(tmp_path, "554 5.7.1 message refused as spam", database_url)
    try:
        for index in range(bounce.UNDELIVERABLE_AFTER):
            await env.send(SELLER, [BUYER_ALIAS], simple_message(SELLER, BUYER_ALIAS, subject=f"m{index}"))
            await env.sink.wait_for(index + 1, timeout_s=15)
        await env.wait_idle()
        marked = await is_undeliverable(env, BUYER)
        counting = await bounce.undeliverable_addresses(env.relay.store, include_counting=True)
    finally:
        await env.stop()

    assert marked is False
    assert counting == []


async def test_late_bounces_count_against_address(env: RelayEnv):
    for index in range(bounce.UNDELIVERABLE_AFTER):
        outcome = await env.send(BUYER, [SELLER_ALIAS], simple_message(BUYER, SELLER_ALIAS, subject=f"q{index}"))
        queue_id = outcome.text.rsplit(" ", 1)[-1]
        await env.sink.wait_for(2 * index + 1)
        await env.wait_idle()
        address = bounce.make_bounce_address(env.config.relay.bounce_secret, DOMAIN, queue_id, 0)
        assert (await env.send("", [address], dsn_report(SELLER))).code == 250
        await env.sink.wait_for(2 * index + 2)

    assert await is_undeliverable(env, SELLER)


async def test_bounce_window_restarts(any_store: Store):
    store = any_store
    start = utcnow()

    def bounce_at(offset: timedelta):
        def unit(session):
            return bounce.record_hard_bounce(session, "Luis@Mail.Example", "5.1.1", "550 5.1.1", start + offset)
        return unit

    results = [await store.run(bounce_at(timedelta(days=days)), write=True) for days in (0, 10, 45, 50, 60)]
    async with store.session() as session:
        row = await session.get(UndeliverableAddress, "luis@mail.example")

    assert results == [False, False, False, False, True]
    assert row.hard_bounces == 3
    assert row.window_started_at == start + timedelta(days=45)


async def test_clear_undeliverable(any_store: Store):
    store = any_store
    def unit(session):
        for _ in range(bounce.UNDELIVERABLE_AFTER):
            bounce.record_hard_bounce(session, "luis@mail.example", "5.1.1", "550 5.1.1")

    await store.run(unit, write=True)

    assert [row["address"] for row in await bounce.undeliverable_addresses(store)] == ["luis@mail.example"]
    assert await bounce.clear_undeliverable(store, "LUIS@mail.example") is True
    assert await bounce.undeliverable_addresses(store) == []
    assert await bounce.clear_undeliverable(store, "luis@mail.example") is False


def test_undeliverable_cli_lists_and_clears(cli_main, migrated_db):
    from relaymail import bounce as bounce_module
    from relaymail.store import Store

    async def mark() -> None:
        store = Store(migrated_db.database.url)
        try:
            for _ in range(bounce_module.UNDELIVERABLE_AFTER):
                await store.run(
                    lambda session: bounce_module.record_hard_bounce(session, "gone@example.org", "5.1.1", "user unknown", utcnow()),
                    write=True,
                )
        finally:
            await store.close()

    run_coroutine(mark)
    listed = cli_main("queue", "undeliverable", "--json")
    cleared = cli_main("queue", "undeliverable-clear", "GONE@example.org", "--json")
    after = cli_main("queue", "undeliverable", "--json")
    missing = cli_main("queue", "undeliverable-clear", "gone@example.org")

    assert listed.rc == 0, listed.stderr
    assert [row["address"] for row in listed.json()["addresses"]] == ["gone@example.org"]
    assert cleared.json() == {"address": "gone@example.org", "cleared": True}
    assert after.json()["count"] == 0
    assert missing.rc == 1
    assert "gone@example.org" in missing.stderr
