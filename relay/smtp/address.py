"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 4.1.2, RFC 6531, RFC 3461). Pure functions.

We are strict where leniency has been abused and lenient where real clients differ:
- ``<>`` is the null reverse-path (MAIL only).
- Source routes (``<@a,@b:user@host>``) are refused: RFC 5321 says to ignore them, but they only ever
  appear in relay probes and nothing legitimate has sent one in decades.
- Local parts are dot-atoms or quoted strings; ``%`` and ``!`` are ordinary characters (the recipient's
  own server decides what they mean — relay permission never depends on the local part).
- Non-ASCII addresses need the SMTPUTF8 parameter (RFC 6531); domains are then IDNA-checked.
- Length limits: local part 64 octets, domain 255, path 256 (RFC 5321 4.5.3.1).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

_ATEXT_SPECIALS = set("!#$%&'*+-/=?^_`{|}~")
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """A path that cannot be accepted; ``reply`` is the full SMTP reply to send."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Path:
    address: str          # "" for the null path
    params: dict[str, str | None]
    needs_smtputf8: bool

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


def parse_path(arg: str, *, allow_null: bool, utf8_allowed: bool) -> Path:
    """Parse ``<addr> [PARAM[=value] …]`` (what follows ``MAIL FROM:`` or ``RCPT TO:``)."""
    text = arg.strip()
    if not text.startswith("<"):
        raise AddressError("501 5.5.4 Syntax: address must be enclosed in <>")
    close = _closing_bracket(text)
    inner, rest = text[1:close], text[close + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("501 5.5.4 Syntax error after the address")
    params = parse_params(rest)
    if inner == "":
        if not allow_null:
            raise AddressError("501 5.1.3 Null address not allowed here")
        return Path("", params, needs_smtputf8=False)
    if inner.startswith("@"):
        raise AddressError("553 5.1.3 Source routes are not accepted")
    needs_utf8 = not inner.isascii()
    if needs_utf8 and not utf8_allowed:
        raise AddressError("553 5.6.7 Non-ASCII address requires SMTPUTF8")
    return Path(_check_mailbox(inner), params, needs_smtputf8=needs_utf8)


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted strings."""
    quoted = False
    i = 1
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
        i += 1
    raise AddressError("501 5.5.4 Syntax: missing > after the address")


def _check_mailbox(mailbox: str) -> str:
    if len(mailbox.encode()) > MAX_PATH - 2:
        raise AddressError("501 5.1.3 Address too long")
    local, at, domain = mailbox.rpartition("@")
    if not at or not local:
        raise AddressError("501 5.1.3 Bad address syntax: user@domain expected")
    if len(local.encode()) > MAX_LOCAL:
        raise AddressError("501 5.1.3 Local part too long")
    if not (_is_dot_string(local) or _is_quoted_string(local)):
        raise AddressError("501 5.1.3 Bad address syntax in the local part")
    _check_domain(domain)
    return mailbox


def _is_atext(char: str) -> bool:
    return char.isalnum() or char in _ATEXT_SPECIALS or (not char.isascii() and char.isprintable())


def _is_dot_string(local: str) -> bool:
    atoms = local.split(".")
    return all(atom and all(_is_atext(c) for c in atom) for atom in atoms)


def _is_quoted_string(local: str) -> bool:
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return False
    body = local[1:-1]
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            if i + 1 >= len(body) or not (32 <= ord(body[i + 1]) <= 126):
                return False
            i += 2
            continue
        if char == '"' or (char.isascii() and not 32 <= ord(char) <= 126):
            return False
        i += 1
    return True


def _check_domain(domain: str) -> None:
    if not domain or len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("501 5.1.3 Bad domain in address")
    if domain.startswith("["):
        _check_address_literal(domain)
        return
    labels = domain.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            raise AddressError("501 5.1.3 Bad domain in address")
        if not all(c.isalnum() or c == "-" for c in label):
            raise AddressError("501 5.1.3 Bad domain in address")
    if not domain.isascii():
        try:
            domain.encode("idna")
        except UnicodeError:
            raise AddressError("501 5.1.3 Domain is not a valid internationalised name") from None


def _check_address_literal(domain: str) -> None:
    if not domain.endswith("]"):
        raise AddressError("501 5.1.3 Bad address literal")
    literal = domain[1:-1]
    if literal.lower().startswith("ipv6:"):
        literal = literal[5:]
    try:
        ipaddress.ip_address(literal)
    except ValueError:
        raise AddressError("501 5.1.3 Bad address literal") from None


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=value KEY2`` → ``{"KEY": "value", "KEY2": None}``; keys upper-cased (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not key or not all(c.isalnum() or c == "-" for c in key) or (eq and not value):
            raise AddressError("501 5.5.4 Syntax error in parameters")
        upper = key.upper()
        if upper in params:
            raise AddressError(f"501 5.5.4 Duplicate parameter {upper}")
        params[upper] = value if eq else None
    return params


def decode_xtext(value: str) -> str:
    """RFC 3461 xtext: ``+XX`` hex escapes; raises AddressError on a malformed escape."""
    out = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "+":
            code = value[i + 1:i + 3]
            if len(code) != 2 or not all(c in "0123456789ABCDEFabcdef" for c in code):
                raise AddressError("501 5.5.4 Malformed xtext in parameter")
            out.append(chr(int(code, 16)))
            i += 3
            continue
        if not (33 <= ord(char) <= 126) or char == "=":
            raise AddressError("501 5.5.4 Malformed xtext in parameter")
        out.append(char)
        i += 1
    return "".join(out)
