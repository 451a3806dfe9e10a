"""The running relay: builds every part from the settings, runs them on one event loop, stops them.

Start order: logging → placeholder-secret refusal → store (opened, migrated) → limiter → chain →
HTTP server (when [http].address is set) →
listeners (role smtp/all) → delivery loop (role delivery/all).
Stop order is the reverse, and it is graceful (:meth:`Relay.stop`): listeners stop accepting and the
delivery loop stops claiming at once; open sessions and in-flight deliveries share the grace period
(``[server] shutdown_grace``) to finish — then sessions get 421 and unfinished claims go back to the
queue — and the store is closed after its pending commits. A second SIGTERM/SIGINT exits at once with
status 1 (what was answered 250 is committed already; leases held lapse after ``lease_seconds``).

Roles: ``smtp`` runs the listeners and never claims a recipient; ``delivery`` runs the delivery loop and
binds no SMTP socket; ``all`` both. Several processes of either role may share one Postgres queue.

Reload (SIGHUP, :meth:`Relay.reload`; what it changes and how a session or an attempt sees it:
:mod:`relay.reload`): the new configuration is read, validated and built — chain started, TLS files
loaded — and only then swapped in, synchronously; any failure keeps the running configuration.

Invariant: nothing here swallows a start-up error — a bad certificate, an unreachable database or a
port in use ends start-up with one clear line (a :class:`~relay.settings.ConfigError` or
:class:`StartupError`) and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from relay.alerts import Alerts
from relay.chain import Chain
from relay.delivery.scheduler import DeliveryService, make_owner
from relay.delivery.service import build_delivery_service
from relay.http import HttpServer, build_http_server
from relay.limits import make_limiter
from relay.limits.base import RateLimiter
from relay.log import configure_logging, get_logger
from relay.monitoring import Monitoring
from relay.plugin import EventRecorder, PluginHost, SuppressionList
from relay.reload import (
    Generation,
    GenerationHook,
    Generations,
    ReloadOutcome,
    RouteSwitch,
    reconcile,
    write_reload_status,
)
from relay.settings import ConfigError, Settings, load_settings, refuse_placeholder_secrets
from relay.smtp.server import SharedState, SmtpServer
from relay.stats import StatsService
from relay.store import open_store
from relay.store.base import QueueStore, StoreError
from relay.webhooks import WebhookService
from relay.workers import SUPERVISOR_GONE, WorkerPool, supervisor_pid, watch_supervisor

log = get_logger(__name__)


class StartupError(Exception):
    """The relay cannot start; ``str()`` says why in one line."""


class Relay:
    def __init__(self, settings: Settings, config_path: Path | None = None, *, worker: int | None = None,
                 overrides: Callable[[Settings], Settings] | None = None,
                 worker_command: list[str] | None = None) -> None:
        # An SMTP worker (relay/workers.py) runs what ``overrides`` makes of every configuration it loads.
        self.overrides = overrides
        self.settings = overrides(settings) if overrides is not None else settings
        # Where a reload reads from (None: the same search as at start: $RELAY_CONFIG, ./relay.toml).
        self.config_path = config_path
        # This process's number among the SMTP workers when it is one (the supervisor is 1); else None.
        self.worker = worker
        self.workers: WorkerPool | None = None
        self.worker_command = worker_command   # how `relay serve` was started (relay.workers.launch_command)
        self.store: QueueStore | None = None
        self.limiter: RateLimiter | None = None
        self.smtp: SmtpServer | None = None
        self.delivery: DeliveryService | None = None
        self.generations: Generations | None = None
        self.http: HttpServer | None = None
        self.monitoring: Monitoring | None = None
        # The outbox's consumers (role delivery/all): webhook delivery, hourly stats and alert checks.
        self.webhooks: WebhookService | None = None
        self.stats: StatsService | None = None
        self.routes = RouteSwitch(None)
        # `relay serve` sets this: where the outcome of each reload is written for `relay reload`.
        self.reload_status_file: Path | None = None
        self.reload_attempts = 0
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._signal_tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        # Set by the first SIGTERM/SIGINT or by request_stop(): run_until_signalled then stops gracefully.
        self._stop_requested = asyncio.Event()
        self.stop_signals = 0   # SIGTERM/SIGINT received; the second one exits at once

    @property
    def chain(self) -> Chain | None:
        """The current plugin chain (None before start)."""
        return self.generations.current.chain if self.generations is not None else None

    async def start(self) -> None:
        refuse_placeholder_secrets(self.settings)
        try:
            self.store = await open_store(self.settings.store)
        except StoreError as exc:
            raise StartupError(f"queue store {self.settings.store.kind}: {exc}") from None
        self.limiter = make_limiter(self.settings.redis)
        # The HTTP server exists before the chain (plugins register routes on it) and serves after it.
        self.http = build_http_server(self.settings.http)
        if self.http is not None:  # /metrics and /readyz come with the HTTP server
            self.monitoring = Monitoring(self)
            self.monitoring.install(self.http)
        self.routes = RouteSwitch(self.http)
        generation = await self._start_generation(1, self.settings)
        self.routes.activate(generation.routes)
        self.generations = Generations(generation)
        if self.http is not None:
            try:
                await self.http.start()
            except OSError as exc:
                raise StartupError(f"cannot listen for HTTP on {self.settings.http.address}: {exc}") from None
        if self.monitoring is not None:
            await self.monitoring.start()
        if self.settings.server.role in ("all", "smtp"):
            self.smtp = SmtpServer(SharedState(self.store, self.limiter, self.generations,
                                               processes=self.settings.server.smtp_workers))
            try:
                await self.smtp.start()
            except OSError as exc:
                raise StartupError(f"cannot listen: {exc}") from None
            await self._start_smtp_workers()
        if self.settings.server.role in ("all", "delivery"):
            self.delivery = await self._start_delivery()
            await self._start_event_consumers()
        log.info("relay_started", role=self.settings.server.role, store=self.settings.store.kind,
                 limiter="redis" if self.settings.redis.url else "memory",
                 smtp_workers=self.settings.server.smtp_workers if self.smtp is not None else None)

    async def _start_smtp_workers(self) -> None:
        """The supervisor starts the other SMTP processes once its own sockets are bound; a worker watches
        its supervisor (see :mod:`relay.workers`)."""
        assert self.smtp is not None
        count = self.settings.server.smtp_workers
        if self.worker is not None:
            task = asyncio.get_running_loop().create_task(
                watch_supervisor(supervisor_pid(), self.request_stop), name="watch-supervisor")
            self._signal_tasks.add(task)
            task.add_done_callback(self._signal_tasks.discard)
        elif count > 1:
            self.workers = WorkerPool(count, self.config_path, self.smtp.bound_addresses(),
                                      self.settings.server.shutdown_grace, self.worker_command)
            await self.workers.start()

    async def _start_generation(self, number: int, settings: Settings) -> Generation:
        """Build and start the chain of ``settings``; ConfigError (nothing left running) when it cannot."""
        assert self.limiter is not None
        secret = settings.server.secret_key
        routes = self.routes.table()
        host = PluginHost(
            hostname=settings.server.hostname,
            secret_key=secret.get_secret_value().encode() if secret else None,
            limiter=self.limiter,
            suppressions=self.store if isinstance(self.store, SuppressionList) else None,
            events=self.store if isinstance(self.store, EventRecorder) else None,
            http=routes,
            public_url=settings.http.public_url or None,
        )
        chain = Chain.from_settings(settings.chain.plugins, settings.plugins, host)
        try:
            await chain.start()
        except BaseException:
            await chain.stop()   # the plugins that did start let go of what they took
            raise
        return Generation(number, settings, chain, routes.routes if routes is not None else {})

    async def _start_delivery(self) -> DeliveryService:
        assert self.store is not None and self.generations is not None
        service = build_delivery_service(self.store, self.settings, chain=GenerationHook(self.generations))
        await service.start()
        return service

    async def _start_event_consumers(self) -> None:
        """Webhooks and the stats job run wherever deliveries do (several nodes may: both are safe to run
        concurrently — leases for deliveries, idempotent hours and atomic alert claims for stats)."""
        assert self.store is not None
        settings = self.settings
        alerts = Alerts(self.store, settings.alerts)
        self.webhooks = WebhookService(self.store, settings.events, settings.webhooks, alerts=alerts,
                                       owner=make_owner(settings.server.hostname))
        await self.webhooks.start()
        self.stats = StatsService(self.store, settings.stats, settings.alerts, alerts)
        await self.stats.start()

    # -- reload ---------------------------------------------------------------------------------------
    async def reload(self) -> ReloadOutcome:
        """Re-read the configuration and apply it (see :mod:`relay.reload`); refused as a whole, with one
        ``reload_refused`` log line and the running configuration kept, when anything is wrong with it."""
        async with self._reload_lock:
            self.reload_attempts += 1
            assert self.generations is not None, "reload before start"
            current = self.generations.current.number
            try:
                return await self._reload(self.generations)
            except ConfigError as exc:
                error = str(exc)
                log.error("reload_refused", error=error, generation=current)
            except Exception as exc:  # a reload must never take the running relay down with it
                error = f"internal error: {exc!r}"
                log.exception("reload_refused", error=error, generation=current)
            return ReloadOutcome(False, current, self.reload_attempts, error=error)

    async def _reload(self, generations: Generations) -> ReloadOutcome:
        new, path = load_settings(self.config_path)
        if self.overrides is not None:
            new = self.overrides(new)
        refuse_placeholder_secrets(new)
        merged, needs_restart = reconcile(self.settings, new)
        for key in needs_restart:
            log.warning("reload_needs_restart", key=key)
        generation = await self._start_generation(generations.current.number + 1, merged)
        try:
            configs = self.smtp.prepare(generation) if self.smtp is not None else []
            if self.delivery is not None:   # the first step of the swap; raises before changing anything
                self.delivery.reconfigure(merged.delivery, hostname=merged.server.hostname)
        except Exception:
            await generation.chain.stop()
            raise
        # The swap: no await from here to the end, so nothing sees half of it.
        if self.smtp is not None:
            self.smtp.apply(configs)
        self.routes.activate(generation.routes)
        previous = generations.install(generation)
        self.settings = merged
        if merged.log != previous.settings.log:
            configure_logging(merged.log.level, merged.log.format)
        log.info("reload_applied", generation=generation.number, config=str(path) if path else None,
                 plugins=[p.name for p in generation.chain.plugins], needs_restart=needs_restart or None)
        if self.webhooks is not None and _event_settings(previous.settings) != _event_settings(merged):
            await self._restart_event_consumers()
        return ReloadOutcome(True, generation.number, self.reload_attempts, needs_restart=tuple(needs_restart))

    async def _restart_event_consumers(self) -> None:
        """New [events] / [[webhooks]] / [stats] / [alerts]: the loops start over with them. Nothing is lost:
        POSTs under way finish (or their leases lapse) and every event waits in the store."""
        if self.stats is not None:
            await self.stats.stop()
        if self.webhooks is not None:
            await self.webhooks.stop(grace=5.0)
        await self._start_event_consumers()
        log.info("event_consumers_restarted", webhooks=[hook.label for hook in self.settings.webhooks])

    # -- stop -----------------------------------------------------------------------------------------
    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: SMTP sessions and deliveries get ``grace`` seconds (default: [server]
        shutdown_grace) together, then the rest stops in reverse start order."""
        self._stopping = True
        grace = self.settings.server.shutdown_grace if grace is None else grace
        draining = []
        if self.workers is not None:   # they drain their own sessions meanwhile
            draining.append(self.workers.stop())
        if self.smtp is not None:
            draining.append(self.smtp.drain(grace))
        if self.delivery is not None:
            draining.append(self.delivery.stop(grace))
        await asyncio.gather(*draining)
        if self.stats is not None:
            await self.stats.stop()
        if self.webhooks is not None:
            await self.webhooks.stop(min(grace, 10.0))
        if self.monitoring is not None:
            await self.monitoring.stop()
        if self.http is not None:
            await self.http.stop()
        if self.generations is not None:
            await self.generations.close()
        if self.limiter is not None:
            await self.limiter.close()
        if self.store is not None:
            await self.store.close()
        log.info("relay_stopped")
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT (then stop gracefully; a second one exits at once with status 1);
        SIGHUP reloads the configuration."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, _on_stop_signal, self, sig)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        if self.worker is not None:   # an SMTP worker: its supervisor's death (see relay.workers)
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(SUPERVISOR_GONE, self._on_supervisor_gone)
        await self._stop_requested.wait()
        log.info("shutdown_requested", grace=self.settings.server.shutdown_grace)
        await self.stop()

    def request_stop(self) -> None:
        """Ask run_until_signalled for the graceful stop a first SIGTERM asks for. Idempotent, and never the
        forced exit of a second signal: an SMTP worker calls it when its supervisor is gone, which its
        parent check and the kernel's death signal (possibly several) both report — one stop."""
        self._stop_requested.set()

    def _on_supervisor_gone(self) -> None:
        if not self._stop_requested.is_set():
            log.warning("smtp_worker_orphaned", reason="the supervisor died")
        self.request_stop()

    def _on_hangup(self) -> None:
        if self._stopping:
            log.info("reload_ignored", reason="shutting down")
            return
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)
        task = asyncio.get_running_loop().create_task(self._reload_and_report(), name="reload")
        self._signal_tasks.add(task)
        task.add_done_callback(self._signal_tasks.discard)

    async def _reload_and_report(self) -> None:
        outcome = await self.reload()
        if self.reload_status_file is not None:
            try:
                write_reload_status(self.reload_status_file, outcome)
            except OSError as exc:
                log.warning("reload_status_not_written", path=str(self.reload_status_file), error=str(exc))


def _event_settings(settings: Settings) -> tuple[object, ...]:
    return settings.events, settings.webhooks, settings.stats, settings.alerts


def _on_stop_signal(relay: Relay, sig: signal.Signals) -> None:
    # Signals are counted, not stop requests: request_stop() (a worker whose supervisor is gone) before an
    # operator's SIGTERM still leaves that SIGTERM the graceful one.
    relay.stop_signals += 1
    if relay.stop_signals == 1:
        relay.request_stop()
        return
    # The second signal: the operator wants out now. Everything answered 250 is committed already;
    # claims still leased lapse after lease_seconds and are delivered by whoever runs next.
    log.warning("shutdown_forced", signal=sig.name)
    sys.stderr.flush()
    os._exit(1)
