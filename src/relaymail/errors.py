"""Exception tree of relaymail.

RelaymailError
    ConfigError         the configuration file is missing, unreadable or invalid
    StoreError          the database refused an operation (integrity, missing row)
        NotFoundError   a seller, buyer, pair, order or message id does not exist
    InputError          a provisioning value is invalid (address, name, locale, alias)
    MessageError        a message cannot be parsed safely (used by the receive path)
    DeliveryError       one delivery attempt failed
        SoftDeliveryError   temporary (4xx, refused or timed-out connection, DNS SERVFAIL)
        HardDeliveryError   permanent (5xx, null MX, NXDOMAIN)

Policy outcomes are values (verdicts), never exceptions.
"""


class RelaymailError(Exception):
    """Base class of every error relaymail raises on purpose."""


class ConfigError(RelaymailError):
    """The configuration is invalid; the message names the key, the value and what is expected."""


class StoreError(RelaymailError):
    """A database operation failed."""


class NotFoundError(StoreError):
    """A record looked up by id does not exist."""


class InputError(RelaymailError):
    """A provisioning value is invalid; the message names the value."""


class MessageError(RelaymailError):
    """A message cannot be handled safely."""


class DeliveryError(RelaymailError):
    """One delivery attempt failed.

    `code` is the SMTP reply code when the next hop gave one, else None.
    """

    def __init__(self, text: str, code: int | None = None, host: str | None = None):
        super().__init__(text)
        self.text = text
        self.code = code
        self.host = host


class SoftDeliveryError(DeliveryError):
    """A temporary failure: the delivery is retried with backoff."""


class HardDeliveryError(DeliveryError):
    """A permanent failure: the delivery is bounced."""
