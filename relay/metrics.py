"""Prometheus metrics: the metric objects the SMTP side, the delivery loop and the store update.

The hot paths only increment counters and observe histograms (a lock and a dict lookup each); anything
that needs a query or a walk over state — queue sizes, open connections, the DNS cache counters, the
throttle's deferrals — is read at scrape time by the collectors in :mod:`relay.monitoring`. Every name
and label is listed in the README's "Operations" section.

Invariants:
- Label values come from small closed sets: listener names (configuration), SMTP stages (the command
  verbs the relay knows), reply codes and RFC 3463 codes (syntax-checked, else ``"other"``), outcomes,
  bounce categories (the classifier's rules), and destinations bounded by :class:`DestinationLabels`.
  No label ever carries an address, a message id or a client IP.
- The metrics live in this module's :data:`REGISTRY` (not prometheus_client's global one), so a library
  registering its own metrics cannot clash with ours; ``/metrics`` serves this registry plus the
  scrape-time collectors of the running relay.
- Destinations: a recipient domain gets its own label once it has been seen :data:`PROMOTE_AFTER` times
  while fewer than ``[http] metrics_destinations`` domains have one; every other domain is ``"other"``.
  A label once given is kept for the life of the process (a counter series must never be renamed), so
  the labelled set is, in practice, the busiest destinations of the first hours.
"""

from __future__ import annotations

import re
import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "AGE_EDGES", "OTHER", "REGISTRY", "DestinationLabels", "age_labels", "configure", "connection_opened",
    "connection_refused", "delivery_attempt", "delivery_outcome", "dsn_queued", "message_accepted",
    "outbound_connection",
    "smtp_rejection",
]

# The `_created` series double every counter for a timestamp nobody alerts on.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

OTHER = "other"
#: Queue age buckets (seconds since reception), as qshape: 5, 10, 20, … 1280 minutes, then older.
AGE_EDGES: tuple[float, ...] = tuple(minutes * 60.0 for minutes in (5, 10, 20, 40, 80, 160, 320, 640, 1280))
#: Outcomes of a recipient a destination needs before it gets a label of its own.
PROMOTE_AFTER = 10
_STATUS = re.compile(rb"^[245]\.\d{1,3}\.\d{1,3}$")
_CODE = re.compile(rb"^[2-5]\d\d$")

# -- SMTP side ----------------------------------------------------------------------------------------
CONNECTIONS_OPENED = Counter(
    "relay_smtp_connections_opened", "SMTP connections admitted (past the connection limits and the "
    "connect stage of the chain)", ["listener"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "relay_smtp_connections_refused", "SMTP connections refused before the greeting, by reason: "
    "listener_full, per_ip_connections, connection_rate, limiter_unavailable, chain", ["listener", "reason"],
    registry=REGISTRY)
MESSAGES_ACCEPTED = Counter(
    "relay_smtp_messages_accepted", "Messages committed to the queue and answered 250", ["listener"],
    registry=REGISTRY)
RECIPIENTS_ACCEPTED = Counter(
    "relay_smtp_recipients_accepted", "Recipients of the messages accepted", ["listener"], registry=REGISTRY)
MESSAGE_SIZE = Histogram(
    "relay_smtp_message_size_bytes", "Size of the messages accepted (with the Received: header)",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864), registry=REGISTRY)
REJECTIONS = Counter(
    "relay_smtp_rejections", "4xx/5xx replies sent to SMTP clients, by stage (the command answered; "
    "connect, data for the end of DATA), reply code and RFC 3463 status", ["stage", "code", "status"],
    registry=REGISTRY)
ENQUEUE_SECONDS = Histogram(
    "relay_store_enqueue_seconds", "Time from the end of DATA to the durable commit of the message "
    "(group commit included)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY)

# -- delivery -----------------------------------------------------------------------------------------
DELIVERIES = Counter(
    "relay_delivery_recipients", "Recipient outcomes recorded by the delivery loop: outcome delivered, "
    "deferred, bounced, expired or dropped; category from the bounce classifier (not_attempted for "
    "deferrals without an attempt, message_expired for expiry); destination: the recipient domain, "
    "bounded ([http] metrics_destinations, the rest \"other\")", ["outcome", "category", "destination"],
    registry=REGISTRY)
ATTEMPT_SECONDS = Histogram(
    "relay_delivery_attempt_duration_seconds", "One delivery attempt (one SMTP transaction, connection set-up "
    "included when it needed one), by result: delivered (every recipient), partial, temporary, permanent",
    ["result"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=REGISTRY)
DSNS = Counter("relay_delivery_dsns", "Delivery status notifications queued, by kind (failed, delayed)",
               ["kind"], registry=REGISTRY)
OUTBOUND_CONNECTIONS = Counter(
    "relay_delivery_connections", "Outbound connections opened, by result (ok, failed)", ["result"],
    registry=REGISTRY)

# -- process ------------------------------------------------------------------------------------------
EVENT_LOOP_LAG = Histogram(
    "relay_event_loop_lag_seconds", "How late a periodic sleep on the event loop woke up (time the loop "
    "was busy with something else)", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                                2.5, 5), registry=REGISTRY)


class DestinationLabels:
    """Maps recipient domains to a bounded set of label values (see the module docstring).

    Until the labelled set is full, unlabelled domains are counted in a space-saving sketch of
    ``capacity * 10`` entries (a domain arriving when it is full takes over the smallest count plus one,
    that count being its possible over-estimate: heavy hitters are never lost, the rare ones churn). A
    domain is promoted on its guaranteed count (count minus over-estimate), so a stream of one-off domains
    never promotes one. Once the labelled set is full the sketch is dropped: no more work.
    """

    def __init__(self, capacity: int = 20, promote_after: int = PROMOTE_AFTER) -> None:
        self._lock = threading.Lock()
        self.capacity = capacity
        self.promote_after = promote_after
        self._labelled: set[str] = set()
        self._counts: dict[str, tuple[int, int]] = {}  # domain -> (count, over-estimate)

    def label(self, domain: str) -> str:
        if domain in self._labelled:
            return domain
        if len(self._labelled) >= self.capacity or not domain:
            return OTHER
        with self._lock:
            return self._count(domain)

    def _count(self, domain: str) -> str:
        entry = self._counts.pop(domain, None)
        if entry is None:
            entry = (0, 0)
            if len(self._counts) >= self.capacity * 10:
                smallest = min(self._counts, key=lambda d: self._counts[d][0])
                floor = self._counts.pop(smallest)[0]
                entry = (floor, floor)  # the count it may have inherited is its error, never promoted on
        count, error = entry[0] + 1, entry[1]
        if count - error >= self.promote_after and len(self._labelled) < self.capacity:
            self._labelled.add(domain)
            if len(self._labelled) >= self.capacity:
                self._counts.clear()
            return domain
        self._counts[domain] = (count, error)
        return OTHER

    @property
    def labelled(self) -> frozenset[str]:
        return frozenset(self._labelled)


DESTINATIONS = DestinationLabels()


def age_labels(edges: tuple[float, ...] = AGE_EDGES) -> list[str]:
    """Label values of the age buckets: "0-5m", "5-10m", … "640-1280m", "1280m+"."""
    minutes = [f"{edge / 60:g}" for edge in edges]
    return [f"{low}-{high}m" for low, high in zip(["0", *minutes], minutes, strict=False)] + [f"{minutes[-1]}m+"]


def configure(destinations: int) -> None:
    """Apply ``[http] metrics_destinations`` (labels already given are kept)."""
    DESTINATIONS.capacity = destinations


# -- what the hot paths call ------------------------------------------------------------------------------
def connection_opened(listener: str) -> None:
    CONNECTIONS_OPENED.labels(listener).inc()


def connection_refused(listener: str, reason: str) -> None:
    CONNECTIONS_REFUSED.labels(listener, reason).inc()


def message_accepted(listener: str, recipients: int, size: int, commit_seconds: float) -> None:
    MESSAGES_ACCEPTED.labels(listener).inc()
    RECIPIENTS_ACCEPTED.labels(listener).inc(recipients)
    MESSAGE_SIZE.observe(size)
    ENQUEUE_SECONDS.observe(commit_seconds)


def smtp_rejection(stage: str, reply: bytes) -> None:
    """Count a 4xx/5xx reply; the code and RFC 3463 status are read from its text."""
    parts = reply.split(b" ", 2)
    code = parts[0][:3] if _CODE.match(parts[0][:3]) else b"other"
    status = parts[1] if len(parts) > 1 and _STATUS.match(parts[1]) else b"none"
    REJECTIONS.labels(stage, code.decode(), status.decode()).inc()


def delivery_outcome(outcome: str, category: str, domain: str) -> None:
    DELIVERIES.labels(outcome, category, DESTINATIONS.label(domain)).inc()


def delivery_attempt(result: str, seconds: float) -> None:
    ATTEMPT_SECONDS.labels(result).observe(seconds)


def dsn_queued(kind: str) -> None:
    DSNS.labels(kind).inc()


def outbound_connection(ok: bool) -> None:
    OUTBOUND_CONNECTIONS.labels("ok" if ok else "failed").inc()
