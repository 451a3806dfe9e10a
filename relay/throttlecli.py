"""``relay throttle status``: the per-destination throttle as every relay node shares it.

Reads the throttle's shared state from Redis (``[redis] url``): each destination (budget) some relay has
used in the last day or that is slowed down, with its configured rate, the rate in force now, the
cool-down left, the connections in use, and the configured domains no relay has used yet. The
configuration (``[plugins.throttle]``) supplies the adaptive schedule and the limits of what was not
recorded. With the memory backend (no ``[redis] url``) the state lives inside the running relay only:
the command says so and exits 1.

Exit codes: 0 shown, 1 nothing to show (memory backend, Redis unreachable), 2 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from pydantic import ValidationError

from relay.limits.base import LimiterUnavailable
from relay.limits.redis import RedisLimiter
from relay.plugins.throttle import DestinationStatus, ThrottleConfig, ThrottlePlugin, read_status
from relay.settings import ConfigError, Settings, load_settings

MEMORY_BACKEND = "memory backend: only visible inside the running relay"


def register(subparsers: Any) -> None:
    throttle = subparsers.add_parser("throttle", help="the per-destination delivery throttle")
    sub = throttle.add_subparsers(dest="throttle_command", required=True)
    status = sub.add_parser("status", help="destinations with their configured and current rates, cool-downs "
                                           "and connections in use (shared state in Redis)")
    status.add_argument("--json", action="store_true", help="one JSON object per destination, one a line")
    status.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    settings, _ = load_settings(args.config)
    config = throttle_config(settings)
    if ThrottlePlugin.name not in settings.chain.plugins:
        print(f"relay: note: {ThrottlePlugin.name!r} is not in [chain] plugins", file=sys.stderr)
    if not settings.redis.url:
        print(MEMORY_BACKEND, file=sys.stderr)
        return 1
    try:
        rows = asyncio.run(_read(settings, config))
    except LimiterUnavailable as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict(), sort_keys=True))
    else:
        print(render_table(rows))
    return 0


def throttle_config(settings: Settings) -> ThrottleConfig:
    """``[plugins.throttle]`` validated as the plugin does at start-up; ConfigError names the key."""
    try:
        return ThrottleConfig.model_validate(settings.plugins.get(ThrottlePlugin.name) or {})
    except ValidationError as exc:
        lines = [f"plugins.{ThrottlePlugin.name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                 for err in exc.errors(include_url=False, include_input=False)]
        raise ConfigError("\n".join(lines)) from None


async def _read(settings: Settings, config: ThrottleConfig) -> list[DestinationStatus]:
    limiter = RedisLimiter(settings.redis)
    try:
        return await read_status(limiter, config, time.time())
    finally:
        await limiter.close()


_COLUMNS = ("DESTINATION", "LIMITS FROM", "RATE", "NOW", "COOL-DOWN", "CONNECTIONS", "LAST SLOW-DOWN")


def render_table(rows: list[DestinationStatus]) -> str:
    if not rows:
        return "no destination throttled or in use"
    lines = [_COLUMNS]
    for row in rows:
        connections = f"{row.connections_in_use}/{row.connections_limit or 'unlimited'}"
        lines.append((row.destination + ("" if row.seen else " (not used yet)"), row.match or "default",
                      row.configured_rate, row.effective_rate, format_duration(row.cooldown_left), connections,
                      row.reason or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS) - 1)]
    return "\n".join("  ".join([*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)),
                                line[-1]]) for line in lines)


def format_duration(seconds: float) -> str:
    """``0`` → ``-``; ``3725`` → ``1h02m05s``; ``59.4`` → ``59s``."""
    whole = round(seconds)
    if whole <= 0:
        return "-"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


__all__ = ["MEMORY_BACKEND", "cmd_status", "format_duration", "register", "render_table", "throttle_config"]
