"""Webhooks: the events of the outbox POSTed, signed, to the endpoints of ``[[webhooks]]``.

How an event travels (see ``docs/webhooks.md`` for the receiver's side):

1. **Fan-out.** Every ``[events] poll_interval`` the loop takes undispatched events in due order and, in
   one transaction, queues one delivery per enabled endpoint whose ``events`` filter wants the type
   (:meth:`~relay.store.base.QueueStore.dispatch_events`). Events nobody wants are marked all the same,
   so the outbox's pending index stays small whether or not webhooks are configured.
2. **Claim.** Per endpoint, a worker leases due deliveries (a lease as for recipients: ``FOR UPDATE SKIP
   LOCKED`` on Postgres), so several relay nodes never send one event to one endpoint at once. The lease
   covers the whole batch (``timeout`` × rounds of ``concurrency``, doubled, plus a margin), and a POST
   only starts while at least ``timeout`` of the lease is left, so it ends before anyone else may claim.
3. **POST.** The body is the event as JSON (:func:`payload`), signed with HMAC-SHA256 over
   ``"<t>.<body>"`` in ``X-Relay-Signature: t=<unix seconds>,v1=<hex>`` (one ``v1`` per secret while
   secrets rotate). Any 2xx is delivered; anything else (another status, a redirect — never followed —, a
   timeout, a refused connection) is a failure.
4. **Retry.** A failure is retried after ``backoff_first`` doubling up to ``backoff_max``, with jitter
   (between half and all of the delay), for ``retry_for`` seconds after the event was queued for the
   endpoint (a last attempt at the end of the window); then it is dead-lettered
   (``relay events dead-letters``, ``relay events replay``).
5. **Pause.** ``pause_after`` consecutive failures (counted per endpoint over every node) pause the
   endpoint for ``pause_for``: an error log line and a ``webhook_paused`` alert (an ``alert`` event, at
   most once per ``[alerts] period``). It resumes by itself: after the pause one delivery is tried; a
   success resumes normal sending, a failure pauses it again at once.

Old events are deleted after ``[events] retention`` (with their deliveries).

Invariants:
- Secrets are never logged; endpoints are logged by name (by default host and path, never the URL's
  user information or query).
- Nothing an endpoint does (hang, garbage, huge bodies) holds up another endpoint or the loop: each
  endpoint has its own worker, every POST a total timeout, and only the first 512 bytes of a failing
  response are read for the log.
- A delivery's result is recorded with its lease owner: a lease lost meanwhile is ignored by the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from relay.alerts import Alerts
from relay.eventsconfig import EventsSettings, WebhookSettings
from relay.log import get_logger
from relay.store.base import (
    EndpointHealth,
    Event,
    QueueStore,
    WebhookDelivery,
    WebhookResult,
    WebhookTarget,
)

log = get_logger(__name__)

SIGNATURE_HEADER = "X-Relay-Signature"
USER_AGENT = "relay-webhooks/1"
#: Receivers should refuse a signature whose timestamp is older than this (seconds): the replay window.
REPLAY_WINDOW = 300
#: Added to every claim's lease beyond the time its POSTs may take (seconds).
LEASE_MARGIN = 30.0
#: Bytes of a failing response kept for the log and the dead letter.
ERROR_BODY_BYTES = 512
#: Back-off of the loops themselves when the store fails (seconds, doubling).
STORE_BACKOFF_FIRST = 0.5
STORE_BACKOFF_MAX = 30.0
PURGE_INTERVAL = 3600.0


# -- the wire format ---------------------------------------------------------------------------------------

def payload(event: Event) -> bytes:
    """The POST body: the event as compact JSON (UTF-8, keys sorted), the same bytes on every attempt."""
    body = {"id": event.id, "type": event.type, "timestamp": event.created_at, "message_id": event.message_id,
            "recipient": event.recipient, "details": event.data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret``."""
    return hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<sig>[,v1=<sig under an older secret>…]``."""
    return ",".join([f"t={timestamp}", *(f"v1={sign(secret, timestamp, body)}" for secret in secrets)])


def verify_signature(header: str, body: bytes, secret: str, *, now: float | None = None,
                     tolerance: float = REPLAY_WINDOW) -> bool:
    """What a receiver does (the reference for ``docs/webhooks.md``): True when one ``v1`` matches and the
    timestamp is within ``tolerance`` seconds of now."""
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [value for key, _, value in fields if key.strip() == "t"]
    candidates = [value.strip() for key, _, value in fields if key.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit():
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def backoff_delay(attempts: int, first: float, maximum: float, rng: random.Random) -> float:
    """Seconds before the next try after ``attempts`` failures: first × 2^(attempts-1), capped, then jittered
    to between half and all of it (retries of many events spread out instead of arriving together)."""
    delay: float = min(maximum, first * 2.0 ** min(max(attempts - 1, 0), 62))
    return delay / 2 + rng.uniform(0, delay / 2)


# -- the service -------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Endpoint:
    settings: WebhookSettings
    secrets: list[str]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    health: EndpointHealth | None = None
    posted: int = 0
    failed: int = 0

    @property
    def name(self) -> str:
        return self.settings.label

    def probing(self, now: float) -> bool:
        """After a pause (or while the failures reach the threshold) one delivery at a time is tried."""
        health, limit = self.health, self.settings.pause_after
        return health is not None and limit > 0 and health.consecutive_failures >= limit and not health.paused(now)


@dataclass(frozen=True, slots=True)
class _Outcome:
    delivery: WebhookDelivery
    ok: bool
    error: str | None = None


class WebhookService:
    """The fan-out, per-endpoint delivery and retention loops of one relay node."""

    def __init__(self, store: QueueStore, settings: EventsSettings, webhooks: Sequence[WebhookSettings], *,
                 owner: str, alerts: Alerts | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.settings = settings
        self.owner = owner
        self.alerts = alerts
        self._clock = clock
        self._rng = rng or random.Random()
        self.endpoints = [_Endpoint(hook, [hook.secret.get_secret_value(),
                                           *(old.get_secret_value() for old in hook.old_secrets)])
                          for hook in webhooks if hook.enabled]
        self.targets = [WebhookTarget(e.name, e.settings.types) for e in self.endpoints]
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.dispatched = 0

    # -- life cycle ----------------------------------------------------------------------------------------
    async def open(self) -> None:
        """Make the HTTP client (what :meth:`start` does before its loops; tests drive the steps themselves)."""
        if self._session is None:
            # No cookies, no proxies from the environment: every POST goes straight to the configured URL.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                                                  headers={"User-Agent": USER_AGENT})

    async def start(self) -> None:
        await self.open()
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="webhooks-dispatch"),
                       asyncio.create_task(self._purge_loop(), name="webhooks-purge")]
        self._tasks += [asyncio.create_task(self._endpoint_loop(e), name=f"webhook:{e.name[:60]}")
                        for e in self.endpoints]
        log.info("webhooks_started", endpoints=[e.name for e in self.endpoints])

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; let POSTs under way finish within ``grace``, then cancel (their leases lapse)."""
        self._stopping.set()
        for endpoint in self.endpoints:
            endpoint.wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- fan-out -------------------------------------------------------------------------------------------
    async def dispatch_once(self) -> int:
        """Fan out every event due now; wake the endpoints that may have work. Returns how many."""
        total = 0
        while True:
            taken = await self.store.dispatch_events(self.targets, self._clock(), self.settings.dispatch_batch)
            total += taken
            if taken < self.settings.dispatch_batch:
                break
        if total:
            self.dispatched += total
            for endpoint in self.endpoints:
                endpoint.wake.set()
        return total

    async def _dispatch_loop(self) -> None:
        backoff = STORE_BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                await self.dispatch_once()
                await self._refresh_health()
                backoff = STORE_BACKOFF_FIRST
                delay = self.settings.poll_interval
            except Exception as exc:  # the loop must survive a store outage: log, back off, go on
                log.error("webhook_dispatch_failed", error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
                delay, backoff = backoff, min(backoff * 2, STORE_BACKOFF_MAX)
            await self._sleep(delay)

    async def _refresh_health(self) -> None:
        """Other nodes' outcomes (a pause decided elsewhere) reach this node's workers."""
        if not self.endpoints:
            return
        known = {health.endpoint: health for health in await self.store.endpoint_health()}
        for endpoint in self.endpoints:
            endpoint.health = known.get(endpoint.name, endpoint.health)

    async def _purge_loop(self) -> None:
        while not self._stopping.is_set():
            if self.settings.retention > 0:
                try:
                    removed = await self.store.purge_events(self._clock() - self.settings.retention)
                    if removed:
                        log.info("events_purged", events=removed)
                except Exception as exc:  # retried at the next interval
                    log.error("events_purge_failed", error=f"{type(exc).__name__}: {exc}")
            await self._sleep(PURGE_INTERVAL)

    async def _sleep(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=max(seconds, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if wake is not None:
            wake.clear()

    # -- per endpoint --------------------------------------------------------------------------------------
    async def _endpoint_loop(self, endpoint: _Endpoint) -> None:
        backoff = STORE_BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                delay = await self._serve_once(endpoint)
                backoff = STORE_BACKOFF_FIRST
            except Exception as exc:  # a store outage or a bug: this endpoint backs off, the others go on
                log.error("webhook_worker_failed", endpoint=endpoint.name, error=f"{type(exc).__name__}: {exc}",
                          retry_in=backoff)
                delay, backoff = backoff, min(backoff * 2, STORE_BACKOFF_MAX)
            if delay > 0:
                await self._sleep(delay, endpoint.wake)

    async def serve_once(self, name: str) -> float:
        """One claim-and-send round for the endpoint named (the worker loop's step, public for tests)."""
        [endpoint] = [e for e in self.endpoints if e.name == name]
        return await self._serve_once(endpoint)

    async def _serve_once(self, endpoint: _Endpoint) -> float:
        """One claim-and-send round; returns how long to wait before the next (0: go on at once)."""
        now = self._clock()
        health = endpoint.health
        if health is not None and health.paused(now):
            assert health.paused_until is not None
            return min(health.paused_until - now, self.settings.poll_interval * 10)
        probing = endpoint.probing(now)
        batch = 1 if probing else self.settings.claim_batch
        hook = endpoint.settings
        lease = 2 * hook.timeout * math.ceil(batch / hook.concurrency) + LEASE_MARGIN
        claimed = await self.store.claim_webhook_deliveries(endpoint.name, now, batch, self.owner, lease)
        if not claimed:
            return self.settings.poll_interval
        outcomes = await self._post_all(endpoint, claimed)
        await self._record(endpoint, outcomes, probing)
        return 0.0 if len(claimed) == batch else self.settings.poll_interval

    async def _post_all(self, endpoint: _Endpoint, deliveries: list[WebhookDelivery]) -> list[_Outcome]:
        gate = asyncio.Semaphore(endpoint.settings.concurrency)

        async def one(delivery: WebhookDelivery) -> _Outcome | None:
            async with gate:
                lease_until = delivery.lease_until or 0.0
                if lease_until - self._clock() < endpoint.settings.timeout:
                    return None  # not enough lease left to finish: leave it to the next claim
                return await self._post(endpoint, delivery)

        results = await asyncio.gather(*(one(d) for d in deliveries))
        return [outcome for outcome in results if outcome is not None]

    async def _post(self, endpoint: _Endpoint, delivery: WebhookDelivery) -> _Outcome:
        assert self._session is not None
        body = payload(delivery.event)
        timestamp = int(self._clock())
        headers = {"Content-Type": "application/json", "X-Relay-Event-Id": delivery.event.id,
                   "X-Relay-Event-Type": delivery.event.type, "X-Relay-Attempt": str(delivery.attempts + 1),
                   SIGNATURE_HEADER: signature_header(endpoint.secrets, timestamp, body)}
        try:
            async with self._session.post(endpoint.settings.url, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=endpoint.settings.timeout)) as response:
                if 200 <= response.status < 300:
                    return _Outcome(delivery, True)
                detail = (await response.content.read(ERROR_BODY_BYTES)).decode("utf-8", "replace")
                return _Outcome(delivery, False, _error_text(f"HTTP {response.status}", detail))
        except TimeoutError:
            return _Outcome(delivery, False, f"timeout after {endpoint.settings.timeout:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return _Outcome(delivery, False, _error_text(type(exc).__name__, str(exc)))

    async def _record(self, endpoint: _Endpoint, outcomes: list[_Outcome], probing: bool) -> None:
        if not outcomes:
            return
        now = self._clock()
        hook = endpoint.settings
        results = [self._result(hook, outcome, now) for outcome in outcomes]
        await self.store.record_webhook_results(results, self.owner, now)
        successes = sum(outcome.ok for outcome in outcomes)
        failures = len(outcomes) - successes
        endpoint.posted += successes
        endpoint.failed += failures
        last_error = next((o.error for o in reversed(outcomes) if not o.ok), None)
        was = endpoint.health
        endpoint.health = await self.store.record_endpoint_outcome(
            endpoint.name, successes=successes, failures=failures, now=now, pause_after=hook.pause_after,
            pause_for=hook.pause_for, error=last_error)
        self._log_outcomes(endpoint, outcomes, results)
        if endpoint.health.paused_now:
            await self._paused(endpoint, endpoint.health)
        elif successes and (probing or (was is not None and was.paused_until is not None)):
            log.info("webhook_endpoint_resumed", endpoint=endpoint.name)

    def _result(self, hook: WebhookSettings, outcome: _Outcome, now: float) -> WebhookResult:
        delivery = outcome.delivery
        if outcome.ok:
            return WebhookResult(hook.label, delivery.event.id, delivered=True)
        deadline = delivery.created_at + hook.retry_for
        if now >= deadline:
            return WebhookResult(hook.label, delivery.event.id, delivered=False, dead=True, error=outcome.error)
        retry_at = now + backoff_delay(delivery.attempts + 1, hook.backoff_first, hook.backoff_max, self._rng)
        return WebhookResult(hook.label, delivery.event.id, delivered=False, next_attempt_at=min(retry_at, deadline),
                             error=outcome.error)

    @staticmethod
    def _log_outcomes(endpoint: _Endpoint, outcomes: list[_Outcome], results: list[WebhookResult]) -> None:
        for outcome, result in zip(outcomes, results, strict=True):
            fields: dict[str, Any] = {"endpoint": endpoint.name, "event_id": result.event_id,
                                      "type": outcome.delivery.event.type, "attempt": outcome.delivery.attempts + 1}
            if outcome.ok:
                log.debug("webhook_delivered", **fields)
            elif result.dead:
                log.warning("webhook_dead_lettered", error=outcome.error, **fields)
            else:
                log.info("webhook_failed", error=outcome.error, next_attempt=result.next_attempt_at, **fields)

    async def _paused(self, endpoint: _Endpoint, health: EndpointHealth) -> None:
        pause = endpoint.settings.pause_for
        log.error("webhook_endpoint_paused", endpoint=endpoint.name, failures=health.consecutive_failures,
                  until=health.paused_until, pause=pause, error=health.last_error)
        if self.alerts is not None:
            await self.alerts.raise_alert(
                "webhook_paused", f"webhook:{endpoint.name}", "critical",
                f"webhook endpoint {endpoint.name} paused for {pause:g} s after "
                f"{health.consecutive_failures} consecutive failures",
                endpoint=endpoint.name, failures=health.consecutive_failures, paused_until=health.paused_until,
                error=health.last_error)

    # -- for the CLI -------------------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [{"endpoint": e.name, "posted": e.posted, "failed": e.failed,
                 "paused_until": e.health.paused_until if e.health else None} for e in self.endpoints]


def _error_text(what: str, detail: str) -> str:
    detail = " ".join(detail.split())[:200]
    return f"{what}: {detail}" if detail else what


def targets_for(webhooks: Sequence[WebhookSettings], endpoint: str | None = None) -> list[WebhookTarget]:
    """The store's view of the configured endpoints (all, or the one named), enabled or not."""
    chosen = [hook for hook in webhooks if endpoint is None or hook.label == endpoint]
    return [WebhookTarget(hook.label, hook.types) for hook in chosen]


__all__ = ["REPLAY_WINDOW", "SIGNATURE_HEADER", "WebhookService", "backoff_delay", "payload", "sign",
           "signature_header", "targets_for", "verify_signature"]
