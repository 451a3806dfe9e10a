"""``/metrics``, ``/readyz`` and the scrape-time collectors of one running relay.

:class:`Monitoring` is built by :class:`relay.app.Relay` when ``[http] address`` is set. It adds its
routes to the relay's HTTP server before that starts (``/healthz`` is the server's own), measures the
event loop's lag, and at each scrape reads what is cheaper to read than to count: open SMTP sessions,
recipients in flight, the DNS cache counters, the throttle's deferrals, the store's group-commit
counters, and the queue's shape and webhook backlog from the store.

Invariants:
- The queue statistics cost one grouped query (plus three small ones over partial indexes for the webhook
  backlog) per ``[http] metrics_queue_cache`` seconds, however often and however many scrapers ask;
  concurrent scrapes share one refresh. A store that fails or is slow (over :data:`QUERY_TIMEOUT`) does
  not fail the scrape: the queue series are left out and ``relay_queue_stats_up`` is 0.
- ``/readyz`` answers 200 only when every check passes — the store answers a trivial query, Redis (when
  configured) answers PING, the listeners accept (roles smtp/all) and the delivery loop runs (roles
  delivery/all); otherwise 503 with a JSON body naming what failed. The detail of a failure goes to the
  log (once per change), never into the body.
- The relay's parts are read when asked, so a part that is not started yet (or was replaced by a reload)
  is reported as it is at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay import metrics
from relay.log import get_logger
from relay.settings import Settings
from relay.store.base import PENDING_STATES, QueueStore, ShapeCount, StoreError, WebhookBacklog

if TYPE_CHECKING:
    from relay.chain import Chain
    from relay.delivery.scheduler import DeliveryService
    from relay.http import HttpServer
    from relay.smtp.server import SmtpServer

log = get_logger(__name__)

#: Seconds between two event-loop lag samples.
LAG_INTERVAL = 0.5
#: Seconds a readiness check or a scrape's store query may take.
READY_TIMEOUT = 2.0
QUERY_TIMEOUT = 5.0


class RelayParts(Protocol):
    """What monitoring reads of the running relay (:class:`relay.app.Relay` has all of it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> QueueStore | None: ...
    @property
    def smtp(self) -> SmtpServer | None: ...
    @property
    def delivery(self) -> DeliveryService | None: ...
    @property
    def chain(self) -> Chain | None: ...


@runtime_checkable
class CountsDeferrals(Protocol):
    """A plugin that counts its deferrals (the throttle): read at scrape time."""

    deferrals: Mapping[str, int]
    rate_cuts: int


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    ok: bool
    taken_at: float
    shape: list[ShapeCount] = field(default_factory=list)
    webhooks: WebhookBacklog | None = None


class QueueSampler:
    """The queue's shape and webhook backlog, refreshed at most every ``ttl`` seconds."""

    def __init__(self, parts: RelayParts, ttl: float) -> None:
        self.parts = parts
        self.ttl = ttl
        self.snapshot: QueueSnapshot | None = None
        self._refreshed = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        if time.monotonic() - self._refreshed < self.ttl:
            return
        async with self._lock:  # concurrent scrapes wait for one query instead of each running their own
            if time.monotonic() - self._refreshed < self.ttl:
                return
            self.snapshot = await self._take()
            self._refreshed = time.monotonic()

    async def _take(self) -> QueueSnapshot:
        now = time.time()
        store = self.parts.store
        if store is None:
            return QueueSnapshot(False, now)
        try:
            async with asyncio.timeout(QUERY_TIMEOUT):
                shape = await store.queue_shape(now, metrics.AGE_EDGES)
                webhooks = await store.webhook_backlog()
        except (StoreError, TimeoutError) as exc:
            log.warning("metrics_queue_query_failed", error=str(exc) or type(exc).__name__)
            return QueueSnapshot(False, now)
        return QueueSnapshot(True, now, shape, webhooks)


class _Shared(Collector):
    """The process-wide metrics of :data:`relay.metrics.REGISTRY`."""

    def collect(self) -> Iterable[Metric]:
        return metrics.REGISTRY.collect()


class _RelayCollector(Collector):
    """What is read at scrape time from the running relay's parts."""

    def __init__(self, monitoring: Monitoring) -> None:
        self.monitoring = monitoring

    def collect(self) -> Iterator[Metric]:
        parts = self.monitoring.parts
        yield from self._smtp(parts.smtp)
        yield from self._delivery(parts.delivery)
        yield from self._throttle(parts.chain)
        yield from self._store(parts.store)
        yield from self._queue(self.monitoring.sampler.snapshot)

    @staticmethod
    def _smtp(smtp: SmtpServer | None) -> Iterator[Metric]:
        if smtp is None:
            return
        gauge = GaugeMetricFamily("relay_smtp_connections_open", "SMTP sessions open now", labels=["listener"])
        for runtime in smtp.runtimes:
            gauge.add_metric([runtime.listener.name], runtime.active)
        yield gauge

    @staticmethod
    def _delivery(delivery: DeliveryService | None) -> Iterator[Metric]:
        if delivery is None:
            return
        yield GaugeMetricFamily("relay_delivery_in_flight", "Recipients claimed by this process and not yet "
                                "recorded", value=delivery.in_flight)
        dns = CounterMetricFamily("relay_dns_cache_lookups", "DNS lookups of the delivery side by result: hit "
                                  "(answered from the cache) or miss (asked the resolver)", labels=["result"])
        dns.add_metric(["hit"], delivery.resolver.cache_hits)
        dns.add_metric(["miss"], delivery.resolver.cache_misses)
        yield dns

    @staticmethod
    def _throttle(chain: Chain | None) -> Iterator[Metric]:
        plugins = [p for p in (chain.plugins if chain is not None else ()) if isinstance(p, CountsDeferrals)]
        if not plugins:
            return
        deferrals = CounterMetricFamily("relay_throttle_deferrals", "Delivery attempts the throttle deferred, "
                                        "by reason: connections, rate, limiter_unavailable", labels=["reason"])
        for reason in ("connections", "rate", "limiter_unavailable"):
            deferrals.add_metric([reason], sum(p.deferrals.get(reason, 0) for p in plugins))
        yield deferrals
        yield CounterMetricFamily("relay_throttle_rate_cuts", "Destination rates the throttle cut on a "
                                  "slow-down signal", value=sum(p.rate_cuts for p in plugins))

    @staticmethod
    def _store(store: QueueStore | None) -> Iterator[Metric]:
        stats = getattr(store, "stats", None)
        batches, messages = getattr(stats, "batches", None), getattr(stats, "messages", None)
        if not isinstance(batches, int) or not isinstance(messages, int):
            return
        yield CounterMetricFamily("relay_store_commits", "Group-commit transactions of accepted mail",
                                  value=batches)
        yield CounterMetricFamily("relay_store_committed_messages", "Messages committed by group commit",
                                  value=messages)

    @staticmethod
    def _queue(snapshot: QueueSnapshot | None) -> Iterator[Metric]:
        ok = snapshot is not None and snapshot.ok
        yield GaugeMetricFamily("relay_queue_stats_up", "1 when the last queue query of /metrics succeeded",
                                value=1 if ok else 0)
        if snapshot is None or not ok:
            return
        yield from _queue_gauges(snapshot)
        if snapshot.webhooks is not None:
            yield from _webhook_gauges(snapshot.webhooks, snapshot.taken_at)


def _queue_gauges(snapshot: QueueSnapshot) -> Iterator[Metric]:
    labels = metrics.age_labels()
    counts = {(state.value, label): 0 for state in PENDING_STATES for label in labels}
    oldest: dict[str, float] = {}
    for cell in snapshot.shape:
        counts[(cell.state, labels[cell.bucket])] = counts.get((cell.state, labels[cell.bucket]), 0) + cell.count
        oldest[cell.state] = min(oldest.get(cell.state, cell.oldest), cell.oldest)
    gauge = GaugeMetricFamily("relay_queue_recipients", "Recipients waiting in the queue by state (queued, held) "
                              "and age since reception", labels=["state", "age"])
    for (state, label), count in counts.items():
        gauge.add_metric([state, label], count)
    yield gauge
    age = GaugeMetricFamily("relay_queue_oldest_age_seconds", "Age of the oldest waiting recipient by state "
                            "(0 when none waits)", labels=["state"])
    for state in PENDING_STATES:
        first = oldest.get(state.value)
        age.add_metric([state.value], max(0.0, snapshot.taken_at - first) if first is not None else 0.0)
    yield age


def _webhook_gauges(backlog: WebhookBacklog, now: float) -> Iterator[Metric]:
    yield GaugeMetricFamily("relay_webhook_undispatched_events", "Outbox events not yet handed to the webhook "
                            "endpoints", value=backlog.undispatched)
    gauge = GaugeMetricFamily("relay_webhook_backlog", "Webhook deliveries per endpoint still to make "
                              "(pending) and given up on (dead)", labels=["endpoint", "state"])
    for endpoint in sorted(set(backlog.pending) | set(backlog.dead)):
        gauge.add_metric([endpoint, "pending"], backlog.pending.get(endpoint, 0))
        gauge.add_metric([endpoint, "dead"], backlog.dead.get(endpoint, 0))
    yield gauge
    oldest = backlog.oldest_pending_at
    yield GaugeMetricFamily("relay_webhook_oldest_pending_age_seconds", "Age of the oldest pending webhook "
                            "delivery (0 when none)", value=max(0.0, now - oldest) if oldest is not None else 0.0)


class Monitoring:
    """Routes, lag sampling and scrape-time collection for one relay; see the module docstring."""

    def __init__(self, parts: RelayParts) -> None:
        self.parts = parts
        http = parts.settings.http
        metrics.configure(http.metrics_destinations)
        self.sampler = QueueSampler(parts, http.metrics_queue_cache)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Shared())
        self.registry.register(_RelayCollector(self))
        self._lag_task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._failed: frozenset[str] = frozenset()

    def install(self, http: HttpServer) -> None:
        http.add_route("GET", "/metrics", self._metrics)
        http.add_route("GET", "/readyz", self._readyz)

    async def start(self) -> None:
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self._measure_lag(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._lag_task = self._lag_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    # -- /metrics -----------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.Response:
        await self.sampler.refresh()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry),
                            headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    async def _measure_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - started - LAG_INTERVAL))

    # -- /readyz ------------------------------------------------------------------------------------
    async def readiness(self) -> dict[str, str]:
        """Each check's answer: "ok", or a short word for what is wrong (unreachable, down, not started)."""
        settings = self.parts.settings
        checks: dict[str, str] = {}
        details: dict[str, str] = {}
        checks["store"] = await self._check(self._ping_store(), "store", details)
        if settings.redis.url:
            checks["redis"] = await self._check(self._ping_redis(settings), "redis", details)
        role = settings.server.role
        if role in ("all", "smtp"):
            smtp = self.parts.smtp
            checks["listeners"] = "not started" if smtp is None else ("ok" if smtp.serving else "down")
        if role in ("all", "delivery"):
            delivery = self.parts.delivery
            checks["delivery"] = "not started" if delivery is None else ("ok" if delivery.running else "down")
        self._log_change(checks, details)
        return checks

    async def _check(self, probe: Awaitable[None], name: str, details: dict[str, str]) -> str:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await probe
        except Exception as exc:  # any failure of a dependency makes the relay not ready; logged below
            details[name] = f"{type(exc).__name__}: {exc}"
            return "unreachable"
        return "ok"

    async def _ping_store(self) -> None:
        store = self.parts.store
        if store is None:
            raise StoreError("the queue store is not open")
        await store.ping()

    async def _ping_redis(self, settings: Settings) -> None:
        if self._redis is None:
            timeout = settings.redis.timeout
            self._redis = aioredis.Redis.from_url(settings.redis.url, socket_timeout=timeout,
                                                  socket_connect_timeout=timeout)
        await self._redis.ping()

    def _log_change(self, checks: dict[str, str], details: dict[str, str]) -> None:
        failed = frozenset(name for name, answer in checks.items() if answer != "ok")
        if failed == self._failed:
            return
        self._failed = failed
        if failed:
            log.warning("not_ready", failed=sorted(failed), **{f"{name}_error": text for name, text in details.items()})
        else:
            log.info("ready")

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self.readiness()
        failed = sorted(name for name, answer in checks.items() if answer != "ok")
        body = {"status": "unavailable" if failed else "ready", "failed": failed, "checks": checks}
        return web.Response(status=503 if failed else 200, text=json.dumps(body), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

