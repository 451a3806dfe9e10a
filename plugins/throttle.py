"""throttle: per-destination connection and rate limits before every delivery attempt, shared by every
relay node, slowing a destination down by itself when it asks.

What is limited — a *budget* per destination:
- ``rollup = "mx"`` (default): the scheduler's destination (an MX set, a fixed host or a smarthost), so
  gmail.com, googlemail.com and every Google-hosted domain share one budget. Its limits are those of the
  first configured domain (``destinations``) seen going to it — sticky per node, so configure one entry
  per MX set — else ``default``.
- ``rollup = "domain"``: each recipient domain has its own budget and its own limits; an attempt carrying
  several domains (one MX set) needs room in each.

Before each attempt, per budget: a connection slot (``connections`` at once over all nodes; a lease
with a TTL of ``lease_ttl`` seconds, renewed every ``lease_ttl / 3`` while the attempt runs and given
back when it ends — the ``after_attempt`` hook —, so the slots of a node that died come back after at
most ``lease_ttl``), then one message from the rate (``rate``, a GCRA "count per period": an idle
destination may take a burst of ``count`` at once, then one every ``period / count``; see
:mod:`relay.limits.gcra`). A budget without room defers the attempt — ``451 4.4.5``, REJECT_TEMPORARY
with ``retry_at`` — which the scheduler records without counting an attempt: never a failure, never a
bounce. ``retry_at`` is now + the limiter's ``retry_after`` plus a small jitter, and deferrals of one
budget on one node are spaced one rate interval apart (at most one period ahead), so a backlog comes
back as a trickle rather than all at once. A full connection budget retries after ``busy_retry``
seconds (plus up to half of it as jitter).

Adaptive: a deferral the bounce classifier marks ``rate_signal`` (a 421, a "rate limited" reply; not
greylisting) cuts the budget's rate to ``cut_factor`` of what it is (never below ``min_factor`` of the
configured rate) for ``cooldown`` seconds, restarted by every further signal; a further cut needs
``cut_hold`` seconds since the last one. Then the rate recovers by ``recovery_step`` of the configured
rate every ``recovery_interval`` seconds (0: ``cooldown / 4``). The schedule is
:mod:`relay.policies.shaping`; the state is shared through the limiter's :class:`ValueStore` (Redis when
``[redis] url`` is set) with compare-and-set, and each node re-reads it at most every ``state_refresh``
seconds. A budget whose rate is ``unlimited`` has nothing to cut. Every node logs one line
(``throttle_rate_changed``: destination, old → new rate, factor, reason) whenever the rate it enforces
for a budget changes; ``relay throttle status`` lists the shared state (:func:`read_status`).

Limits and margins, stated:
- Rates are decided atomically by the shared limiter: over any span L, a budget admits at most
  ``count + L / interval`` attempts across all nodes. The one margin: after a cut, a node that has not
  re-read the state yet (≤ ``state_refresh`` s) still enforces the old rate.
- Connection slots never exceed ``connections`` while their holders live. A slot held by an attempt
  longer than ``lease_ttl`` is renewed; if Redis loses it anyway (a restart), one extra connection may
  open until that attempt ends (logged as ``throttle_lease_lost``). Slots count attempts in progress,
  not idle connections the scheduler keeps open between messages.
- Messages per connection are not limited here: the SMTP client's connection reuse is bounded by
  ``[delivery] max_messages_per_connection`` for every destination alike, and the scheduler has no
  per-destination override to pass a value to. That is a known gap.
- Memory backend (no Redis): the limits hold for this node only and the status is only visible inside
  the running relay.

Failure: ``on_error = "continue"`` — a throttle that fails (a bug) must not stop mail, so the chain logs
the error and the attempt goes ahead unthrottled. Redis outages follow ``[redis] fail_open``: open, the
limiter answers "allowed" (logged by it); closed, it raises and the throttle defers the attempt for
:data:`UNAVAILABLE_RETRY` seconds. The adaptive state survives an outage in each node's memory.

Invariants: imports nothing from relay but :mod:`relay.plugin` and :mod:`relay.policies`; every key it
writes carries a TTL; a lease taken is in the attempt's ``notes`` before anything else can fail, so
``after_attempt`` gives it back whatever happens.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator
from relay.policies.shaping import (
    AdaptivePolicy,
    DestinationLimits,
    LimitsTable,
    Rate,
    SlowDown,
    cooldown_left,
    factor_at,
    format_rate,
    on_signal,
    parse_rate,
    recovered_at,
)

from relay.plugin import (
    CONTINUE,
    AttemptContext,
    AttemptFinished,
    DeliveryEvent,
    LimiterUnavailable,
    Plugin,
    PluginConfig,
    PluginHost,
    ValueStore,
    Verdict,
    get_logger,
)

log = get_logger(__name__)

DEFAULT_CONNECTIONS = 10
DEFAULT_RATE = "600/min"
#: Seconds an attempt is deferred when a fail-closed limiter cannot be reached.
UNAVAILABLE_RETRY = 60.0
#: Deferral jitter: up to this share of the rate interval, and never more than MAX_JITTER seconds.
JITTER_SHARE = 0.25
MAX_JITTER = 5.0
#: Each node tells the shared state a budget is in use at most this often (for the status command) …
SEEN_REFRESH = 300.0
#: … and the record lives this long without being refreshed.
SEEN_TTL = 86_400.0
#: Signals for one budget closer together than this on one node count once (a batch of recipients).
SIGNAL_DEBOUNCE = 1.0
#: Compare-and-set rounds before a signal is given up (another node keeps writing the same state).
CAS_TRIES = 5
#: A node forgets its local copy of a budget unused for this long (the shared state stays).
BUDGET_IDLE = 3600.0
#: Kept a little past full recovery, so that nodes with stale clocks still read a sensible state.
STATE_TTL_MARGIN = 60.0


# --------------------------------------------------------------------------------------------------
# Names in the shared storage (also read by `relay throttle status`)
# --------------------------------------------------------------------------------------------------

RATE_PREFIX = "throttle:rate:"
CONN_PREFIX = "throttle:conn:"
SLOW_PREFIX = "throttle:slow:"
SEEN_PREFIX = "throttle:seen:"


def budget_for_destination(destination: str) -> str:
    """The budget of an MX-set roll-up: the scheduler's destination label (``mx:10:mx1.example,…``)."""
    return destination


def budget_for_domain(domain: str) -> str:
    return f"domain:{domain.lower().rstrip('.')}"


# --------------------------------------------------------------------------------------------------
# Configuration: [plugins.throttle]
# --------------------------------------------------------------------------------------------------

class LimitsConfig(PluginConfig):
    """``{ connections = 10, rate = "600/min" }``; a key left out takes the default's value."""

    connections: int | None = Field(default=None, ge=0, le=100_000)
    rate: str | None = None

    @field_validator("rate")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    def resolve(self, fallback: DestinationLimits) -> DestinationLimits:
        rate = fallback.rate if self.rate is None else parse_rate(self.rate)
        connections = fallback.connections if self.connections is None else self.connections
        return DestinationLimits(connections, rate)


class ThrottleConfig(PluginConfig):
    default: LimitsConfig = LimitsConfig()
    destinations: dict[str, LimitsConfig] = Field(default_factory=dict)
    rollup: Literal["mx", "domain"] = "mx"
    lease_ttl: float = Field(default=60.0, gt=0, le=3600)
    busy_retry: float = Field(default=5.0, gt=0, le=3600)
    adaptive: bool = True
    cut_factor: float = Field(default=0.5, gt=0, lt=1)
    cooldown: float = Field(default=3600.0, gt=0, le=30 * 86_400)
    recovery_step: float = Field(default=0.25, gt=0, le=1)
    recovery_interval: float = Field(default=0.0, ge=0, le=30 * 86_400)
    min_factor: float = Field(default=0.05, gt=0, le=1)
    cut_hold: float = Field(default=120.0, ge=0, le=30 * 86_400)
    state_refresh: float = Field(default=5.0, ge=0, le=3600)

    @field_validator("destinations")
    @classmethod
    def _valid_destinations(cls, value: dict[str, LimitsConfig]) -> dict[str, LimitsConfig]:
        placeholder = DestinationLimits(0, None)
        LimitsTable(placeholder, {key: placeholder for key in value})  # raises on a bad or duplicate key
        return value

    def limits_table(self) -> LimitsTable:
        builtin = DestinationLimits(DEFAULT_CONNECTIONS, parse_rate(DEFAULT_RATE))
        default = self.default.resolve(builtin)
        return LimitsTable(default, {key: entry.resolve(default) for key, entry in self.destinations.items()})

    def adaptive_policy(self) -> AdaptivePolicy:
        return AdaptivePolicy(cut_factor=self.cut_factor, cooldown=self.cooldown,
                              recovery_step=self.recovery_step,
                              recovery_interval=self.recovery_interval or self.cooldown / 4,
                              min_factor=self.min_factor, cut_hold=self.cut_hold)


# --------------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Lease:
    """One connection slot taken for one attempt."""

    key: str
    holder: str
    limit: int
    budget: str


@dataclass(slots=True)
class _Budget:
    """What one node keeps about one budget: its limits, a cached copy of the shared slow-down, the rate
    it enforced last (to log changes) and the spacing of its deferrals."""

    name: str
    limits: DestinationLimits
    match: str | None
    slow: SlowDown | None = None
    fetched_at: float = -math.inf
    enforced: Rate | None = None
    enforced_known: bool = False
    seen_at: float = -math.inf
    next_retry: float = 0.0
    last_signal: float = -math.inf
    used_at: float = 0.0


class ThrottlePlugin(Plugin[ThrottleConfig]):
    name = "throttle"
    Config = ThrottleConfig
    on_error = "continue"

    def __init__(self, config: ThrottleConfig, host: PluginHost, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(config, host)
        self._clock = clock
        self._table = config.limits_table()
        self._policy = config.adaptive_policy()
        self._values: ValueStore | None = host.limiter if isinstance(host.limiter, ValueStore) else None
        self._node = f"{host.hostname}:{os.getpid()}:{secrets.token_hex(4)}"
        self._serial = itertools.count(1)
        self._budgets: dict[str, _Budget] = {}
        self._held: dict[str, Lease] = {}  # by holder: the leases to renew
        self._maintainer: asyncio.Task[None] | None = None
        # Deferrals by reason (connections, rate, limiter_unavailable) and rate cuts since start: plain
        # counters the relay's /metrics reads at scrape time (a plugin imports nothing of the relay).
        self.deferrals: collections.Counter[str] = collections.Counter()
        self.rate_cuts = 0

    async def start(self) -> None:
        self._maintainer = asyncio.create_task(self._maintain(), name="throttle-leases")

    async def stop(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        await self._give_back(list(self._held.values()))

    # -- before an attempt --------------------------------------------------------------------------
    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        now = self._clock()
        held: list[Lease] = []
        ctx.notes[self.name] = held  # before any lease is taken: after_attempt finds whatever was
        try:
            for budget in self._budgets_for(ctx, now):
                verdict = await self._admit(budget, held, now)
                if verdict is not None:
                    await self._give_back(held)
                    return verdict
        except LimiterUnavailable as exc:
            # Only a fail-closed limiter raises for a decision (fail-open answers "allowed"): honour it.
            await self._give_back(held)
            self.deferrals["limiter_unavailable"] += 1
            return Verdict.tempfail("Destination busy, will retry", code=451, enhanced="4.4.5",
                                    reason=f"throttle: rate limiter unavailable ({exc})",
                                    retry_at=now + UNAVAILABLE_RETRY + random.uniform(0, MAX_JITTER))
        return CONTINUE

    async def _admit(self, budget: _Budget, held: list[Lease], now: float) -> Verdict | None:
        """Take a slot and a message from ``budget``; a deferral verdict when it has no room."""
        await self._refresh(budget, now)
        limits = budget.limits
        if limits.connections:
            lease = Lease(CONN_PREFIX + budget.name, f"{self._node}:{next(self._serial)}", limits.connections,
                          budget.name)
            held.append(lease)
            self._held[lease.holder] = lease
            decision = await self.host.limiter.acquire(lease.key, lease.limit, lease.holder, self.config.lease_ttl)
            if not decision.allowed:
                return self._busy(budget, decision.current, now)
        rate = self._enforced_rate(budget, now)
        if rate is not None:
            decision = await self.host.limiter.hit(RATE_PREFIX + budget.name, rate.count, rate.period)
            if not decision.allowed:
                return self._over_rate(budget, rate, decision.retry_after, now)
        return None

    def _busy(self, budget: _Budget, in_use: int, now: float) -> Verdict:
        self.deferrals["connections"] += 1
        retry = self.config.busy_retry
        return Verdict.tempfail("Destination busy, will retry", code=451, enhanced="4.4.5",
                                reason=f"throttle: {budget.name}: {in_use} of {budget.limits.connections} "
                                       f"connections in use",
                                retry_at=now + retry + random.uniform(0, retry / 2))

    def _over_rate(self, budget: _Budget, rate: Rate, retry_after: float, now: float) -> Verdict:
        self.deferrals["rate"] += 1
        interval = rate.interval
        wait = retry_after if math.isfinite(retry_after) else interval
        # Space this node's deferrals one interval apart, but never more than one period ahead.
        start = max(now + wait, min(budget.next_retry, now + wait + rate.period))
        retry_at = start + random.uniform(0, min(interval * JITTER_SHARE, MAX_JITTER))
        budget.next_retry = retry_at + interval
        return Verdict.tempfail("Destination rate limit, will retry", code=451, enhanced="4.4.5",
                                reason=f"throttle: {budget.name}: rate {rate} reached, retry in "
                                       f"{retry_at - now:.1f}s",
                                retry_at=retry_at)

    # -- after an attempt ---------------------------------------------------------------------------
    async def after_attempt(self, event: AttemptFinished) -> None:
        held = event.attempt.notes.pop(self.name, None)
        if held:
            await self._give_back(held)

    async def _give_back(self, leases: Sequence[Lease]) -> None:
        for lease in list(leases):
            self._held.pop(lease.holder, None)
            await self._release(lease)
        if isinstance(leases, list):
            leases.clear()

    async def _release(self, lease: Lease) -> None:
        try:
            await self.host.limiter.release(lease.key, lease.holder)
        except LimiterUnavailable as exc:  # the lease lapses by its TTL
            log.warning("throttle_release_failed", destination=lease.budget, error=str(exc))

    # -- the adaptive slow-down ---------------------------------------------------------------------
    async def deferred(self, event: DeliveryEvent) -> None:
        verdict = event.classification
        if not self.config.adaptive or verdict is None or not verdict.rate_signal:
            return
        now = self._clock()
        domain = event.recipient.domain
        name = budget_for_domain(domain) if self.config.rollup == "domain" \
            else budget_for_destination(event.destination)
        budget = self._budget(name, [domain], now)
        if budget.limits.rate is None or now - budget.last_signal < SIGNAL_DEBOUNCE:
            return
        budget.last_signal = now
        reason = f"{verdict.category} ({verdict.enhanced}" + (f", rule {verdict.rule})" if verdict.rule else ")")
        await self._record_signal(budget, now, reason)

    async def _record_signal(self, budget: _Budget, now: float, reason: str) -> None:
        if self._values is None:
            state: SlowDown | None = on_signal(self._policy, budget.slow, now, reason)
        else:
            state = await self._store_signal(budget, now, reason)
        if state is None:
            return
        budget.slow, budget.fetched_at = state, now
        if state.cut_at != now:
            log.debug("throttle_cooldown_restarted", destination=budget.name, reason=reason)
        self._enforced_rate(budget, now)  # logs the change, if this was a cut

    async def _store_signal(self, budget: _Budget, now: float, reason: str) -> SlowDown | None:
        """Read-modify-write of the shared slow-down, by compare-and-set (several nodes may signal)."""
        assert self._values is not None
        key = SLOW_PREFIX + budget.name
        try:
            for _ in range(CAS_TRIES):
                raw = await self._values.get_value(key)
                state = on_signal(self._policy, SlowDown.from_json(raw), now, reason)
                ttl = max(1.0, recovered_at(self._policy, state) - now + STATE_TTL_MARGIN)
                if await self._values.replace_value(key, raw, state.to_json(), ttl):
                    return state
        except LimiterUnavailable as exc:
            # Slow down here at least; the other nodes learn of it from their own signals.
            log.warning("throttle_signal_not_shared", destination=budget.name, error=str(exc))
            return on_signal(self._policy, budget.slow, now, reason)
        log.warning("throttle_signal_contended", destination=budget.name, tries=CAS_TRIES)
        return None

    def _enforced_rate(self, budget: _Budget, now: float) -> Rate | None:
        """The rate in force for ``budget`` now; logs one line when it differs from the last one used."""
        configured = budget.limits.rate
        if configured is None:
            return None
        factor = factor_at(self._policy, budget.slow, now) if self.config.adaptive else 1.0
        current = configured.scaled(factor)
        previous = budget.enforced if budget.enforced_known else configured
        if current != previous:
            self._log_change(budget, previous, current, factor, now)
        budget.enforced, budget.enforced_known = current, True
        return current

    def _log_change(self, budget: _Budget, old: Rate | None, new: Rate, factor: float, now: float) -> None:
        slowed = old is not None and new.per_second < old.per_second
        slow = budget.slow
        if slowed:
            reason = f"slow-down signal: {slow.reason}" if slow is not None and slow.reason else "slow-down signal"
        else:
            reason = "recovered" if factor >= 1.0 else "recovering after the cool-down"
        emit = log.warning if slowed else log.info
        self.rate_cuts += slowed
        emit("throttle_rate_changed", destination=budget.name, old_rate=format_rate(old), new_rate=str(new),
             factor=round(factor, 4), reason=reason,
             cooldown_left=round(cooldown_left(self._policy, slow, now), 1))

    # -- budgets and shared state -------------------------------------------------------------------
    def _budgets_for(self, ctx: AttemptContext, now: float) -> list[_Budget]:
        domains = sorted({rcpt.domain.lower() for rcpt in ctx.recipients})
        if self.config.rollup == "domain":
            return [self._budget(budget_for_domain(domain), [domain], now) for domain in domains]
        return [self._budget(budget_for_destination(ctx.destination), domains, now)]

    def _budget(self, name: str, domains: Sequence[str], now: float) -> _Budget:
        match, limits = next(((key, found) for key, found in map(self._table.match, domains) if key is not None),
                             (None, self._table.default))
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = _Budget(name, limits, match)
        elif budget.match is None and match is not None:
            # The first configured domain seen at a rolled-up destination sets its limits (sticky).
            budget.limits, budget.match, budget.seen_at = limits, match, -math.inf
            budget.enforced_known = False  # a new configured rate, not a change to log
        budget.used_at = now
        return budget

    async def _refresh(self, budget: _Budget, now: float) -> None:
        """Re-read the shared slow-down (at most every ``state_refresh`` s) and say the budget is in use."""
        if self._values is None:
            return
        try:
            if self.config.adaptive and now - budget.fetched_at >= self.config.state_refresh:
                budget.fetched_at = now
                budget.slow = SlowDown.from_json(await self._values.get_value(SLOW_PREFIX + budget.name))
            if now - budget.seen_at >= SEEN_REFRESH:
                budget.seen_at = now
                await self._values.set_value(SEEN_PREFIX + budget.name, self._seen_record(budget), SEEN_TTL)
        except LimiterUnavailable as exc:
            # The limiter logs outages itself; the cached state stays in force meanwhile.
            log.debug("throttle_state_unavailable", destination=budget.name, error=str(exc))

    def _seen_record(self, budget: _Budget) -> str:
        return json.dumps({"connections": budget.limits.connections, "rate": format_rate(budget.limits.rate),
                           "match": budget.match, "node": self._node}, separators=(",", ":"), sort_keys=True)

    # -- lease renewal and house-keeping --------------------------------------------------------------
    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_ttl / 3)
            try:
                await self._renew_leases()
                self._forget_idle_budgets(self._clock())
            except asyncio.CancelledError:
                raise
            except Exception:  # the renewal loop must outlive any one failure
                log.exception("throttle_maintenance_failed")

    async def _renew_leases(self) -> None:
        for lease in list(self._held.values()):
            if lease.holder not in self._held:
                continue
            try:
                decision = await self.host.limiter.acquire(lease.key, lease.limit, lease.holder,
                                                           self.config.lease_ttl)
            except LimiterUnavailable as exc:
                log.warning("throttle_lease_renewal_failed", error=str(exc))
                return
            if lease.holder not in self._held:
                await self._release(lease)  # given back while renewing: the renewal may have re-added it
            elif not decision.allowed:
                log.warning("throttle_lease_lost", destination=lease.budget, holder=lease.holder)

    def _forget_idle_budgets(self, now: float) -> None:
        for name in [n for n, b in self._budgets.items() if now - b.used_at > BUDGET_IDLE]:
            del self._budgets[name]


PLUGIN = ThrottlePlugin


# --------------------------------------------------------------------------------------------------
# Status (read from the shared state; what `relay throttle status` prints)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DestinationStatus:
    destination: str           # the budget: a destination label or "domain:<name>"
    match: str | None          # the configured domain whose limits apply (None: default)
    configured_rate: str
    effective_rate: str
    factor: float
    cooldown_left: float       # seconds
    connections_in_use: int
    connections_limit: int     # 0: no limit
    reason: str                # why it was last slowed down ("" if never)
    seen: bool                 # False: configured, no relay has used it yet (MX roll-up)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


async def read_status(values: ValueStore, config: ThrottleConfig, now: float) -> list[DestinationStatus]:
    """Every budget with a live "seen" record or slow-down, plus the configured domains not seen yet."""
    table = config.limits_table()
    policy = config.adaptive_policy()
    seen = {key[len(SEEN_PREFIX):]: raw for key, raw in (await values.scan_values(SEEN_PREFIX)).items()}
    slow = {key[len(SLOW_PREFIX):]: raw for key, raw in (await values.scan_values(SLOW_PREFIX)).items()}
    rows = []
    for name in sorted(set(seen) | set(slow)):
        match, limits = _recorded_limits(seen.get(name), name, table)
        state = SlowDown.from_json(slow.get(name))
        factor = factor_at(policy, state, now) if config.adaptive else 1.0
        effective = limits.rate.scaled(factor) if limits.rate is not None else None
        rows.append(DestinationStatus(
            destination=name, match=match, configured_rate=format_rate(limits.rate),
            effective_rate=format_rate(effective), factor=factor,
            cooldown_left=cooldown_left(policy, state, now), connections_in_use=await values.slots_held(
                CONN_PREFIX + name), connections_limit=limits.connections,
            reason=state.reason if state is not None else "", seen=name in seen))
    matched = {row.match for row in rows} | {row.destination for row in rows}
    for key, limits in sorted(table.overrides.items()):
        if key not in matched and budget_for_domain(key) not in matched:
            rows.append(DestinationStatus(key, key, format_rate(limits.rate), format_rate(limits.rate), 1.0, 0.0,
                                          0, limits.connections, "", seen=False))
    return rows


def _recorded_limits(raw: str | None, name: str, table: LimitsTable) -> tuple[str | None, DestinationLimits]:
    """The limits a relay recorded for a budget; else what this configuration would give it."""
    if raw:
        try:
            data = json.loads(raw)
            match = data.get("match")
            return (match if isinstance(match, str) else None,
                    DestinationLimits(int(data["connections"]), parse_rate(str(data["rate"]))))
        except (ValueError, TypeError, KeyError):
            pass
    if name.startswith("domain:"):
        return table.match(name[len("domain:"):])
    return None, table.default
