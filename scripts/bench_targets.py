"""The processes scripts/bench starts: the sink, a loopback Postfix and relaymail.

Everything listens on 127.0.0.1 only. `ProcessGroup` remembers each process
this script started so that `stop_all()` can end exactly those, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
POSTFIX_TEMPLATES = SCRIPTS_DIR / "postfix-loopback"

RELAY_DOMAIN = "bench.example"
SELLER_ID = "S1"
SELLER_SUPPORT = "support@seller-shop.example"
SELLER_SENDER = "orders@seller-shop.example"
BUYER_DOMAIN = "buyers.example"


class HarnessError(Exception):
    """A step of the benchmark itself failed (a target did not start, a command failed)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_smtp(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until 127.0.0.1:port sends a 220 greeting. Raise HarnessError on timeout."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise HarnessError(f"process {process.pid} exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                greeting = sock.recv(512)
                if greeting.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
                last_error = f"greeting {greeting[:80]!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise HarnessError(f"127.0.0.1:{port} did not greet with 220 within {timeout:.0f} s ({last_error})")


def buyer_address(number: int) -> str:
    return f"buyer{number}@{BUYER_DOMAIN}"


def tail_text(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


# --- memory -----------------------------------------------------------------


def process_tree(root_pid: int) -> list[int]:
    """Return root_pid and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after it.
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    result, pending = [], [root_pid]
    while pending:
        pid = pending.pop()
        if Path(f"/proc/{pid}").exists():
            result.append(pid)
            pending.extend(children.get(pid, []))
    return result


def status_kib(pid: int, field: str) -> int | None:
    """Return a field such as VmHWM or VmRSS from /proc/PID/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss(pids: list[int]) -> bool:
    """Reset VmHWM of each process to its current RSS (Linux clear_refs value 5)."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def cpu_seconds(pids: list[int]) -> float:
    """Return the user plus system CPU time of the processes so far, in seconds (0 for a gone process)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            # The command name in brackets may contain spaces, so split after its closing bracket.
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(stat[11]) + int(stat[12])  # utime and stime, fields 14 and 15 of proc(5)
    return total / ticks


def peak_rss_mib(pids: list[int]) -> float | None:
    values = [status_kib(pid, "VmHWM") for pid in pids]
    known = [v for v in values if v is not None]
    return sum(known) / 1024 if known else None


def pss_kib(pid: int) -> int:
    """Return the proportional set size of a process in KiB (0 if it is gone).

    PSS divides each shared page among the processes that map it, so the sum
    over a multi-process server such as Postfix does not count shared
    libraries once per process as a sum of RSS would.
    """
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


class PssSampler:
    """Samples the summed PSS of a process tree every 0.2 s and keeps the maximum."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(pss_kib(pid) for pid in process_tree(self.root_pid))
            self.max_kib = max(self.max_kib, total)
            self._stop.wait(0.2)

    @property
    def max_mib(self) -> float | None:
        return self.max_kib / 1024 if self.max_kib else None


# --- processes --------------------------------------------------------------


class ProcessGroup:
    """Processes started by this script and cleanup steps, undone in reverse order."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, object]] = []

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self._steps.append((name, process))
        return process

    def on_stop(self, name: str, callback) -> None:
        self._steps.append((name, callback))

    def stop_all(self) -> None:
        while self._steps:
            name, step = self._steps.pop()
            try:
                if isinstance(step, subprocess.Popen):
                    stop_process(step)
                else:
                    step()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on with the next step
                print(f"warning: stopping {name} failed: {exc}", file=sys.stderr)


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """End one process this script started: SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def running_command(pid: int) -> str | None:
    """Return the command name of a live process, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = stat.partition("(")[2].rpartition(")")
    return None if rest.split()[0] == "Z" else name


def stop_pid(pid: int, expected_command: str, grace: float = 10.0) -> None:
    """End a daemon this script started but is not the parent of (the Postfix master).

    Signals it only while its command name is still `expected_command`, so a
    recycled PID is left alone.
    """
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if running_command(pid) != expected_command:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and running_command(pid) == expected_command:
            time.sleep(0.1)


# --- sink -------------------------------------------------------------------


class Sink:
    """SMTP server on 127.0.0.1 that accepts and discards, and counts messages.

    Uses Postfix's smtp-sink when it is installed and `use_smtp_sink` is true,
    else scripts/bench_sink.py under the current Python (which needs aiosmtpd).
    Both write "mesg=N" counters to standard output, which a thread parses.
    """

    def __init__(self, group: ProcessGroup, use_smtp_sink: bool):
        self.group = group
        self.smtp_sink = shutil.which("smtp-sink") if use_smtp_sink else None
        self.port = 0
        self.kind = "smtp-sink" if self.smtp_sink else "aiosmtpd (scripts/bench_sink.py)"
        self._count = 0
        self._lock = threading.Lock()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = free_port()
        if self.smtp_sink:
            argv = [self.smtp_sink, "-c"]
            if os.geteuid() == 0:
                # smtp-sink refuses to run as root without a user to switch to.
                argv += ["-u", "nobody"]
            argv += [f"127.0.0.1:{self.port}", "256"]
        else:
            argv = [sys.executable, str(SCRIPTS_DIR / "bench_sink.py"), str(self.port)]
        self.process = self.group.start("sink", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read_counts, daemon=True).start()
        wait_for_smtp(self.port, 15, self.process)

    def _read_counts(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        pattern = re.compile(rb"mesg=(\d+)")
        carry = b""
        while True:
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                return
            text = carry + chunk
            matches = pattern.findall(text)
            if matches:
                with self._lock:
                    self._count = max(self._count, int(matches[-1]))
            carry = text[-32:]

    def count(self) -> int:
        with self._lock:
            return self._count

    def wait_for_count(self, target: int, timeout: float) -> tuple[int, float]:
        """Wait until the count reaches `target`, and return the count and the monotonic time then."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.count()
            now = time.monotonic()
            if current >= target or now >= deadline:
                return current, now
            time.sleep(0.01)


# --- Postfix ----------------------------------------------------------------


def postfix_version() -> str | None:
    postconf = shutil.which("postconf")
    if not postconf:
        return None
    result = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True, text=True)
    return result.stdout.strip() or None


class PostfixInstance:
    """A Postfix instance in its own directory, listening on 127.0.0.1:port only.

    Config, queue and data directories live under `base_dir`, with main.cf and
    master.cf rendered from scripts/postfix-loopback. Nothing in /etc/postfix is
    changed (`postfix check` still reads the postfix-files list there). The
    instance relays everything to the sink and does no local delivery.
    """

    def __init__(self, group: ProcessGroup, base_dir: Path, sink_port: int):
        self.group = group
        self.base_dir = base_dir
        self.config_dir = base_dir / "config"
        self.queue_dir = base_dir / "queue"
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "maillog"
        self.sink_port = sink_port
        self.port = 0
        self.master_pid: int | None = None
        self.postfix = shutil.which("postfix") or "/usr/sbin/postfix"

    @staticmethod
    def available() -> bool:
        return shutil.which("postfix") is not None or Path("/usr/sbin/postfix").exists()

    def _render(self, name: str) -> str:
        text = (POSTFIX_TEMPLATES / name).read_text()
        values = {
            "@BASE_DIR@": str(self.base_dir),
            "@CONFIG_DIR@": str(self.config_dir),
            "@QUEUE_DIR@": str(self.queue_dir),
            "@DATA_DIR@": str(self.data_dir),
            "@LOG_FILE@": str(self.log_file),
            "@LISTEN_PORT@": str(self.port),
            "@SINK_PORT@": str(self.sink_port),
        }
        for marker, value in values.items():
            text = text.replace(marker, value)
        leftover = re.findall(r"@[A-Z_]+@", text)
        if leftover:
            raise HarnessError(f"{POSTFIX_TEMPLATES / name}: markers without a value: {leftover}")
        return text

    def _postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.postfix, "-c", str(self.config_dir), *args],
            capture_output=True, text=True, timeout=timeout,
        )

    def start(self) -> None:
        if os.geteuid() != 0:
            raise HarnessError("the Postfix target needs root (postfix start runs master as root)")
        self.port = free_port()
        if self.port < 1024:
            raise HarnessError(f"free_port() returned privileged port {self.port}; Postfix is started only on ports >= 1024")
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True)
        # Postfix opens data_directory as the postfix user, which needs
        # search permission on every parent directory.
        for directory in (self.base_dir.parent, self.base_dir):
            directory.chmod(directory.stat().st_mode | 0o111)
        shutil.chown(self.data_dir, user="postfix")
        (self.config_dir / "main.cf").write_text(self._render("main.cf.in"))
        (self.config_dir / "master.cf").write_text(self._render("master.cf.in"))

        # Register the stop step first, so a half-started instance is stopped too.
        self.group.on_stop("postfix", self.stop)
        result = self._postfix("start")
        if result.returncode != 0:
            raise HarnessError(
                f"postfix -c {self.config_dir} start failed with status {result.returncode}: "
                f"{result.stdout}{result.stderr}\n{tail(self.log_file)}"
            )
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_file.exists():
            self.master_pid = int(pid_file.read_text().split()[0])
        wait_for_smtp(self.port, 30)

    def stop(self) -> None:
        if not (self.config_dir / "main.cf").exists():
            return
        try:
            self._postfix("stop", timeout=15)
        except subprocess.TimeoutExpired:
            pass
        if self.master_pid is not None:
            stop_pid(self.master_pid, "master")


# --- relaymail --------------------------------------------------------------


def find_relaymail() -> list[str] | None:
    """Return the relaymail command next to this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "relaymail"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("relaymail")
    return [found] if found else None


class RelaymailInstance:
    """relaymail with its config, SQLite database and logs under `base_dir`."""

    def __init__(self, group: ProcessGroup, command: list[str], base_dir: Path, sink_port: int, log_level: str):
        self.group = group
        self.command = command
        self.base_dir = base_dir
        self.config_path = base_dir / "relaymail.toml"
        self.db_path = base_dir / "relaymail.sqlite3"
        self.log_path = base_dir / "relaymail.log"
        self.sink_port = sink_port
        self.log_level = log_level
        self.port = 0
        self.process: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.port = free_port()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # All benchmark clients connect from 127.0.0.1, so the per-client
        # connection limit is raised above the largest client count.
        self.config_path.write_text(
            f"""[relay]
domain = "{RELAY_DOMAIN}"
hostname = "relay.{RELAY_DOMAIN}"
bounce_secret = "{secrets.token_hex(16)}"

[smtp]
listen = "127.0.0.1:{self.port}"
max_connections = 1000
max_connections_per_client = 1000

[database]
url = "sqlite+aiosqlite:///{self.db_path}"

[delivery]
transport = "smarthost"
smarthost = "127.0.0.1:{self.sink_port}"

[log]
level = "{self.log_level}"
"""
        )

    def _commands(self, buyers: int) -> list[list[str]]:
        config = ["--config", str(self.config_path)]
        commands = [
            ["db", "upgrade", *config],
            ["seller", "add", *config, "--id", SELLER_ID, "--name", "Bench Seller",
             "--support-email", SELLER_SUPPORT, "--sender", SELLER_SENDER],
        ]
        for number in range(1, buyers + 1):
            commands.append(["buyer", "add", *config, "--id", f"B{number}", "--email", buyer_address(number)])
            commands.append(["pair", "show", *config, "--buyer", f"B{number}", "--seller", SELLER_ID, "--json"])
        return commands

    def _run_in_one_process(self, commands: list[list[str]]) -> list[str] | None:
        """Run the commands through scripts/bench_provision.py, or return None if this Python lacks relaymail."""
        probe = subprocess.run([sys.executable, "-c", "import relaymail.cli"], capture_output=True)
        if probe.returncode != 0:
            return None
        result = subprocess.run(
            [sys.executable, str(SCRIPTS_DIR / "bench_provision.py")],
            input=json.dumps(commands), capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            raise HarnessError(f"scripts/bench_provision.py failed with status {result.returncode}: "
                               f"{tail_text(result.stderr)}")
        outputs = []
        for argv, item in zip(commands, json.loads(result.stdout)):
            if item["status"] != 0:
                raise HarnessError(f"relaymail {' '.join(argv)} failed with status {item['status']}: "
                                   f"{tail_text(result.stderr)}")
            outputs.append(item["output"])
        return outputs

    def _run_one_by_one(self, commands: list[list[str]]) -> list[str]:
        outputs = []
        for argv in commands:
            full = [*self.command, *argv]
            result = subprocess.run(full, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise HarnessError(f"{' '.join(full)} failed with status {result.returncode}: "
                                   f"{tail_text(result.stderr or result.stdout)}")
            outputs.append(result.stdout)
        return outputs

    def provision(self, buyers: int) -> list[tuple[str, str]]:
        """Create the schema, one seller and `buyers` buyers, and return (buyer address, seller alias) pairs.

        Uses the relaymail CLI: in one process when this Python can import
        relaymail, else one `relaymail` command per step.
        """
        commands = self._commands(buyers)
        outputs = self._run_in_one_process(commands)
        if outputs is None:
            outputs = self._run_one_by_one(commands)
        pairs = []
        for number, output in zip(range(1, buyers + 1), outputs[3::2]):
            pairs.append((buyer_address(number), json.loads(output)["seller_alias"]))
        return pairs

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = self.group.start(
            "relaymail serve",
            [*self.command, "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.base_dir,
        )
        log.close()
        try:
            wait_for_smtp(self.port, 60, self.process)
        except HarnessError as exc:
            raise HarnessError(f"relaymail serve did not start: {exc}\n{tail(self.log_path)}") from None

    def check_running(self) -> None:
        """Raise HarnessError with the log's last lines if `relaymail serve` has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise HarnessError(f"relaymail serve exited with status {self.process.returncode}:\n"
                               f"{tail(self.log_path)}")

    def _query(self, sql: str, *params) -> list[tuple]:
        # A read-only connection: in WAL mode it never blocks the relay's writes.
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)) as db:
            return db.execute(sql, params).fetchall()

    def last_message_id(self) -> int:
        return self._query("SELECT coalesce(max(id), 0) FROM messages")[0][0]

    def queued_deliveries(self) -> int:
        return self._query("SELECT count(*) FROM deliveries WHERE state = 'queued'")[0][0]

    def message_statuses(self, after_id: int) -> dict[str, int]:
        """Count the messages stored after message id `after_id` by status (queued, delivered, blocked...)."""
        rows = self._query("SELECT status, count(*) FROM messages WHERE id > ? GROUP BY status", after_id)
        return dict(rows)

    def wait_until_drained(self, timeout: float) -> tuple[bool, float]:
        """Wait until no delivery is queued, and return whether it happened and the monotonic time then.

        NOTE: a delivery deferred after a failed attempt stays queued until its
        retry time (min_backoff_s, 300 s by default), so this then times out.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.queued_deliveries() == 0:
                return True, now
            if now >= deadline:
                return False, now
            time.sleep(0.05)
