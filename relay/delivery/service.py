"""Wiring: the delivery service for a whole relay configuration (what ``relay.app`` starts).

Kept apart from :mod:`relay.delivery.scheduler` so that the scheduler depends on ``[delivery]`` alone
and this module is the one place that reads the rest of ``relay.toml`` (``[server].hostname``).
"""

from __future__ import annotations

from relay.delivery.scheduler import DeliveryChain, DeliveryService
from relay.settings import Settings
from relay.store.base import QueueStore


def build_delivery_service(store: QueueStore, settings: Settings,
                           chain: DeliveryChain | None = None) -> DeliveryService:
    """A :class:`DeliveryService` over ``store`` configured by ``settings.delivery`` (not started)."""
    return DeliveryService.from_settings(store, settings.delivery, hostname=settings.server.hostname,
                                         chain=chain)


__all__ = ["build_delivery_service"]
