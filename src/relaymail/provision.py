"""Provisioning: sellers, their senders, buyers, pairs and orders, as the marketplace sends them.

The CLI calls these functions, and an HTTP API can call them too. Each takes an
AsyncSession, checks and normalises its input, flushes, and never commits: the
caller commits, or rolls back after an error.

    add_seller      create or update a seller, approving the senders given
    add_sender      approve a sender address of a seller (re-approves a blocked one)
    block_sender    block a sender address of a seller (records it if it was not listed)
    add_buyer       create or update a buyer
    set_opt_out     record whether a buyer declined unsolicited messages from sellers
    show_pair       return a pair's two aliases, creating the pair or importing its aliases
    add_order       create an order or update its status

"Add" creates the record or updates the existing one with the same id, so the
marketplace can send the same record again. An optional argument left as None
keeps the stored value, or takes the default for a new record.

Input rules (each violation raises InputError naming the value and what is expected):
- ids: 1 to 64 printable characters, no whitespace.
- addresses: valid syntax (email-validator, no DNS lookup), no display name, not
  at the marketplace domain (mail to an alias address would loop through the relay).
  They are stored lower-cased, with an internationalised domain in its ASCII
  (IDNA) form when the local part is ASCII.
- names (business, buyer): 1 to 200 characters after trimming surrounding
  whitespace, with no control characters (Unicode Cc), no format characters (Cf)
  except ZERO WIDTH JOINER and ZERO WIDTH NON-JOINER (needed by emoji sequences
  and by scripts such as Persian), no line or paragraph separators (Zl, Zp) and no
  lone surrogates. That rules out CR and LF, which could inject a header, and
  bidirectional overrides, which could disguise a name.
- locales: a language code with an optional region, `ll` or `ll-CC`, "_" accepted;
  stored as `es-MX`.
- aliases: the alias form, 15 characters of [a-z0-9], with or without
  `@domain`, where the domain must be the marketplace domain; any letter case.
- order statuses: one of models.ORDER_STATUSES, any letter case.

Raises NotFoundError for an unknown seller or buyer, and ConflictError when the
input contradicts stored data (an alias used elsewhere, an order of another
pair) or when another client inserted the same record at the same time. After
any of these errors the caller must roll the session back.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone

from email_validator import EmailNotValidError, validate_email
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import InputError, StoreError
from .models import ORDER_STATUSES, Buyer, Order, Pair, Seller, SellerSender, SenderState, utcnow
from .store import ALIAS_LENGTH, get_buyer, get_seller, is_alias_form, new_alias

DEFAULT_LOCALE = "es-MX"
MAX_ID_CHARS = 64
MAX_NAME_CHARS = 200

# Format characters that some scripts and emoji sequences need.
ALLOWED_FORMAT_CHARS = {"\u200c", "\u200d"}  # ZERO WIDTH NON-JOINER, ZERO WIDTH JOINER
REJECTED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}

LOCALE_RE = re.compile(r"([A-Za-z]{2})(?:[-_]([A-Za-z]{2}))?")


class ConflictError(StoreError):
    """Input that contradicts a stored record, such as an alias of another pair."""


async def _flush(session: AsyncSession, record: str) -> None:
    """Flush, turning a unique-key violation from a concurrent writer into ConflictError."""
    try:
        await session.flush()
    except IntegrityError as exc:
        raise ConflictError(
            f"{record} was written by another client at the same time ({exc.orig}): "
            "roll back and retry"
        ) from exc


# --- input checks ----------------------------------------------------------


def validate_id(value: str, field: str) -> str:
    """Return `value` if it is a valid id, else raise InputError naming `field`."""
    if not value:
        raise InputError(f"{field} is empty: expected 1 to {MAX_ID_CHARS} printable characters")
    if len(value) > MAX_ID_CHARS:
        raise InputError(
            f"{field} {value!r} has {len(value)} characters: expected at most {MAX_ID_CHARS}"
        )
    if not value.isprintable() or any(char.isspace() for char in value):
        raise InputError(
            f"{field} {value!r} contains whitespace or a non-printable character: "
            "expected printable characters only"
        )
    return value


def normalize_address(value: str, field: str, domain: str | None = None) -> str:
    """Return the address lower-cased, or raise InputError naming `field`.

    Checks syntax only (no DNS lookup). An address at `domain`, the marketplace
    domain, is rejected because mail to it would come back into the relay.
    """
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InputError(f"invalid {field} {value!r}: {exc}") from None

    address = (result.ascii_email or result.normalized).lower()
    if domain is not None and address.rpartition("@")[2] == domain.lower():
        raise InputError(
            f"invalid {field} {value!r}: expected an address outside the marketplace domain "
            f"{domain}, because mail to it would loop through the relay"
        )
    return address


def normalize_name(value: str, field: str) -> str:
    """Return the name without surrounding whitespace, or raise InputError naming `field`.

    Control characters are rejected before trimming, so a trailing CR or LF is
    an error rather than being trimmed away.
    """
    for char in value:
        if char in ALLOWED_FORMAT_CHARS:
            continue
        if unicodedata.category(char) in REJECTED_CATEGORIES:
            raise InputError(
                f"{field} {value!r} contains U+{ord(char):04X}, a control, format or line "
                "separator character: expected text without line breaks or control characters"
            )

    name = value.strip()
    if not name:
        raise InputError(f"{field} is empty: expected 1 to {MAX_NAME_CHARS} characters")
    if len(name) > MAX_NAME_CHARS:
        raise InputError(
            f"{field} {name!r} has {len(name)} characters: expected at most {MAX_NAME_CHARS}"
        )
    return name


def normalize_locale(value: str) -> str:
    """Return the locale as `ll` or `ll-CC` (for example es-MX), or raise InputError."""
    match = LOCALE_RE.fullmatch(value.strip())
    if match is None:
        raise InputError(
            f"invalid locale {value!r}: expected a language code with an optional region, "
            "for example es-MX, en-US or es"
        )
    language, region = match.groups()
    if region is None:
        return language.lower()
    return f"{language.lower()}-{region.upper()}"


def normalize_status(value: str) -> str:
    """Return the order status lower-cased, or raise InputError listing the valid ones."""
    status = value.strip().lower()
    if status not in ORDER_STATUSES:
        raise InputError(
            f"invalid order status {value!r}: expected one of {', '.join(ORDER_STATUSES)}"
        )
    return status


def parse_alias(value: str, domain: str, field: str) -> str:
    """Return the alias local part of `value` lower-cased, or raise InputError naming `field`.

    `value` is `local` or `local@domain`; the domain must be the marketplace's.
    """
    text = value.strip().lower()
    local, at, alias_domain = text.rpartition("@")
    if not at:
        local = text
    elif alias_domain != domain.lower():
        raise InputError(
            f"invalid {field} {value!r}: expected an address at the marketplace domain {domain}"
        )
    if not is_alias_form(local):
        raise InputError(
            f"invalid {field} {value!r}: expected {ALIAS_LENGTH} characters of a-z and 0-9, "
            f"optionally followed by @{domain}"
        )
    return local


def parse_datetime(value: str, field: str) -> datetime:
    """Parse an ISO 8601 date or date and time into an aware UTC datetime.

    A date means midnight UTC; a date and time without an offset is UTC.
    """
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputError(
            f"invalid {field} {value!r}: expected an ISO 8601 date or date and time, "
            "for example 2024-05-31 or 2024-05-31T14:30:00-06:00"
        ) from None

    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


# --- sellers and senders ---------------------------------------------------


async def add_seller(
    session: AsyncSession,
    seller_id: str,
    business_name: str,
    support_email: str,
    *,
    domain: str,
    senders: list[str] | tuple[str, ...] = (),
    locale: str | None = None,
    block_notice: bool | None = None,
) -> tuple[Seller, bool]:
    """Create or update a seller and approve `senders`; return it and whether it was created.

    The support address is where buyers' messages go. It is not made an
    approved sender: pass it in `senders` as well if the seller writes to buyers from it.
    Senders already listed and not named in `senders` keep their state.
    `domain` is the marketplace domain, which no address may use.
    """
    validate_id(seller_id, "seller id")
    business_name = normalize_name(business_name, "business name")
    support_email = normalize_address(support_email, "support email", domain)
    sender_addresses = [normalize_address(a, "sender address", domain) for a in senders]
    locale = normalize_locale(locale) if locale is not None else None

    seller = await session.get(Seller, seller_id)
    created = seller is None
    if seller is None:
        seller = Seller(id=seller_id, locale=DEFAULT_LOCALE, block_notice=True, senders=[])
        session.add(seller)
    seller.business_name = business_name
    seller.support_email = support_email
    if locale is not None:
        seller.locale = locale
    if block_notice is not None:
        seller.block_notice = block_notice

    for address in sender_addresses:
        _set_sender_state(seller, address, SenderState.APPROVED)

    await _flush(session, f"seller {seller_id!r}")
    return seller, created


def _set_sender_state(seller: Seller, address: str, state: SenderState) -> tuple[SellerSender, bool]:
    for sender in seller.senders:
        if sender.address == address:
            sender.state = state.value
            return sender, False
    sender = SellerSender(address=address, state=state.value)
    seller.senders.append(sender)
    return sender, True


async def add_sender(
    session: AsyncSession, seller_id: str, address: str, *, domain: str
) -> tuple[SellerSender, bool]:
    """Approve `address` as a sender of the seller; return the record and whether it is new.

    A blocked address is approved again. Raises NotFoundError for an unknown seller.
    """
    address = normalize_address(address, "sender address", domain)
    seller = await get_seller(session, seller_id)
    sender, created = _set_sender_state(seller, address, SenderState.APPROVED)
    await _flush(session, f"sender {address} of seller {seller_id!r}")
    return sender, created


async def block_sender(
    session: AsyncSession, seller_id: str, address: str
) -> tuple[SellerSender, bool]:
    """Block `address` as a sender of the seller; return the record and whether it is new.

    An address the seller never listed is recorded as blocked, so the block is
    kept on record. Raises NotFoundError for an unknown seller.
    """
    address = normalize_address(address, "sender address")
    seller = await get_seller(session, seller_id)
    sender, created = _set_sender_state(seller, address, SenderState.BLOCKED)
    await _flush(session, f"sender {address} of seller {seller_id!r}")
    return sender, created


# --- buyers ----------------------------------------------------------------


async def add_buyer(
    session: AsyncSession,
    buyer_id: str,
    email: str,
    *,
    domain: str,
    name: str | None = None,
    locale: str | None = None,
    opted_out: bool | None = None,
) -> tuple[Buyer, bool]:
    """Create or update a buyer; return it and whether it was created.

    `domain` is the marketplace domain, which the buyer's address may not use.
    """
    validate_id(buyer_id, "buyer id")
    email = normalize_address(email, "buyer email", domain)
    name = normalize_name(name, "buyer name") if name is not None else None
    locale = normalize_locale(locale) if locale is not None else None

    buyer = await session.get(Buyer, buyer_id)
    created = buyer is None
    if buyer is None:
        buyer = Buyer(id=buyer_id, locale=DEFAULT_LOCALE, opted_out=False)
        session.add(buyer)
    buyer.email = email
    if name is not None:
        buyer.name = name
    if locale is not None:
        buyer.locale = locale
    if opted_out is not None:
        buyer.opted_out = opted_out

    await _flush(session, f"buyer {buyer_id!r}")
    return buyer, created


async def set_opt_out(session: AsyncSession, buyer_id: str, opted_out: bool) -> Buyer:
    """Record whether the buyer declined unsolicited messages; raise NotFoundError if unknown."""
    buyer = await get_buyer(session, buyer_id)
    buyer.opted_out = opted_out
    await _flush(session, f"buyer {buyer_id!r}")
    return buyer


# --- pairs -----------------------------------------------------------------


@dataclass(frozen=True)
class PairAliases:
    """A pair's two aliases as full addresses at the marketplace domain."""

    pair_id: int
    buyer_id: str
    seller_id: str
    buyer_alias: str  # the seller writes here to reach the buyer
    seller_alias: str  # the buyer writes here to reach the seller
    created: bool


async def show_pair(
    session: AsyncSession,
    buyer_id: str,
    seller_id: str,
    domain: str,
    buyer_alias: str | None = None,
    seller_alias: str | None = None,
) -> PairAliases:
    """Return the aliases of the pair (buyer, seller), creating the pair if it is missing.

    A new pair gets fresh random aliases, unless `buyer_alias` and
    `seller_alias` (both or neither) import existing ones. For an existing
    pair, imported aliases must equal the stored ones, because aliases never
    change. Raises NotFoundError for an unknown buyer or seller, InputError for
    a malformed alias and ConflictError for an alias that differs from the
    stored one or belongs to another pair.
    """
    if (buyer_alias is None) != (seller_alias is None):
        raise InputError("alias import needs both the buyer alias and the seller alias, or neither")
    imported = None
    if buyer_alias is not None and seller_alias is not None:
        imported = (
            parse_alias(buyer_alias, domain, "buyer alias"),
            parse_alias(seller_alias, domain, "seller alias"),
        )
        if imported[0] == imported[1]:
            raise InputError(
                f"buyer alias and seller alias are both {imported[0]!r}: expected two different aliases"
            )

    await get_buyer(session, buyer_id)
    await get_seller(session, seller_id)

    pair = await session.scalar(
        select(Pair).where(Pair.buyer_id == buyer_id, Pair.seller_id == seller_id)
    )
    created = pair is None
    if pair is not None:
        if imported is not None:
            _check_same_aliases(pair, imported, domain)
    else:
        if imported is not None:
            await _check_aliases_unused(session, imported, domain)
            aliases = imported
        else:
            aliases = await _fresh_aliases(session)
        pair = Pair(
            buyer_id=buyer_id, seller_id=seller_id, buyer_alias=aliases[0], seller_alias=aliases[1]
        )
        session.add(pair)
        await _flush(session, f"pair of buyer {buyer_id!r} and seller {seller_id!r}")

    return PairAliases(
        pair_id=pair.id,
        buyer_id=buyer_id,
        seller_id=seller_id,
        buyer_alias=f"{pair.buyer_alias}@{domain}",
        seller_alias=f"{pair.seller_alias}@{domain}",
        created=created,
    )


def _check_same_aliases(pair: Pair, imported: tuple[str, str], domain: str) -> None:
    stored = (pair.buyer_alias, pair.seller_alias)
    for role, old, new in zip(("buyer alias", "seller alias"), stored, imported):
        if old != new:
            raise ConflictError(
                f"pair of buyer {pair.buyer_id!r} and seller {pair.seller_id!r} already has "
                f"{role} {old}@{domain}, so {new}@{domain} cannot be imported: aliases never change"
            )


async def _check_aliases_unused(session: AsyncSession, aliases: tuple[str, str], domain: str) -> None:
    for alias in aliases:
        other = await session.scalar(
            select(Pair).where(or_(Pair.buyer_alias == alias, Pair.seller_alias == alias))
        )
        if other is not None:
            raise ConflictError(
                f"alias {alias}@{domain} is already used by the pair of buyer "
                f"{other.buyer_id!r} and seller {other.seller_id!r}"
            )


async def _fresh_aliases(session: AsyncSession) -> tuple[str, str]:
    # There are 36**15 (about 2**77) aliases, so a fresh one practically never
    # collides. The bound of 10 draws only stops a broken random source.
    for _ in range(10):
        aliases = (new_alias(), new_alias())
        if aliases[0] == aliases[1]:
            continue
        existing_pair_id = await session.scalar(
            select(Pair.id).where(
                or_(Pair.buyer_alias.in_(aliases), Pair.seller_alias.in_(aliases))
            )
        )
        if existing_pair_id is None:
            return aliases
    raise StoreError("could not draw an unused alias in 10 attempts")


# --- orders ----------------------------------------------------------------


async def add_order(
    session: AsyncSession,
    order_id: str,
    buyer_id: str,
    seller_id: str,
    status: str,
    placed_at: datetime | None = None,
) -> tuple[Order, bool]:
    """Create an order or update its status; return it and whether it was created.

    `placed_at` must be aware; None means now for a new order and keeps the
    stored date otherwise. Raises NotFoundError for an unknown buyer or seller
    and ConflictError if the order id belongs to another buyer or seller.
    """
    validate_id(order_id, "order id")
    status = normalize_status(status)
    if placed_at is not None and placed_at.tzinfo is None:
        raise InputError(f"placed-at date {placed_at.isoformat()} has no time zone: expected UTC")

    await get_buyer(session, buyer_id)
    await get_seller(session, seller_id)

    order = await session.get(Order, order_id)
    created = order is None
    if order is None:
        order = Order(id=order_id, buyer_id=buyer_id, seller_id=seller_id, placed_at=utcnow())
        session.add(order)
    elif (order.buyer_id, order.seller_id) != (buyer_id, seller_id):
        raise ConflictError(
            f"order {order_id!r} belongs to buyer {order.buyer_id!r} and seller "
            f"{order.seller_id!r}, not to buyer {buyer_id!r} and seller {seller_id!r}"
        )
    order.status = status
    if placed_at is not None:
        order.placed_at = placed_at

    await _flush(session, f"order {order_id!r}")
    return order, created
