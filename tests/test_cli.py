"""The relaymail CLI and the provisioning functions behind it.

Each command runs at least once as `python -m relaymail` in a subprocess (the
`cli` fixture) on a migrated SQLite file. The tables of invalid input call
relaymail.cli.main in this process (`cli_main`), because that is much faster.
The provisioning functions also run directly on SQLite and, when
RELAYMAIL_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from relaymail import cli as cli_module
from relaymail import db, provision
from relaymail.errors import InputError, NotFoundError, RelaymailError
from relaymail.models import Seller
from relaymail.store import Store, find_alias, sender_sellers

from conftest import DOMAIN, run_coroutine, write_config

ALIAS_ADDRESS = re.compile(r"[a-z0-9]{15}@" + re.escape(DOMAIN))


def assert_error(result, rc: int, *fragments: str) -> None:
    """Check the exit status and that stderr is one `relaymail: error:` message with `fragments`."""
    assert result.rc == rc, (result.rc, result.stdout, result.stderr)
    assert result.stderr.startswith("relaymail: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def seller(cli_main, migrated_db):
    """Create seller s1 with one approved sender."""
    result = cli_main(
        "seller", "add", "--id", "s1", "--name", "Tienda Ñandú", "--support-email", "Help@Shop.example",
        "--sender", "Orders@Shop.example",
    )
    assert result.rc == 0, result.stderr


@pytest.fixture
def buyer(seller, cli_main):
    """Create buyer b1 as well as seller s1."""
    result = cli_main("buyer", "add", "--id", "b1", "--email", "Ana@Mail.example", "--name", "Ana")
    assert result.rc == 0, result.stderr


# --- seller ------------------------------------------------------------------


def test_seller_add_json(cli, migrated_db):
    result = cli(
        "seller", "add", "--id", "s1", "--name", "Tienda Ñandú", "--support-email", "Help@Shop.example",
        "--sender", "Orders@Shop.example", "--sender", "ventas@shop.example", "--json",
    )

    assert result.rc == 0, result.stderr
    assert result.json() == {
        "id": "s1",
        "business_name": "Tienda Ñandú",
        "support_email": "help@shop.example",
        "locale": "es-MX",
        "block_notice": True,
        "senders": [
            {"address": "orders@shop.example", "state": "approved"},
            {"address": "ventas@shop.example", "state": "approved"},
        ],
        "created": True,
    }


def test_seller_add_human_output(cli, migrated_db):
    result = cli(
        "seller", "add", "--id", "s1", "--name", "Shop", "--support-email", "help@shop.example",
        "--sender", "a@shop.example", "--no-block-notice", "--locale", "en_us",
    )

    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines() == [
        "id=s1",
        "business_name=Shop",
        "support_email=help@shop.example",
        "locale=en-US",
        "block_notice=false",
        "senders=a@shop.example:approved",
        "created=true",
    ]


def test_seller_support_email_not_a_sender(seller, migrated_db):
    async def senders_of_support_address():
        store = Store(migrated_db.database.url)
        try:
            async with store.session() as session:
                return await sender_sellers(session, "help@shop.example")
        finally:
            await store.close()

    assert run_coroutine(senders_of_support_address) == {}


def test_seller_readd_updates(cli_main, seller):
    result = cli_main(
        "seller", "add", "--id", "s1", "--name", "Tienda Nueva", "--support-email", "soporte@shop.example",
        "--sender", "otro@shop.example", "--json",
    )

    assert result.rc == 0, result.stderr
    record = result.json()
    assert record["created"] is False
    assert record["business_name"] == "Tienda Nueva"
    assert record["support_email"] == "soporte@shop.example"
    assert record["locale"] == "es-MX"
    assert record["block_notice"] is True
    assert [s["address"] for s in record["senders"]] == ["orders@shop.example", "otro@shop.example"]


def test_seller_readd_keeps_options(cli_main, seller):
    cli_main(
        "seller", "add", "--id", "s1", "--name", "T", "--support-email", "h@shop.example",
        "--locale", "en", "--no-block-notice",
    )

    result = cli_main("seller", "add", "--id", "s1", "--name", "T", "--support-email", "h@shop.example", "--json")

    assert result.json()["locale"] == "en"
    assert result.json()["block_notice"] is False


def test_seller_name_keeps_unicode(cli_main, migrated_db):
    name = "Café 👩\u200d💻 خانه\u200cها"

    result = cli_main("seller", "add", "--id", "s9", "--name", f"  {name} ", "--support-email", "a@b.example", "--json")

    assert result.rc == 0, result.stderr
    assert result.json()["business_name"] == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("Bad\rName", "U+000D"),
        ("Bad\nName", "U+000A"),
        ("Bad\x07Name", "U+0007"),
        ("Bad\x7fName", "U+007F"),
        ("Bad\u0085Name", "U+0085"),
        ("Evil\u202eemaN", "U+202E"),
        ("Line\u2028Break", "U+2028"),
        ("", "business name is empty"),
        ("   ", "business name is empty"),
        ("x" * 201, "has 201 characters: expected at most 200"),
    ],
)
def test_seller_rejects_bad_name(cli_main, migrated_db, name, fragment):
    result = cli_main("seller", "add", "--id", "s1", "--name", name, "--support-email", "a@b.example")

    assert_error(result, 2, fragment)


def test_seller_name_with_crlf_subprocess(cli, migrated_db):
    result = cli(
        "seller", "add", "--id", "s1", "--name", "Shop\r\nBcc: x@evil.example", "--support-email", "a@b.example",
    )

    assert_error(result, 2, "business name 'Shop\\r\\nBcc: x@evil.example' contains U+000D")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("not-an-address", "invalid support email 'not-an-address'"),
        ("a@localhost", "invalid support email 'a@localhost'"),
        ("Ann <ann@shop.example>", "invalid support email 'Ann <ann@shop.example>'"),
        ("a b@shop.example", "invalid support email 'a b@shop.example'"),
        (f"help@{DOMAIN.upper()}", "would loop through the relay"),
    ],
)
def test_seller_rejects_bad_support_email(cli_main, migrated_db, address, fragment):
    result = cli_main("seller", "add", "--id", "s1", "--name", "Shop", "--support-email", address)

    assert_error(result, 2, fragment)


def test_seller_rejects_bad_sender(cli_main, migrated_db):
    result = cli_main(
        "seller", "add", "--id", "s1", "--name", "Shop", "--support-email", "a@shop.example", "--sender", "nope",
    )

    assert_error(result, 2, "invalid sender address 'nope'")


@pytest.mark.parametrize(
    ("seller_id", "fragment"),
    [
        ("", "seller id is empty"),
        ("s 1", "seller id 's 1' contains whitespace"),
        ("s\t1", "contains whitespace or a non-printable character"),
        ("x" * 65, "has 65 characters: expected at most 64"),
    ],
)
def test_seller_rejects_bad_id(cli_main, migrated_db, seller_id, fragment):
    result = cli_main("seller", "add", "--id", seller_id, "--name", "Shop", "--support-email", "a@shop.example")

    assert_error(result, 2, fragment)


@pytest.mark.parametrize("locale", ["spanish", "es-MEX", "e", "es-MX-x"])
def test_seller_rejects_bad_locale(cli_main, migrated_db, locale):
    result = cli_main(
        "seller", "add", "--id", "s1", "--name", "Shop", "--support-email", "a@shop.example", "--locale", locale,
    )

    assert_error(result, 2, f"invalid locale {locale!r}", "for example es-MX")


def test_seller_add_missing_options(cli_main, migrated_db):
    result = cli_main("seller", "add", "--id", "s1")

    assert_error(result, 2, "the following arguments are required: --name, --support-email", "usage:")


# --- seller senders ------------------------------------------------------------


def test_sender_block_then_approve(cli, seller):
    blocked = cli("seller", "sender", "block", "--seller", "s1", "ORDERS@shop.example", "--json")
    approved = cli("seller", "sender", "add", "--seller", "s1", "orders@shop.example", "--json")

    assert blocked.rc == 0, blocked.stderr
    assert blocked.json() == {
        "seller_id": "s1", "address": "orders@shop.example", "state": "blocked", "created": False,
    }
    assert approved.json() == {
        "seller_id": "s1", "address": "orders@shop.example", "state": "approved", "created": False,
    }


def test_sender_add_new_address(cli_main, seller):
    result = cli_main("seller", "sender", "add", "--seller", "s1", "New@Shop.example")

    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines() == [
        "seller_id=s1", "address=new@shop.example", "state=approved", "created=true",
    ]


def test_sender_block_unlisted_address(cli_main, seller):
    result = cli_main("seller", "sender", "block", "--seller", "s1", "stranger@else.example", "--json")

    assert result.rc == 0, result.stderr
    assert result.json()["state"] == "blocked"
    assert result.json()["created"] is True


def test_sender_unknown_seller(cli_main, seller):
    added = cli_main("seller", "sender", "add", "--seller", "s404", "a@shop.example")
    blocked = cli_main("seller", "sender", "block", "--seller", "s404", "a@shop.example")

    assert_error(added, 1, "seller 's404' not found")
    assert_error(blocked, 1, "seller 's404' not found")


def test_sender_bad_address(cli_main, seller):
    result = cli_main("seller", "sender", "add", "--seller", "s1", "orders@")

    assert_error(result, 2, "invalid sender address 'orders@'")


# --- buyer ---------------------------------------------------------------------


def test_buyer_add_json(cli, migrated_db):
    result = cli("buyer", "add", "--id", "b1", "--email", "Ana.Perez@Mail.Example", "--json")

    assert result.rc == 0, result.stderr
    assert result.json() == {
        "id": "b1",
        "email": "ana.perez@mail.example",
        "name": None,
        "locale": "es-MX",
        "opted_out": False,
        "created": True,
    }


def test_buyer_readd_keeps_name(cli_main, buyer):
    result = cli_main("buyer", "add", "--id", "b1", "--email", "nueva@mail.example", "--opt-out", "--json")

    assert result.rc == 0, result.stderr
    assert result.json() == {
        "id": "b1",
        "email": "nueva@mail.example",
        "name": "Ana",
        "locale": "es-MX",
        "opted_out": True,
        "created": False,
    }


def test_buyer_opt_out_and_in(cli, buyer):
    opted_out = cli("buyer", "opt-out", "b1", "--json")
    opted_in = cli("buyer", "opt-in", "b1")

    assert opted_out.rc == 0, opted_out.stderr
    assert opted_out.json()["opted_out"] is True
    assert opted_in.rc == 0, opted_in.stderr
    assert "opted_out=false" in opted_in.stdout.splitlines()


def test_buyer_opt_out_unknown(cli_main, buyer):
    result = cli_main("buyer", "opt-out", "b404")

    assert_error(result, 1, "buyer 'b404' not found")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--email", "ana"], "invalid buyer email 'ana'"),
        (["--email", f"x@{DOMAIN}"], "would loop through the relay"),
        (["--email", "a@mail.example", "--name", "Ana\nBcc: x@evil.example"], "buyer name 'Ana\\nBcc"),
        (["--email", "a@mail.example", "--name", "Ana\x1b[31m"], "U+001B"),
        (["--email", "a@mail.example", "--locale", "castellano"], "invalid locale 'castellano'"),
    ],
)
def test_buyer_add_rejects(cli_main, migrated_db, options, fragment):
    result = cli_main("buyer", "add", "--id", "b1", *options)

    assert_error(result, 2, fragment)


# --- pair ----------------------------------------------------------------------


def test_pair_show_creates_aliases(cli, buyer):
    first = cli("pair", "show", "--buyer", "b1", "--seller", "s1", "--json")
    again = cli("pair", "show", "--buyer", "b1", "--seller", "s1", "--json")

    assert first.rc == 0, first.stderr
    record = first.json()
    assert ALIAS_ADDRESS.fullmatch(record["buyer_alias"])
    assert ALIAS_ADDRESS.fullmatch(record["seller_alias"])
    assert record["buyer_alias"] != record["seller_alias"]
    assert record["created"] is True
    assert again.json() == {**record, "created": False}


def test_pair_show_human_output(cli_main, buyer):
    result = cli_main("pair", "show", "--buyer", "b1", "--seller", "s1")

    lines = result.stdout.splitlines()
    assert result.rc == 0, result.stderr
    assert [line.split("=", 1)[0] for line in lines] == [
        "buyer_alias", "seller_alias", "buyer_id", "seller_id", "pair_id", "created",
    ]
    assert ALIAS_ADDRESS.fullmatch(lines[0].split("=", 1)[1])


def test_pair_aliases_differ_per_seller(cli_main, buyer):
    cli_main("seller", "add", "--id", "s2", "--name", "Otra", "--support-email", "h@otra.example")

    with_s1 = cli_main("pair", "show", "--buyer", "b1", "--seller", "s1", "--json").json()
    with_s2 = cli_main("pair", "show", "--buyer", "b1", "--seller", "s2", "--json").json()

    assert with_s1["buyer_alias"] != with_s2["buyer_alias"]
    assert with_s1["seller_alias"] != with_s2["seller_alias"]


def test_pair_alias_lookup_ignores_case(cli_main, buyer, migrated_db):
    shown = cli_main("pair", "show", "--buyer", "b1", "--seller", "s1", "--json").json()
    buyer_local = shown["buyer_alias"].split("@")[0]
    seller_local = shown["seller_alias"].split("@")[0]

    async def look_up():
        store = Store(migrated_db.database.url)
        try:
            async with store.session() as session:
                by_buyer_alias = await find_alias(session, buyer_local.upper())
                by_seller_alias = await find_alias(session, seller_local.swapcase())
                return (
                    (by_buyer_alias.role, by_buyer_alias.pair.buyer_id, by_buyer_alias.pair.seller_id),
                    (by_seller_alias.role, by_seller_alias.pair.buyer_id, by_seller_alias.pair.seller_id),
                )
        finally:
            await store.close()

    by_buyer_alias, by_seller_alias = run_coroutine(look_up)
    assert by_buyer_alias == ("buyer_alias", "b1", "s1")
    assert by_seller_alias == ("seller_alias", "b1", "s1")


def test_pair_show_unknown_parties(cli_main, buyer):
    no_buyer = cli_main("pair", "show", "--buyer", "b404", "--seller", "s1")
    no_seller = cli_main("pair", "show", "--buyer", "b1", "--seller", "s404")

    assert_error(no_buyer, 1, "buyer 'b404' not found")
    assert_error(no_seller, 1, "seller 's404' not found")


def test_pair_import_aliases(cli, buyer):
    imported = cli(
        "pair", "show", "--buyer", "b1", "--seller", "s1",
        "--buyer-alias", f"T969VZ2JN3BDSY7@{DOMAIN.upper()}", "--seller-alias", "k2m4n6p8q0r1s3t", "--json",
    )
    repeated = cli(
        "pair", "show", "--buyer", "b1", "--seller", "s1",
        "--buyer-alias", "t969vz2jn3bdsy7", "--seller-alias", f"k2m4n6p8q0r1s3t@{DOMAIN}", "--json",
    )

    assert imported.rc == 0, imported.stderr
    assert imported.json()["buyer_alias"] == f"t969vz2jn3bdsy7@{DOMAIN}"
    assert imported.json()["seller_alias"] == f"k2m4n6p8q0r1s3t@{DOMAIN}"
    assert imported.json()["created"] is True
    assert repeated.rc == 0, repeated.stderr
    assert repeated.json()["created"] is False


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--buyer-alias", "t969vz2jn3bdsy7"], "needs both the buyer alias and the seller alias"),
        (["--seller-alias", "t969vz2jn3bdsy7"], "needs both the buyer alias and the seller alias"),
        (["--buyer-alias", "t969vz2jn3bdsy", "--seller-alias", "k2m4n6p8q0r1s3t"],
         "invalid buyer alias 't969vz2jn3bdsy': expected 15 characters of a-z and 0-9"),
        (["--buyer-alias", "t969vz2jn3bdsy7", "--seller-alias", "k2m4n6p8q0r1s3_"],
         "invalid seller alias 'k2m4n6p8q0r1s3_'"),
        (["--buyer-alias", "t969vz2jn3bdsy7@other.example", "--seller-alias", "k2m4n6p8q0r1s3t"],
         "expected an address at the marketplace domain marketplace.example"),
        (["--buyer-alias", "t969vz2jn3bdsy7", "--seller-alias", "T969VZ2JN3BDSY7"],
         "are both 't969vz2jn3bdsy7': expected two different aliases"),
    ],
)
def test_pair_import_rejects_bad_alias(cli_main, buyer, options, fragment):
    result = cli_main("pair", "show", "--buyer", "b1", "--seller", "s1", *options)

    assert_error(result, 2, fragment)


def test_pair_import_conflicts_with_stored_alias(cli_main, buyer):
    shown = cli_main("pair", "show", "--buyer", "b1", "--seller", "s1", "--json").json()

    result = cli_main(
        "pair", "show", "--buyer", "b1", "--seller", "s1",
        "--buyer-alias", "t969vz2jn3bdsy7", "--seller-alias", shown["seller_alias"],
    )

    assert_error(
        result, 1,
        f"already has buyer alias {shown['buyer_alias']}",
        f"t969vz2jn3bdsy7@{DOMAIN} cannot be imported",
    )


def test_pair_import_conflicts_with_other_pair(cli, buyer):
    cli("buyer", "add", "--id", "b2", "--email", "luis@mail.example")
    taken = cli("pair", "show", "--buyer", "b1", "--seller", "s1", "--json").json()

    result = cli(
        "pair", "show", "--buyer", "b2", "--seller", "s1",
        "--buyer-alias", "t969vz2jn3bdsy7", "--seller-alias", taken["buyer_alias"],
    )
    after = cli("pair", "show", "--buyer", "b2", "--seller", "s1", "--json")

    assert_error(result, 1, f"alias {taken['buyer_alias']} is already used by the pair of buyer 'b1' and seller 's1'")
    assert after.json()["created"] is True
    assert after.json()["buyer_alias"] != f"t969vz2jn3bdsy7@{DOMAIN}"


# --- order ---------------------------------------------------------------------


def test_order_add_json(cli, buyer):
    result = cli(
        "order", "add", "--id", "O-1001", "--buyer", "b1", "--seller", "s1", "--status", "Unshipped",
        "--placed-at", "2024-05-31T14:30:00-06:00", "--json",
    )

    assert result.rc == 0, result.stderr
    assert result.json() == {
        "id": "O-1001",
        "buyer_id": "b1",
        "seller_id": "s1",
        "status": "unshipped",
        "placed_at": "2024-05-31T20:30:00+00:00",
        "created": True,
    }


def test_order_readd_updates_status(cli_main, buyer):
    cli_main(
        "order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s1", "--status", "pending",
        "--placed-at", "2024-05-31",
    )

    result = cli_main("order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s1", "--status", "shipped")

    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines() == [
        "id=O-1",
        "buyer_id=b1",
        "seller_id=s1",
        "status=shipped",
        "placed_at=2024-05-31T00:00:00+00:00",
        "created=false",
    ]


def test_order_default_date_is_now(cli_main, buyer):
    before = datetime.now(timezone.utc)

    result = cli_main("order", "add", "--id", "O-2", "--buyer", "b1", "--seller", "s1", "--status", "pending", "--json")

    placed_at = datetime.fromisoformat(result.json()["placed_at"])
    assert before - timedelta(seconds=1) <= placed_at <= datetime.now(timezone.utc)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--status", "cancelled"], "invalid order status 'cancelled': expected one of pending, unshipped"),
        (["--status", "shipped", "--placed-at", "2024-13-01"], "invalid placed-at date '2024-13-01'"),
        (["--status", "shipped", "--placed-at", "yesterday"], "invalid placed-at date 'yesterday'"),
        (["--status", "shipped", "--placed-at", "31/05/2024"], "expected an ISO 8601 date"),
    ],
)
def test_order_add_rejects(cli_main, buyer, options, fragment):
    result = cli_main("order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s1", *options)

    assert_error(result, 2, fragment)


def test_order_unknown_parties(cli_main, buyer):
    no_buyer = cli_main("order", "add", "--id", "O-1", "--buyer", "b404", "--seller", "s1", "--status", "pending")
    no_seller = cli_main("order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s404", "--status", "pending")

    assert_error(no_buyer, 1, "buyer 'b404' not found")
    assert_error(no_seller, 1, "seller 's404' not found")


def test_order_of_other_pair_conflicts(cli_main, buyer):
    cli_main("buyer", "add", "--id", "b2", "--email", "luis@mail.example")
    cli_main("order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s1", "--status", "pending")

    result = cli_main("order", "add", "--id", "O-1", "--buyer", "b2", "--seller", "s1", "--status", "shipped")

    assert_error(result, 1, "order 'O-1' belongs to buyer 'b1' and seller 's1', not to buyer 'b2'")


# --- configuration and usage --------------------------------------------------


def test_missing_config(cli):
    result = cli("buyer", "opt-out", "b1", config=None)

    assert_error(result, 2, "no configuration file given: pass --config PATH or set RELAYMAIL_CONFIG")


def test_config_file_not_found(cli_main, tmp_path):
    missing = tmp_path / "nowhere.toml"

    result = cli_main("db", "current", "--config", str(missing), config=None)

    assert_error(result, 2, f"configuration file {missing} not found")


def test_config_invalid_value_names_key(cli, tmp_path):
    config = write_config(tmp_path / "bad.toml")
    config.write_text(config.read_text().replace('transport = "maildir"', 'transport = "pigeon"'))

    result = cli("db", "current", config=config)

    assert_error(result, 2, "delivery.transport = 'pigeon': expected one of maildir, smarthost, mx")


def test_config_unknown_key_names_key(cli_main, tmp_path):
    config = write_config(tmp_path / "typo.toml", extra='\n[policy]\ntimezon = "UTC"\n')

    result = cli_main("db", "current", config=config)

    assert_error(result, 2, "policy.timezon: unknown key")


def test_config_option_before_command(cli, migrated_db, config_file):
    result = cli("--config", str(config_file), "buyer", "add", "--id", "b1", "--email", "a@mail.example",
                 config=None)

    assert result.rc == 0, result.stderr


def test_config_option_overrides_environment(cli_main, migrated_db, config_file, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[relay\n")

    result = cli_main("buyer", "add", "--id", "b1", "--email", "a@mail.example", "--config", str(config_file),
                 config=broken)

    assert result.rc == 0, result.stderr


def test_unknown_command(cli):
    result = cli("sellers", "add")

    assert_error(result, 2, "invalid choice: 'sellers'")


def test_help_exits_zero(cli):
    result = cli("pair", "show", "--help")

    assert result.rc == 0
    assert "--buyer-alias" in result.stdout
    assert "Aliases never change" in result.stdout


def test_module_entry_point_help(cli):
    result = cli("--help")

    assert result.rc == 0
    assert result.stdout.startswith("usage: relaymail ")


# --- server and queue hooks ----------------------------------------------------


def test_queue_list_empty(cli, migrated_db):
    listed = cli("queue", "list", "--json")
    human = cli("queue", "list")

    assert listed.rc == 0, listed.stderr
    assert listed.json() == {"count": 0, "deliveries": []}
    assert human.stdout.splitlines() == ["count=0"]


def test_queue_flush_empty(cli_main, migrated_db):
    result = cli_main("queue", "flush", "--json")

    assert result.rc == 0, result.stderr
    assert result.json() == {"made_due": 0}


def test_missing_stage_module_is_error():
    with pytest.raises(RelaymailError, match="relaymail.nonexistent is missing from this installation"):
        cli_module._import_stage("relaymail.nonexistent")


def test_serve_returns_server_status(monkeypatch, config_file):
    calls = []

    class FakeServer:
        @staticmethod
        def run(config):
            calls.append(config.relay.domain)

    monkeypatch.setattr(cli_module, "_import_stage", lambda name: FakeServer)

    assert cli_module.main(["serve", "--config", str(config_file)]) == 0
    assert calls == [DOMAIN]


# --- input rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("es-MX", "es-MX"), ("es_mx", "es-MX"), ("EN-us", "en-US"), ("pt", "pt"), (" es-MX ", "es-MX")],
)
def test_locale_normalized(value, expected):
    assert provision.normalize_locale(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-31", datetime(2024, 5, 31, tzinfo=timezone.utc)),
        ("2024-05-31T14:30", datetime(2024, 5, 31, 14, 30, tzinfo=timezone.utc)),
        ("2024-05-31T14:30:00Z", datetime(2024, 5, 31, 14, 30, tzinfo=timezone.utc)),
        ("2024-05-31 23:30:00-06:00", datetime(2024, 6, 1, 5, 30, tzinfo=timezone.utc)),
    ],
)
def test_datetime_parsed_as_utc(value, expected):
    parsed = provision.parse_datetime(value, "placed-at date")

    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


def test_address_keeps_ascii_domain():
    assert provision.normalize_address("Ana@Exámple.COM", "buyer email") == "ana@xn--exmple-qta.com"
    assert provision.normalize_address("José@exámple.com", "buyer email") == "josé@exámple.com"


def test_alias_parse_ignores_case():
    assert provision.parse_alias(f"T969VZ2JN3BDSY7@{DOMAIN.upper()}", DOMAIN, "alias") == "t969vz2jn3bdsy7"


@pytest.mark.parametrize("name", ["Ana\u200dMaría", "Ana\u200cMaría"])
def test_name_allows_joiners(name):
    assert provision.normalize_name(name, "buyer name") == name


@pytest.mark.parametrize("name", ["Ana\ufeff", "Ana\u00adMaría", "Ana\u2029", "Ana\udc80", "Ana\r"])
def test_name_rejects_invisible_characters(name):
    with pytest.raises(InputError, match="buyer name"):
        provision.normalize_name(name, "buyer name")


# --- provisioning functions on SQLite and PostgreSQL ---------------------------


@pytest.fixture
async def session_factory(database_url):
    await db.upgrade(database_url)
    store = Store(database_url)
    try:
        yield store.session
    finally:
        await store.close()


async def test_provision_round_trip(session_factory):
    async with session_factory() as session:
        seller, created = await provision.add_seller(
            session, "s1", "Tienda Ñandú", "Help@Shop.example", domain=DOMAIN, senders=["Orders@Shop.example"],
        )
        await provision.add_buyer(session, "b1", "Ana@Mail.example", domain=DOMAIN, name="Ana", opted_out=True)
        aliases = await provision.show_pair(session, "b1", "s1", DOMAIN)
        order, _ = await provision.add_order(
            session, "O-1", "b1", "s1", "shipped", datetime(2024, 5, 31, 12, tzinfo=timezone.utc)
        )
        await session.commit()

    assert created is True
    assert ALIAS_ADDRESS.fullmatch(aliases.buyer_alias)
    assert ALIAS_ADDRESS.fullmatch(aliases.seller_alias)

    async with session_factory() as session:
        stored = await session.get(Seller, "s1")
        match = await find_alias(session, aliases.buyer_alias.split("@")[0].upper())
        senders = await sender_sellers(session, "ORDERS@shop.example")
        again = await provision.show_pair(session, "b1", "s1", DOMAIN)

    assert stored.business_name == "Tienda Ñandú"
    assert stored.support_email == "help@shop.example"
    assert match.role == "buyer_alias"
    assert match.pair.buyer.opted_out is True
    assert senders == {"s1": "approved"}
    assert again == provision.PairAliases(
        aliases.pair_id, "b1", "s1", aliases.buyer_alias, aliases.seller_alias, created=False
    )


async def test_provision_sender_states(session_factory):
    async with session_factory() as session:
        await provision.add_seller(session, "s1", "Shop", "help@shop.example", domain=DOMAIN)
        _, new_block = await provision.block_sender(session, "s1", "a@shop.example")
        _, new_approval = await provision.add_sender(session, "s1", "A@shop.example", domain=DOMAIN)
        await provision.add_sender(session, "s1", "b@shop.example", domain=DOMAIN)
        await provision.block_sender(session, "s1", "b@shop.example")
        await session.commit()

    async with session_factory() as session:
        a_state = await sender_sellers(session, "a@shop.example")
        b_state = await sender_sellers(session, "b@shop.example")

    assert new_block is True
    assert new_approval is False
    assert a_state == {"s1": "approved"}
    assert b_state == {"s1": "blocked"}


async def test_provision_alias_conflicts(session_factory):
    async with session_factory() as session:
        await provision.add_seller(session, "s1", "Shop", "help@shop.example", domain=DOMAIN)
        await provision.add_buyer(session, "b1", "ana@mail.example", domain=DOMAIN)
        await provision.add_buyer(session, "b2", "luis@mail.example", domain=DOMAIN)
        await provision.show_pair(
            session, "b1", "s1", DOMAIN, buyer_alias="aaaaaaaaaaaaaaa", seller_alias="bbbbbbbbbbbbbbb"
        )
        await session.commit()

    async with session_factory() as session:
        with pytest.raises(provision.ConflictError, match="aaaaaaaaaaaaaaa@marketplace.example is already used"):
            await provision.show_pair(
                session, "b2", "s1", DOMAIN, buyer_alias="ccccccccccccccc", seller_alias="aaaaaaaaaaaaaaa"
            )
        with pytest.raises(provision.ConflictError, match="already has seller alias bbbbbbbbbbbbbbb@"):
            await provision.show_pair(
                session, "b1", "s1", DOMAIN, buyer_alias="aaaaaaaaaaaaaaa", seller_alias="ddddddddddddddd"
            )
        with pytest.raises(NotFoundError, match="buyer 'b9' not found"):
            await provision.show_pair(session, "b9", "s1", DOMAIN)


async def test_provision_order_update(session_factory):
    placed = datetime(2024, 5, 1, tzinfo=timezone.utc)
    async with session_factory() as session:
        await provision.add_seller(session, "s1", "Shop", "help@shop.example", domain=DOMAIN)
        await provision.add_buyer(session, "b1", "ana@mail.example", domain=DOMAIN)
        await provision.add_order(session, "O-1", "b1", "s1", "pending", placed)
        await session.commit()

    async with session_factory() as session:
        order, created = await provision.add_order(session, "O-1", "b1", "s1", "DELIVERED")
        await session.commit()

    assert created is False
    assert order.status == "delivered"
    assert order.placed_at == placed


def test_commands_on_postgres(cli, tmp_path, postgres_url):
    config = write_config(tmp_path / "pg.toml", database_url=postgres_url)

    steps = [
        cli("db", "upgrade", config=config),
        cli("seller", "add", "--id", "s1", "--name", "Shop", "--support-email", "h@shop.example", config=config),
        cli("buyer", "add", "--id", "b1", "--email", "ana@mail.example", config=config),
        cli("order", "add", "--id", "O-1", "--buyer", "b1", "--seller", "s1", "--status", "pending", config=config),
    ]
    shown = cli("pair", "show", "--buyer", "b1", "--seller", "s1", "--json", config=config)
    again = cli("pair", "show", "--buyer", "b1", "--seller", "s1", "--json", config=config)

    for step in steps:
        assert step.rc == 0, step.stderr
    assert shown.rc == 0, shown.stderr
    assert ALIAS_ADDRESS.fullmatch(shown.json()["buyer_alias"])
    assert again.json() == {**shown.json(), "created": False}
