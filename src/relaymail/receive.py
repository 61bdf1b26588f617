"""The SMTP session: judge recipients at RCPT, the message after DATA.

`RelayHandler` is an aiosmtpd handler. Everything knowable in the session is
answered there with a reply code, so nothing turns into backscatter later:

    RCPT    outside the domain            550 5.7.1 (never an open relay)
            unknown address at the domain 550 5.1.1 (repeated ones are slowed
                                           down, then answered 421 and closed)
            a second, different alias     452 4.5.3 (one alias per transaction,
                                           so each recipient gets its own verdict
                                           after DATA; clients retry it alone)
    DATA    bare CR or LF                 554 5.5.2 (SMTP smuggling)
            too many Received headers     554 5.4.6 (a loop)
            unusable From header          550 5.7.1
            sender not allowed            550 5.7.1 (SPEC section 3)
            policy verdict                250 (deliver, block, suppress),
                                          4xx or 5xx (defer, reject)

A 250 is sent only after the message, its rewritten bytes and its delivery
rows are committed (see store.Store). Any unexpected exception becomes
`451 4.3.0` and a log line with the queue id; no Python exception text ever
reaches the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

from . import bounce, dkim, i18n, links, mime, policy, provision, reports, rewrite, store
from .config import Config
from .errors import InputError
from .headers import ParsedHeaders, decoding_codecs, first_field, parse_headers, split_fields
from .log import fields, set_queue_id
from .queue import Claimed, Loaded, QueueManager
from .models import Delivery, Direction, Message, MessageStatus, Pair, SenderState, ThreadId, utcnow

log = logging.getLogger(__name__)

REWRITE_IN_THREAD_BYTES = 256 * 1024
ALIAS_CACHE_SIZE = 10_000
OPERATOR_LOCAL_PARTS = ("postmaster", "abuse")

# Wording of each headers.judge_from reason in a rejection reply.
FROM_PROBLEMS = {"missing": "is missing", "cannot be parsed": "cannot be parsed"}

REPLY_INTERNAL = "451 4.3.0 Temporary local problem; please try again later"
REPLY_UNREWRITABLE = (
    "554 5.7.1 Message rejected: it cannot be forwarded without revealing a sender address in a part "
    "that must not be changed (a signed or encrypted part, or a part header); remove the address "
    "or send the message unsigned"
)
REPLY_BARE_EOL = (
    "554 5.5.2 Message rejected: it contains a bare CR or LF; "
    "end every line with CRLF and send it again"
)


def new_queue_id() -> str:
    """Return a 12-character queue id (upper-case hex)."""
    return secrets.token_hex(6).upper()


@dataclass
class Target:
    """The meaning of one accepted recipient address: an alias, the operators or a bounce address."""

    kind: str  # "alias", "operators" or "bounce"
    address: str
    match: store.AliasMatch | None = None
    bounce_token: bounce.BounceToken | None = None


@dataclass
class Outcome:
    """The reply to DATA and what to archive."""

    reply: str
    queue_id: str


def has_bare_line_ending(data: bytes) -> bool:
    """Return True if `data` contains a LF not preceded by CR, or a CR not followed by LF."""
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


class RelayHandler:
    """aiosmtpd handler of relaymail's SMTP listener."""

    def __init__(self, config: Config, db: store.Store, on_queued=None, queue: QueueManager | None = None):
        self.config = config
        self.store = db
        self.on_queued = on_queued or (lambda: None)
        self.queue = queue
        self.domain = config.relay.domain.lower()
        # Created here so that an unreadable key stops `relaymail serve` at start.
        self.signer = dkim.Signer.from_config(config)
        self._locks: dict[tuple[str, object], list] = {}  # key -> [lock, tasks using it]
        # Aliases found at RCPT. A pair and its aliases never change once created
        # and no command deletes a pair, so a found alias stays valid. Unknown
        # aliases are not cached, so a pair created later is found at once.
        self._aliases: collections.OrderedDict[str, store.AliasMatch] = collections.OrderedDict()

    # --- session hooks ----------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        last = responses.pop()
        responses.append("250-PIPELINING")
        responses.append("250-ENHANCEDSTATUSCODES")
        responses.append(last)
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.targets = []
        return "250 2.1.0 Sender OK"

    async def handle_RSET(self, server, session, envelope):
        return "250 2.0.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        try:
            return await self._judge_recipient(server, session, envelope, address, rcpt_options)
        except Exception:  # noqa: BLE001 - the catch-all boundary of the SMTP session
            log.exception(fields(event="rcpt_failed", client=_peer(session)))
            return REPLY_INTERNAL

    async def handle_DATA(self, server, session, envelope):
        queue_id = new_queue_id()
        set_queue_id(queue_id)
        try:
            outcome = await self._process(session, envelope, queue_id)
        except Exception:  # noqa: BLE001 - the catch-all boundary of the SMTP session
            log.exception(fields(event="data_failed", client=_peer(session)))
            return REPLY_INTERNAL
        finally:
            set_queue_id("-")
        return outcome.reply

    async def handle_exception(self, error: Exception) -> str:
        log.error(fields(event="session_error", error=type(error).__name__))
        return REPLY_INTERNAL

    # --- RCPT -------------------------------------------------------------

    async def _judge_recipient(self, server, session, envelope, address, rcpt_options) -> str:
        targets: list[Target] = getattr(envelope, "targets", [])
        envelope.targets = targets
        local, _, domain = address.rpartition("@")

        if len(targets) >= self.config.smtp.max_recipients:
            log.info(fields(event="defer", client=_peer(session), status="too many recipients (452 4.5.3)"))
            return f"452 4.5.3 Too many recipients; send at most {self.config.smtp.max_recipients} per message"
        if not local or domain.lower() != self.domain:
            log.info(fields(event="reject", client=_peer(session), status="relay denied (550 5.7.1)"))
            return f"550 5.7.1 Relay access denied: this server accepts mail only for addresses at {self.domain}"

        target = await self._find_target(local)
        if target is None:
            return await self._unknown_recipient(server, session, address)

        if any(t.address == address.lower() for t in targets):
            return "250 2.1.5 Recipient OK (duplicate)"
        if targets and (target.kind != "operators" or any(t.kind != "operators" for t in targets)):
            log.info(fields(event="defer", client=_peer(session), status="second alias in one transaction (452 4.5.3)"))
            return f"452 4.5.3 One alias per message: send to <{address}> in a separate transaction"

        targets.append(target)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def _find_target(self, local: str) -> Target | None:
        lowered = local.lower()
        address = f"{lowered}@{self.domain}"
        if lowered in OPERATOR_LOCAL_PARTS and self.config.relay.operators_address:
            return Target("operators", address)
        if bounce.is_bounce_local_part(lowered):
            token = bounce.verify_bounce_address(self.config.relay.bounce_secret, lowered)
            return Target("bounce", address, bounce_token=token) if token else None

        match = await self._lookup_alias(lowered)
        return Target("alias", address, match=match) if match else None

    async def _lookup_alias(self, local_part: str) -> store.AliasMatch | None:
        match = self._aliases.get(local_part)
        if match is not None:
            self._aliases.move_to_end(local_part)
            return match

        match = await self.store.run(functools.partial(store.lookup_alias_ref, local_part=local_part))
        if match is not None:
            self._aliases[local_part] = match
            if len(self._aliases) > ALIAS_CACHE_SIZE:
                self._aliases.popitem(last=False)
        return match

    async def _unknown_recipient(self, server, session, address: str) -> str:
        smtp = self.config.smtp
        session.unknown_recipients = getattr(session, "unknown_recipients", 0) + 1
        count = session.unknown_recipients
        log.info(fields(event="reject", client=_peer(session), unknown=count, status="unknown recipient (550 5.1.1)"))

        if count > smtp.unknown_recipients_before_disconnect:
            log.warning(fields(event="disconnect", client=_peer(session), reason="too many unknown recipients"))
            server._writer.write(b"421 4.7.0 Too many unknown recipients; closing connection\r\n")
            server.transport.close()
            return "421 4.7.0 Too many unknown recipients; closing connection"
        if count > smtp.unknown_recipients_before_delay:
            await asyncio.sleep(smtp.unknown_recipient_delay_s)
        if bounce.is_bounce_local_part(address.partition("@")[0]):
            return "550 5.7.1 Invalid or expired bounce address"
        return f"550 5.1.1 Recipient <{address}> does not exist here; check the address"

    # --- DATA -------------------------------------------------------------

    async def _process(self, session, envelope, queue_id: str) -> Outcome:
        raw: bytes = envelope.original_content or b""
        targets: list[Target] = getattr(envelope, "targets", [])
        client = _peer(session)
        log.info(fields(event="data", client=client, size=len(raw), nrcpt=len(targets)))

        if has_bare_line_ending(raw):
            await self._archive_rejected(queue_id, envelope, raw, None, "smuggling", "bare CR or LF in DATA", client)
            return self._reject(queue_id, REPLY_BARE_EOL, "bare CR or LF")

        headers = parse_headers(raw)
        if headers.received_count > self.config.smtp.max_received_headers:
            reply = (
                f"554 5.4.6 Mail loop detected: the message has {headers.received_count} Received "
                f"headers (at most {self.config.smtp.max_received_headers})"
            )
            await self._archive_rejected(queue_id, envelope, raw, headers, "loop", "too many Received headers", client)
            return self._reject(queue_id, reply, "loop")

        target = targets[0]
        if target.kind == "operators":
            return await self._to_operators(queue_id, envelope, raw, headers, client)
        if target.kind == "bounce":
            return await self._bounce_report(queue_id, envelope, raw, headers, target, client)
        return await self._to_alias(queue_id, envelope, raw, headers, target.match, client)

    def _reject(self, queue_id: str, reply: str, why: str) -> Outcome:
        # The reply text may quote the sender's address, so the log keeps only its codes.
        code = " ".join(reply.split()[:2])
        log.info(fields(event="reject", rule=why, status=f"rejected ({code})"))
        return Outcome(reply=reply, queue_id=queue_id)

    async def _to_alias(self, queue_id, envelope, raw, headers: ParsedHeaders, match: store.AliasMatch, client) -> Outcome:
        pair = match.pair
        direction = Direction.SELLER_TO_BUYER if match.role == "buyer_alias" else Direction.BUYER_TO_SELLER

        if headers.from_address is None:
            problem = FROM_PROBLEMS.get(headers.from_error, headers.from_error)
            reply = (
                f"550 5.7.1 The From header {problem}; send the message with "
                "exactly one From header holding one address"
            )
            await self._archive_rejected(queue_id, envelope, raw, headers, "from_header", f"From header {headers.from_error}", client, pair, direction)
            return self._reject(queue_id, reply, "from header")

        # Counters the policy reads (messages today, automatic messages in the window) must not
        # change between the read and the insert, so messages of one seller (seller to buyer) or
        # one pair (buyer to seller) are judged one at a time.
        # NOTE: the lock is per process; relays sharing PostgreSQL can still pass a few extra messages.
        key = ("seller", pair.seller_id) if direction is Direction.SELLER_TO_BUYER else ("pair", pair.id)
        async with self._serialised(key):
            return await self._judge_and_queue(queue_id, envelope, raw, headers, pair, direction, client)

    async def _judge_and_queue(self, queue_id, envelope, raw, headers: ParsedHeaders, pair: Pair, direction: Direction, client) -> Outcome:
        sender = _comparable_address(headers.from_address)
        now = utcnow()
        context = await self.store.run(
            functools.partial(
                store.load_message_context,
                pair_id=pair.id,
                direction=direction.value,
                sender=sender,
                in_reply_to=headers.in_reply_to,
                references=headers.references,
                policy_config=self.config.policy,
                now=now,
            )
        )

        denial = _authorize(context, direction, sender)
        if denial is not None:
            await self._archive_rejected(queue_id, envelope, raw, headers, "sender", denial, client, pair, direction)
            return self._reject(queue_id, f"550 5.7.1 {denial}", "sender")

        verdict = await self._decide(context, direction, envelope, raw, headers, now)
        if verdict.action == "defer":
            log.info(fields(event="defer", rule=verdict.rule, status=f"deferred ({verdict.reply})"))
            return Outcome(reply=verdict.reply, queue_id=queue_id)
        if verdict.action == "reject":
            await self._archive_rejected(queue_id, envelope, raw, headers, verdict.rule, verdict.reason, client, pair, direction)
            return self._reject(queue_id, verdict.reply, verdict.rule)

        message = _new_message(queue_id, envelope, raw, headers, pair, direction, client)
        message.rule = verdict.rule
        message.reason = verdict.reason
        message.automatic = verdict.automatic
        message.critical = verdict.critical
        message.thread_reply = verdict.thread_reply
        message.needs_response = verdict.needs_response
        message.order_id = context.order_ids[0] if context.order_ids else None
        if verdict.findings:
            message.findings = json.dumps(
                [{"kind": f.kind, "action": f.action, "location": f.location, "text": f.text} for f in verdict.findings],
                ensure_ascii=False,
            )

        if verdict.action in ("block", "suppress"):
            message.status = MessageStatus.BLOCKED.value if verdict.action == "block" else MessageStatus.SUPPRESSED.value
            notice = await self._notice_for(message, context, envelope, headers, verdict)
            await self.store.run(functools.partial(store.save_accepted, message=message, notice=notice), write=True)
            log.info(fields(event=verdict.action, rule=verdict.rule, notice=notice is not None, status=f"{verdict.action} ({verdict.reason})"))
            if notice is not None:
                self.on_queued()
            return Outcome(reply=f"250 2.0.0 Ok: queued as {queue_id}", queue_id=queue_id)

        try:
            thread_id, recipient = await self._rewrite(message, context, direction, raw, headers, verdict)
        except rewrite.RewriteError as exc:
            await self._archive_rejected(queue_id, envelope, raw, headers, "rewrite", str(exc), client, pair, direction)
            return self._reject(queue_id, REPLY_UNREWRITABLE, "rewrite")

        bounce_address = bounce.make_bounce_address(self.config.relay.bounce_secret, self.domain, queue_id, 0)
        await self._save_and_hand_over(message, thread_id, recipient, bounce_address)
        log.info(fields(event="queued", direction=direction.value, pair=pair.id, size=len(raw), status="queued"))
        return Outcome(reply=f"250 2.0.0 Ok: queued as {queue_id}", queue_id=queue_id)

    async def _save_and_hand_over(self, message: Message, thread_id: ThreadId, recipient: str, sender: str) -> None:
        """Store the message durably; when the queue has a free slot, start its delivery at once."""
        reserved = self.queue is not None and self.queue.reserve()
        claim = (self.queue.node, utcnow() + timedelta(seconds=self.config.delivery.lease_s)) if reserved else None
        unit = functools.partial(
            store.save_accepted, message=message, thread_id=thread_id, recipients=[(recipient, sender)], claim=claim
        )
        try:
            delivery_ids = await self.store.run(unit, write=True)
        except BaseException:
            if reserved:
                self.queue.cancel_reservation()
            raise

        if reserved:
            loaded = Loaded(sender, recipient, message.received_at, message.delivered_raw)
            self.queue.start(Claimed(delivery_ids[0], message.queue_id), loaded)
        else:
            self.on_queued()

    async def _decide(self, context: store.MessageContext, direction: Direction, envelope, raw: bytes, headers: ParsedHeaders, now) -> policy.Verdict:
        if direction is Direction.SELLER_TO_BUYER:
            text, attachments = await _content(raw)
        else:
            # Only the automatic-message cap applies to buyer-to-seller mail: no content to read.
            text, attachments = "", ()
        facts = context.facts
        inp = policy.PolicyInput(
            direction=direction.value,
            subject=headers.subject,
            text=text,
            envelope_sender=_envelope_sender(envelope),
            auto_submitted=headers.auto_submitted,
            precedence=headers.precedence,
            looks_automatic=headers.looks_automatic,
            thread_reply=facts.thread_reply,
            buyer_opted_out=context.party.buyer_opted_out,
            has_recent_order=facts.has_recent_order,
            sent_today=facts.sent_today,
            orders_last_30_days=facts.orders_last_30_days,
            automatic_passed_recently=facts.automatic_passed_recently,
            attachments=attachments,
            now=now,
            marketplace_domain=self.domain,
            replaced_addresses=tuple(_sender_real_addresses(context, direction)),
        )
        return policy.decide(inp, self.config.policy)

    async def _rewrite(self, message: Message, context: store.MessageContext, direction: Direction, raw: bytes, headers: ParsedHeaders, verdict) -> tuple[ThreadId, str]:
        """Rewrite and sign the message for its recipient; return its thread id row and the recipient."""
        party = context.party
        sender_side = "seller" if direction is Direction.SELLER_TO_BUYER else "buyer"

        if direction is Direction.SELLER_TO_BUYER:
            from_name = party.business_name
            from_alias = f"{party.seller_alias}@{self.domain}"
            to_address = party.buyer_email
            banner = i18n.business_line(party.buyer_locale, party.business_name)
            banner_links = []
        else:
            from_name = party.buyer_name or i18n.default_buyer_name(party.seller_locale)
            from_alias = f"{party.buyer_alias}@{self.domain}"
            to_address = party.support_email
            banner = i18n.order_line(party.seller_locale, context.order_ids)
            banner_links = links.seller_links(self.config, message.queue_id, party.seller_locale)

        relay_id = f"{message.queue_id.lower()}.{secrets.token_hex(6)}@{self.domain}"
        spec = rewrite.RewriteSpec(
            from_name=from_name,
            from_address=from_alias,
            to_address=to_address,
            message_id=relay_id,
            in_reply_to=context.in_reply_to,
            references=_references_order(context.references, context.in_reply_to),
            banner=banner,
            sender_addresses=_sender_real_addresses(context, direction),
            received=self._received(message.queue_id),
            strip_subject_tags=verdict.strip_subject_tag,
            banner_links=banner_links,
            redact=self._redactor(verdict, context, direction),
        )
        if len(raw) > REWRITE_IN_THREAD_BYTES:
            delivered = await asyncio.to_thread(rewrite.rewrite, raw, spec)
        else:
            delivered = rewrite.rewrite(raw, spec)

        message.relay_message_id = relay_id
        message.delivered_raw = await self._sign(delivered)
        thread_id = ThreadId(pair_id=party.pair_id, origin=sender_side, relay_id=relay_id, original_id=headers.message_id or "")
        return thread_id, to_address

    def _redactor(self, verdict, context: store.MessageContext, direction: Direction):
        """Return the function that applies the content rules' "redact" action, or None."""
        if not any(finding.action == "redact" for finding in verdict.findings):
            return None
        content = self.config.policy.content
        placeholders = {kind: i18n.redaction_placeholder(context.party.buyer_locale, kind) for kind in ("emails", "phones", "links")}
        exempt = tuple(_sender_real_addresses(context, direction))

        def redact(text: str) -> str:
            found = policy.find_contact_details(
                text, content, marketplace_domain=self.domain, replaced_addresses=exempt
            )
            return policy.apply_redactions(text, found, placeholders)

        return redact

    @contextlib.asynccontextmanager
    async def _serialised(self, key: tuple[str, object]):
        entry = self._locks.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    async def _sign(self, data: bytes) -> bytes:
        """Add a DKIM-Signature for the marketplace domain when a key is configured."""
        if self.signer is None:
            return data
        if len(data) > REWRITE_IN_THREAD_BYTES:
            return await asyncio.to_thread(self.signer.sign, data)
        return self.signer.sign(data)

    def _delivery(self, message: Message, recipient: str, index: int, null_sender: bool = False) -> Delivery:
        sender = "" if null_sender else bounce.make_bounce_address(
            self.config.relay.bounce_secret, self.domain, message.queue_id, index
        )
        return Delivery(message_id=message.id, recipient=recipient, envelope_sender=sender, next_attempt_at=utcnow())

    def _received(self, queue_id: str) -> str:
        # The sender's host and IP address are left out on purpose: they would reveal the other side.
        stamp = format_datetime(datetime.now(timezone.utc))
        return f"by {self.config.relay.hostname} (relaymail) with ESMTP id {queue_id}; {stamp}"

    async def _notice_for(self, message: Message, context: store.MessageContext, envelope, headers: ParsedHeaders, verdict) -> tuple[Message, str] | None:
        """Build the blocked notice for a blocked message when the rules allow; return (row, recipient) or None."""
        from . import notice as notices

        party = context.party
        if verdict.action != "block":
            return None
        if not notices.should_send_notice(
            _envelope_sender(envelope), headers.auto_submitted, party.block_notice, automatic=verdict.automatic
        ):
            return None

        notice_id = new_queue_id()
        notice_from = self.config.relay.notice_address or f"notices@{self.domain}"
        data = notices.build_blocked_notice(
            seller_locale=party.seller_locale,
            notice_from=notice_from,
            to_address=headers.from_address,
            domain=self.domain,
            hostname=self.config.relay.hostname,
            message_id=f"{notice_id.lower()}.{secrets.token_hex(6)}@{self.domain}",
            original_subject=headers.subject,
            original_date=_header_text(raw_headers_of(message.raw), "date"),
            buyer_alias=f"{party.buyer_alias}@{self.domain}",
            order_id=message.order_id,
            rule=verdict.rule,
            reason_key=verdict.reason_key,
            now=utcnow(),
            original_message_id=headers.message_id,
        )
        data = await self._sign(data)
        row = Message(
            queue_id=notice_id,
            direction=Direction.NOTICE.value,
            pair_id=party.pair_id,
            seller_id=party.seller_id,
            buyer_id=party.buyer_id,
            envelope_sender="",
            header_from=notice_from,
            subject="blocked notice",
            rule=verdict.rule,
            raw=data,
            delivered_raw=data,
            size_bytes=len(data),
            received_at=message.received_at,
        )
        return row, headers.from_address

    async def _to_operators(self, queue_id, envelope, raw, headers, client) -> Outcome:
        received = f"Received: {self._received(queue_id)}\r\n".encode()
        async with self.store.writing() as session:
            message = _new_message(queue_id, envelope, raw, headers, None, Direction.TO_OPERATORS, client)
            message.delivered_raw = received + raw
            session.add(message)
            await session.flush()
            session.add(self._delivery(message, self.config.relay.operators_address, 0))
            await session.commit()
        self.on_queued()
        log.info(fields(event="queued", direction="to_operators", size=len(raw), status="queued"))
        return Outcome(reply=f"250 2.0.0 Ok: queued as {queue_id}", queue_id=queue_id)

    async def _bounce_report(self, queue_id, envelope, raw, headers, target: Target, client) -> Outcome:
        # Reports are recorded against the delivery their token names and never forwarded to the
        # other party; a late hard bounce bounces that delivery and sends the DSN (relaymail.bounce).
        token = target.bounce_token
        if len(raw) > REWRITE_IN_THREAD_BYTES:
            report = await asyncio.to_thread(reports.parse, raw)
        else:
            report = reports.parse(raw)

        message = _new_message(queue_id, envelope, raw, headers, None, Direction.NOTICE, client)
        message.status = MessageStatus.DELIVERED.value
        message.rule = "bounce_report"
        message.reason = f"{report.kind} report about delivery {token.index} of {token.queue_id}"
        # PostgreSQL text columns cannot hold NUL, which a decoded Subject of a bounce may contain.
        for name in ("subject", "header_from", "original_message_id"):
            setattr(message, name, getattr(message, name).replace("\x00", ""))
        unit = functools.partial(bounce.apply_report, config=self.config, token=token, report=report, archived=message)
        row, effects = await self.store.run(unit, write=True)

        if effects is not None:
            effects.log(row.delivery_id)
            if effects.dsn_queue_id:
                self.on_queued()
        log.info(fields(event="bounce_report", about=token.queue_id, kind=report.kind, report_status=row.status or "-", status=row.effect))
        return Outcome(reply=f"250 2.0.0 Ok: report recorded as {queue_id}", queue_id=queue_id)

    async def _archive_rejected(self, queue_id, envelope, raw, headers, rule, reason, client, pair=None, direction=None) -> None:
        """Archive a message refused after DATA (best effort: a failure here must not change the reply)."""
        try:
            async with self.store.writing() as session:
                message = _new_message(queue_id, envelope, raw, headers, pair, direction or Direction.BUYER_TO_SELLER, client)
                if direction is None:
                    message.direction = "unknown"
                message.status = MessageStatus.REJECTED.value
                message.rule = rule
                message.reason = reason
                session.add(message)
                await session.commit()
        except Exception:  # noqa: BLE001 - archiving a rejected message is best effort
            log.exception(fields(event="archive_failed"))


def _new_message(queue_id, envelope, raw, headers: ParsedHeaders | None, pair: Pair | None, direction: Direction, client: str) -> Message:
    message = Message(
        queue_id=queue_id,
        direction=direction.value,
        pair_id=pair.id if pair else None,
        seller_id=pair.seller_id if pair else None,
        buyer_id=pair.buyer_id if pair else None,
        envelope_sender=_envelope_sender(envelope)[:320],
        header_from=(headers.from_address or "")[:320] if headers else "",
        recipient_alias=(envelope.rcpt_tos[0] if envelope.rcpt_tos else "")[:320],
        client_address=client,
        subject=headers.subject[:2000] if headers else "",
        original_message_id=(headers.message_id or "")[:998] if headers else "",
        status=MessageStatus.QUEUED.value,
        raw=raw,
        size_bytes=len(raw),
        received_at=utcnow(),
    )
    # PostgreSQL text columns cannot hold NUL, which a decoded header may contain.
    for name in ("subject", "header_from", "envelope_sender", "original_message_id", "recipient_alias"):
        setattr(message, name, getattr(message, name).replace("\x00", ""))
    return message


def _references_order(mapped: list[str], in_reply_to: list[str]) -> list[str]:
    """Keep the References order of the original, then add In-Reply-To ids it lacked."""
    ordered = [m for m in mapped if m not in in_reply_to]
    for msgid in in_reply_to:
        if msgid not in ordered:
            ordered.append(msgid)
    return ordered


def _authorize(context: store.MessageContext, direction: Direction, sender: str) -> str | None:
    """Return why `sender` (normalised) may not write through this alias, or None when it may."""
    party = context.party
    if direction is Direction.BUYER_TO_SELLER:
        if sender == party.buyer_email.lower():
            return None
        return "This address accepts mail only from the buyer of this conversation"

    states = context.sender_states
    if states.get(party.seller_id) == SenderState.APPROVED.value:
        return None
    if any(state == SenderState.APPROVED.value for state in states.values()):
        return "This sender address belongs to another seller, which cannot write to this buyer"
    return (
        f"The sender address <{sender}> is not approved for this seller; the seller must add "
        "and approve it in its messaging permissions, then send the message again"
    )


def _sender_real_addresses(context: store.MessageContext, direction: Direction) -> list[str]:
    """Return the real addresses of the side that wrote the message."""
    if direction is Direction.SELLER_TO_BUYER:
        return context.seller_addresses
    return [context.party.buyer_email.lower()]


async def _content(raw: bytes) -> tuple[str, tuple[policy.Attachment, ...]]:
    """Return the decoded text of the text parts and the attachments, for the policy."""
    if len(raw) > REWRITE_IN_THREAD_BYTES:
        return await asyncio.to_thread(policy_view, raw)
    return policy_view(raw)


def policy_view(raw: bytes) -> tuple[str, tuple[policy.Attachment, ...]]:
    """Decode what the policy reads: text of the text parts, and each attachment's size and head."""
    root = mime.parse(raw)
    texts: list[str] = []
    attachments: list[policy.Attachment] = []
    _collect(root, texts, attachments)
    return "\n".join(texts), tuple(attachments)


def _collect(part: mime.Part, texts: list[str], attachments: list[policy.Attachment]) -> None:
    if part.is_multipart:
        for child in part.children:
            _collect(child, texts, attachments)
        return

    payload = part.decoded_payload()
    if part.is_text_part():
        texts.append(_decode_text(payload, part.charset))
        return
    attachments.append(
        policy.Attachment(
            filename=part.filename or "",
            content_type=part.content_type.lower(),
            decoded_size=len(payload),
            head=payload[: policy.SNIFF_BYTES],
        )
    )


def _decode_text(payload: bytes, charset: str | None) -> str:
    for codec in decoding_codecs(charset):
        try:
            return payload.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    return payload.decode("utf-8", errors="replace")


def raw_headers_of(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def _header_text(header_block: bytes, name: str) -> str | None:
    fields_, _, _ = split_fields(header_block)
    found = first_field(fields_, name)
    return found.value()[:200] if found else None


def _envelope_sender(envelope) -> str:
    """Return MAIL FROM's address, "" for the null sender (aiosmtpd keeps it as "<>")."""
    sender = envelope.mail_from or ""
    return "" if sender == "<>" else sender


def _comparable_address(address: str) -> str:
    """Return `address` as provisioning stores it (lower case, IDNA domain), else lower-cased."""
    try:
        return provision.normalize_address(address, "From address")
    except InputError:
        return address.lower()


def _peer(session) -> str:
    peer = getattr(session, "peer", None)
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "-")
