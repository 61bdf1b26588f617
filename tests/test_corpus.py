"""Corpus replay: e-mail from other projects' test data sent through the relay on 127.0.0.1.

The corpus (shared/corpus, described by its MANIFEST.md) holds real, broken and hostile
messages that no one here wrote. Each test starts relaymail with the case cast (see
relayenv.py), sends hundreds of corpus files over several concurrent SMTP sessions, and
checks every reply and every delivered message. Files are read in place and changed only
in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest
from corpus_helpers import (
    BatchResult,
    Job,
    address_leaks,
    attachment_digests,
    bounce_files,
    forward_files,
    from_problems,
    message_id_of,
    replace_from,
    send_batch,
    to_crlf,
    wire_problems,
)
from relayenv import BUYER, BUYER_ALIAS, SELLER, SELLER_ALIAS, RelayEnv

from relaymail.queue import list_deliveries

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

CONNECTIONS = 8
SOCKET_TIMEOUT_S = 30.0  # per socket operation; a relay that stops answering fails the message
SEND_BUDGET_S = 110.0  # no message starts later, so each test stays well under three minutes
DRAIN_TIMEOUT_S = 30.0
BUYER_NAME_ON_RECORD = "Juan Pérez"  # the display name relayenv provisions for the buyer
BUYER_FROM_FIELD = f"From: Juan <{BUYER}>\r\n".encode()

# Corpus files with a reported relay bug, keyed by path inside the corpus, with the check
# that fails for them. The corpus test leaves these (file, check) pairs out, and an
# xfail(strict=True) test below reproduces each bug, so fixing it makes that test fail
# until its entry here and its mark are removed.
KNOWN_FAILURES: dict[str, tuple[str, str]] = {}


@pytest.fixture
def corpus(shared_dir: Path) -> Path:
    path = shared_dir / "corpus"
    if not (path / "MANIFEST.md").is_file():
        pytest.skip(f"e-mail corpus not found at {path}; it is read in place and never copied into the repository")
    return path


@pytest.fixture
async def env(tmp_path: Path):
    relay_env = await RelayEnv(tmp_path).start()
    try:
        yield relay_env
    finally:
        await relay_env.stop()


def relative_name(corpus: Path, path: Path) -> str:
    return path.relative_to(corpus).as_posix()


def is_known(name: str, check: str) -> bool:
    return KNOWN_FAILURES.get(name, ("", ""))[0] == check


def reply_problems(result: BatchResult) -> list[str]:
    """Return the replies that are not a definitive 2xx or 5xx, or that leak Python exception text."""
    problems = [f"{name}: not sent, the time budget ran out" for name in result.unsent]
    for name, reply in sorted(result.replies.items()):
        if reply.stage == "connection":
            problems.append(f"{name}: connection dropped or timed out after {reply.seconds:.1f} s ({reply.text})")
        elif reply.code // 100 not in (2, 5):
            problems.append(f"{name}: {reply.stage} answered {reply.code} {reply.text}")
        if "Error: (" in reply.text:
            problems.append(f"{name}: reply text contains Python exception text: {reply.text}")
    return problems


def print_counts(title: str, result: BatchResult, delivered: int, seconds: float) -> None:
    by_code = Counter(f"{reply.code} {reply.text[:5]}" if reply.code else "no reply" for reply in result.replies.values())
    accepted = sum(1 for reply in result.replies.values() if reply.code // 100 == 2)
    slowest = max(result.replies.items(), key=lambda item: item[1].seconds, default=("-", None))
    print(f"\n{title}: sent {len(result.replies)}, accepted {accepted}, delivered {delivered}, in {seconds:.1f} s")
    print(f"  replies by code: {dict(sorted(by_code.items()))}")
    if slowest[1] is not None:
        print(f"  slowest message: {slowest[0]} ({slowest[1].seconds:.1f} s)")
    for name, reply in sorted(result.replies.items()):
        if reply.code // 100 != 2:
            print(f"  {name}: {reply.stage} {reply.code} {reply.text[:160]}")


async def drain(env: RelayEnv) -> list[dict]:
    """Wait for the queue to empty; return the deliveries still pending after DRAIN_TIMEOUT_S."""
    await env.wait_idle(timeout_s=DRAIN_TIMEOUT_S)
    return await list_deliveries(env.relay.store)


async def test_corpus_buyer_to_seller(env: RelayEnv, corpus: Path):
    started = time.monotonic()
    files = forward_files(corpus)
    assert len(files) >= 300

    inputs: dict[str, bytes] = {}
    for path in files:
        raw = path.read_bytes()
        # The buyer's address is made up for these tests, so no corpus file, attachment
        # or embedded message can carry it. Every occurrence in the output is a leak.
        assert BUYER.encode() not in raw.lower(), relative_name(corpus, path)
        inputs[relative_name(corpus, path)] = replace_from(to_crlf(raw), BUYER_FROM_FIELD)
    jobs = [Job(name, BUYER, SELLER_ALIAS, data) for name, data in inputs.items()]

    result = await asyncio.to_thread(send_batch, env.port, jobs, CONNECTIONS, SOCKET_TIMEOUT_S, SEND_BUDGET_S)
    pending = await drain(env)
    archived = {message.queue_id: message for message in await env.messages()}
    delivered_by_id = {message_id_of(item.data): item for item in env.sink.messages}

    print_counts("buyer-to-seller corpus", result, len(env.sink.messages), time.monotonic() - started)
    suppressed = [name for name, reply in result.replies.items() if reply.queue_id and archived[reply.queue_id].status == "suppressed"]
    print(f"  accepted but suppressed as repeated automatic messages: {len(suppressed)}")

    problems = reply_problems(result)
    missing, leaks, wire, changed, senders, recipients, unsuppressible = [], [], [], [], [], [], []
    automatic_delivered = []
    for name, reply in sorted(result.replies.items()):
        if reply.queue_id is None:
            continue
        message = archived.get(reply.queue_id)
        if message is None:
            missing.append(f"{name}: accepted as {reply.queue_id} but not archived")
            continue
        if message.status == "suppressed":
            # An automatic message reaches the seller at most once per pair, direction and
            # 24 hours; later ones are archived as suppressed and never delivered.
            if not message.automatic or message.rule != "automatic_cap":
                unsuppressible.append(f"{name}: suppressed by rule {message.rule!r}, automatic={message.automatic}")
            continue
        received = delivered_by_id.get(message.relay_message_id)
        if received is None:
            if not is_known(name, "delivered"):
                missing.append(f"{name}: accepted as {reply.queue_id}, status {message.status!r}, never reached the sink")
            continue
        if message.automatic:
            automatic_delivered.append(name)

        data = received.data
        if received.rcpt_tos != [SELLER]:
            recipients.append(f"{name}: delivered to {received.rcpt_tos}")
        found = address_leaks(data, BUYER)
        if found and not is_known(name, "leak"):
            leaks.append(f"{name}: buyer address in {', '.join(found)}")
        broken_lines = wire_problems(data)
        if broken_lines and not is_known(name, "wire"):
            wire.append(f"{name}: {', '.join(broken_lines)}")
        before, after = attachment_digests(inputs[name]), attachment_digests(data)
        if before != after and not is_known(name, "attachments"):
            changed.append(f"{name}: lost {dict(before - after)}, gained {dict(after - before)}")
        wrong_from = from_problems(data, BUYER_ALIAS, BUYER_NAME_ON_RECORD)
        if wrong_from and not is_known(name, "from"):
            senders.append(f"{name}: {', '.join(wrong_from)}")

    assert problems == [], "replies that are not definitive:\n" + "\n".join(problems)
    assert pending == [], f"deliveries still queued after {DRAIN_TIMEOUT_S} s: {pending}"
    assert missing == [], "accepted messages not delivered:\n" + "\n".join(missing)
    assert unsuppressible == [], "messages suppressed without being automatic:\n" + "\n".join(unsuppressible)
    assert len(automatic_delivered) <= 1, f"automatic messages delivered in one pair and direction within 24 hours: {automatic_delivered}"
    assert recipients == [], "\n".join(recipients)
    assert leaks == [], "the buyer's real address reached the seller:\n" + "\n".join(leaks)
    assert wire == [], "delivered messages with bad line endings or long lines:\n" + "\n".join(wire)
    assert changed == [], "attachments or embedded messages changed:\n" + "\n".join(changed)
    assert senders == [], "From header is not the buyer alias alone:\n" + "\n".join(senders)


async def test_corpus_bounces_get_no_answer(env: RelayEnv, corpus: Path):
    started = time.monotonic()
    files = bounce_files(corpus)
    assert len(files) >= 150

    # From is left as the file has it. Line endings are made CRLF so that each message
    # reaches the sender check instead of the bare CR/LF rejection.
    jobs = [Job(relative_name(corpus, path), "", SELLER_ALIAS, to_crlf(path.read_bytes())) for path in files]

    result = await asyncio.to_thread(send_batch, env.port, jobs, CONNECTIONS, SOCKET_TIMEOUT_S, SEND_BUDGET_S)
    pending = await drain(env)
    await asyncio.sleep(0.5)  # one more queue poll: a notice queued late would be sent by now
    deliveries = await list_deliveries(env.relay.store, include_final=True)
    generated = [message.queue_id for message in await env.messages() if message.direction == "notice"]

    print_counts("null-sender bounce corpus", result, len(env.sink.messages), time.monotonic() - started)

    problems = reply_problems(result)
    # None of these files has the buyer's address in From, so the seller alias must reject
    # every one of them after DATA.
    not_rejected = [
        f"{name}: {reply.stage} {reply.code} {reply.text}"
        for name, reply in sorted(result.replies.items())
        if not (reply.stage == "DATA" and reply.code == 550 and reply.text.startswith("5.7.1"))
    ]
    assert problems == [], "replies that are not definitive:\n" + "\n".join(problems)
    assert not_rejected == [], "null-sender messages not rejected 550 5.7.1:\n" + "\n".join(not_rejected)
    assert pending == []
    assert deliveries == [], "relaymail queued mail in answer to null-sender messages"
    assert generated == [], "relaymail generated notices in answer to null-sender messages"
    assert env.sink.messages == []
