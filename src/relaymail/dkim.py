"""DKIM signing of outgoing mail with dkimpy, and the key pair behind it.

`Signer.from_config(config)` returns None while `[dkim] selector` is empty and
otherwise reads the private key, raising ConfigError that names the file when
it is missing, unreadable, not an RSA key in PEM form or shorter than 1024
bits (RFC 8301 section 3.2). `Signer.sign(message)` returns the message with a
DKIM-Signature header prepended: rsa-sha256, relaxed/relaxed canonicalization,
`d=` the [dkim] domain. The `h=` list names each configured header as often as
it occurs in the message, plus From one more time, so a From header added
later breaks the signature (oversigning).

`generate_key(bits)` makes a new RSA key in PKCS#1 PEM form, `write_key` stores
it with mode 0600, and `dns_record` returns the TXT record that publishes the
public key at `<selector>._domainkey.<domain>`.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .config import Config
from .errors import ConfigError, InputError, MessageError, RelaymailError

MIN_KEY_BITS = 1024
KEY_BITS_CHOICES = (1024, 2048, 3072, 4096)
# A DNS TXT record is a list of character-strings of at most 255 octets each (RFC 1035 section 3.3).
TXT_STRING_MAX = 255


class KeyFileExistsError(RelaymailError):
    """The key file to write exists already and replacing it was not requested."""


@dataclass(frozen=True)
class DnsRecord:
    """The TXT record that publishes a DKIM public key."""

    name: str  # <selector>._domainkey.<domain>
    value: str  # "v=DKIM1; k=rsa; p=..."

    @property
    def strings(self) -> list[str]:
        """The value split into character-strings of at most 255 characters."""
        return [self.value[i : i + TXT_STRING_MAX] for i in range(0, len(self.value), TXT_STRING_MAX)]

    @property
    def zone_line(self) -> str:
        """The record as one zone-file line."""
        quoted = " ".join(f'"{part}"' for part in self.strings)
        return f"{self.name} IN TXT {quoted}"


class Signer:
    """Signs messages for one domain and selector with one RSA key."""

    def __init__(self, selector: str, domain: str, private_key_pem: bytes, headers: list[str] | tuple[str, ...]):
        self.selector = selector
        self.domain = domain
        self.private_key_pem = private_key_pem
        self.headers = tuple(name.lower() for name in headers)

    @classmethod
    def from_config(cls, config: Config) -> Signer | None:
        """Return the signer that [dkim] describes, or None when signing is off."""
        section = config.dkim
        if not section.selector:
            return None
        key = load_private_key(Path(section.private_key_path), "dkim.private_key_path")
        return cls(section.selector, section.domain, private_key_pem(key), section.headers)

    def sign(self, message: bytes) -> bytes:
        """Return `message` (CRLF line endings) with a DKIM-Signature header prepended.

        Raises MessageError when dkimpy cannot parse the message's header.
        """
        include = self._signed_headers(message)
        try:
            signature = dkimpy.sign(
                message,
                self.selector.encode("ascii"),
                self.domain.encode("ascii"),
                self.private_key_pem,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
                linesep=b"\r\n",
            )
        except dkimpy.DKIMException as exc:
            raise MessageError(f"DKIM signing failed: {exc}") from exc
        return signature + message

    def _signed_headers(self, message: bytes) -> list[bytes]:
        present = [name.lower() for name in _header_names(message)]
        include = [name.encode("ascii") for name in present if name in self.headers]
        # From always appears once more than in the message: the extra entry signs an absent From.
        include.append(b"from")
        return include

    def dns_record(self) -> DnsRecord:
        """Return the TXT record of this signer's public key."""
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        return dns_record(self.selector, self.domain, key)


def _header_names(message: bytes) -> list[str]:
    """Return the field names of the header section, in order (continuation lines skipped)."""
    end = message.find(b"\r\n\r\n")
    block = message if end < 0 else message[:end]
    names = []
    for line in block.split(b"\r\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        if colon:
            names.append(name.strip().decode("ascii", errors="replace"))
    return names


# --- keys ---------------------------------------------------------------------


def load_private_key(path: Path, key: str) -> rsa.RSAPrivateKey:
    """Read an RSA private key in PEM form; raise ConfigError naming `key` and `path` on failure."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{key} = {str(path)!r}: file not found; create a key with `relaymail dkim keygen`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{key} = {str(path)!r}: cannot read the file: {exc.strerror}") from None

    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"{key} = {str(path)!r}: not an unencrypted private key in PEM form ({exc})"
        ) from None
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ConfigError(f"{key} = {str(path)!r}: expected an RSA key, got {type(private_key).__name__}")
    if private_key.key_size < MIN_KEY_BITS:
        raise ConfigError(
            f"{key} = {str(path)!r}: the key has {private_key.key_size} bits; expected at least {MIN_KEY_BITS}"
        )
    return private_key


def private_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    """Return the key as unencrypted PKCS#1 PEM ("BEGIN RSA PRIVATE KEY"), which dkimpy reads."""
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def generate_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """Return a new RSA private key of `bits` bits (public exponent 65537)."""
    if bits not in KEY_BITS_CHOICES:
        raise InputError(f"key size {bits}: expected one of {', '.join(map(str, KEY_BITS_CHOICES))} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_key(path: Path, private_key: rsa.RSAPrivateKey, replace: bool = False) -> None:
    """Write the key to `path` with mode 0600.

    Raises KeyFileExistsError when `path` exists and `replace` is false. With
    `replace`, the new file is written beside it and renamed over it, so a
    crash leaves either the old key or the new one.
    """
    data = private_key_pem(private_key)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"output {str(path)!r}: directory {str(directory)!r} not found")

    if not replace:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileExistsError(
                f"key file {str(path)!r} exists already; pass --force to replace it "
                "(then publish the new DNS record before the relay signs with the new key)"
            ) from None
        _write_all(fd, data)
        return

    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_all(fd, data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    try:
        # mkstemp and os.open already create the file 0600 or narrower; fchmod makes it exact.
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def dns_record(selector: str, domain: str, private_key: rsa.RSAPrivateKey) -> DnsRecord:
    """Return the TXT record publishing the public half of `private_key`."""
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b64encode(public_der).decode("ascii")
    return DnsRecord(name=f"{selector}._domainkey.{domain}", value=f"v=DKIM1; k=rsa; p={encoded}")
