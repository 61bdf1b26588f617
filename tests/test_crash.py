"""Crash safety: `relaymail serve` killed with SIGKILL under load loses no accepted message.

The scenario, all on 127.0.0.1:
  1. an aiosmtpd sink in this process stands for the next hop (the smarthost);
  2. relaymail.db and relaymail.provision migrate a fresh SQLite database and
     create one buyer-seller pair;
  3. `python -m relaymail serve` runs as a subprocess;
  4. several SMTP clients send buyer-to-seller messages, each with a unique
     marker in its body; every tenth one has a From that the relay rejects;
  5. the relay is killed with SIGKILL (by its PID) at random points of the load,
     and restarted each time; the clients reconnect and carry on;
  6. after the load, it is killed and restarted once more, and the test waits
     for the queue to drain and stops the relay with SIGTERM.

What is asserted:
  - every message that got a 250 reached the sink at least once;
  - no rejected message reached it, and nothing that was never sent;
  - every accepted message is archived as delivered;
  - `relaymail queue list` shows an empty queue at the end;
  - the relay exits 0 on SIGTERM.

What is counted and printed (run pytest with -s to see it):
  - duplicates: a marker delivered more than once, because a kill fell between
    the sink's 250 and the relay's commit of the attempt;
  - in-doubt messages: the connection broke after the message data was sent
    and before the reply, so the relay may or may not have stored them.
RELAYMAIL_CRASH_SEED=N repeats a run's random choices.
scripts/crashtest runs the same scenario with other sizes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest
from relayenv import BUYER, DOMAIN, SELLER, write_relay_config
from sink import Sink

from relaymail import config as relaymail_config
from relaymail import db, provision
from relaymail.store import Store

READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
SCENARIO_TIMEOUT_S = 150.0
MARKER_RE = re.compile(rb"crash-marker-(\d{5})")
QUEUED_RE = re.compile(r"queued as ([0-9A-F]{12})")
STRANGER = "someone.else@example.org"


@dataclass
class Figures:
    """What one crash run sent, what the sink received, and how often the relay was killed."""

    seed: int
    sent: int = 0
    accepted: dict[int, str] = field(default_factory=dict)  # marker -> queue id
    rejected: set[int] = field(default_factory=set)
    in_doubt: set[int] = field(default_factory=set)
    retries: int = 0
    kills: list[dict] = field(default_factory=list)
    delivered: Counter = field(default_factory=Counter)  # marker -> times received by the sink
    unknown_markers: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    @property
    def completed(self) -> int:
        return len(self.accepted) + len(self.rejected) + len(self.in_doubt)

    @property
    def duplicates(self) -> dict[int, int]:
        return {marker: count for marker, count in self.delivered.items() if count > 1}

    def summary(self) -> dict:
        in_doubt_delivered = sum(1 for marker in self.in_doubt if self.delivered[marker])
        return {
            "seed": self.seed,
            "sent": self.sent,
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "in_doubt": len(self.in_doubt),
            "in_doubt_delivered": in_doubt_delivered,
            "client_retries": self.retries,
            "kills": len(self.kills),
            "kill_points": [kill["completed"] for kill in self.kills],
            "delivered_distinct": len(self.delivered),
            "delivered_total": sum(self.delivered.values()),
            "duplicates": sum(count - 1 for count in self.duplicates.values()),
            "duplicate_markers": sorted(self.duplicates),
            "timings_s": {name: round(value, 2) for name, value in self.timings.items()},
        }


class RelayProcess:
    """`python -m relaymail serve` as a child process, restarted after each kill."""

    def __init__(self, config_path: Path, port: int, log_dir: Path):
        self.config_path = config_path
        self.port = port
        self.log_dir = log_dir
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    async def start(self) -> None:
        started = time.monotonic()
        self.starts += 1
        log_path = self.log_dir / f"relay-{self.starts}.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "relaymail", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        await self._wait_ready(log_path)
        self.start_seconds.append(time.monotonic() - started)

    async def _wait_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited with {self.process.returncode} at start:\n{tail(log_path)}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            banner = await asyncio.wait_for(reader.readline(), timeout=5)
            writer.close()
            if banner.startswith(b"220"):
                return
        raise AssertionError(f"relay not ready within {READY_TIMEOUT_S} s:\n{tail(log_path)}")

    def kill(self) -> None:
        """Send SIGKILL to the relay's PID and reap it."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def run_cli(config_path: Path, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "relaymail", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, f"relaymail {' '.join(args)} failed: {completed.stderr}"
    return completed.stdout


async def provision_pair(config: relaymail_config.Config) -> str:
    """Migrate the database and create the buyer-seller pair; return the seller alias."""
    await db.upgrade(config.database.url)
    store = Store(config.database.url)
    try:
        async with store.session() as session:
            await provision.add_seller(session, "S1", "Tienda", SELLER, domain=DOMAIN, senders=[SELLER])
            await provision.add_buyer(session, "B1", BUYER, domain=DOMAIN, name="Juan")
            pair = await provision.show_pair(session, "B1", "S1", DOMAIN)
            await session.commit()
    finally:
        await store.close()
    return pair.seller_alias


def make_message(index: int, seller_alias: str, rejected: bool) -> bytes:
    sender = STRANGER if rejected else BUYER
    return (
        f"From: Cliente <{sender}>\r\n"
        f"To: {seller_alias}\r\n"
        f"Subject: Pregunta {index}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\n"
        f"Message-ID: <crash-{index:05d}@example.net>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"Hola, una pregunta. crash-marker-{index:05d}\r\n"
    ).encode()


async def client_worker(port: int, seller_alias: str, pending: asyncio.Queue, figures: Figures, deadline: float) -> None:
    """Send messages from `pending` over one connection, reconnecting whenever the relay dies."""
    client: aiosmtplib.SMTP | None = None
    while True:
        try:
            index, rejected = pending.get_nowait()
        except asyncio.QueueEmpty:
            break

        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"load did not finish in time; stuck at message {index}")
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
                try:
                    await client.connect()
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    client = None
                    await asyncio.sleep(0.05)
                    continue

            outcome = await send_one(client, index, seller_alias, rejected)
            if outcome == "retry":
                figures.retries += 1
                client.close()
                client = None
                continue
            record(figures, index, outcome)
            break

    if client is not None and client.is_connected:
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


async def send_one(client: aiosmtplib.SMTP, index: int, seller_alias: str, rejected: bool) -> tuple[str, str] | str:
    """Return ("accepted", queue id), ("rejected", reply), ("in_doubt", error) or "retry"."""
    try:
        await client.mail(BUYER)
        await client.rcpt(seller_alias)
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code >= 500:
            raise AssertionError(f"message {index}: unexpected {exc.code} {exc.message} before DATA") from exc
        return "retry"
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        # Nothing was stored before DATA: sending the message again is safe.
        return "retry"

    try:
        reply = await client.data(make_message(index, seller_alias, rejected))
    except aiosmtplib.SMTPResponseException as exc:
        if exc.code >= 500:
            return ("rejected", f"{exc.code} {exc.message}")
        return "retry"
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
        return ("in_doubt", repr(exc))

    match = QUEUED_RE.search(reply.message)
    if reply.code != 250 or match is None:
        raise AssertionError(f"message {index}: unexpected reply {reply.code} {reply.message}")
    return ("accepted", match.group(1))


def record(figures: Figures, index: int, outcome: tuple[str, str]) -> None:
    kind, detail = outcome
    if kind == "accepted":
        figures.accepted[index] = detail
    elif kind == "rejected":
        figures.rejected.add(index)
    else:
        figures.in_doubt.add(index)


async def killer(relay: RelayProcess, figures: Figures, thresholds: list[int], rng: random.Random, load_done: asyncio.Event) -> None:
    """Kill and restart the relay each time the load passes the next threshold."""
    for threshold in thresholds:
        while figures.completed < threshold and not load_done.is_set():
            await asyncio.sleep(0.005)
        if load_done.is_set():
            return
        # A few milliseconds more, so kills do not all land right after a reply.
        await asyncio.sleep(rng.uniform(0, 0.03))
        completed = figures.completed
        relay.kill()
        figures.kills.append({"completed": completed, "phase": "load"})
        await relay.start()


async def wait_drained(sink: Sink, figures: Figures, database: Path) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        collect(sink, figures)
        if all(figures.delivered[marker] for marker in figures.accepted) and pending_deliveries(database) == 0:
            return
        await asyncio.sleep(0.2)
    missing = sorted(marker for marker in figures.accepted if not figures.delivered[marker])
    raise AssertionError(
        f"queue not drained within {DRAIN_TIMEOUT_S} s (seed {figures.seed}); "
        f"accepted but not delivered: {missing[:20]}"
    )


def pending_deliveries(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
        return connection.execute("SELECT count(*) FROM deliveries WHERE state IN ('queued', 'held')").fetchone()[0]


def collect(sink: Sink, figures: Figures) -> None:
    figures.delivered.clear()
    figures.unknown_markers = 0
    for received in sink.messages:
        found = MARKER_RE.findall(received.data)
        if len(found) != 1:
            figures.unknown_markers += 1
            continue
        figures.delivered[int(found[0])] += 1


async def run_scenario(directory: Path, messages: int, clients: int, kills: int, seed: int) -> Figures:
    """Run the load with `kills` SIGKILLs during it and one after it; return the figures."""
    rng = random.Random(seed)
    figures = Figures(seed=seed)
    sink = await Sink().start()
    config_path = write_relay_config(directory, sink.port, extra="workers = 8\n")
    config = relaymail_config.load(config_path)
    database = directory / "relay.sqlite3"
    port = config.listen_port
    relay = RelayProcess(config_path, port, directory)

    try:
        phase_start = time.monotonic()
        seller_alias = await provision_pair(config)
        figures.timings["provision"] = time.monotonic() - phase_start
        await relay.start()

        pending: asyncio.Queue = asyncio.Queue()
        for index in range(messages):
            pending.put_nowait((index, index % 10 == 9))
        figures.sent = messages

        thresholds = sorted(rng.sample(range(messages // 10, messages * 85 // 100), kills))
        load_done = asyncio.Event()
        deadline = time.monotonic() + SCENARIO_TIMEOUT_S
        kill_task = asyncio.create_task(killer(relay, figures, thresholds, rng, load_done))
        workers = [
            asyncio.create_task(client_worker(port, seller_alias, pending, figures, deadline))
            for _ in range(clients)
        ]
        phase_start = time.monotonic()
        try:
            # Returns when every task is done, or at the first failure, which result() raises.
            done, _ = await asyncio.wait([kill_task, *workers], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            load_done.set()
            for task in (kill_task, *workers):
                task.cancel()
            await asyncio.gather(kill_task, *workers, return_exceptions=True)
        figures.timings["load"] = time.monotonic() - phase_start

        # One more kill while the queue may still hold deliveries in flight.
        relay.kill()
        figures.kills.append({"completed": figures.completed, "phase": "drain"})
        await relay.start()
        phase_start = time.monotonic()
        await wait_drained(sink, figures, database)
        figures.timings["drain"] = time.monotonic() - phase_start
        figures.timings["relay_start_max"] = max(relay.start_seconds)

        # In a thread, so the sink on this event loop can reply to the relay while it stops.
        status = await asyncio.to_thread(relay.terminate)
        assert status == 0, f"relay exited with {status} on SIGTERM:\n{tail(directory / f'relay-{relay.starts}.log')}"
        collect(sink, figures)
        listed = json.loads(await asyncio.to_thread(run_cli, config_path, "queue", "list", "--json"))
        assert listed["count"] == 0, f"queue not empty after the drain: {listed}"
        check_archive(database, figures)
        return figures
    finally:
        relay.ensure_stopped()
        await sink.stop()


def check_archive(database: Path, figures: Figures) -> None:
    """Every accepted message is archived as delivered, and no delivery row is left pending."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        statuses = dict(connection.execute("SELECT queue_id, status FROM messages"))
    not_delivered = {qid: statuses.get(qid) for qid in figures.accepted.values() if statuses.get(qid) != "delivered"}
    assert not_delivered == {}, f"accepted messages not archived as delivered: {not_delivered}"
    assert pending_deliveries(database) == 0


def check_figures(figures: Figures) -> None:
    """Assert the crash-safety properties of one run; each message names the seed."""
    seed = figures.seed
    lost = sorted(set(figures.accepted) - set(figures.delivered))
    delivered_rejected = sorted(set(figures.rejected) & set(figures.delivered))
    never_sent = sorted(set(figures.delivered) - set(range(figures.sent)))

    assert lost == [], f"accepted (250) but never delivered: {lost} (seed {seed})"
    assert delivered_rejected == [], f"rejected but delivered: {delivered_rejected} (seed {seed})"
    assert never_sent == [], f"delivered but never sent: {never_sent} (seed {seed})"
    assert figures.unknown_markers == 0, f"{figures.unknown_markers} messages without one marker (seed {seed})"
    assert all(index % 10 == 9 for index in figures.rejected), f"a message from the buyer was rejected (seed {seed})"
    assert all(index % 10 != 9 for index in figures.accepted), f"a message from a stranger was accepted (seed {seed})"
    assert figures.completed == figures.sent


@pytest.mark.slow
async def test_sigkill_loses_no_accepted_message(tmp_path: Path):
    seed = int(os.environ.get("RELAYMAIL_CRASH_SEED", random.randrange(1_000_000)))
    kills = random.Random(seed).randint(3, 5)

    figures = await asyncio.wait_for(
        run_scenario(tmp_path, messages=400, clients=8, kills=kills, seed=seed), timeout=SCENARIO_TIMEOUT_S + 60
    )
    print(f"\ncrash test figures: {json.dumps(figures.summary())}")

    check_figures(figures)
    assert len(figures.kills) == kills + 1
    assert len(figures.rejected) > 0
    assert len(figures.accepted) > figures.sent // 2


def test_check_figures_detects_failures():
    lost = Figures(seed=1, sent=20, accepted={0: "A" * 12, 1: "B" * 12}, rejected={9, 19})
    lost.delivered.update({0: 1})
    rejected_delivered = Figures(seed=2, sent=20, accepted={0: "A" * 12}, rejected={9})
    rejected_delivered.delivered.update({0: 1, 9: 1})

    with pytest.raises(AssertionError, match=r"accepted \(250\) but never delivered: \[1\] \(seed 1\)"):
        check_figures(lost)
    with pytest.raises(AssertionError, match=r"rejected but delivered: \[9\]"):
        check_figures(rejected_delivered)
