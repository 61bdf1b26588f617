"""Run many `relaymail` CLI commands in one Python process, for scripts/bench.

Starting the CLI once per buyer costs an interpreter start and the imports
each time, so scripts/bench sends the whole list here instead. The commands
go through relaymail.cli.main exactly as on the command line.

Input on stdin: a JSON list of argument lists (without the program name).
Output on stdout: a JSON list of {"status": N, "output": "..."}, one per
command. It stops after the first command with a non-zero status.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from relaymail.cli import main as relaymail_main


def run_commands(commands: list[list[str]]) -> list[dict]:
    results = []
    for argv in commands:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            status = relaymail_main(argv)
        results.append({"status": status, "output": output.getvalue()})
        if status != 0:
            break
    return results


if __name__ == "__main__":
    json.dump(run_commands(json.load(sys.stdin)), sys.stdout)
