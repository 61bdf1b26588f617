"""Tests of relaymail.i18n and the gettext catalogs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_file
from babel.messages.pofile import read_po

from relaymail import i18n

SOURCES = [Path(i18n.__file__)] + [Path(i18n.__file__).with_name(name) for name in ("notice.py", "links.py", "http_pages.py", "dsn.py")]
CATALOGS = sorted(i18n.LOCALE_DIR.glob("*/LC_MESSAGES/relaymail.po"))


def source_message_ids() -> set[str | tuple[str, str]]:
    """Return every message id that the code marks for translation."""
    found = set()
    for path in SOURCES:
        for _lineno, message, _comments, _context in extract_from_file("python", str(path), keywords=DEFAULT_KEYWORDS):
            found.add(message)
    return found


def read_catalog(path: Path):
    with path.open("rb") as po_file:
        return read_po(po_file)


@pytest.fixture
def locale_dir(tmp_path, monkeypatch):
    """Point i18n at a copy of the catalogs, and clear its caches before and after."""
    copy = tmp_path / "locale"
    shutil.copytree(i18n.LOCALE_DIR, copy)
    monkeypatch.setattr(i18n, "LOCALE_DIR", copy)
    i18n.available_locales.cache_clear()
    i18n._load.cache_clear()
    yield copy
    i18n.available_locales.cache_clear()
    i18n._load.cache_clear()


@pytest.mark.parametrize(
    "tag, expected",
    [
        (None, "es_MX"),
        ("", "es_MX"),
        ("es-MX", "es_MX"),
        ("es_mx", "es_MX"),
        ("es", "es_MX"),
        ("es-AR", "es_MX"),
        ("en", "en"),
        ("EN", "en"),
        ("en-US", "en"),
        ("en_GB", "en"),
        ("fr-FR", "es_MX"),
        ("zh-Hant-TW", "es_MX"),
    ],
)
def test_resolve_locale(tag, expected):
    assert i18n.resolve_locale(tag) == expected


def test_translator_by_locale():
    assert i18n.translator("es-MX")("Why it was blocked") == "Motivo del bloqueo"
    assert i18n.translator("en-US")("Why it was blocked") == "Why it was blocked"
    assert i18n.translator("de")("What you can do") == "¿Qué puede hacer?"


def test_business_line():
    name = "Artesanías Ñandú S.A. de C.V."

    assert i18n.business_line("es-MX", name) == "Mensaje del vendedor: Artesanías Ñandú S.A. de C.V."
    assert i18n.business_line("es-MX", name, marketplace="marketplace.example") == (
        "Artesanías Ñandú S.A. de C.V. le envió este mensaje a través de marketplace.example."
    )
    assert i18n.business_line("en", name) == "Message from the seller: Artesanías Ñandú S.A. de C.V."


def test_business_name_is_not_a_template():
    assert i18n.business_line("es-MX", "Tienda {marketplace} {0}") == "Mensaje del vendedor: Tienda {marketplace} {0}"


@pytest.mark.parametrize(
    "locale, orders, expected",
    [
        ("es-MX", ["402-7781"], "Pedido de este comprador: 402-7781"),
        ("es-MX", ["402-7790", "402-7781"], "Pedidos de este comprador: 402-7790, 402-7781"),
        ("es-MX", [], "Este comprador aún no tiene pedidos con usted."),
        ("en", ["402-7781"], "Order from this buyer: 402-7781"),
        ("en", ["402-7790", "402-7781"], "Orders from this buyer: 402-7790, 402-7781"),
        ("en", [], "This buyer has no orders with you yet."),
    ],
)
def test_order_line(locale, orders, expected):
    assert i18n.order_line(locale, orders) == expected


def test_default_buyer_name():
    assert i18n.default_buyer_name("es-MX") == "Comprador"
    assert i18n.default_buyer_name("en-US") == "Buyer"
    assert i18n.default_buyer_name(None) == "Comprador"


def test_redaction_placeholders():
    assert i18n.redaction_placeholder("es-MX", "emails") == "[correo electrónico eliminado]"
    assert i18n.redaction_placeholder("es-MX", "phones") == "[teléfono eliminado]"
    assert i18n.redaction_placeholder("en", "links") == "[link removed]"
    with pytest.raises(KeyError):
        i18n.redaction_placeholder("en", "faxes")


def test_catalogs_found():
    assert i18n.available_locales() == ("en", "es_MX")


@pytest.mark.parametrize("path", CATALOGS, ids=lambda path: path.parent.parent.name)
def test_catalog_lists_every_source_message(path):
    catalog_ids = {message.id for message in read_catalog(path) if message.id}
    assert source_message_ids() - catalog_ids == set()
    assert catalog_ids - source_message_ids() == set()


def test_spanish_catalog_complete():
    for message in read_catalog(i18n.LOCALE_DIR / "es_MX" / "LC_MESSAGES" / "relaymail.po"):
        if not message.id:
            continue
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        assert all(strings), f"untranslated: {message.id!r}"
        assert not message.fuzzy, f"fuzzy: {message.id!r}"


@pytest.mark.parametrize("path", CATALOGS, ids=lambda path: path.parent.parent.name)
def test_translations_keep_placeholders(path):
    for message in read_catalog(path):
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        expected = set(re.findall(r"\{\w+\}", ids[-1]))
        for string in strings:
            if string:
                assert set(re.findall(r"\{\w+\}", string)) == expected, string


def test_spanish_reads_formal_and_punctuated():
    catalog = read_catalog(i18n.LOCALE_DIR / "es_MX" / "LC_MESSAGES" / "relaymail.po")
    for message in catalog:
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        for string in strings:
            if not message.id or not string:
                continue
            # Usted form: no informal pronouns or verb forms.
            assert not re.search(r"\b(tú|tu|tus|te|ti|puedes|tienes|envías|escribiste)\b", string, re.IGNORECASE), string
            # Every question opens with ¿ and every exclamation with ¡.
            assert string.count("?") == string.count("¿"), string
            assert string.count("!") == string.count("¡"), string


def test_new_language_needs_only_a_po_file(locale_dir):
    target = locale_dir / "pt_BR" / "LC_MESSAGES"
    target.mkdir(parents=True)
    (target / "relaymail.po").write_text(
        'msgid ""\n'
        'msgstr ""\n'
        '"Language: pt_BR\\n"\n'
        '"Plural-Forms: nplurals=2; plural=(n > 1);\\n"\n'
        '"Content-Type: text/plain; charset=utf-8\\n"\n'
        "\n"
        'msgid "Why it was blocked"\n'
        'msgstr "Motivo do bloqueio"\n',
        encoding="utf-8",
    )

    assert i18n.resolve_locale("pt-BR") == "pt_BR"
    assert i18n.resolve_locale("pt") == "pt_BR"
    assert i18n.translator("pt-BR")("Why it was blocked") == "Motivo do bloqueio"
    # A text the new catalog lacks appears in English.
    assert i18n.translator("pt-BR")("What you can do") == "What you can do"


def test_fuzzy_entries_are_not_used(locale_dir):
    path = locale_dir / "es_MX" / "LC_MESSAGES" / "relaymail.po"
    text = path.read_text(encoding="utf-8")
    path.write_text(
        text.replace('msgid "Why it was blocked"', '#, fuzzy\nmsgid "Why it was blocked"'), encoding="utf-8"
    )

    assert i18n.translator("es-MX")("Why it was blocked") == "Why it was blocked"
