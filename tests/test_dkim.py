"""DKIM: key generation, the published record, signing rewritten mail, verification with dkimpy.

Verification never uses real DNS: dkimpy's `dnsfunc` returns the TXT record
that `relaymail dkim keygen` printed, joined from its character-strings as a
resolver would.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dkim as dkimpy
import pytest
from conftest import DOMAIN, write_config
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relaymail import config as relaymail_config
from relaymail import dkim, rewrite
from relaymail.errors import ConfigError, MessageError

SELECTOR = "mail2024"
BUYER = "juan.perez@example.net"
SELLER_ALIAS = f"k7m2q9x4zr1c8nw@{DOMAIN}"

ORIGINAL = (
    "From: Juan <juan.perez@example.net>\r\n"
    "To: k7m2q9x4zr1c8nw@marketplace.example\r\n"
    "Subject: =?utf-8?q?Pregunta_sobre_el_env=C3=ADo?=\r\n"
    "Date: Mon, 11 Mar 2024 10:00:00 -0600\r\n"
    "Message-ID: <q1@example.net>\r\n"
    "Received: from client.example.net ([192.0.2.7]) by mx.example.net\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Hola, ¿cuándo llega mi pedido? Escríbanme a juan.perez@example.net.\r\n"
).encode()


def rewritten_message() -> bytes:
    spec = rewrite.RewriteSpec(
        from_name="Juan Pérez",
        from_address=f"t969vz2jn3bdsy7@{DOMAIN}",
        to_address="ventas@example.com",
        message_id=f"abc123.0001@{DOMAIN}",
        in_reply_to=[],
        references=[],
        banner="Pedido: 402-7781",
        sender_addresses=[BUYER],
        received=f"by mx.{DOMAIN} (relaymail) with ESMTP id ABC123; Mon, 11 Mar 2024 16:00:01 +0000",
    )
    return rewrite.rewrite(ORIGINAL, spec)


def dns_lookup(record_value: str, expected_name: str):
    """Return a dkimpy `dnsfunc` that returns the record for `expected_name` and None for other names."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        if name.decode().rstrip(".") != expected_name:
            return None
        return record_value.encode()

    return lookup


def signature_tags(signed: bytes) -> dict[str, str]:
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    assert header.startswith("DKIM-Signature:")
    value = header.split("\r\n")[0]
    for line in header.split("\r\n")[1:]:
        if not line.startswith((" ", "\t")):
            break
        value += line
    value = value.removeprefix("DKIM-Signature:")
    tags = {}
    for item in value.split(";"):
        key, _, tag_value = item.strip().partition("=")
        tags[key.strip()] = "".join(tag_value.split())
    return tags


@pytest.fixture
def keyed(tmp_path: Path, cli_main):
    """A configuration with [dkim] on, its key made by `dkim keygen`, and the printed record."""
    key_path = tmp_path / "dkim.pem"
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(key_path), "--json")
    assert result.rc == 0, result.stderr
    config_path = write_config(
        tmp_path / "signing.toml",
        extra=f'\n[dkim]\nselector = "{SELECTOR}"\nprivate_key_path = "dkim.pem"\n',
    )
    return relaymail_config.load(config_path), result.json()


# --- signing and verification ----------------------------------------------------


def test_signed_rewrite_verifies(keyed):
    config, record = keyed
    signer = dkim.Signer.from_config(config)
    signed = signer.sign(rewritten_message())

    lookup = dns_lookup("".join(record["strings"]), f"{SELECTOR}._domainkey.{DOMAIN}")
    assert dkimpy.verify(signed, dnsfunc=lookup)


def test_signature_tags(keyed):
    config, _ = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    tags = signature_tags(signed)

    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == DOMAIN
    assert tags["s"] == SELECTOR
    signed_names = tags["h"].split(":")
    assert signed_names.count("from") == 2
    for name in ("to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding"):
        assert name in signed_names
    assert "received" not in signed_names


def test_message_unchanged_below_signature(keyed):
    config, _ = keyed
    message = rewritten_message()
    signed = dkim.Signer.from_config(config).sign(message)

    assert signed.endswith(message)
    assert signed.startswith(b"DKIM-Signature: ")
    assert all(len(line) <= 998 for line in signed.split(b"\r\n"))


def test_tampered_body_fails(keyed):
    config, record = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    tampered = signed.replace(b"402-7781", b"402-7782")
    lookup = dns_lookup(record["value"], f"{SELECTOR}._domainkey.{DOMAIN}")

    assert tampered != signed
    assert not dkimpy.verify(tampered, dnsfunc=lookup)


def test_tampered_subject_fails(keyed):
    config, record = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    head, body = signed.split(b"\r\n\r\n", 1)
    tampered = head.replace(b"Subject: ", b"Subject: Re: ", 1) + b"\r\n\r\n" + body
    lookup = dns_lookup(record["value"], f"{SELECTOR}._domainkey.{DOMAIN}")

    assert not dkimpy.verify(tampered, dnsfunc=lookup)


def test_added_from_fails(keyed):
    config, record = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    head, body = signed.split(b"\r\n\r\n", 1)
    with_second_from = head + b"\r\nFrom: attacker@example.org" + b"\r\n\r\n" + body
    lookup = dns_lookup(record["value"], f"{SELECTOR}._domainkey.{DOMAIN}")

    assert not dkimpy.verify(with_second_from, dnsfunc=lookup)


def test_relaxed_header_whitespace_verifies(keyed):
    config, record = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    head, body = signed.split(b"\r\n\r\n", 1)
    # Relaxed header canonicalization ignores the case of names and runs of whitespace.
    refolded = head.replace(b"\r\nDate: ", b"\r\ndate:   ", 1) + b"\r\n\r\n" + body
    lookup = dns_lookup(record["value"], f"{SELECTOR}._domainkey.{DOMAIN}")

    assert refolded != signed
    assert dkimpy.verify(refolded, dnsfunc=lookup)


def test_wrong_published_key_fails(keyed, tmp_path: Path):
    config, _ = keyed
    signed = dkim.Signer.from_config(config).sign(rewritten_message())
    other = dkim.dns_record(SELECTOR, DOMAIN, dkim.generate_key(2048))
    lookup = dns_lookup(other.value, f"{SELECTOR}._domainkey.{DOMAIN}")

    assert not dkimpy.verify(signed, dnsfunc=lookup)


def test_malformed_header_raises(keyed):
    config, _ = keyed
    signer = dkim.Signer.from_config(config)

    with pytest.raises(MessageError, match="DKIM signing failed"):
        signer.sign(b"a header line without a colon\r\n\r\nbody\r\n")


def test_signing_off_without_selector(config_file: Path):
    config = relaymail_config.load(config_file)

    assert dkim.Signer.from_config(config) is None


def test_custom_domain_and_headers(tmp_path: Path):
    key_path = tmp_path / "k.pem"
    dkim.write_key(key_path, dkim.generate_key(2048))
    config = relaymail_config.load(
        write_config(
            tmp_path / "custom.toml",
            extra=(
                '\n[dkim]\nselector = "s1"\nprivate_key_path = "k.pem"\n'
                'domain = "mail.marketplace.example"\nheaders = ["From", "Subject"]\n'
            ),
        )
    )
    signer = dkim.Signer.from_config(config)
    signed = signer.sign(rewritten_message())
    tags = signature_tags(signed)
    lookup = dns_lookup(signer.dns_record().value, "s1._domainkey.mail.marketplace.example")

    assert tags["d"] == "mail.marketplace.example"
    assert tags["h"] == "from:subject:from"
    assert dkimpy.verify(signed, dnsfunc=lookup)


# --- key files ---------------------------------------------------------------------


def signing_config(tmp_path: Path, key_path: str) -> relaymail_config.Config:
    path = write_config(
        tmp_path / "relaymail.toml",
        extra=f'\n[dkim]\nselector = "{SELECTOR}"\nprivate_key_path = "{key_path}"\n',
    )
    return relaymail_config.load(path)


def test_missing_key_names_path(tmp_path: Path):
    config = signing_config(tmp_path, "keys/missing.pem")

    with pytest.raises(ConfigError) as error:
        dkim.Signer.from_config(config)

    assert str(tmp_path / "keys" / "missing.pem") in str(error.value)
    assert "dkim.private_key_path" in str(error.value)
    assert "not found" in str(error.value)


def test_unreadable_key_names_path(tmp_path: Path):
    # Reading a directory fails for root too, unlike a file with mode 000.
    (tmp_path / "dkim.pem").mkdir()
    config = signing_config(tmp_path, "dkim.pem")

    with pytest.raises(ConfigError) as error:
        dkim.Signer.from_config(config)

    assert str(tmp_path / "dkim.pem") in str(error.value)
    assert "cannot read" in str(error.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_key_without_read_permission(tmp_path: Path):
    key_path = tmp_path / "dkim.pem"
    dkim.write_key(key_path, dkim.generate_key(2048))
    key_path.chmod(0)
    config = signing_config(tmp_path, "dkim.pem")

    with pytest.raises(ConfigError, match="cannot read"):
        dkim.Signer.from_config(config)


def test_garbage_key_names_path(tmp_path: Path):
    (tmp_path / "dkim.pem").write_text("not a key\n")
    config = signing_config(tmp_path, "dkim.pem")

    with pytest.raises(ConfigError) as error:
        dkim.Signer.from_config(config)

    assert str(tmp_path / "dkim.pem") in str(error.value)
    assert "PEM" in str(error.value)


def test_encrypted_key_rejected(tmp_path: Path):
    key = dkim.generate_key(2048)
    (tmp_path / "dkim.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = signing_config(tmp_path, "dkim.pem")

    with pytest.raises(ConfigError, match="unencrypted"):
        dkim.Signer.from_config(config)


def test_non_rsa_key_rejected(tmp_path: Path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "dkim.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    config = signing_config(tmp_path, "dkim.pem")

    with pytest.raises(ConfigError, match="expected an RSA key"):
        dkim.Signer.from_config(config)


def test_pkcs8_key_accepted(tmp_path: Path):
    key = dkim.generate_key(2048)
    (tmp_path / "dkim.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    config = signing_config(tmp_path, "dkim.pem")
    signer = dkim.Signer.from_config(config)
    lookup = dns_lookup(dkim.dns_record(SELECTOR, DOMAIN, key).value, f"{SELECTOR}._domainkey.{DOMAIN}")

    assert dkimpy.verify(signer.sign(rewritten_message()), dnsfunc=lookup)


# --- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('selector = "s1"', "dkim.private_key_path"),
        ('private_key_path = "k.pem"', "dkim.selector"),
        ('selector = "bad selector"\nprivate_key_path = "k.pem"', "'bad selector'"),
        ('selector = "s1."\nprivate_key_path = "k.pem"', "'s1.'"),
        ('domain = "localhost"', "dkim.domain = 'localhost'"),
        ('headers = ["Subject", "To"]', "\"From\""),
        ('headers = ["From", "Received"]', "'Received' must not be signed"),
        ('headers = ["From", "Bad:Name"]', "'Bad:Name' is not a header field name"),
        ('headers = "From"', "dkim.headers"),
        ("unknown = 1", "dkim.unknown"),
    ],
)
def test_invalid_dkim_config(tmp_path: Path, section: str, message: str):
    path = write_config(tmp_path / "relaymail.toml", extra=f"\n[dkim]\n{section}\n")

    with pytest.raises(ConfigError) as error:
        relaymail_config.load(path)

    assert message in str(error.value)


def test_dkim_defaults(config_file: Path):
    section = relaymail_config.load(config_file).dkim

    assert section.selector == ""
    assert section.domain == DOMAIN
    assert section.headers[0] == "From"
    assert "Auto-Submitted" in section.headers


def test_key_path_relative_to_config(tmp_path: Path):
    config = signing_config(tmp_path, "keys/dkim.pem")

    assert config.dkim.private_key_path == str(tmp_path / "keys" / "dkim.pem")


def test_example_config_loads():
    example = Path(__file__).resolve().parents[1] / "config.example.toml"

    assert relaymail_config.load(example).dkim.selector == ""


# --- keygen and record commands --------------------------------------------------------


def test_keygen_writes_private_key(tmp_path: Path, cli_main):
    key_path = tmp_path / "new.pem"
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(key_path), "--json")

    assert result.rc == 0, result.stderr
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert dkim.load_private_key(key_path, "test").key_size == 2048


def test_keygen_record_form(tmp_path: Path, cli_main):
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(tmp_path / "k.pem"), "--json")
    record = result.json()

    assert record["name"] == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert record["type"] == "TXT"
    assert record["value"].startswith("v=DKIM1; k=rsa; p=MII")
    assert "".join(record["strings"]) == record["value"]
    assert all(len(part) <= 255 for part in record["strings"])
    assert len(record["strings"]) == 2  # a 2048-bit key's record is about 410 characters
    quoted = " ".join(f'"{part}"' for part in record["strings"])
    assert record["record"] == f"{SELECTOR}._domainkey.{DOMAIN} IN TXT {quoted}"


def test_keygen_human_output(tmp_path: Path, cli_main):
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(tmp_path / "k.pem"))
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())

    assert result.rc == 0, result.stderr
    assert lines["name"] == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert lines["record"].startswith(f'{SELECTOR}._domainkey.{DOMAIN} IN TXT "v=DKIM1; k=rsa; p=')


def test_keygen_bits(tmp_path: Path, cli_main):
    key_path = tmp_path / "k.pem"
    result = cli_main("dkim", "keygen", "--selector", "s", "--bits", "3072", "--output", str(key_path), "--json")

    assert result.rc == 0, result.stderr
    assert result.json()["bits"] == 3072
    assert dkim.load_private_key(key_path, "test").key_size == 3072


def test_keygen_refuses_existing_file(tmp_path: Path, cli_main):
    key_path = tmp_path / "k.pem"
    key_path.write_text("keep me\n")
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(key_path))

    assert result.rc == 1
    assert str(key_path) in result.stderr
    assert "--force" in result.stderr
    assert key_path.read_text() == "keep me\n"


def test_keygen_force_replaces(tmp_path: Path, cli_main):
    key_path = tmp_path / "k.pem"
    first = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(key_path), "--json").json()
    second = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(key_path), "--json", "--force")

    assert second.rc == 0, second.stderr
    assert second.json()["value"] != first["value"]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".k.pem")] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--selector", "bad_selector"], "invalid selector 'bad_selector'"),
        (["--selector", "s1", "--bits", "512"], "key size 512"),
        (["--selector", "s1", "--bits", "many"], "invalid int value: 'many'"),
    ],
)
def test_keygen_invalid_input(tmp_path: Path, cli_main, args: list[str], message: str):
    result = cli_main("dkim", "keygen", *args, "--output", str(tmp_path / "k.pem"))

    assert result.rc == 2
    assert message in result.stderr
    assert not (tmp_path / "k.pem").exists()


def test_keygen_missing_directory(tmp_path: Path, cli_main):
    output = tmp_path / "nowhere" / "k.pem"
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(output))

    assert result.rc == 2
    assert str(tmp_path / "nowhere") in result.stderr


def test_keygen_with_config_naming_missing_key(tmp_path: Path, cli_main):
    # The configuration may already name the key that keygen is about to write.
    config_path = signing_config(tmp_path, "dkim.pem").path
    result = cli_main("dkim", "keygen", "--selector", SELECTOR, "--output", str(tmp_path / "dkim.pem"), config=config_path)

    assert result.rc == 0, result.stderr
    assert dkim.Signer.from_config(relaymail_config.load(config_path)) is not None


def test_record_matches_keygen(keyed, cli_main):
    config, generated = keyed
    result = cli_main("dkim", "record", "--json", config=config.path)

    assert result.rc == 0, result.stderr
    assert result.json()["value"] == generated["value"]
    assert result.json()["record"] == generated["record"]


def test_record_without_signing_config(cli_main):
    result = cli_main("dkim", "record")

    assert result.rc == 2
    assert "dkim.selector" in result.stderr


def test_record_missing_key(tmp_path: Path, cli_main):
    config_path = signing_config(tmp_path, "gone.pem").path
    result = cli_main("dkim", "record", config=config_path)

    assert result.rc == 2
    assert str(tmp_path / "gone.pem") in result.stderr
