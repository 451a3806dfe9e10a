"""The tables of relay.toml for the event outbox and its consumers: ``[events]``, ``[[webhooks]]``, ``[stats]``
and ``[alerts]`` (every key with its default in ``relay.toml.example``).

Invariants:
- This module imports nothing from ``relay.settings`` (which imports it), so there is no import cycle.
- Every model is frozen and refuses unknown keys, like every other table of relay.toml.
- A webhook's ``secret`` is a ``SecretStr`` (never printed by a repr or a validation error);
  ``relay.settings.placeholder_secrets`` refuses the start while one still reads CHANGE-ME.
- Rates are percentages (``5.0`` is 5 %); bounce and complaint rates alert *above* their thresholds
  (warning <= critical), the delivery rate *below* them (warning >= critical).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Seconds = Annotated[float, Field(gt=0)]
DAY = 86_400.0

#: Every event type the relay writes; a webhook's ``events`` filter may name only these.
EVENT_TYPES = ("queued", "delivered", "deferred", "bounced", "expired", "dropped", "suppressed", "opened",
               "clicked", "unsubscribed", "complained", "alert")


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventsSettings(_Table):
    """``[events]``: the outbox and the webhook loop (run by every node with role delivery or all)."""

    # Events older than this are deleted with their webhook deliveries (seconds; 0: kept for ever).
    retention: float = Field(default=30 * DAY, ge=0)
    # Events fanned out to the endpoints per transaction.
    dispatch_batch: int = Field(default=500, ge=1, le=100_000)
    # Deliveries one node claims for one endpoint at a time.
    claim_batch: int = Field(default=50, ge=1, le=10_000)
    # How often the loop looks for new events and due retries (seconds).
    poll_interval: Seconds = 1.0


class WebhookSettings(_Table):
    """One ``[[webhooks]]`` endpoint."""

    # The endpoint's name in logs, the CLI and the store; default: the URL's host and path.
    name: str = ""
    url: str
    # Event types sent to it; empty: every type.
    events: list[str] = Field(default_factory=list)
    # HMAC-SHA256 key of the X-Relay-Signature header; `relay init`-style random, at least 16 characters.
    secret: SecretStr
    # Previous secrets, also signed with while receivers switch over (each adds a v1= to the header).
    old_secrets: list[SecretStr] = Field(default_factory=list)
    # Seconds one POST may take, connection included.
    timeout: Seconds = 10.0
    enabled: bool = True
    # POSTs in flight to this endpoint at once, per relay node.
    concurrency: int = Field(default=4, ge=1, le=256)
    # An event is retried this long after it was queued for the endpoint, then dead-lettered (seconds).
    retry_for: Seconds = DAY
    # Back-off: the first retry after about backoff_first seconds, doubling up to backoff_max (jittered).
    backoff_first: Seconds = 10.0
    backoff_max: Seconds = 3600.0
    # Consecutive failed POSTs that pause the endpoint (0: never), and for how long (seconds).
    pause_after: int = Field(default=20, ge=0)
    pause_for: Seconds = 600.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("events")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(EVENT_TYPES))
        if unknown:
            raise ValueError(f"unknown event type {', '.join(unknown)} (known: {', '.join(EVENT_TYPES)})")
        return value

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        # The placeholder passes here so that the start refuses it with the usual message.
        if len(text) < 16 and text != "CHANGE-ME":
            raise ValueError("must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookSettings:
        if self.backoff_max < self.backoff_first:
            raise ValueError("backoff_max must not be below backoff_first")
        return self

    @property
    def label(self) -> str:
        """The name, or the URL's host and path (never its user information or query: they may be secret)."""
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.hostname}{port}{parts.path}"

    @property
    def types(self) -> frozenset[str] | None:
        return frozenset(self.events) if self.events else None


def check_webhook_names(webhooks: list[WebhookSettings]) -> None:
    """``ValueError`` when two endpoints share a name (deliveries are kept per name)."""
    labels = [hook.label for hook in webhooks]
    doubled = sorted({label for label in labels if labels.count(label) > 1})
    if doubled:
        raise ValueError(f"webhooks share a name: {', '.join(doubled)} (give each a distinct name)")


class StatsSettings(_Table):
    """``[stats]``: hourly aggregates materialised from the events."""

    # How often the current and previous hour are recomputed (and the alert checks run), in seconds.
    interval: Seconds = 300.0
    # Hours recomputed when the relay starts (hours it was down for are filled in).
    backfill_hours: int = Field(default=48, ge=0, le=24 * 90)
    # Materialised hours older than this are deleted (seconds; 0: kept for ever).
    retention: float = Field(default=400 * DAY, ge=0)


class Threshold(_Table):
    """A rate's warning and critical levels (percent), over a window, once the volume is enough to judge."""

    warning: float = Field(ge=0, le=100)
    critical: float = Field(ge=0, le=100)
    # Seconds of events judged: the whole hours overlapping the last `window` seconds.
    window: Seconds = 3600.0
    # Below this many messages in the rate's denominator nothing is judged.
    min_volume: int = Field(default=100, ge=1)


class AlertSettings(_Table):
    """``[alerts]``: anomaly checks over the hourly statistics, per sender and per destination domain."""

    enabled: bool = True
    # An alert of one kind for one domain is raised at most once per period (again earlier only when it
    # escalates from warning to critical), in seconds.
    period: Seconds = 3600.0
    # Bounced (hard + soft, expired included) of delivered + bounced, above the thresholds.
    bounce_rate: Threshold = Threshold(warning=5.0, critical=10.0)
    # Complaints of delivered, above the thresholds.
    complaint_rate: Threshold = Threshold(warning=0.05, critical=0.1, window=DAY, min_volume=1000)
    # Delivered of delivered + bounced + deferred attempts, below the thresholds.
    delivery_rate: Threshold = Threshold(warning=95.0, critical=90.0)

    @model_validator(mode="after")
    def _ordered(self) -> AlertSettings:
        for name in ("bounce_rate", "complaint_rate"):
            rule: Threshold = getattr(self, name)
            if rule.critical < rule.warning:
                raise ValueError(f"{name}: critical must not be below warning (the rate alerts above them)")
        if self.delivery_rate.critical > self.delivery_rate.warning:
            raise ValueError("delivery_rate: critical must not be above warning (the rate alerts below them)")
        return self


__all__ = ["EVENT_TYPES", "AlertSettings", "EventsSettings", "StatsSettings", "Threshold", "WebhookSettings",
           "check_webhook_names"]
