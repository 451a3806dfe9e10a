"""The ``[delivery]`` table of relay.toml: how outbound mail is sent, retried, paused and kept.

Layout in relay.toml (every key optional, defaults below and in ``relay.toml.example``)::

    [delivery]
    hostname = ""                 # EHLO name; empty: [server].hostname
    [delivery.concurrency]        # total / per_destination connections
    [delivery.timeouts]           # RFC 5321 4.5.3.2 per-stage timeouts
    [delivery.retry]              # schedule, max_lifetime, delay_warning_after
    [delivery.retention]          # how long finished messages and attempt history are kept
    [delivery.dns]                # nameservers, timeout, allow_private, max_hosts
    [delivery.tls]                # opportunistic plaintext-fallback memory, extra CA file
    [delivery.circuit_breaker]    # failures before a destination pauses, pause length
    [delivery.routes]             # default = {kind = "mx"}; domains."example.com" = {kind = …}
    [delivery.classification]     # rules = [{…}] tried before the shipped bounce rules

Invariants:
- This module imports nothing from ``relay.settings`` (which imports it) and only pure policies, so there
  is no import cycle; it checks routes, the retry schedule and classification rules with the policies that
  will use them, so a bad value is reported at start-up with its key, not at the first delivery.
- Every model is frozen and refuses unknown keys, like every other table of relay.toml.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

Seconds = Annotated[float, Field(gt=0)]
NonNegativeSeconds = Annotated[float, Field(ge=0)]

DAY = 86_400.0

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def check_host_name(value: str) -> str:
    """A name we put in SMTP lines and headers (greeting, EHLO, Received:, DSNs): a DNS host name or an
    address literal ([192.0.2.1], [IPv6:2001:db8::1]), ASCII, nothing else — a CR/LF or a space in it would
    inject protocol lines or header fields. Raises ValueError; returns the value unchanged."""
    if value.startswith("[") and value.endswith("]"):
        literal = value[1:-1]
        literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
        try:
            ipaddress.ip_address(literal)
        except ValueError:
            raise ValueError("must be a host name or an address literal like [192.0.2.1]") from None
        return value
    labels = value.rstrip(".").split(".") if value else [""]
    if len(value) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError("must be a host name (letters, digits, hyphens, dots; no spaces or control "
                         "characters) or an address literal like [192.0.2.1]")
    return value


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConcurrencySettings(_Table):
    # Connections open at once, over all destinations.
    total: int = Field(default=100, ge=1, le=10_000)
    # Connections open at once to one destination (an MX set, a host or a smarthost).
    per_destination: int = Field(default=10, ge=1, le=1_000)


class TimeoutSettings(_Table):
    """RFC 5321 4.5.3.2 minimums (the connect timeout is ours; the RFC leaves it open)."""

    connect: Seconds = 30.0
    greeting: Seconds = 300.0
    ehlo: Seconds = 300.0          # also STARTTLS, AUTH, RSET and QUIT
    mail: Seconds = 300.0
    rcpt: Seconds = 300.0
    data_init: Seconds = 120.0     # DATA until the 354
    data_block: Seconds = 180.0    # writing the message: no progress for this long aborts
    data_end: Seconds = 600.0      # the final "." until the reply


class RetrySettings(_Table):
    # Delays after the 1st, 2nd, … failed attempt; "*" repeats the last one (policies.retry syntax).
    schedule: str = "5m, 10m, 20m, 40m, 1h, 2h, 4h*"
    # A recipient not delivered this long after reception expires (bounce with 4.4.7).
    max_lifetime: Seconds = 5 * DAY
    # Send one "delayed" DSN once a recipient has waited this long; 0 disables delay warnings.
    delay_warning_after: NonNegativeSeconds = 4 * 3600.0

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        from relay.policies.retry import RetrySchedule  # pure policy; imported late to keep start-up lean

        RetrySchedule.parse(value)  # raises ValueError naming the bad entry
        return value


class RetentionSettings(_Table):
    # Messages whose recipients are all final are deleted this long after they finished.
    finished_messages: Seconds = 7 * DAY
    # Attempt history rows are kept this long.
    history: Seconds = 30 * DAY
    # How often the purge runs.
    purge_interval: Seconds = 3600.0


class DnsSettings(_Table):
    # "ip" or "ip:port" entries; empty: the system resolver (/etc/resolv.conf).
    nameservers: list[str] = Field(default_factory=list)
    timeout: Seconds = 5.0
    # Deliver to private/loopback addresses found in DNS (internal deployments, tests).
    allow_private: bool = False
    # MX hosts tried per domain (each at each of its addresses).
    max_hosts: int = Field(default=5, ge=1, le=50)


class TlsDeliverySettings(_Table):
    # After a failed STARTTLS handshake on an opportunistic route, the host is sent to in plaintext
    # directly for this long (the handshake is not retried on every connection).
    plaintext_fallback_memory: Seconds = 3600.0
    # Extra CA certificates (PEM) trusted for "verified" routes, besides the system store.
    ca_file: Path | None = None


class CircuitBreakerSettings(_Table):
    # Consecutive connection-level failures that pause a destination.
    failures: int = Field(default=5, ge=1)
    # First pause; each failed probe after a pause doubles it, up to max_open.
    open_for: Seconds = 300.0
    max_open: Seconds = 3600.0


class RouteSettings(_Table):
    """Routes as tables ``Route.parse`` understands (kind mx / host / smarthost / reject)."""

    default: dict[str, Any] = Field(default_factory=lambda: {"kind": "mx"})
    domains: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("default")
    @classmethod
    def _valid_default(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_route(value, "default")
        return value

    @field_validator("domains")
    @classmethod
    def _valid_domains(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for domain, table in value.items():
            _check_route(table, domain)
        return {domain.lower().rstrip("."): table for domain, table in value.items()}


def _check_route(table: dict[str, Any], where: str) -> None:
    from relay.policies.routing import Route  # pure policy; see the module docstring

    try:
        Route.parse(table)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"route {where!r}: {exc}") from None


class ClassificationSettings(_Table):
    # Bounce-classification rules tried before the shipped ones (see policies/bounce_rules.toml).
    rules: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _valid_rules(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from relay.policies.bounce import parse_rules  # pure policy; see the module docstring

        parse_rules(value, "rules")
        return value


class DeliverySettings(_Table):
    """The whole ``[delivery]`` table."""

    # Name sent in EHLO/HELO and used as the reporting MTA of DSNs; empty: [server].hostname.
    hostname: str = ""
    concurrency: ConcurrencySettings = ConcurrencySettings()
    # Recipients leased per claim from the queue store.
    claim_batch: int = Field(default=200, ge=1, le=10_000)
    # How long a claim is leased. A live worker renews what it holds every lease_seconds/3; a crashed
    # worker's claims come back after at most this long.
    lease_seconds: Seconds = 300.0
    # Messages sent over one connection before it is closed and a new one opened.
    max_messages_per_connection: int = Field(default=100, ge=1)
    # Recipients per SMTP transaction (RFC 5321 4.5.3.1.8: servers accept at least 100).
    max_recipients_per_transaction: int = Field(default=100, ge=1, le=1000)
    # An idle connection is kept this long for the next message to the same destination.
    idle_timeout: Seconds = 5.0
    timeouts: TimeoutSettings = TimeoutSettings()
    retry: RetrySettings = RetrySettings()
    retention: RetentionSettings = RetentionSettings()
    dns: DnsSettings = DnsSettings()
    tls: TlsDeliverySettings = TlsDeliverySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()
    routes: RouteSettings = RouteSettings()
    classification: ClassificationSettings = ClassificationSettings()

    @field_validator("hostname")
    @classmethod
    def _host_name(cls, value: str) -> str:
        return check_host_name(value) if value else value

    def ehlo_hostname(self, server_hostname: str) -> str:
        """The name to greet with: ``hostname`` when set, else the server's."""
        return self.hostname or server_hostname


__all__ = [
    "CircuitBreakerSettings",
    "ClassificationSettings",
    "ConcurrencySettings",
    "DeliverySettings",
    "DnsSettings",
    "RetentionSettings",
    "RetrySettings",
    "RouteSettings",
    "TimeoutSettings",
    "TlsDeliverySettings",
]
