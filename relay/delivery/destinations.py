"""Destinations: where claimed recipients queue up inside one delivery service, and their circuit breakers.

A destination is what one connection can serve: for an ``mx`` route the *set* of MX host names (so two
domains hosted by the same provider share connections, RFC 5321 5.1 ordering kept), for ``host`` and
``smarthost`` routes the host itself. Its key also carries the port, the TLS policy and the username, so
that mail under different policies never shares a session.

A :class:`Job` is one message's recipients for one destination — what one transaction carries. Jobs
queue on their :class:`Destination`; the scheduler's workers take them one after the other over a
connection, so a connection carries many messages.

:class:`CircuitBreaker`: after ``failures`` consecutive connection-level failures (connect, greeting,
EHLO, TLS, AUTH) the destination is *open* (paused) for ``open_for`` seconds; once that has passed the
next attempt is a probe: success closes the breaker, failure re-opens it for twice as long (up to
``max_open``).

Invariants: everything here is in-process state of one service (each node pauses on its own evidence);
nothing here does I/O except closing idle connections.

Throughput: a destination remembers when its last jobs ended and how many recipients they carried, and how
long its oldest running job has been going (:meth:`Destination.rate`), so that the scheduler can keep a
slow destination from holding more claims than it can work through soon (see ``_trim_backlog`` there).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from relay.delivery.client import DeliveryConnection, Target
from relay.delivery.mx import MxHost
from relay.policies.routing import Route
from relay.store.base import Claim, StoredMessage

DestinationKey = tuple[str | int | None, ...]

#: Finished jobs remembered per destination for its rate.
RATE_SAMPLES = 64


def destination_key(route: Route, hosts: Sequence[MxHost] = ()) -> DestinationKey:
    """The identity of a destination: route kind, port, TLS policy, credentials and the host set."""
    if route.kind == "mx":
        # Sorted by (preference, name): equal-preference hosts come back shuffled on every lookup.
        names = tuple(f"{h.preference}:{h.name}" for h in sorted(hosts, key=lambda h: (h.preference, h.name)))
        return ("mx", route.port, route.tls, route.username, *names)
    return (route.kind, route.port, route.tls, route.username, route.host)


def destination_label(key: DestinationKey) -> str:
    """A short human name for logs: ``mx:10:mx1.example.org,20:mx2.example.org`` or ``smarthost:relay.isp``."""
    kind, port = key[0], key[1]
    hosts = ",".join(str(part) for part in key[4:])
    return f"{kind}:{hosts}" + ("" if port == 25 else f":{port}")


@dataclass(slots=True)
class Job:
    """Recipients of one message for one destination: one transaction."""

    message: StoredMessage
    claims: list[Claim]
    route: Route

    @property
    def lease_until(self) -> float:
        return min(claim.lease_until for claim in self.claims)

    @property
    def recipient_ids(self) -> list[int]:
        return [claim.recipient.id for claim in self.claims]


def jobs_for(claims: Sequence[Claim], route: Route, max_recipients: int) -> list[Job]:
    """Group a destination's claims by message, at most ``max_recipients`` per transaction."""
    by_message: dict[str, list[Claim]] = {}
    for claim in claims:
        by_message.setdefault(claim.message.id, []).append(claim)
    jobs = []
    for group in by_message.values():
        for start in range(0, len(group), max_recipients):
            chunk = group[start:start + max_recipients]
            jobs.append(Job(chunk[0].message, chunk, route))
    return jobs


@dataclass(slots=True)
class CircuitBreaker:
    failures_to_open: int
    open_for: float
    max_open: float
    consecutive_failures: int = 0
    open_until: float = 0.0
    current_open: float = 0.0   # the length of the present (or last) pause; 0: never opened
    probing: bool = False       # the pause is over and the next attempt decides

    def is_open(self, now: float) -> bool:
        if self.open_until and now < self.open_until:
            return True
        if self.open_until:
            self.open_until = 0.0
            self.probing = True
        return False

    def record_failure(self, now: float) -> bool:
        """Count a connection-level failure; True when this failure opened the breaker."""
        self.consecutive_failures += 1
        if self.probing or self.consecutive_failures >= self.failures_to_open:
            self.current_open = (min(self.current_open * 2, self.max_open) if self.probing and self.current_open
                                 else self.open_for)
            self.open_until = now + self.current_open
            self.probing = False
            self.consecutive_failures = 0
            return True
        return False

    def record_success(self) -> bool:
        """A session was set up; True when this closed a breaker that had been open."""
        was_recovering = self.probing or self.current_open > 0
        self.consecutive_failures = 0
        self.probing = False
        self.open_until = 0.0
        self.current_open = 0.0
        return was_recovering


@dataclass(slots=True)
class IdleConnection:
    connection: DeliveryConnection
    since: float


@dataclass(slots=True)
class Destination:
    """Queued jobs, running workers, idle connections and the breaker of one destination."""

    key: DestinationKey
    route: Route
    targets: list[Target]
    breaker: CircuitBreaker
    queue: deque[Job] = field(default_factory=deque)
    workers: int = 0
    idle: list[IdleConnection] = field(default_factory=list)
    last_used: float = 0.0
    # Recipients of the jobs running now and when each of those started, and (end, duration, recipients)
    # of the last finished jobs: what rate() is computed from.
    running: int = 0
    started: list[float] = field(default_factory=list)
    finished: deque[tuple[float, float, int]] = field(default_factory=lambda: deque(maxlen=RATE_SAMPLES))

    def job_started(self, now: float, recipients: int) -> None:
        self.running += recipients
        self.started.append(now)

    def job_finished(self, started: float, now: float, recipients: int) -> None:
        self.running -= recipients
        with contextlib.suppress(ValueError):
            self.started.remove(started)
        self.finished.append((now, now - started, recipients))

    @property
    def queued(self) -> int:
        """Recipients waiting in the queue (not yet started)."""
        return sum(len(job.claims) for job in self.queue)

    def rate(self, now: float, concurrency: int) -> float | None:
        """Recipients per second this destination gets through with ``concurrency`` connections, or None
        while nothing is known (no job finished in the last minute and none running).

        ``concurrency`` x recipients per job / mean job duration, over the recent jobs and the running ones
        (a running job counts with the time it has taken so far: a tarpit holding every connection shows
        a low rate long before its first timeout).
        """
        recent = [entry for entry in self.finished if now - entry[0] <= 60.0]
        durations = [duration for _, duration, _ in recent] + [now - start for start in self.started]
        if not durations:
            return None
        jobs = len(recent) + len(self.started)
        per_job = (sum(count for _, _, count in recent) + self.running) / jobs
        mean = max(sum(durations) / len(durations), 0.001)
        return concurrency * max(per_job, 1.0) / mean

    @property
    def label(self) -> str:
        return destination_label(self.key)

    def take_idle(self) -> DeliveryConnection | None:
        """The most recently parked connection that is still usable (stale ones are dropped)."""
        while self.idle:
            parked = self.idle.pop()
            if parked.connection.usable:
                return parked.connection
            parked.connection.close_nowait()
        return None

    def park(self, connection: DeliveryConnection, now: float) -> None:
        self.idle.append(IdleConnection(connection, now))

    def expired_idle(self, now: float, idle_timeout: float) -> Iterator[DeliveryConnection]:
        """Remove and yield the parked connections idle for longer than ``idle_timeout``."""
        keep = []
        for parked in self.idle:
            if now - parked.since >= idle_timeout or not parked.connection.usable:
                yield parked.connection
            else:
                keep.append(parked)
        self.idle = keep

    def drain_idle(self) -> list[DeliveryConnection]:
        connections = [parked.connection for parked in self.idle]
        self.idle = []
        return connections

    def take_queue(self) -> list[Job]:
        jobs = list(self.queue)
        self.queue.clear()
        return jobs

    @property
    def is_quiet(self) -> bool:
        """Nothing queued, running or parked: the entry may be forgotten (unless its breaker matters)."""
        return not self.queue and self.workers == 0 and not self.idle


__all__ = [
    "CircuitBreaker",
    "Destination",
    "DestinationKey",
    "Job",
    "destination_key",
    "destination_label",
    "jobs_for",
]
