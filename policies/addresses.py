"""The one normal form of addresses, domains and IP addresses for the suppression list.

Whatever adds an entry (the CLI, an import, a bounce, a complaint, an unsubscribe) and whatever looks one
up (every RCPT, every delivery attempt) passes the value through this module, so that one spelling of a
recipient always finds the entry made under another:

- Surrounding whitespace and one pair of angle brackets (``<user@example.com>``) are removed.
- The domain is lower-cased, loses a trailing dot, and an internationalised domain is IDNA-encoded
  (IDNA 2008 with UTS 46 mapping, non-transitional, as the delivery side encodes it for MX lookups):
  ``user@Bücher.Example``, ``user@xn--bcher-kva.example`` and ``USER@XN--BCHER-KVA.EXAMPLE.`` are one
  address. Address literals (``[192.0.2.1]``) are kept, lower-cased.
- The local part is lower-cased (and NFC-normalised when it is not ASCII). RFC 5321 lets a server treat
  ``Bob`` and ``bob`` as two mailboxes, but the overwhelming majority of providers do not, and a
  suppression (a complaint, a hard bounce) must not be dodged by changing the case of a letter. The
  rare case-sensitive mailbox that gets over-suppressed is the lesser harm.
- Nothing else is rewritten: sub-addresses (``user+tag``) and dots in the local part are provider
  conventions, not rules, so ``user+tag@`` and ``user@`` stay two addresses.
- IP addresses take their canonical text form; an IPv4-mapped IPv6 address becomes the IPv4 address.

Invariants: the normalising functions are total and deterministic — they never raise on odd input (a
value they cannot interpret is lower-cased and stripped) — so lookups never fail on what SMTP let through.
Validation is separate (:func:`check_value`), for values an operator types or imports.

Pure, like every policy: no I/O, no state. Besides the standard library it uses the ``idna`` package
(a declared dependency) because the standard library's codec implements IDNA 2003, which maps ``ß`` to
``ss`` and would name a different domain than the one mail is delivered to.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from typing import Literal

import idna

Kind = Literal["address", "domain", "ip"]
KINDS: tuple[Kind, ...] = ("address", "domain", "ip")

MAX_DOMAIN = 255
MAX_LOCAL = 64


def strip_value(value: str) -> str:
    """Surrounding whitespace and angle brackets removed (``< <a@b> >`` → ``a@b``)."""
    text = value.strip()
    while len(text) >= 2 and text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def normalize_domain(domain: str) -> str:
    """``Bücher.Example.`` → ``xn--bcher-kva.example``; address literals and oddities lower-cased."""
    text = strip_value(domain).rstrip(".")
    if text.isascii() or text.startswith("["):
        return text.lower()
    try:
        return idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        # Not a valid IDNA 2008 name (the SMTP side checks only IDNA 2003): keep a stable form anyway.
        return _folded(text)


def normalize_local_part(local: str) -> str:
    return local.lower() if local.isascii() else _folded(local)


def _folded(text: str) -> str:
    """Lower-case in NFC (one code point sequence for what looks the same), stable when applied twice."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())


def normalize_address(address: str) -> str:
    """``<Bob@Bücher.Example>`` → ``bob@xn--bcher-kva.example``; the split is at the last ``@``."""
    text = strip_value(address)
    local, at, domain = text.rpartition("@")
    if not at:
        return normalize_local_part(text)
    return f"{normalize_local_part(local)}@{normalize_domain(domain)}"


def address_domain(address: str) -> str:
    """The normalised domain of an address (``""`` when there is no ``@``)."""
    _, at, domain = strip_value(address).rpartition("@")
    return normalize_domain(domain) if at else ""


def normalize_ip(ip: str) -> str:
    """Canonical text of an IP address (``::ffff:192.0.2.1`` → ``192.0.2.1``); other text lower-cased."""
    text = strip_value(ip)
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if candidate.lower().startswith("ipv6:"):
        candidate = candidate[5:]
    try:
        parsed = ipaddress.ip_address(candidate)
    except ValueError:
        return text.lower()
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def normalize_value(value: str, kind: str) -> str:
    """The normal form of a suppression value of the given kind."""
    if kind == "address":
        return normalize_address(value)
    if kind == "domain":
        return normalize_domain(value)
    if kind == "ip":
        return normalize_ip(value)
    raise ValueError(f"unknown suppression kind {kind!r}: expected one of {', '.join(KINDS)}")


def guess_kind(value: str) -> Kind:
    """``address`` when there is an ``@``, ``ip`` when it parses as an IP address, else ``domain``."""
    text = strip_value(value)
    if "@" in text:
        return "address"
    try:
        ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return "domain"
    return "ip"


def check_value(value: str, kind: str) -> str:
    """Validate an operator-supplied value and return its normal form; ValueError says what is wrong."""
    text = strip_value(value)
    if not text:
        raise ValueError("empty value")
    if kind == "address":
        local, at, domain = text.rpartition("@")
        if not at or not local:
            raise ValueError(f"{text!r} is not an address (user@domain expected)")
        if len(local.encode()) > MAX_LOCAL or any(c.isspace() or ord(c) < 32 for c in local):
            raise ValueError(f"{text!r}: bad local part")
        _check_domain(domain)
    elif kind == "domain":
        _check_domain(text)
    elif kind == "ip":
        try:
            ipaddress.ip_address(normalize_ip(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address") from None
    return normalize_value(text, kind)


def _check_domain(domain: str) -> None:
    text = domain.rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.ip_address(normalize_ip(text))
        except ValueError:
            raise ValueError(f"{domain!r} is not a valid address literal") from None
        return
    encoded = normalize_domain(text)
    labels = encoded.split(".")
    if not text or len(encoded) > MAX_DOMAIN or not encoded.isascii() or "@" in text:
        raise ValueError(f"{domain!r} is not a valid domain")
    for label in labels:
        # Letters, digits, hyphens and (for SRV/DMARC-style names people do paste) underscores.
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-") \
                or not all(c.isalnum() or c in "-_" for c in label):
            raise ValueError(f"{domain!r} is not a valid domain")


__all__ = [
    "KINDS",
    "Kind",
    "address_domain",
    "check_value",
    "guess_kind",
    "normalize_address",
    "normalize_domain",
    "normalize_ip",
    "normalize_local_part",
    "normalize_value",
    "strip_value",
]
