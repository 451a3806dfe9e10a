"""The delivery loop: claim due recipients, group them by destination, deliver, record what happened.

One :class:`DeliveryService` per process. Its loop claims due recipients from the queue store in batches
under a lease (owner ``hostname:pid:random``), waking at once on new mail (``wait_for_new_mail``) or when
the next recipient comes due (``next_due_at``). Claims are grouped by domain → route → destination (for MX
routes the resolved MX set, so domains sharing an MX set share connections) and by message, so one
transaction carries many RCPTs of one message and one connection carries many messages
(``max_messages_per_connection``). Concurrency is bounded globally and per destination.

Per recipient the reply (or the failure without one) goes through the :class:`BounceClassifier`:
delivered, permanent (bounced, with an RFC 3464 DSN) or temporary (retried per :class:`RetryPolicy`,
honouring "try again in …" hints, expired with a DSN when the lifetime ends). The results, the attempt
history and the DSNs of one transaction are committed together (``record_results``). A "delayed" DSN
is sent once, on the first result after ``delay_warning_after``.

House-keeping: ``claim_expired`` at least every minute (every recipient past ``max_lifetime``, in any
non-final state, is expired with 4.4.7), ``purge`` per the retention settings, idle connections closed
after ``idle_timeout``.

Circuit breaker: after N consecutive connection-level failures a destination is paused; its recipients
are re-queued for the end of the pause without counting an attempt; it resumes by itself (see
:mod:`relay.delivery.destinations`).

Invariants:
- Containment: whatever one destination does — a crash in our code, a hostile reply, a hung peer, a
  strange DNS answer — becomes a temporary failure logged with its cause; other destinations keep
  flowing and the loop never dies (store outages are retried with back-off).
- Backpressure: a destination holds at most about ``BACKLOG_HORIZON`` seconds of work at its measured
  rate (never less than ``BACKLOG_FLOOR`` jobs per connection); claims beyond that are deferred, without
  counting an attempt, to when the destination can be expected to get to them (``_trim_backlog``). The
  in-flight budget is shared by every destination, so without this a slow one (a tarpit, a throttling
  provider) with a large backlog would hold every claim slot and starve the healthy ones.
- A recipient is only attempted under a lease with time to spare (``_lease_margin``); results are
  recorded with the lease owner, so a lease lost in between is ignored by the store rather than applied
  twice. On :meth:`DeliveryService.stop` unfinished claims are released, never dropped.
- Heartbeat: every lease/3 seconds one ``renew`` call extends the lease of every claim still being
  worked on (routed, queued on a destination or in flight), so a slow but live transaction never
  outlasts its lease however long its stage timeouts add up to. A claim whose renewal fails was taken
  over (or settled): it is dropped from the queues and never attempted; if it is in flight its result
  is ignored by the store. A dead process stops renewing: its leases lapse within ``lease_seconds``.
- Each DSN is recorded paired with the recipients it reports on (:class:`~relay.store.base.Bounce`):
  the store commits it only with their results, so a lost lease never yields a duplicate DSN.
- Every attempt is recorded as an :class:`AttemptRecord` and logged on one line (``delivery_attempt``);
  every change of state is logged on one line (``delivered`` / ``bounced`` / ``expired``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from relay import metrics
from relay.delivery.client import (
    ClientOptions,
    DeliveryConnection,
    Failure,
    SendResult,
    Target,
    TlsContexts,
    TlsFallbackMemory,
)
from relay.delivery.config import DeliverySettings
from relay.delivery.destinations import (
    CircuitBreaker,
    Destination,
    DestinationKey,
    Job,
    destination_key,
    jobs_for,
)
from relay.delivery.dsn import DsnKind, FailedRecipient, build_bounce
from relay.delivery.events import attempt_event, dropped_event, expiry_event
from relay.delivery.mx import DnsError, MxHost, MxResolver
from relay.delivery.recorder import ResultRecorder
from relay.ids import new_queue_id
from relay.log import get_logger
from relay.plugin import Action, Verdict
from relay.policies.bounce import BounceClassifier, Classification, Reply
from relay.policies.retry import RetryPolicy, RetrySchedule, retry_hint
from relay.policies.routing import Route, Router
from relay.store.base import (
    AttemptRecord,
    Bounce,
    Claim,
    QueueStore,
    RecipientResult,
    RecipientRow,
    RecipientState,
    StoredMessage,
    StoreError,
)

log = get_logger(__name__)

#: Expiry runs at least this often (seconds).
EXPIRY_INTERVAL = 60.0
#: The loop never sleeps longer than this, whatever the queue says (a missed wake-up costs this much).
MAX_SLEEP = 30.0
#: Back-off after the store failed in the loop: doubles up to the maximum.
STORE_BACKOFF_FIRST = 0.5
STORE_BACKOFF_MAX = 30.0
#: A chain step deferring without saying until when: try again after this long.
CHAIN_DEFER_DELAY = 60.0
#: Domains of one claim batch routed within this many seconds are queued together (see _dispatch).
ROUTING_WINDOW = 0.5
#: Longest reply text kept in last_reply / history / DSNs (the classifier bounds replies at 4096).
MAX_REPLY_KEPT = 1000
#: Backpressure (see the module docstring): seconds of work at its own rate a destination may hold …
BACKLOG_HORIZON = 5.0
#: … but at least this many recipients per connection …
BACKLOG_FLOOR = 2
#: … and the rest is deferred by its expected wait, within these bounds (seconds).
BACKLOG_DEFER_MIN = 1.0
BACKLOG_DEFER_MAX = 300.0

EXPIRED_STATUS = "4.4.7"
#: Metric names of the states a result leaves a recipient in, and categories of results without an attempt.
_OUTCOME_NAMES = {RecipientState.QUEUED: "deferred", RecipientState.DELETED: "dropped"}
_UNATTEMPTED_CATEGORY = {RecipientState.QUEUED: "not_attempted", RecipientState.EXPIRED: "message_expired",
                         RecipientState.DELETED: "dropped"}
EXPIRED_TEXT = "delivery time expired (queue lifetime exceeded)"


# ------------------------------------------------------------------------------------------------
# The chain hook point (the plugin API comes later; this is the seam it fills)
# ------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class AttemptContext:
    """What a chain step sees before an attempt; ``data`` may be replaced (for example to sign it)."""

    message: StoredMessage
    recipients: list[RecipientRow]
    route: Route
    destination: str
    data: bytes
    # A step deferring the attempt (REJECT_TEMPORARY) may say until when; else CHAIN_DEFER_DELAY.
    retry_at: float | None = None
    # Recipients a step took out of the attempt (recipient id -> verdict); see relay.plugin.AttemptContext.
    skip: dict[int, Verdict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # Set once the chain let the attempt go ahead and a connection is about to be used.
    attempted: bool = False


class DeliveryChain(Protocol):
    """Hooks around delivery attempts. ``before_attempt`` may veto or postpone an attempt:
    ``REJECT_TEMPORARY`` defers it without counting an attempt, ``REJECT_PERMANENT`` bounces with the
    verdict's reply; anything else (or None) lets it go ahead, without the recipients it put in
    ``ctx.skip`` (each settled by its own verdict: bounced, deferred or dropped). Observers are told the outcome per
    recipient — also for outcomes without a connection (DNS failures, reject routes: ``ctx.data`` is
    empty) and for expiry (``bounced`` with category ``message_expired``). A step that raises is logged
    and treated as CONTINUE (observers) or a temporary deferral (``before_attempt``)."""

    async def before_attempt(self, ctx: AttemptContext) -> Verdict | None: ...
    async def delivered(self, ctx: AttemptContext, recipient: RecipientRow, reply: Reply) -> None: ...
    async def deferred(self, ctx: AttemptContext, recipient: RecipientRow, classification: Classification,
                       next_attempt_at: float) -> None: ...
    async def bounced(self, ctx: AttemptContext, recipient: RecipientRow,
                      classification: Classification) -> None: ...


@runtime_checkable
class AttemptEndHook(Protocol):
    """Optional for a :class:`DeliveryChain`: told once every attempt it was asked about is over, whatever
    became of it (sent, deferred or refused by the chain, crashed) — where it gives back what it took
    for the attempt (the throttle's connection slots). Raising is logged and ignored."""

    async def after_attempt(self, ctx: AttemptContext) -> None: ...


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _AttemptMeta:
    """Where and how an attempt went, for the history rows and log lines."""

    started_at: float
    duration: float
    mx: str | None
    tls_version: str | None


@dataclass(slots=True)
class _Settlement:
    """What recording one job produces."""

    results: list[RecipientResult] = field(default_factory=list)
    failed: list[FailedRecipient] = field(default_factory=list)
    delayed: list[FailedRecipient] = field(default_factory=list)
    # The recipient ids behind failed / delayed, in the same order: what each DSN reports on.
    failed_ids: list[int] = field(default_factory=list)
    delayed_ids: list[int] = field(default_factory=list)
    observed: list[tuple[RecipientRow, Classification, SendResult, float | None]] = field(default_factory=list)

    def fail(self, recipient_id: int, failure: FailedRecipient) -> None:
        self.failed.append(failure)
        self.failed_ids.append(recipient_id)

    def delay(self, recipient_id: int, failure: FailedRecipient) -> None:
        self.delayed.append(failure)
        self.delayed_ids.append(recipient_id)


@dataclass(slots=True)
class _Routed:
    """A domain's claims with the destination they go to."""

    key: DestinationKey
    route: Route
    targets: list[Target]
    claims: list[Claim]


@dataclass(slots=True)
class DeliveryStats:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    dropped: int = 0
    connections: int = 0
    session_failures: int = 0
    dsns: int = 0
    leases_renewed: int = 0     # renewals by the heartbeat (one per claim per tick)
    leases_lost: int = 0        # claims dropped because another worker (or an operator) took them


def make_owner(hostname: str) -> str:
    """A lease owner id unique to this process: ``hostname:pid:random``."""
    return f"{hostname}:{os.getpid()}:{secrets.token_hex(4)}"


# ------------------------------------------------------------------------------------------------
# The service
# ------------------------------------------------------------------------------------------------

class DeliveryService:
    """Claims, delivers and records; see the module docstring."""

    def __init__(self, store: QueueStore, settings: DeliverySettings, *, resolver: MxResolver,
                 classifier: BounceClassifier, retry_policy: RetryPolicy, router: Router,
                 chain: DeliveryChain | None = None, hostname: str = "relay.localhost",
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.classifier = classifier
        self.retry_policy = retry_policy
        self.router = router
        self.chain = chain
        self.hostname = settings.ehlo_hostname(hostname)
        self.owner = make_owner(self.hostname)
        self.stats = DeliveryStats()
        self._clock = clock
        self._recorder = ResultRecorder(store, self.owner)
        self._tls_memory = TlsFallbackMemory(settings.tls.plaintext_fallback_memory)
        self._contexts = TlsContexts(settings.tls.ca_file)
        self._global = asyncio.Semaphore(settings.concurrency.total)
        self._destinations: dict[DestinationKey, Destination] = {}
        self._inflight: dict[int, Claim] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._renew_now = asyncio.Event()  # a reload changed the lease: renew at once, then at the new pace
        # Claims whose lease we are ending ourselves (a commit or a release under way).
        self._settling: set[int] = set()
        self._wake = asyncio.Event()
        # Domains of recipients being expired (not in _inflight), for the outcome metrics.
        self._expiring: dict[int, str] = {}
        self._stopping = False
        self._max_inflight = settings.claim_batch * 2
        self._last_claim_full = False
        self._waiting_for_room = False
        self._next_expiry = 0.0
        self._next_purge = 0.0
        # Never start an attempt on a lease about to run out: another worker may claim it meanwhile.
        self._lease_margin = min(60.0, settings.lease_seconds / 4)
        # Renewing three times per lease: two renewals in a row may fail (a store hiccup) before it lapses.
        self._renew_every = settings.lease_seconds / 3

    @classmethod
    def from_settings(cls, store: QueueStore, settings: DeliverySettings, *, hostname: str,
                      chain: DeliveryChain | None = None) -> DeliveryService:
        """Build the collaborators (resolver, classifier, retry policy, router) from ``[delivery]``."""
        dns = settings.dns
        retry = settings.retry
        return cls(
            store, settings,
            resolver=MxResolver(dns.nameservers, dns.timeout, dns.max_hosts, dns.allow_private),
            classifier=BounceClassifier.with_rules(settings.classification.rules, "delivery.classification"),
            retry_policy=RetryPolicy(RetrySchedule.parse(retry.schedule), retry.max_lifetime,
                                     retry.delay_warning_after or None),
            router=Router.from_config(settings.routes.domains, settings.routes.default, "delivery.routes"),
            chain=chain, hostname=hostname)

    def reconfigure(self, settings: DeliverySettings, *, hostname: str) -> None:
        """Apply a reloaded ``[delivery]`` (see :mod:`relay.reload`).

        Everything built from the new values is built first, so a value that cannot be used raises before
        anything changed. From then on claims, routing, new connections and results use the new values;
        an attempt under way finishes with the route and connection options it started with. The lease
        owner id stays (the claims held now are still ours). Destinations already known keep their
        circuit-breaker state and its settings; new ones get the new settings. A new ``concurrency.total``
        counts for attempts that start from now on (those under way hold a slot of the old limit).
        """
        old, dns, retry = self.settings, settings.dns, settings.retry
        resolver = self.resolver if dns == old.dns else MxResolver(dns.nameservers, dns.timeout, dns.max_hosts,
                                                                    dns.allow_private)
        classifier = BounceClassifier.with_rules(settings.classification.rules, "delivery.classification")
        retry_policy = RetryPolicy(RetrySchedule.parse(retry.schedule), retry.max_lifetime,
                                   retry.delay_warning_after or None)
        router = Router.from_config(settings.routes.domains, settings.routes.default, "delivery.routes")
        contexts = self._contexts if settings.tls.ca_file == old.tls.ca_file else TlsContexts(settings.tls.ca_file)
        # Nothing below can fail: the service switches as a whole, between two steps of the loop.
        self.settings = settings
        self.resolver, self.classifier, self.retry_policy, self.router = resolver, classifier, retry_policy, router
        self.hostname = settings.ehlo_hostname(hostname)
        self._contexts = contexts
        self._tls_memory.duration = settings.tls.plaintext_fallback_memory
        if settings.concurrency.total != old.concurrency.total:
            self._global = asyncio.Semaphore(settings.concurrency.total)
        self._max_inflight = settings.claim_batch * 2
        self._lease_margin = min(60.0, settings.lease_seconds / 4)
        self._renew_every = settings.lease_seconds / 3
        if settings.lease_seconds != old.lease_seconds:
            self._renew_now.set()  # the heartbeat may be asleep for a third of the old lease: renew now
        self._wake.set()
        log.info("delivery_reconfigured", concurrency=settings.concurrency.total,
                 routes=len(settings.routes.domains))

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._stopping = False
        self._loop_task = asyncio.create_task(self._run(), name="delivery-loop")
        self._watch_task = asyncio.create_task(self._watch_new_mail(), name="delivery-new-mail")
        self._start_heartbeat()
        log.info("delivery_started", owner=self.owner, concurrency=self.settings.concurrency.total)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; let in-flight attempts finish within ``grace`` seconds, then cut them off and
        release every claim not recorded, so another worker (or the next start) takes them over."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + max(grace, 0)
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._loop_task is not None:
            # The loop notices _stopping at its next step; cancelling it inside claim_due could leave
            # rows leased to nobody until the lease ends, so it gets the grace period to exit by itself.
            _, late = await asyncio.wait({self._loop_task}, timeout=max(grace, 0))
            for task in late:
                task.cancel()
        await asyncio.gather(*(t for t in (self._watch_task, self._loop_task) if t is not None),
                             return_exceptions=True)
        self._watch_task = self._loop_task = None
        unstarted = [job for dest in self._destinations.values() for job in dest.take_queue()]
        await self._release_jobs(unstarted, "shutdown")
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(deadline - time.monotonic(), 0))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._recorder.drain()  # a commit under way must land before the claims are released
        await self._stop_heartbeat()  # nothing is attempted any more: what is left is given back now
        await self._release_ids(list(self._inflight), "shutdown")
        self._inflight.clear()
        for dest in self._destinations.values():
            dest.take_queue()  # routed after the first sweep; their claims were just released
        await self._close_idle(everything=True)
        log.info("delivery_stopped", owner=self.owner)

    @property
    def running(self) -> bool:
        """The delivery loop is up (readiness)."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def in_flight(self) -> int:
        """Recipients claimed and not yet recorded or released."""
        return len(self._inflight)

    async def run_once(self) -> int:
        """Expire, then claim and deliver everything due now, waiting until all of it is recorded.

        For tests and the CLI; returns how many recipients were claimed. Idle connections stay open
        for the next call (until :meth:`stop`).
        """
        now = self._clock()
        own_heartbeat = self._start_heartbeat()  # a long run needs its leases kept as much as the loop
        try:
            await self._expire(now)
            total = 0
            for _ in range(1000):  # bounded: a step that keeps re-queueing "now" must not spin forever
                claimed = await self._claim_and_dispatch()
                total += claimed
                await self._wait_until_idle()
                if claimed == 0:
                    break
        finally:
            if own_heartbeat:
                await self._stop_heartbeat()
        await self._close_idle(everything=False)
        return total

    # -- the loop -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = STORE_BACKOFF_FIRST
        while not self._stopping:
            try:
                await self._housekeeping()
                claimed = await self._claim_and_dispatch()
                backoff = STORE_BACKOFF_FIRST
                if self._last_claim_full and len(self._inflight) < self._max_inflight:
                    continue  # more is due and there is room: claim again at once
                await self._sleep(await self._sleep_for(claimed))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store (or something unforeseen) failed: log it, back off, keep the loop alive.
                log.exception("delivery_loop_error", retry_in=backoff)
                await self._sleep(backoff)
                backoff = min(backoff * 2, STORE_BACKOFF_MAX)

    async def _sleep_for(self, claimed: int) -> float:
        now = self._clock()
        wake = [self._next_expiry, now + MAX_SLEEP]
        if any(dest.idle for dest in self._destinations.values()):
            wake.append(now + self.settings.idle_timeout)
        if any(dest.queue for dest in self._destinations.values()):
            wake.append(now + BACKLOG_HORIZON)   # to trim backlogs while the in-flight budget is full
        if len(self._inflight) < self._max_inflight:
            due = await self.store.next_due_at()
            if due is not None:
                wake.append(due)
        return max(0.0, min(wake) - now)

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _watch_new_mail(self) -> None:
        """Turn the store's new-mail signal into a wake-up of the loop."""
        backoff = STORE_BACKOFF_FIRST
        while not self._stopping:
            try:
                if await self.store.wait_for_new_mail(MAX_SLEEP):
                    self._wake.set()
                backoff = STORE_BACKOFF_FIRST
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery_new_mail_watch_error", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, STORE_BACKOFF_MAX)

    async def _housekeeping(self) -> None:
        now = self._clock()
        await self._close_idle(everything=False)
        self._forget_quiet_destinations(now)
        for dest in list(self._destinations.values()):
            self._trim_backlog(dest)   # a destination whose jobs all hang finishes none to trigger it
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRY_INTERVAL
            await self._expire(now)
        if now >= self._next_purge:
            self._next_purge = now + self.settings.retention.purge_interval
            retention = self.settings.retention
            await self.store.purge(now - retention.finished_messages, now - retention.history)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_task_crashed", task=task.get_name(), error=repr(task.exception()))

    async def _wait_until_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*set(self._tasks), return_exceptions=True)

    # -- the lease heartbeat ------------------------------------------------------------------------
    def _start_heartbeat(self) -> bool:
        """Start renewing leases unless it runs already; True when this call started it."""
        if self._heartbeat_task is not None and not self._heartbeat_task.done():
            return False
        self._heartbeat_task = asyncio.create_task(self._keep_leases(), name="delivery-lease-heartbeat")
        return True

    async def _stop_heartbeat(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _keep_leases(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._renew_every):
                    await self._renew_now.wait()
            self._renew_now.clear()
            try:
                await self._renew_leases()
            except Exception:  # a bug here must not stop the heartbeat: live work would lose its leases
                log.exception("delivery_heartbeat_crashed")

    async def _renew_leases(self) -> None:
        """One tick: renew every claim still being worked on, in one store call; drop the lost ones."""
        ids = list(self._inflight)
        if not ids:
            return
        lease = self.settings.lease_seconds
        until = self._clock() + lease  # taken before the call: never later than what the store sets
        try:
            renewed = await self.store.renew(ids, self.owner, lease)
        except Exception as exc:
            # The store is unreachable: try again next tick. Meanwhile the lease margin keeps new attempts
            # off leases about to end, and the store ignores results of leases that were lost.
            log.warning("delivery_lease_renewal_failed", recipients=len(ids), error=f"{type(exc).__name__}: {exc}")
            return
        for rid in renewed:
            claim = self._inflight.get(rid)
            if claim is not None and claim.lease_until < until:
                self._inflight[rid] = replace(claim, lease_until=until)
        self.stats.leases_renewed += len(renewed)
        log.debug("delivery_leases_renewed", recipients=len(renewed), lease_until=round(until, 3))
        # Settled or being settled meanwhile (the store has no lease left to renew for those) is not lost.
        lost = [rid for rid in ids if rid not in renewed and rid in self._inflight and rid not in self._settling]
        if lost:
            self._drop_lost(lost)

    def _drop_lost(self, lost: list[int]) -> None:
        """Claims another worker (or an operator) holds now: take them out of the queues for good.

        One in flight cannot be called back; its result will be ignored by the store, its DSN with it.
        Claims still being routed are caught before their attempt (:meth:`_held_part`).
        """
        gone = set(lost)
        unqueued = self._unqueue(gone)
        for rid in lost:
            claim = self._inflight[rid]
            log.warning("delivery_lease_lost", queue_id=claim.message.id, recipient=claim.recipient.address,
                        recipient_id=rid, queued=rid in unqueued)
        self.stats.leases_lost += len(lost)
        self._forget(lost)

    def _unqueue(self, gone: set[int]) -> set[int]:
        """Remove these claims from every destination queue; return the ones found there."""
        removed: set[int] = set()
        for dest in self._destinations.values():
            if not any(rid in gone for job in dest.queue for rid in job.recipient_ids):
                continue
            kept = []
            for job in dest.queue:
                claims = [claim for claim in job.claims if claim.recipient.id not in gone]
                removed.update(rid for rid in job.recipient_ids if rid in gone)
                if claims:
                    kept.append(Job(job.message, claims, job.route))
            dest.queue.clear()
            dest.queue.extend(kept)
        return removed

    def _held_part(self, job: Job) -> Job:
        """The job's claims this service still holds, with their latest lease times."""
        claims = [self._inflight[claim.recipient.id] for claim in job.claims if claim.recipient.id in self._inflight]
        return Job(job.message, claims, job.route)

    # -- claiming and routing -----------------------------------------------------------------------
    async def _claim_and_dispatch(self) -> int:
        room = self._max_inflight - len(self._inflight)
        limit = min(room, self.settings.claim_batch)
        if limit <= 0 or self._stopping:
            self._last_claim_full = False
            self._waiting_for_room = limit <= 0  # _forget wakes the loop once workers make room
            return 0
        claims = await self.store.claim_due(self._clock(), limit, self.owner, self.settings.lease_seconds)
        self._last_claim_full = len(claims) == limit
        self._waiting_for_room = self._last_claim_full
        if not claims:
            return 0
        for claim in claims:
            self._inflight[claim.recipient.id] = claim
        self._spawn(self._dispatch(claims), "dispatch")
        return len(claims)

    async def _dispatch(self, claims: list[Claim]) -> None:
        """Route a batch's domains concurrently and queue their jobs on their destinations.

        Domains routed within :data:`ROUTING_WINDOW` are queued together, so that a message's recipients
        in different domains of one destination (one MX set) travel in one transaction; a domain whose
        DNS is slow is queued on its own when it is ready, never holding the others back longer.
        """
        by_domain: dict[str, list[Claim]] = {}
        for claim in claims:
            by_domain.setdefault(claim.recipient.domain, []).append(claim)
        pending = {asyncio.create_task(self._route_domain(domain, group), name=f"route:{domain[:60]}")
                   for domain, group in by_domain.items()}
        try:
            done, pending = await asyncio.wait(pending, timeout=ROUTING_WINDOW)
            self._queue_routed([task.result() for task in done])
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                self._queue_routed([task.result() for task in done])
        finally:
            for task in pending:
                task.cancel()

    async def _route_domain(self, domain: str, claims: list[Claim]) -> _Routed | None:
        """Where a domain's claims go; None when they were settled here (DNS failure, reject route)."""
        try:
            route = self.router.route_for(domain)
            if route.kind == "reject":
                await self._settle_all(claims, route, _rejected_by_route(route))
                return None
            hosts, targets = await self._resolve(domain, route)
        except DnsError as exc:
            await self._settle_all(claims, self.router.route_for(domain), self._dns_failure(exc))
            return None
        except Exception as exc:  # contained: a crash while routing one domain defers only its mail
            log.exception("delivery_routing_crashed", domain=domain)
            failure = Failure("dns", "dns", f"routing failed: {type(exc).__name__}: {exc}")
            await self._settle_all(claims, Route("mx"), failure)
            return None
        return _Routed(destination_key(route, hosts), route, targets, claims)

    def _queue_routed(self, routed: Sequence[_Routed | None]) -> None:
        merged: dict[DestinationKey, _Routed] = {}
        for item in routed:
            if item is None:
                continue
            if item.key in merged:
                merged[item.key].claims.extend(item.claims)
            else:
                merged[item.key] = item
        for item in merged.values():
            dest = self._destination(item.key, item.route, item.targets)
            dest.queue.extend(jobs_for(item.claims, item.route, self.settings.max_recipients_per_transaction))
            self._trim_backlog(dest)
            self._ensure_workers(dest)

    # -- backpressure -------------------------------------------------------------------------------
    def _backlog_cap(self, dest: Destination, now: float) -> int:
        """Recipients ``dest`` may hold (running + queued): about BACKLOG_HORIZON seconds of its work."""
        per_destination = self.settings.concurrency.per_destination
        rate = dest.rate(now, per_destination)
        if rate is None:
            return max(per_destination * BACKLOG_FLOOR, self._max_inflight // 2)  # nothing known yet
        return max(per_destination * BACKLOG_FLOOR, int(rate * BACKLOG_HORIZON))

    def _trim_backlog(self, dest: Destination) -> None:
        """Take the newest queued jobs beyond the destination's cap off its queue and defer them.

        The jobs that keep every connection of the destination busy always stay, whatever the cap.
        """
        if self._stopping or not dest.queue:
            return
        now = self._clock()
        cap = self._backlog_cap(dest, now)
        held = dest.running + dest.queued
        keep_jobs = max(0, self.settings.concurrency.per_destination - len(dest.started))
        excess: list[Job] = []
        while len(dest.queue) > keep_jobs and held > cap:
            job = dest.queue.pop()
            held -= len(job.claims)
            excess.append(job)
        if excess:
            self._spawn(self._defer_backlog(dest, excess), "backlog-deferral")

    async def _defer_backlog(self, dest: Destination, jobs: list[Job]) -> None:
        """Re-queue claims a busy destination will not get to soon, each at its expected turn."""
        now = self._clock()
        per_destination = self.settings.concurrency.per_destination
        rate = dest.rate(now, per_destination) or float(per_destination)
        ahead = dest.running + dest.queued
        results = []
        for job in jobs:
            for claim in job.claims:
                ahead += 1
                wait = min(BACKLOG_DEFER_MAX, max(BACKLOG_DEFER_MIN, ahead / rate))
                results.append(RecipientResult(claim.recipient.id, RecipientState.QUEUED,
                                               now + wait * random.uniform(1.0, 1.2), None, None,
                                               count_attempt=False))
        log.info("delivery_backlog_deferred", destination=dest.label, recipients=len(results),
                 rate=round(rate, 2), held=dest.running + dest.queued,
                 until=round(max(result.next_attempt_at or now for result in results) - now, 1))
        try:
            await self._record(results)
        except Exception:
            log.exception("delivery_record_failed", destination=dest.label, recipients=len(results))
            self._forget(result.recipient_id for result in results)

    async def _resolve(self, domain: str, route: Route) -> tuple[list[MxHost], list[Target]]:
        limit = self.settings.dns.max_hosts
        if route.kind == "mx":
            hosts = await self.resolver.resolve(domain)
            targets = [Target(host.name, address, route.port) for host in hosts for address in host.addresses]
            return hosts, targets[:limit]
        host = route.host or domain
        return [], (await _host_targets(host, route.port, self.settings.dns.timeout))[:limit]

    def _dns_failure(self, exc: DnsError) -> Failure:
        reply = Reply(exc.code, exc.enhanced, exc.text)
        verdict = self.classifier.classify_failure("dns", exc.detail or exc.text, permanent=exc.permanent,
                                                   enhanced=exc.enhanced)
        return Failure("dns", "dns", exc.detail or exc.text, reply=reply, verdict=verdict)

    def _destination(self, key: DestinationKey, route: Route, targets: list[Target]) -> Destination:
        dest = self._destinations.get(key)
        breaker = self.settings.circuit_breaker
        if dest is None:
            dest = Destination(key, route, targets,
                               CircuitBreaker(breaker.failures, breaker.open_for, breaker.max_open))
            self._destinations[key] = dest
        else:
            dest.targets = targets  # the freshest resolution (addresses change, order is reshuffled)
        dest.last_used = self._clock()
        return dest

    def _forget_quiet_destinations(self, now: float) -> None:
        """Drop entries with nothing going on and no pause to remember (bounded memory)."""
        stale_after = max(600.0, self.settings.circuit_breaker.max_open)
        for key in [k for k, d in self._destinations.items()
                    if d.is_quiet and not d.breaker.is_open(now) and now - d.last_used > stale_after]:
            del self._destinations[key]

    # -- workers ------------------------------------------------------------------------------------
    def _ensure_workers(self, dest: Destination) -> None:
        limit = self.settings.concurrency.per_destination
        while dest.workers < limit and dest.workers < len(dest.queue):
            dest.workers += 1
            self._spawn(self._work(dest), f"deliver:{dest.label[:60]}")

    async def _work(self, dest: Destination) -> None:
        """Take the destination's jobs one after another, reusing one connection across them."""
        conn = dest.take_idle()
        try:
            while dest.queue and not self._stopping:
                job = dest.queue.popleft()
                async with self._global:
                    started = self._clock()
                    dest.job_started(started, len(job.claims))
                    try:
                        conn = await self._run_job(dest, job, conn)
                    finally:
                        dest.job_finished(started, self._clock(), len(job.claims))
                self._trim_backlog(dest)   # its rate is better known now
        except asyncio.CancelledError:
            if conn is not None:
                conn.close_nowait()
            conn = None
            raise
        finally:
            dest.workers -= 1
            if conn is not None:
                if conn.usable and not self._stopping:
                    dest.park(conn, self._clock())
                    self._wake.set()  # so the loop schedules the idle close
                else:
                    await conn.close()
            if dest.queue and not self._stopping:
                self._ensure_workers(dest)

    async def _run_job(self, dest: Destination, job: Job,
                       conn: DeliveryConnection | None) -> DeliveryConnection | None:
        """One transaction for one job, contained: returns the connection to keep using, if any."""
        try:
            return await self._attempt_job(dest, job, conn)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("delivery_job_crashed", queue_id=job.message.id, destination=dest.label)
            if conn is not None:
                conn.close_nowait()
            failure = Failure("protocol", "connect", f"internal error: {type(exc).__name__}")
            await self._settle_safely(job, [failure] * len(job.claims), _no_attempt(self._clock()), None)
            return None

    async def _attempt_job(self, dest: Destination, job: Job,
                           conn: DeliveryConnection | None) -> DeliveryConnection | None:
        job = self._held_part(job)
        if not job.claims:
            return conn  # every lease of this job was lost (see _drop_lost): nothing of it is ours to try
        now = self._clock()
        if job.lease_until - now < self._lease_margin:
            await self._release_jobs([job], "lease nearly over")
            return conn
        if dest.breaker.is_open(now):
            await self._defer_paused(job, dest)
            return conn
        data = await self._message_data(job)
        if data is None:
            return conn
        ctx = AttemptContext(job.message, [c.recipient for c in job.claims], job.route, dest.label, data)
        try:
            if self.chain is not None and not await self._chain_allows(ctx, job):
                return conn
            if ctx.skip:
                job = await self._settle_skipped(ctx, job)
                if not job.claims:
                    return conn
            ctx.attempted = True
            started, clock_start = now, time.monotonic()
            conn, results, tried = await self._send_via_destination(dest, job, ctx.data, conn)
            meta = _AttemptMeta(started, time.monotonic() - clock_start, tried,
                                conn.tls_version if conn is not None else None)
            await self._settle_safely(job, results, meta, ctx, data)
            if conn is not None and not conn.usable:
                await conn.close()
                return None
            return conn
        finally:
            await self._attempt_over(ctx)

    async def _settle_skipped(self, ctx: AttemptContext, job: Job) -> Job:
        """Settle the recipients a chain step took out of this attempt (``ctx.skip``); return the rest.

        A permanent rejection fails the recipient like any permanent failure (DSN, ``bounced`` observers)
        under the category ``plugin_rejected``, so the classifier never guesses at a reply we made up; a
        temporary one re-queues it without counting an attempt; ACCEPT drops it (state deleted, no DSN).
        """
        now = self._clock()
        rejected: list[Claim] = []
        failures: list[SendResult] = []
        quiet: list[RecipientResult] = []
        kept: list[Claim] = []
        for claim in job.claims:
            verdict = ctx.skip.get(claim.recipient.id)
            if verdict is None or verdict.action is Action.CONTINUE:
                kept.append(claim)
                continue
            log.info("delivery_skipped_by_chain", queue_id=job.message.id, recipient=claim.recipient.address,
                     action=verdict.action.value, reply=verdict.reply(), reason=verdict.reason)
            if verdict.action is Action.REJECT_PERMANENT:
                rejected.append(claim)
                failures.append(Failure("protocol", "chain", verdict.reason or "refused by a plugin",
                                        reply=Reply(verdict.code, verdict.enhanced, verdict.text),
                                        verdict=Classification("permanent", "plugin_rejected", verdict.enhanced)))
            elif verdict.action is Action.REJECT_TEMPORARY:
                until = verdict.retry_at if verdict.retry_at is not None else now + CHAIN_DEFER_DELAY
                quiet.append(RecipientResult(claim.recipient.id, RecipientState.QUEUED, until,
                                             f"deferred: {verdict.reply()}", None, count_attempt=False))
            else:
                dropped = dropped_event(job.message, claim.recipient, now, verdict.reply(), verdict.reason)
                quiet.append(RecipientResult(claim.recipient.id, RecipientState.DELETED, None,
                                             f"dropped before delivery: {verdict.reply()}", None,
                                             count_attempt=False, events=(dropped,)))
        if rejected:
            await self._settle_safely(Job(job.message, rejected, job.route), failures, _no_attempt(now), ctx,
                                      ctx.data)
        if quiet:
            try:
                await self._record(quiet)
            except Exception:
                log.exception("delivery_record_failed", queue_id=job.message.id, recipients=len(quiet))
                self._forget(result.recipient_id for result in quiet)
        ctx.recipients = [claim.recipient for claim in kept]
        return Job(job.message, kept, job.route)

    async def _attempt_over(self, ctx: AttemptContext) -> None:
        """Tell the chain the attempt is over, whatever happened (see :class:`AttemptEndHook`)."""
        chain: object = self.chain  # as object: mypy sees no overlap between the two protocols otherwise
        if not isinstance(chain, AttemptEndHook):
            return
        try:
            await chain.after_attempt(ctx)
        except Exception:
            log.exception("delivery_after_attempt_crashed", queue_id=ctx.message.id, destination=ctx.destination)

    async def _send_via_destination(self, dest: Destination, job: Job, data: bytes,
                                    conn: DeliveryConnection | None
                                    ) -> tuple[DeliveryConnection | None, list[SendResult], str | None]:
        """Send over ``conn`` or a new connection, trying the destination's hosts in order.

        A connection-level failure moves on to the next host (and counts towards the breaker). A reused
        connection found dead before any recipient was answered is replaced once, transparently.
        """
        recipients = [claim.recipient for claim in job.claims]
        last_failure: Failure | None = None
        tried: list[Target] = []
        targets = iter(dest.targets)
        retried_reuse = False
        while True:
            reused = conn is not None
            if conn is None or not conn.usable:
                if conn is not None:
                    await conn.close()
                conn, last_failure = await self._open_next(dest, targets, last_failure, tried)
                if conn is None:
                    break
                reused = False
            results = await conn.send(job.message, data, recipients)
            if _untouched_failure(results) and (reused or _session_failure(results)) and not retried_reuse:
                # The server dropped an idle session (or refused RSET): nobody was answered, try afresh.
                retried_reuse = True
                conn.close_nowait()
                conn = None
                targets = iter(dest.targets)
                continue
            return conn, results, conn.target.name
        failure = last_failure or Failure("connect", "connect", "no host to try for this destination")
        return None, [failure] * len(recipients), tried[-1].name if tried else None

    async def _open_next(self, dest: Destination, targets: Iterator[Target], last_failure: Failure | None,
                         tried: list[Target]) -> tuple[DeliveryConnection | None, Failure | None]:
        for target in targets:
            if dest.breaker.is_open(self._clock()):
                break
            tried.append(target)
            conn = DeliveryConnection(target, self._client_options(dest.route), self._tls_memory)
            self.stats.connections += 1
            failure = await conn.open()
            metrics.outbound_connection(failure is None)
            if failure is None:
                if dest.breaker.record_success():
                    log.info("destination_resumed", destination=dest.label)
                return conn, last_failure
            self.stats.session_failures += 1
            last_failure = failure
            log.info("delivery_session_failed", destination=dest.label, mx=str(target), stage=failure.stage,
                     kind=failure.kind, reply=str(failure.reply) if failure.reply else None,
                     detail=failure.detail)
            if dest.breaker.record_failure(self._clock()):
                log.warning("destination_paused", destination=dest.label,
                            until=dest.breaker.open_until, pause=dest.breaker.current_open)
                break
        return None, last_failure

    def _client_options(self, route: Route) -> ClientOptions:
        return ClientOptions(
            ehlo_hostname=self.hostname, timeouts=self.settings.timeouts, tls=route.tls,
            contexts=self._contexts, username=route.username, password=route.password,
            max_messages=self.settings.max_messages_per_connection)

    async def _message_data(self, job: Job) -> bytes | None:
        try:
            return await self.store.message_data(job.message.id)
        except StoreError as exc:
            # Gone (deleted by an operator) or the store is down: give the leases back either way.
            log.warning("delivery_message_unavailable", queue_id=job.message.id, error=str(exc))
            await self._release_jobs([job], "message data unavailable")
            return None

    async def _chain_allows(self, ctx: AttemptContext, job: Job) -> bool:
        assert self.chain is not None
        try:
            verdict = await self.chain.before_attempt(ctx)
        except Exception as exc:
            log.exception("delivery_chain_crashed", queue_id=job.message.id)
            verdict = Verdict(Action.REJECT_TEMPORARY, 451, "4.3.0", "plugin failure",
                              reason=f"{type(exc).__name__}: {exc}")
        if verdict is None or not verdict.is_reject:
            return True
        reply = Reply(verdict.code, verdict.enhanced, verdict.text)
        now = self._clock()
        if verdict.action == Action.REJECT_TEMPORARY:
            until = next((t for t in (ctx.retry_at, verdict.retry_at) if t is not None), now + CHAIN_DEFER_DELAY)
            log.info("delivery_deferred_by_chain", queue_id=job.message.id, reason=verdict.reason,
                     next_attempt=until)
            await self._record_deferral(job, until, f"deferred: {reply}")
            return False
        failure = Failure("protocol", "chain", verdict.reason or "refused by a plugin", reply=reply)
        await self._settle_safely(job, [failure] * len(job.claims), _no_attempt(now), ctx, ctx.data)
        return False

    # -- recording ----------------------------------------------------------------------------------
    async def _settle_all(self, claims: list[Claim], route: Route, failure: Failure) -> None:
        """Record the same failure (DNS, a reject route) for claims that never reached a connection."""
        for job in jobs_for(claims, route, self.settings.max_recipients_per_transaction):
            # Observers hear about these too (a null MX bounce matters to a suppression list); there is
            # no message data to show them: no attempt was made.
            ctx = AttemptContext(job.message, [c.recipient for c in job.claims], route,
                                 f"{route.kind}:{job.claims[0].recipient.domain}", b"")
            await self._settle_safely(job, [failure] * len(job.claims),
                                      _AttemptMeta(self._clock(), 0.0, None, None), ctx)

    async def _settle_safely(self, job: Job, results: Sequence[SendResult], meta: _AttemptMeta,
                             ctx: AttemptContext | None, data: bytes | None = None) -> None:
        try:
            await self._settle(job, results, meta, ctx, data)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Recording failed (store down): the leases run out and the recipients come back by themselves.
            log.exception("delivery_record_failed", queue_id=job.message.id, recipients=len(job.claims))
            self._forget(claim.recipient.id for claim in job.claims)

    async def _settle(self, job: Job, results: Sequence[SendResult], meta: _AttemptMeta,
                      ctx: AttemptContext | None, data: bytes | None) -> None:
        now = self._clock()
        settlement = _Settlement()
        warn = await self._delay_warnings_due(job, now)
        for claim, result in zip(job.claims, results, strict=True):
            self._settle_recipient(job.message, claim.recipient, result, meta, now, settlement,
                                   claim.recipient.id in warn)
        self._time_attempt(meta, settlement)
        bounces = await self._dsns(job.message, settlement, data, now)
        await self._record(settlement.results, bounces)
        if self.chain is not None and ctx is not None:
            await self._observe(ctx, settlement)

    def _settle_recipient(self, message: StoredMessage, rcpt: RecipientRow, result: SendResult,
                          meta: _AttemptMeta, now: float, out: _Settlement, warn_delay: bool) -> None:
        verdict = self._classify(result)
        reply_text = _reply_text(result)
        attempt = AttemptRecord(rcpt.id, meta.started_at, meta.duration, meta.mx, meta.tls_version,
                                reply_text, verdict.category, verdict.outcome)
        next_attempt: float | None = None
        if verdict.outcome == "delivered":
            state = RecipientState.DELIVERED
        elif verdict.outcome == "permanent":
            state = RecipientState.BOUNCED
            out.fail(rcpt.id, self._failed(rcpt, verdict.enhanced, meta.mx, reply_text, now))
        else:
            next_attempt = self.retry_policy.next_attempt(now, message.received_at, rcpt.attempts + 1,
                                                          _hint(result))
            if next_attempt is None:
                state = RecipientState.EXPIRED
                out.fail(rcpt.id, self._failed(rcpt, EXPIRED_STATUS, meta.mx, reply_text, now))
            else:
                state = RecipientState.QUEUED
                if warn_delay:
                    out.delay(rcpt.id, self._failed(rcpt, verdict.enhanced, meta.mx, reply_text, now, "delayed",
                                                    self.retry_policy.expires_at(message.received_at)))
        event = attempt_event(message, rcpt, state, verdict, reply=reply_text, mx=meta.mx, tls=meta.tls_version,
                              now=now, next_attempt_at=next_attempt)
        out.results.append(RecipientResult(rcpt.id, state, next_attempt, reply_text, attempt, events=(event,)))
        out.observed.append((rcpt, verdict, result, next_attempt))
        self._log_attempt(message, rcpt, result, verdict, meta, state, next_attempt)

    def _classify(self, result: SendResult) -> Classification:
        if isinstance(result, Reply):
            return self.classifier.classify(result)
        if result.verdict is not None:
            return result.verdict
        if result.reply is not None:
            verdict = self.classifier.classify(result.reply)
            if verdict.outcome != "delivered":
                return verdict
        return self.classifier.classify_failure(result.kind, result.detail)

    async def _delay_warnings_due(self, job: Job, now: float) -> set[int]:
        """Recipients owed a "delayed" DSN should this attempt fail temporarily: the message is past the
        warning age and the previous attempt was not (so the warning goes exactly once, on the attempt
        that crosses the age). Only messages past the age cost a history look-up."""
        received = job.message.received_at
        policy = self.retry_policy
        if not policy.delay_warning_due(received, now):
            return set()
        due = set()
        for claim in job.claims:
            history = await self.store.attempts_of(claim.recipient.id)
            previous = max((a.started_at for a in history), default=received)
            if not policy.delay_warning_due(received, previous):
                due.add(claim.recipient.id)
        return due

    def _failed(self, rcpt: RecipientRow, status: str, mx: str | None, diagnostic: str | None, now: float,
                action: DsnKind = "failed", retry_until: float | None = None) -> FailedRecipient:
        return FailedRecipient(address=rcpt.address, orcpt=rcpt.orcpt, status=status, action=action,
                               remote_mta=mx, diagnostic=diagnostic, last_attempt_at=now,
                               notify=rcpt.notify, will_retry_until=retry_until)

    async def _dsns(self, message: StoredMessage, settlement: _Settlement, data: bytes | None,
                    now: float) -> list[Bounce]:
        """The DSNs of one job, each paired with the recipients it reports on (the store commits it
        only together with their results)."""
        if not (settlement.failed or settlement.delayed) or not message.sender:
            return []
        original = data if data is not None else await self._original(message)
        bounces = []
        kinds: tuple[tuple[DsnKind, list[FailedRecipient], list[int]], ...] = (
            ("failed", settlement.failed, settlement.failed_ids),
            ("delayed", settlement.delayed, settlement.delayed_ids))
        for kind, failures, recipient_ids in kinds:
            if not failures:
                continue
            dsn = build_bounce(message=message, original=original, failures=failures,
                               reporting_mta=self.hostname, kind=kind, new_id=new_queue_id(now), now=now)
            if dsn is not None:
                bounces.append(Bounce(dsn, tuple(recipient_ids)))
                self.stats.dsns += 1
                metrics.dsn_queued(kind)
                log.info("dsn_queued", queue_id=message.id, dsn_id=dsn.id, kind=kind,
                         recipients=len(failures))
        return bounces

    async def _original(self, message: StoredMessage) -> bytes:
        try:
            return await self.store.message_data(message.id)
        except StoreError:
            return b""  # the DSN then carries no copy of the original, but still goes out

    async def _record(self, results: list[RecipientResult], bounces: Sequence[Bounce] = ()) -> None:
        """Commit (grouped with other transactions' results, retried briefly inside the recorder)."""
        ids = [result.recipient_id for result in results]
        self._settling.update(ids)  # their leases are being ended by us: not "lost" when renewal misses them
        try:
            await self._recorder.record(results, bounces)
        finally:
            self._settling.difference_update(ids)
        for result in results:
            self._count(result.state)
            self._measure(result)
        self._forget(result.recipient_id for result in results)

    def _measure(self, result: RecipientResult) -> None:
        """The outcome metric of one recorded result (by state, category and bounded destination)."""
        claim = self._inflight.get(result.recipient_id)
        domain = claim.recipient.domain if claim is not None else self._expiring.pop(result.recipient_id, "")
        if result.attempt is not None and result.attempt.category:
            category = result.attempt.category
        else:
            category = _UNATTEMPTED_CATEGORY.get(result.state, "none")
        metrics.delivery_outcome(_OUTCOME_NAMES.get(result.state, result.state.value), category, domain)

    def _time_attempt(self, meta: _AttemptMeta, settlement: _Settlement) -> None:
        """The attempt-duration metric: only attempts that tried a connection (an MX host is known)."""
        if meta.mx is None:
            return
        outcomes = {verdict.outcome for _rcpt, verdict, _result, _next in settlement.observed}
        if outcomes == {"delivered"}:
            result = "delivered"
        elif "delivered" in outcomes:
            result = "partial"
        else:
            result = "temporary" if "temporary" in outcomes else "permanent"
        metrics.delivery_attempt(result, meta.duration)

    def _count(self, state: RecipientState) -> None:
        if state == RecipientState.DELIVERED:
            self.stats.delivered += 1
        elif state == RecipientState.BOUNCED:
            self.stats.bounced += 1
        elif state == RecipientState.EXPIRED:
            self.stats.expired += 1
        elif state == RecipientState.DELETED:
            self.stats.dropped += 1
        else:
            self.stats.deferred += 1

    async def _observe(self, ctx: AttemptContext, settlement: _Settlement) -> None:
        chain = self.chain
        assert chain is not None
        for rcpt, verdict, result, next_attempt in settlement.observed:
            try:
                if verdict.outcome == "delivered" and isinstance(result, Reply):
                    await chain.delivered(ctx, rcpt, result)
                elif verdict.outcome == "temporary" and next_attempt is not None:
                    await chain.deferred(ctx, rcpt, verdict, next_attempt)
                else:
                    await chain.bounced(ctx, rcpt, verdict)
            except Exception:
                log.exception("delivery_observer_crashed", queue_id=ctx.message.id, recipient=rcpt.address)

    async def _record_deferral(self, job: Job, until: float, why: str) -> None:
        """Re-queue without counting an attempt (a paused destination, a chain deferral)."""
        results = [RecipientResult(c.recipient.id, RecipientState.QUEUED, until, why, None, count_attempt=False)
                   for c in job.claims]
        try:
            await self._record(results)
        except Exception:
            log.exception("delivery_record_failed", queue_id=job.message.id, recipients=len(job.claims))
            self._forget(claim.recipient.id for claim in job.claims)

    async def _defer_paused(self, job: Job, dest: Destination) -> None:
        until = dest.breaker.open_until
        for claim in job.claims:
            log.info("delivery_paused_deferral", queue_id=job.message.id, recipient=claim.recipient.address,
                     destination=dest.label, next_attempt=until)
        await self._record_deferral(job, until, f"destination {dest.label} paused after repeated "
                                                f"connection failures")

    async def _release_jobs(self, jobs: Sequence[Job], why: str) -> None:
        await self._release_ids([rid for job in jobs for rid in job.recipient_ids], why)

    async def _release_ids(self, ids: list[int], why: str) -> None:
        if not ids:
            return
        self._settling.update(ids)
        try:
            await self.store.release(ids, self.owner)
            log.info("delivery_claims_released", recipients=len(ids), reason=why)
        except Exception:
            log.exception("delivery_release_failed", recipients=len(ids), reason=why)
        finally:
            self._settling.difference_update(ids)
        self._forget(ids)

    def _forget(self, recipient_ids: Iterable[int]) -> None:
        """These claims are settled or given back; wake the loop when that makes room for a claim."""
        for rid in recipient_ids:
            self._inflight.pop(rid, None)
        room = self._max_inflight - len(self._inflight)
        if self._waiting_for_room and (room >= self.settings.claim_batch // 2 or not self._inflight):
            self._waiting_for_room = False
            self._wake.set()

    # -- expiry and idle connections ----------------------------------------------------------------
    async def _expire(self, now: float) -> None:
        """Every recipient past the queue lifetime, in any non-final state, becomes EXPIRED (4.4.7)."""
        cutoff = now - self.retry_policy.max_lifetime
        batch = self.settings.claim_batch
        while not self._stopping:
            claims = await self.store.claim_expired(cutoff, batch, self.owner, self.settings.lease_seconds)
            if not claims:
                return
            by_message: dict[str, list[Claim]] = {}
            for claim in claims:
                by_message.setdefault(claim.message.id, []).append(claim)
            for group in by_message.values():
                await self._expire_message(group, now)
            if len(claims) < batch:
                return

    async def _expire_message(self, claims: list[Claim], now: float) -> None:
        message = claims[0].message
        settlement = _Settlement()
        verdict = Classification("permanent", "message_expired", EXPIRED_STATUS, rule="expiry")
        expired = Failure("protocol", "expiry", EXPIRED_TEXT, verdict=verdict)
        for claim in claims:
            rcpt = claim.recipient
            self._expiring[rcpt.id] = rcpt.domain
            settlement.observed.append((rcpt, verdict, expired, None))
            diagnostic = rcpt.last_reply or EXPIRED_TEXT
            settlement.results.append(RecipientResult(rcpt.id, RecipientState.EXPIRED, None, EXPIRED_TEXT,
                                                      None, count_attempt=False,
                                                      events=(expiry_event(message, rcpt, now, diagnostic),)))
            settlement.fail(rcpt.id, self._failed(rcpt, EXPIRED_STATUS, None, diagnostic, now))
            log.info("expired", queue_id=message.id, recipient=rcpt.address, domain=rcpt.domain,
                     state_was=rcpt.state.value, attempts=rcpt.attempts, reply=diagnostic)
        bounces = await self._dsns(message, settlement, None, now)
        await self._record(settlement.results, bounces)
        if self.chain is not None:
            route = self.router.route_for(claims[0].recipient.domain)
            await self._observe(AttemptContext(message, [c.recipient for c in claims], route, "expiry", b""),
                                settlement)

    async def _close_idle(self, *, everything: bool) -> None:
        now = self._clock()
        closing: list[DeliveryConnection] = []
        for dest in self._destinations.values():
            if everything:
                closing.extend(dest.drain_idle())
            else:
                closing.extend(dest.expired_idle(now, self.settings.idle_timeout))
        if closing:
            await asyncio.gather(*(conn.close() for conn in closing), return_exceptions=True)

    # -- logging ------------------------------------------------------------------------------------
    def _log_attempt(self, message: StoredMessage, rcpt: RecipientRow, result: SendResult,
                     verdict: Classification, meta: _AttemptMeta, state: RecipientState,
                     next_attempt: float | None) -> None:
        fields: dict[str, Any] = {
            "queue_id": message.id, "recipient": rcpt.address, "domain": rcpt.domain, "mx": meta.mx,
            "tls": meta.tls_version, "reply": _reply_text(result), "category": verdict.category,
            "status": verdict.enhanced, "outcome": verdict.outcome, "attempt": rcpt.attempts + 1,
            "duration": round(meta.duration, 3), "next_attempt": next_attempt,
        }
        if isinstance(result, Failure) and result.reply is not None:
            fields["detail"] = result.detail
        log.info("delivery_attempt", **fields)
        if state != RecipientState.QUEUED:
            log.info(state.value, queue_id=message.id, recipient=rcpt.address, domain=rcpt.domain,
                     mx=meta.mx, reply=fields["reply"], category=verdict.category)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _no_attempt(now: float) -> _AttemptMeta:
    return _AttemptMeta(now, 0.0, None, None)


def _reply_text(result: SendResult) -> str:
    if isinstance(result, Reply):
        return str(result)[:MAX_REPLY_KEPT]
    if result.reply is not None:
        return str(result.reply)[:MAX_REPLY_KEPT]
    return f"{result.kind} failure at {result.stage}: {result.detail}"[:MAX_REPLY_KEPT]


def _hint(result: SendResult) -> float | None:
    reply = result if isinstance(result, Reply) else result.reply
    return retry_hint(reply.text) if reply is not None else None


def _untouched_failure(results: Sequence[SendResult]) -> bool:
    """Every recipient failed without any reply, before the message body was sent."""
    return all(isinstance(r, Failure) and r.reply is None and r.kind == "connect"
               and r.stage in ("rset", "mail", "rcpt", "data") for r in results)


def _session_failure(results: Sequence[SendResult]) -> bool:
    return all(isinstance(r, Failure) and r.session_level for r in results)


def _rejected_by_route(route: Route) -> Failure:
    reply = Reply(route.reject_code, route.reject_enhanced, route.reject_text)
    return Failure("protocol", "route", "refused by the configured route", reply=reply)


async def _host_targets(host: str, port: int, limit: float) -> list[Target]:
    """Addresses of a host/smarthost route (the system resolver: no MX lookup for a pinned host)."""
    try:
        async with asyncio.timeout(limit):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise DnsError(451, "4.4.3", "temporary DNS failure, will retry", f"{host}: lookup timed out") \
            from None
    except OSError as exc:
        raise DnsError(451, "4.4.3", "temporary DNS failure, will retry", f"{host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    addresses.sort(key=lambda a: ":" in a)  # IPv4 first, as for MX hosts
    return [Target(host, address, port) for address in addresses]


__all__ = [
    "AttemptContext",
    "AttemptEndHook",
    "DeliveryChain",
    "DeliveryService",
    "DeliveryStats",
    "make_owner",
]
