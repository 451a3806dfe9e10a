"""Raising an alert: a log line and an ``alert`` event in the outbox (so webhooks tell someone).

Whoever detects a condition — the stats job's anomaly checks, the webhook loop pausing an endpoint — calls
:meth:`Alerts.raise_alert`. The store decides atomically whether this (kind, scope) may be raised now
(:meth:`~relay.store.base.QueueStore.claim_alert`): at most once per ``[alerts] period``, again earlier only
when it escalates from warning to critical. That holds across every relay node on one database.

An alert event's ``data``: ``kind`` (``bounce_rate``, ``complaint_rate``, ``delivery_rate``,
``webhook_paused``), ``level`` (``warning`` / ``critical``), ``scope`` (``destination:gmail.com``,
``sender:example.com``, ``webhook:<name>``), ``summary`` (one human line) and the kind's own details.

Invariants: a failure to record an alert is logged and never raised to the caller (an alert must not stop
the work that noticed the problem); with ``[alerts] enabled = false`` nothing is recorded, but the log
line is still written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from relay.eventsconfig import AlertSettings
from relay.log import get_logger
from relay.store.base import Event, QueueStore, StoreError

log = get_logger(__name__)

Level = Literal["warning", "critical"]


class Alerts:
    def __init__(self, store: QueueStore, settings: AlertSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self.raised = 0

    async def raise_alert(self, kind: str, scope: str, level: Level, summary: str, **details: Any) -> bool:
        """Log and record an alert unless it was raised recently; True when it was raised now."""
        now = self._clock()
        if not self.settings.enabled:
            _log(level, kind, scope, summary, details, recorded=False)
            return False
        try:
            if not await self.store.claim_alert(kind, scope, level, now, self.settings.period):
                log.debug("alert_suppressed_in_period", kind=kind, scope=scope, level=level)
                return False
            await self.store.record_event(Event(
                id=uuid.uuid4().hex, type="alert", created_at=now,
                data={"kind": kind, "level": level, "scope": scope, "summary": summary, **details}))
        except StoreError as exc:
            log.error("alert_not_recorded", kind=kind, scope=scope, level=level, error=str(exc))
            _log(level, kind, scope, summary, details, recorded=False)
            return False
        self.raised += 1
        _log(level, kind, scope, summary, details, recorded=True)
        return True


def _log(level: Level, kind: str, scope: str, summary: str, details: dict[str, Any], *, recorded: bool) -> None:
    emit = log.error if level == "critical" else log.warning
    emit("alert", kind=kind, scope=scope, level=level, summary=summary, recorded=recorded, **details)


__all__ = ["Alerts", "Level"]
