"""Checking SMTP AUTH credentials against the bcrypt hashes in the queue store.

Invariants:
- bcrypt never runs on the event loop: it runs in a small dedicated thread pool, so a burst of AUTH
  attempts queues there instead of stalling every session (and cannot starve the default executor).
- An unknown user, a wrong password, a disabled and an expired account are indistinguishable to the
  client: same reply, and the same bcrypt work (a dummy hash is checked for unknown users). The reason
  is logged, the password never is — nor a user name that is not one of ours, which is logged as a
  fingerprint only (it may well be a password typed into the wrong field).
- Failures count against the client IP and the username (any username, known or not) in the rate
  limiter; past either limit the client is locked out for the period before any hash is checked.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt

from relay.limits import limit_key
from relay.limits.base import LimiterUnavailable, RateLimiter
from relay.log import get_logger
from relay.settings import LimitSettings
from relay.store.base import QueueStore, StoreError, User

log = get_logger(__name__)

BCRYPT_ROUNDS = 12
# bcrypt only looks at the first 72 bytes; longer passwords are refused when set, never truncated.
MAX_PASSWORD_BYTES = 72
# Checked instead of a user's hash when there is no such user, so that an unknown name costs the same
# bcrypt work as a known one. A fixed cost-12 hash of 32 random bytes nobody kept: computing one at
# import cost every process ~240 ms of start-up (the delivery side and the CLI included).
_DUMMY_HASH = b"$2b$12$gkUAr.0S4KYICgm978JeEOf/UlfCe6pupe6sXw0dN7rkovvN83wwq"
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relay-bcrypt")


class AuthStatus(enum.Enum):
    OK = "ok"
    INVALID = "invalid"          # 535 5.7.8 — whatever the private reason
    LOCKED = "locked"            # 454 4.7.0 — too many failures, try later
    UNAVAILABLE = "unavailable"  # 454 4.7.0 — store or limiter unreachable


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    status: AuthStatus
    user: User | None = None
    reason: str = ""             # private, for the log


def loggable_username(username: str, *, known: bool = True) -> str:
    """The username as the log may show it.

    A name with control characters is no user of ours — it is typically a whole AUTH PLAIN blob (authzid
    NUL user NUL password) sent where a name was expected — and may carry a password, so it is never
    written out. A name that is not one of our users is shown as a fingerprint (``unknown:`` and 12 hex
    digits of its SHA-256): people type their password into the user name field, and the log must not
    keep it; the fingerprint still ties together the attempts made with one name.
    """
    if len(username) > 256 or any(not ch.isprintable() for ch in username):
        return "[not a valid username]"
    if not known:
        return "unknown:" + hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return username


def hash_password(password: str) -> str:
    """bcrypt hash for a new password; raises ValueError for one bcrypt would truncate."""
    raw = password.encode()
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    if not raw:
        raise ValueError("empty password")
    return bcrypt.hashpw(raw, bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


async def check_password(password: str, hashed: str | None) -> bool:
    """Constant-work comparison off the event loop (a dummy hash when there is no user)."""
    raw = password.encode()
    too_long = len(raw) > MAX_PASSWORD_BYTES
    target = hashed.encode() if hashed else _DUMMY_HASH
    loop = asyncio.get_running_loop()
    matched = await loop.run_in_executor(_POOL, _check, raw[:MAX_PASSWORD_BYTES], target)
    return matched and hashed is not None and not too_long


class Authenticator:
    def __init__(self, store: QueueStore, limiter: RateLimiter, limits: LimitSettings) -> None:
        self._store = store
        self._limiter = limiter
        self._limits = limits

    async def authenticate(self, username: str, password: str, client_ip: str) -> AuthOutcome:
        valid = loggable_username(username) == username
        try:
            if await self._locked_out(username, client_ip):
                # A name only looked up for the log line: bcrypt is what the lockout must spare.
                known = valid and await self._store.get_user(username) is not None
                log.warning("auth_locked_out", username=loggable_username(username, known=known))
                return AuthOutcome(AuthStatus.LOCKED, reason="locked out")
            user = await self._store.get_user(username) if valid else None
        except (StoreError, LimiterUnavailable) as exc:
            log.error("auth_unavailable", username=loggable_username(username, known=False), error=str(exc))
            return AuthOutcome(AuthStatus.UNAVAILABLE, reason=str(exc))
        shown = loggable_username(username, known=user is not None)
        matched = await check_password(password, user.password_hash if user else None)
        reason = self._refusal_reason(user, matched)
        if reason is None and user is not None:
            log.info("auth_ok", username=shown)
            return AuthOutcome(AuthStatus.OK, user=user)
        log.warning("auth_failed", username=shown, reason=reason)
        await self._count_failure(username, client_ip)
        return AuthOutcome(AuthStatus.INVALID, reason=reason or "invalid")

    @staticmethod
    def _refusal_reason(user: User | None, matched: bool) -> str | None:
        if user is None:
            return "unknown user"
        if not matched:
            return "wrong password"
        if user.disabled:
            return "account disabled"
        if user.is_expired(time.time()):
            return "account expired"
        return None

    def _failure_keys(self, username: str, client_ip: str) -> list[tuple[str, int, float]]:
        per_ip, per_user = self._limits.auth_failures_per_ip, self._limits.auth_failures_per_user
        keys = []
        if per_ip.count:
            keys.append((limit_key("authfail", "ip", client_ip), per_ip.count, per_ip.period))
        if per_user.count:
            keys.append((limit_key("authfail", "user", username), per_user.count, per_user.period))
        return keys

    async def _locked_out(self, username: str, client_ip: str) -> bool:
        for key, count, period in self._failure_keys(username, client_ip):
            decision = await self._limiter.peek(key, count, period)
            if not decision.allowed:
                return True
        return False

    async def _count_failure(self, username: str, client_ip: str) -> None:
        for key, count, period in self._failure_keys(username, client_ip):
            try:
                await self._limiter.hit(key, count, period)
            except LimiterUnavailable:
                log.warning("auth_failure_not_counted", reason="limiter unavailable")
