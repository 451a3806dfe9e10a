"""DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463), one key or several per domain.

Configuration (``[plugins.dkim]``, every key documented in relay.toml.example)::

    [plugins.dkim]
    domains = { "example.com" = [
        { selector = "s2026", algorithm = "rsa-sha256", key_file = "/etc/relay/dkim/example.com.s2026.pem" },
        { selector = "e2026", algorithm = "ed25519-sha256", key_file = "/etc/relay/dkim/example.com.e2026.pem" },
    ] }

Every key listed for the signing domain signs, so two keys of different algorithms give dual signing:
verifiers that know ed25519 check either, older ones (most of today's) ignore the ed25519 signature and
check the RSA one (RFC 8463 section 4). ``relay dkim keygen`` writes keys and prints their DNS records.

Which domain signs (``d=``), first match wins:

1. the domain of the RFC 5322 ``From`` header — what DMARC aligns with. Only when the message has exactly
   one ``From`` field and all its mailboxes share one domain; anything else (two ``From`` fields, mailboxes
   of different domains) is not a domain we can vouch for, and falls through;
2. the envelope sender's domain (MAIL FROM), for messages whose ``From`` domain has no key (a signature
   that still carries the sending domain's reputation, though it does not align for DMARC);
3. ``default_domain``, when set: the relay's own signing domain for everything else.

A domain without keys of its own uses the keys of its nearest parent domain listed with
``subdomains = true`` (``d=`` is then the parent, which is where the public key is published; DMARC's
relaxed alignment accepts a parent domain). A message for which no key is found is sent unsigned.

Where and how: at ``before_attempt``, that is before every delivery attempt, on the copy the attempt
sends. The stored message stays unsigned, so each attempt carries a fresh signature (``t=`` of the
attempt) and a retry days later never sends a stale one. The chain's seal check guarantees that no
plugin changes the message after this one (put dkim last among the plugins that change the message).
Canonicalisation is relaxed/relaxed. The signed header fields are the configured list (those present in
the message, each occurrence), and the ``oversign`` ones — ``From`` by default — are listed once more than
they occur, so no further ``From`` can be added without breaking the signature (RFC 6376 section 8.15).

Why ``modifies`` is empty although a header is added: ``modifies`` tells the chain that a plugin changes
what an earlier seal covers. A ``DKIM-Signature`` header is by definition outside every DKIM signature
(verifiers drop it from the signed fields), so adding one never breaks an earlier signature; declaring
``modifies`` would make the chain refuse two sealing steps in a row, which is exactly what a second
signer (or ARC sealing) needs.

Invariants:
- Keys are read and checked at :meth:`DkimPlugin.start`: a missing or unreadable file, a file that is not
  an unencrypted PEM private key, a key of the wrong type for its algorithm or an RSA key under 2048 bits
  refuse start-up with a :class:`PluginError` naming the file. Each key then signs a test message that
  is verified against its own public record, so a key that could not sign fails at start, not per message.
- Signing runs off the event loop, in a small thread pool of its own (RSA-2048 costs a few ms).
- A message whose header block cannot be parsed as RFC 5322 (so cannot be signed) is sent unsigned, with
  a warning in the log; any other failure fails the hook, which the chain turns into a deferral (451).
- Private keys never reach the log (``repr`` of a key shows the file, never the key).
- Trust: this step signs for whatever domain the message's ``From`` names when that domain has a key
  here. Which users may send as which domains is the submission side's decision, made before the queue.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import dkim
import idna
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import Field, field_validator, model_validator

from relay.plugin import CONTINUE, AttemptContext, Plugin, PluginConfig, PluginError, PluginHost, Verdict

__all__ = [
    "DEFAULT_HEADERS", "MIN_RSA_BITS", "DkimConfig", "DkimKeyConfig", "DkimPlugin", "SigningKey",
    "dns_record_name", "normalize_domain", "normalize_selector", "public_txt_value", "txt_strings",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: RSA keys shorter than this are refused (RFC 8301 sets 1024 as the floor; 2048 is today's practice).
MIN_RSA_BITS = 2048

#: Header fields signed by default: those a reader sees or that decide how the message is shown or
#: handled (RFC 6376 section 5.4.1), plus List-Unsubscribe(-Post), which RFC 8058 requires be signed.
DEFAULT_HEADERS: tuple[str, ...] = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-ID", "Content-Description", "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post",
)

# Fields that must not be signed (RFC 6376 section 5.4.1: they change in transit); dkimpy refuses them too.
_UNSIGNABLE = frozenset(name.decode().lower() for name in dkim.DKIM.SHOULD_NOT)
# RFC 5322 field name: printable US-ASCII except the colon.
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
# RFC 6376 selector: sub-domain *("." sub-domain), each label letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_CANONICALIZE = (b"relaxed", b"relaxed")
_SIGNER_THREADS = 2
_SELF_TEST_MESSAGE = (b"From: relay start-up check <check@%s>\r\nSubject: dkim self-test\r\n"
                      b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\nThis message is never sent.\r\n")


# -- configuration ------------------------------------------------------------------------------------
def normalize_domain(text: str) -> str:
    """A domain as DKIM's ``d=`` carries it: lower-case A-labels, no trailing dot; ValueError if invalid."""
    name = text.strip().rstrip(".")
    if not name:
        raise ValueError("empty domain")
    try:
        ascii_name = idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"invalid domain {text!r}: {exc}") from None
    if "." not in ascii_name or not all(re.fullmatch(_LABEL, label) for label in ascii_name.split(".")):
        raise ValueError(f"invalid domain {text!r}")
    return ascii_name.lower()


def normalize_selector(text: str) -> str:
    """A selector (RFC 6376 section 3.1: DNS labels separated by dots), lower-cased; ValueError if invalid."""
    if not _SELECTOR.fullmatch(text):
        raise ValueError(f"invalid selector {text!r} (DNS labels separated by dots)")
    return text.lower()


class DkimKeyConfig(PluginConfig):
    """One signing key of a domain."""

    selector: str
    algorithm: Algorithm = "rsa-sha256"
    key_file: Path
    # Also sign mail of subdomains that have no key of their own, as d=<this domain>.
    subdomains: bool = False

    @field_validator("selector")
    @classmethod
    def _selector_syntax(cls, value: str) -> str:
        return normalize_selector(value)


class DkimConfig(PluginConfig):
    """``[plugins.dkim]``: keys per signing domain, the fallback domain and the signed header fields."""

    domains: dict[str, list[DkimKeyConfig]] = Field(default_factory=dict)
    # Signs messages whose From and envelope domains have no key (not DMARC-aligned); "" signs none.
    default_domain: str = ""
    headers: list[str] = Field(default_factory=lambda: list(DEFAULT_HEADERS))
    # Listed once more than they occur: nobody can add another such field without breaking the signature.
    oversign: list[str] = Field(default_factory=lambda: ["From"])

    @field_validator("domains")
    @classmethod
    def _domain_names(cls, value: dict[str, list[DkimKeyConfig]]) -> dict[str, list[DkimKeyConfig]]:
        normalized: dict[str, list[DkimKeyConfig]] = {}
        for name, keys in value.items():
            domain = normalize_domain(name)
            if domain in normalized:
                raise ValueError(f"domain {name!r} is listed twice")
            if not keys:
                raise ValueError(f"domain {name!r} has no keys")
            selectors = [key.selector for key in keys]
            if len(set(selectors)) != len(selectors):
                raise ValueError(f"domain {name!r}: a selector is listed twice")
            normalized[domain] = keys
        return normalized

    @field_validator("default_domain")
    @classmethod
    def _default_domain_name(cls, value: str) -> str:
        return normalize_domain(value) if value else ""

    @field_validator("headers", "oversign")
    @classmethod
    def _field_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid header field name {name!r}")
            if name.lower() in _UNSIGNABLE:
                raise ValueError(f"{name} must not be signed: it changes in transit")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DkimConfig:
        if "from" not in {name.lower() for name in self.headers}:
            raise ValueError("headers must include From (RFC 6376 section 5.4)")
        if self.default_domain and self.default_domain not in self.domains:
            raise ValueError(f"default_domain {self.default_domain!r} has no keys in domains")
        return self


# -- keys ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SigningKey:
    """A loaded key, ready for dkimpy: ``private`` is PEM (RSA) or the base64 seed (ed25519)."""

    domain: str
    selector: str
    algorithm: Algorithm
    key_file: Path
    subdomains: bool
    public_record: str
    private: bytes = field(repr=False)

    def describe(self) -> str:
        return f"{self.selector}._domainkey.{self.domain} ({self.algorithm})"


def dns_record_name(selector: str, domain: str) -> str:
    """Where the public key is published (RFC 6376 section 3.6.2.1)."""
    return f"{selector}._domainkey.{domain}"


def public_txt_value(key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """The DKIM key record (RFC 6376 section 3.6.1): ``v=DKIM1; k=…; p=…``.

    RSA: the DER SubjectPublicKeyInfo, as every signer publishes it; ed25519: the raw 32-byte key
    (RFC 8463 section 4.2)."""
    if isinstance(key, rsa.RSAPublicKey):
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"


def txt_strings(value: str, size: int = 255) -> list[str]:
    """Cut a TXT value into character-strings of at most 255 octets (RFC 1035 3.3.14); verifiers join
    them without separators (RFC 6376 section 3.6.2.2)."""
    return [value[i:i + size] for i in range(0, len(value), size)] or [""]


def load_signing_key(domain: str, entry: DkimKeyConfig) -> SigningKey:
    """Read and check one key file; :class:`PluginError` naming the file for anything wrong."""
    path = entry.key_file
    private_key = _read_private_key(path)
    if entry.algorithm == "rsa-sha256":
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise PluginError(f"key file {path}: {_kind(private_key)} key, but rsa-sha256 needs an RSA key")
        if private_key.key_size < MIN_RSA_BITS:
            raise PluginError(f"key file {path}: RSA key of {private_key.key_size} bits is too short; "
                              f"rsa-sha256 needs at least {MIN_RSA_BITS} (make one with `relay dkim keygen`)")
        signer_form = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        public = public_txt_value(private_key.public_key())
    else:
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise PluginError(f"key file {path}: {_kind(private_key)} key, but ed25519-sha256 needs an "
                              "Ed25519 key")
        seed = private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        signer_form = base64.b64encode(seed)
        public = public_txt_value(private_key.public_key())
    return SigningKey(domain=domain, selector=entry.selector, algorithm=entry.algorithm, key_file=path,
                      subdomains=entry.subdomains, public_record=public, private=signer_form)


def _read_private_key(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PluginError(f"key file {path}: not found") from None
    except PermissionError:
        raise PluginError(f"key file {path}: not readable by this user") from None
    except OSError as exc:
        raise PluginError(f"key file {path}: cannot be read ({exc.strerror})") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "this key is encrypted and no password was given".
        raise PluginError(f"key file {path}: the key is encrypted; DKIM keys must be unencrypted PEM "
                          "(protect the file with mode 0600 instead)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PluginError(f"key file {path}: not a PEM private key") from None


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519"
    return f"a {type(key).__name__.removeprefix('_').replace('PrivateKey', '')}"


# -- reading the message ------------------------------------------------------------------------------
def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """The header block as (lower-case name, unfolded raw value) pairs, in order.

    Mirrors how dkimpy splits fields (a line starting with white space continues the previous one), so
    that the counts used for ``h=`` match the fields dkimpy signs."""
    end = message.find(b"\r\n\r\n")
    block = message if end < 0 else message[:end]
    fields: list[tuple[str, bytes]] = []
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            previous, value = fields[-1]
            fields[-1] = (previous, value + b" " + line.strip())
        elif b":" in line:
            raw_name, _, value = line.partition(b":")
            fields.append((raw_name.strip().decode("ascii", "replace").lower(), value.strip()))
    return fields


def author_domain(fields: list[tuple[str, bytes]]) -> str | None:
    """The domain of the one ``From`` field when all its mailboxes share it; None otherwise."""
    values = [value for name, value in fields if name == "from"]
    if len(values) != 1:
        return None
    addresses = email.utils.getaddresses([values[0].decode("utf-8", "replace")])
    domains = {_domain_or_none(address.rpartition("@")[2]) for _, address in addresses if "@" in address}
    return domains.pop() if len(domains) == 1 else None


def _domain_or_none(text: str) -> str | None:
    try:
        return normalize_domain(text)
    except ValueError:
        return None


def signed_field_list(fields: list[tuple[str, bytes]], headers: list[str], oversign: list[str]) -> list[bytes]:
    """The ``h=`` list: each configured field as often as it occurs, oversigned ones once more."""
    present: dict[str, int] = {}
    for name, _ in fields:
        present[name] = present.get(name, 0) + 1
    oversigned = {name.lower() for name in oversign}
    names: list[bytes] = []
    seen: set[str] = set()
    for name in [*headers, *oversign]:
        lowered = name.lower()
        if lowered in seen:
            continue
        seen.add(lowered)
        count = present.get(lowered, 0) + (1 if lowered in oversigned else 0)
        names.extend([lowered.encode("ascii")] * count)
    return names


# -- the plugin ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Signature:
    domain: str
    selector: str
    algorithm: str


class DkimPlugin(Plugin[DkimConfig]):
    """Adds one DKIM-Signature per key of the signing domain before every delivery attempt."""

    name: ClassVar[str] = "dkim"
    Config: ClassVar[type[PluginConfig]] = DkimConfig
    seals: ClassVar[bool] = True
    # Empty on purpose: see the module docstring (a DKIM-Signature header breaks no earlier seal).
    modifies: ClassVar[frozenset[Literal["headers", "body"]]] = frozenset()

    def __init__(self, config: DkimConfig, host: PluginHost) -> None:
        super().__init__(config, host)
        self.keys: dict[str, list[SigningKey]] = {}
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        keys = {domain: [load_signing_key(domain, entry) for entry in entries]
                for domain, entries in self.config.domains.items()}
        for domain_keys in keys.values():
            for key in domain_keys:
                self._warn_if_readable(key.key_file)
        self._executor = ThreadPoolExecutor(max_workers=_SIGNER_THREADS, thread_name_prefix="dkim")
        loop = asyncio.get_running_loop()
        try:
            for domain_keys in keys.values():
                for key in domain_keys:
                    await loop.run_in_executor(self._executor, _self_test, key)
        except BaseException:
            await self.stop()   # a refused start leaves no threads behind
            raise
        self.keys = keys
        self.log.info("dkim_keys_loaded", keys=[key.describe() for ks in keys.values() for key in ks],
                      default_domain=self.config.default_domain or None)

    async def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        if self._executor is None:
            raise RuntimeError("dkim plugin used before start()")
        loop = asyncio.get_running_loop()
        signed, made = await loop.run_in_executor(self._executor, self.sign, ctx.data, ctx.message.sender)
        if made:
            ctx.data = signed
            ctx.notes["dkim"] = [{"d": s.domain, "s": s.selector, "a": s.algorithm} for s in made]
            self.log.debug("dkim_signed", queue_id=ctx.message.id,
                           signatures=[f"{s.selector}._domainkey.{s.domain}" for s in made])
        return CONTINUE

    # -- signing (runs in the signer threads) ---------------------------------------------------------
    def sign(self, message: bytes, sender: str = "") -> tuple[bytes, list[_Signature]]:
        """The message with one DKIM-Signature per key of its signing domain on top (unchanged when
        there is no key, or when it cannot be parsed), and what was signed."""
        fields = header_fields(message)
        keys = self.keys_for_message(fields, sender)
        if not keys:
            self.log.debug("dkim_no_key", from_domain=author_domain(fields), sender=sender)
            return message, []
        include = signed_field_list(fields, self.config.headers, self.config.oversign)
        try:
            signer = dkim.DKIM(message)
            headers = [signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                                   signature_algorithm=key.algorithm.encode("ascii"),
                                   canonicalize=_CANONICALIZE, include_headers=include)
                       for key in keys]
        except dkim.MessageFormatError as exc:
            self.log.warning("dkim_unsignable_message", error=str(exc), domain=keys[0].domain)
            return message, []
        made = [_Signature(key.domain, key.selector, key.algorithm) for key in keys]
        return b"".join(headers) + message, made

    def keys_for_message(self, fields: list[tuple[str, bytes]], sender: str) -> list[SigningKey]:
        """Keys of the signing domain: From's domain, else the envelope sender's, else default_domain."""
        envelope_domain = _domain_or_none(sender.rpartition("@")[2]) if "@" in sender else None
        for candidate in (author_domain(fields), envelope_domain, self.config.default_domain or None):
            if candidate is not None:
                keys = self.keys_for_domain(candidate)
                if keys:
                    return keys
        return []

    def keys_for_domain(self, domain: str) -> list[SigningKey]:
        """The domain's own keys, else those of its nearest parent that signs for subdomains."""
        if domain in self.keys:
            return self.keys[domain]
        labels = domain.split(".")
        for start in range(1, len(labels) - 1):
            parent_keys = [k for k in self.keys.get(".".join(labels[start:]), []) if k.subdomains]
            if parent_keys:
                return parent_keys
        return []

    def _warn_if_readable(self, path: Path) -> None:
        try:
            mode = path.stat().st_mode
        except OSError:
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            self.log.warning("dkim_key_file_not_private", key_file=str(path), mode=oct(stat.S_IMODE(mode)),
                             hint="chmod 600")


def _self_test(key: SigningKey) -> None:
    """Sign a fixed message with the key and verify it against the key's own public record."""
    message = _SELF_TEST_MESSAGE % key.domain.encode("ascii")
    record = key.public_record.encode("ascii")
    expected = dns_record_name(key.selector, key.domain).encode("ascii")

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name.rstrip(b".") == expected else None

    try:
        header = dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                           signature_algorithm=key.algorithm.encode("ascii"), canonicalize=_CANONICALIZE,
                           include_headers=[b"from", b"subject", b"date", b"from"])
        verified = dkim.verify(header + message, dnsfunc=lookup)
    except Exception as exc:  # whatever the signing library raises, it means this key cannot sign here
        raise PluginError(f"key file {key.key_file}: cannot sign with it ({type(exc).__name__}: {exc})") from None
    if not verified:
        raise PluginError(f"key file {key.key_file}: a test signature did not verify")


PLUGIN = DkimPlugin

