"""Signed, stateless tracking tokens: what a click, open or unsubscribe link carries.

A token reads ``v1.<key id>.<payload>.<signature>``:

- ``payload`` is base64url (no padding) of ``kind flag NUL-separated fields``: the kind (``c`` click,
  ``o`` open, ``u`` unsubscribe), ``r`` for raw or ``z`` for raw-deflated fields (whichever is shorter),
  then message id, recipient and value (the URL of a click, the sender domain of an unsubscribe) as
  UTF-8 joined by NUL.
- ``signature`` is base64url of HMAC-SHA256 over the ASCII text ``v1.<key id>.<payload>`` with the key
  of that id, so the version and key id are signed too.
- A key is derived from a secret (``server.secret_key``) and its key id; old (key id, secret) pairs stay
  valid for verification, so keys rotate without breaking links already sent.

Invariants:
- Verifying reads no database: a token is valid exactly when its signature is, under a known key id.
- A token of one kind is never accepted for another (the kind is inside the signed payload).
- Failures are :class:`TokenError` with an HTTP status: 400 for a malformed token, 404 for a well-formed
  one that is foreign (unknown version or key), tampered with or of the wrong kind. Signatures are
  compared in constant time.
- The payload is signed, not encrypted: anyone holding a link can read its recipient and URL (they are
  the recipient's own data, in the recipient's own mail).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MAX_TOKEN_LENGTH", "Claims", "TokenCodec", "TokenError", "TokenKind", "derive_key"]

VERSION = "v1"
MAX_TOKEN_LENGTH = 4096          # longer is never one of ours; refused before any work
_KEY_CONTEXT = b"relay/tracking/token-key/"
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_SEP = b"\x00"


class TokenKind(enum.StrEnum):
    CLICK = "c"
    OPEN = "o"
    UNSUBSCRIBE = "u"


@dataclass(frozen=True, slots=True)
class Claims:
    """What a token says. ``recipient`` is "" for a message with several recipients."""

    kind: TokenKind
    message_id: str
    recipient: str = ""
    value: str = ""              # click: the original URL; unsubscribe: the sender domain (scope)


class TokenError(Exception):
    """A token that must not be honoured; ``status`` is the HTTP answer (400 or 404)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def derive_key(secret: bytes, key_id: str) -> bytes:
    """The signing key of ``key_id``: HMAC-SHA256(secret, context ‖ key id), never the secret itself."""
    return hmac.new(secret, _KEY_CONTEXT + key_id.encode("ascii"), hashlib.sha256).digest()


def valid_key_id(key_id: str) -> bool:
    return _KEY_ID.fullmatch(key_id) is not None


class TokenCodec:
    """Issues tokens under the current key and verifies them under the current or an old one."""

    def __init__(self, key_id: str, key: bytes, old_keys: Mapping[str, bytes] | None = None) -> None:
        for kid in (key_id, *(old_keys or {})):
            if not valid_key_id(kid):
                raise ValueError(f"key id {kid!r} must be 1-16 characters of A-Z a-z 0-9 _ -")
        if old_keys and key_id in old_keys:
            raise ValueError(f"key id {key_id!r} is both the current and an old key")
        self.key_id = key_id
        self._keys = {**(old_keys or {}), key_id: key}

    @classmethod
    def from_secrets(cls, secret: bytes, key_id: str, old: Mapping[str, bytes] | None = None) -> TokenCodec:
        """Keys derived from the current secret and from old (key id → secret) pairs."""
        return cls(key_id, derive_key(secret, key_id),
                   {kid: derive_key(old_secret, kid) for kid, old_secret in (old or {}).items()})

    # -- issuing ------------------------------------------------------------------------------------
    def issue(self, claims: Claims) -> str:
        """The token for ``claims``; ValueError when a field cannot be carried (a NUL, a lone surrogate)."""
        fields = (claims.message_id, claims.recipient, claims.value)
        if any("\x00" in f for f in fields):
            raise ValueError("a token field contains NUL")
        raw = _SEP.join(f.encode("utf-8") for f in fields)
        packed = zlib.compress(raw, 9, wbits=-15)
        body = b"z" + packed if len(packed) < len(raw) else b"r" + raw
        payload = _b64encode(claims.kind.value.encode("ascii") + body)
        signed = f"{VERSION}.{self.key_id}.{payload}"
        return f"{signed}.{self._sign(self.key_id, signed)}"

    # -- verifying ----------------------------------------------------------------------------------
    def verify(self, token: str, kind: TokenKind) -> Claims:
        """The claims of a genuine token of ``kind``; :class:`TokenError` for anything else."""
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenError(400, "malformed")
        parts = token.split(".")
        if len(parts) != 4:
            raise TokenError(400, "malformed")
        version, key_id, payload, signature = parts
        if version != VERSION or key_id not in self._keys:
            raise TokenError(404, "foreign")
        if not _B64URL.fullmatch(payload) or not _B64URL.fullmatch(signature):
            raise TokenError(400, "malformed")
        expected = self._sign(key_id, f"{version}.{key_id}.{payload}")
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
            raise TokenError(404, "bad signature")
        claims = _decode_payload(payload)
        if claims.kind is not kind:
            raise TokenError(404, "wrong kind")
        return claims

    def _sign(self, key_id: str, signed: str) -> str:
        return _b64encode(hmac.new(self._keys[key_id], signed.encode("ascii"), hashlib.sha256).digest())


def _decode_payload(payload: str) -> Claims:
    """Decode a payload whose signature was already checked (so it is ours; still parsed defensively)."""
    try:
        data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        kind = TokenKind(data[:1].decode("ascii"))
        flag, body = data[1:2], data[2:]
        if flag == b"z":
            inflater = zlib.decompressobj(wbits=-15)
            body = inflater.decompress(body, MAX_TOKEN_LENGTH * 8)
            if inflater.unconsumed_tail or not inflater.eof:
                raise ValueError("payload does not inflate cleanly")
        elif flag != b"r":
            raise ValueError("unknown payload flag")
        message_id, recipient, value = (f.decode("utf-8") for f in body.split(_SEP))
    except (ValueError, binascii.Error, zlib.error, UnicodeDecodeError) as exc:
        raise TokenError(400, f"bad payload: {exc}") from None
    return Claims(kind, message_id, recipient, value)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")
