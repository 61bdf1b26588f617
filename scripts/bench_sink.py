"""SMTP sink for scripts/bench when Postfix's smtp-sink is not installed.

Run as `python scripts/bench_sink.py PORT`. It listens on 127.0.0.1:PORT,
accepts every message and discards it, and writes "mesg=N" (the number of
messages received so far) to standard output every 0.02 s while N changes.
It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP


class CountingHandler:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages += 1
        return "250 2.0.0 discarded"


async def report_counts(handler: CountingHandler) -> None:
    last = -1
    while True:
        if handler.messages != last:
            last = handler.messages
            sys.stdout.write(f"mesg={last}\n")
            sys.stdout.flush()
        await asyncio.sleep(0.02)


async def serve(port: int) -> None:
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.bench.example", data_size_limit=None),
        host="127.0.0.1",
        port=port,
        backlog=256,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reporter = asyncio.create_task(report_counts(handler))
    await stop.wait()
    reporter.cancel()
    server.close()
    await server.wait_closed()


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: bench_sink.py PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
