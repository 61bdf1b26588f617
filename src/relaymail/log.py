"""Logging in the style of an MTA: one line per event, the queue id first.

Every line about a message starts with its queue id, or with `NOQUEUE` and the
connection id before a queue id exists. The id lives in a ContextVar set inside
the task that handles the message, so concurrent sessions never log under each
other's ids. Callers pass key=value pairs through `fields()`; addresses are
never logged, an id or an alias stands for them.
"""

import contextvars
import logging
import sys

queue_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("queue_id", default="-")


class QueueIdFilter(logging.Filter):
    """Attach the current queue id to every record as `record.queue_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.queue_id = queue_id_var.get()
        return True


def configure(level: str = "INFO") -> None:
    """Send logs to stderr as `time level queue_id: logger message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(QueueIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(queue_id)s: %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

    # aiosmtpd logs peers' addresses and envelope addresses at INFO; keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def fields(**values: object) -> str:
    """Format key=value pairs; values with spaces are wrapped in parentheses.

    `status` is written as given, in the `word (text)` form of MTA logs.
    """
    parts = []
    for key, value in values.items():
        text = " ".join(str(value).split())
        if " " in text and key != "status" and not text.startswith("("):
            text = f"({text})"
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def set_queue_id(queue_id: str) -> contextvars.Token:
    """Set the queue id for log lines of the current task."""
    return queue_id_var.set(queue_id)
