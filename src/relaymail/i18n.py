"""Translated texts that buyers and sellers read, from gettext catalogs.

Catalogs are the `.po` files in relaymail/locale/<locale>/LC_MESSAGES/relaymail.po.
Each is read with Babel (`read_po`), compiled in memory to the `.mo` format
and loaded as `babel.support.Translations`, once per process. Message ids are
the English texts, so a text missing from a catalog appears in English.
Adding a language means adding a `.po` file: no code changes.

A recipient's locale tag ("es-MX", "en_US", "EN") picks a catalog in this
order: the exact locale, then the bare language, then any catalog of the same
language, then the default es_MX. So "en-US" gets "en", and an unknown
language gets Spanish.

Texts with placeholders use `str.format` names such as `{business}`. Values
are substituted after translation and are never parsed as templates.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

DOMAIN = "relaymail"
DEFAULT_LOCALE = "es_MX"
LOCALE_DIR = Path(__file__).parent / "locale"


def N_(message: str) -> str:
    """Mark `message` as a message id for extraction, without translating it yet."""
    return message


REDACTION_PLACEHOLDERS = {
    "emails": N_("[email address removed]"),
    "phones": N_("[phone number removed]"),
    "links": N_("[link removed]"),
}


@functools.cache
def available_locales() -> tuple[str, ...]:
    """Return the names of the catalogs found under LOCALE_DIR, such as ("en", "es_MX")."""
    found = LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}.po")
    return tuple(sorted(path.parent.parent.name for path in found))


def resolve_locale(tag: str | None) -> str:
    """Return the catalog name for a locale tag, falling back to DEFAULT_LOCALE."""
    available = available_locales()
    if not tag:
        return DEFAULT_LOCALE

    parts = tag.strip().replace("-", "_").split("_")
    language = parts[0].lower()
    region = parts[1].upper() if len(parts) > 1 else ""

    candidates = [f"{language}_{region}" if region else language, language]
    candidates += [name for name in available if name.split("_")[0].lower() == language]
    for candidate in candidates:
        if candidate in available:
            return candidate
    return DEFAULT_LOCALE


def translations(locale: str | None) -> Translations:
    """Return the loaded catalog for a recipient's locale tag."""
    return _load(resolve_locale(locale))


def translator(locale: str | None) -> Callable[[str], str]:
    """Return the `gettext` function of the catalog for a recipient's locale tag."""
    return translations(locale).gettext


def business_line(locale: str | None, business_name: str, *, marketplace: str = "") -> str:
    """Return the line put at the top of a seller's message to a buyer, naming the business.

    With `marketplace` (a name or the marketplace domain), the line also names
    the marketplace as the service that carried the message.
    """
    _ = translator(locale)
    if marketplace:
        return _("{business} sent you this message through {marketplace}.").format(
            business=business_name, marketplace=marketplace
        )
    return _("Message from the seller: {business}").format(business=business_name)


def default_buyer_name(locale: str | None) -> str:
    """Return the display name for a buyer whose records give no name ("Comprador", "Buyer")."""
    _ = translator(locale)
    return _("Buyer")


def order_line(locale: str | None, order_ids: list[str]) -> str:
    """Return the line put at the top of a buyer's message to a seller, naming the pair's orders.

    `order_ids` are listed in the order given (most recent first, by the
    caller's contract), separated by commas.
    """
    catalog = translations(locale)
    if not order_ids:
        return catalog.gettext("This buyer has no orders with you yet.")

    text = catalog.ngettext(
        "Order from this buyer: {orders}", "Orders from this buyer: {orders}", len(order_ids)
    )
    return text.format(orders=", ".join(order_ids))


def redaction_placeholder(locale: str | None, kind: str) -> str:
    """Return the text that replaces a redacted e-mail address, phone number or link.

    `kind` is "emails", "phones" or "links", as the [policy.content] keys.
    Raises KeyError for another kind.
    """
    return translator(locale)(REDACTION_PLACEHOLDERS[kind])


@functools.cache
def _load(name: str) -> Translations:
    path = LOCALE_DIR / name / "LC_MESSAGES" / f"{DOMAIN}.po"
    with path.open("rb") as po_file:
        catalog = read_po(po_file, locale=name, domain=DOMAIN)

    # Translations reads only the compiled .mo format. write_mo leaves fuzzy entries out.
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(compiled, domain=DOMAIN)
