"""``relay events …``: the event outbox and its webhooks, against the queue database directly.

- ``relay events list [--type T] [--since WHEN] [--limit N] [--json]`` — events, oldest first.
- ``relay events status [--json]`` — per configured endpoint: deliveries waiting, dead letters, consecutive
  failures and any pause (shared by every node).
- ``relay events dead-letters [--endpoint NAME] [--since WHEN] [--limit N] [--json]`` — deliveries given up
  after their retry window, newest first, with the last error.
- ``relay events replay (--id ID … | --since WHEN) [--endpoint NAME] [--all]`` — queue events again: the
  ids given to every endpoint that wants their type (or the one named), whatever became of them; or the
  dead letters since WHEN — with ``--all`` every event since WHEN, delivered or not. The running relay
  sends them within ``[events] poll_interval``; receivers deduplicate by event id.

WHEN is a time ago (``90s``, ``30m``, ``2h``, ``7d``), epoch seconds, or an ISO 8601 time (UTC unless it
says otherwise). Endpoints are named as in ``[[webhooks]]`` (``name``, else the URL's host and path).

Exit codes: 0 done, 1 the store failed, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relay.log import configure_logging
from relay.settings import Settings, load_settings
from relay.store.base import QueueStore, StoreError, WebhookDelivery
from relay.webhooks import targets_for

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

Command = Callable[[QueueStore, Settings, argparse.Namespace], Awaitable[int]]


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds for ``90s``/``30m``/``2h``/``7d`` ago, epoch seconds, or ISO 8601 (UTC by default)."""
    now = time.time() if now is None else now
    text = text.strip()
    ago = _AGO.match(text)
    if ago:
        return now - float(ago[1]) * _UNITS[ago[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time (try 2h, 7d, 1700000000 or 2026-01-31T12:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def register(subparsers: Any) -> None:
    events = subparsers.add_parser("events", help="the event outbox and its webhooks (dead letters, replay)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = events.add_subparsers(dest="events_command", required=True)

    listing = sub.add_parser("list", help="events, oldest first")
    listing.add_argument("--type", help="only events of this type")
    listing.add_argument("--since", help="created at or after WHEN (default: 1d)", default="1d")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    listing.set_defaults(func=lambda a: _run(a, cmd_list))

    status = sub.add_parser("status", help="per endpoint: waiting, dead letters, failures, pause")
    status.add_argument("--json", action="store_true", help="one JSON object a line")
    status.set_defaults(func=lambda a: _run(a, cmd_status))

    dead = sub.add_parser("dead-letters", help="deliveries given up after their retry window")
    dead.add_argument("--endpoint", help="one endpoint (its name)")
    dead.add_argument("--since", help="events created at or after WHEN")
    dead.add_argument("--limit", type=int, default=100)
    dead.add_argument("--json", action="store_true", help="one JSON object a line")
    dead.set_defaults(func=lambda a: _run(a, cmd_dead_letters))

    replay = sub.add_parser("replay", help="queue events again for the webhooks")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", action="append", dest="ids", metavar="ID", help="an event id (repeatable)")
    which.add_argument("--since", help="dead letters (or with --all every event) created at or after WHEN")
    replay.add_argument("--endpoint", help="only to this endpoint (its name)")
    replay.add_argument("--all", action="store_true", help="with --since: every event, not only dead letters")
    replay.set_defaults(func=lambda a: _run(a, cmd_replay))


def _run(args: argparse.Namespace, command: Command) -> int:
    settings, _ = load_settings(args.config)
    configure_logging("warning", settings.log.format)  # stdout is the answer; the store's log goes to stderr

    async def run() -> int:
        from relay.store import open_store
        store = await open_store(settings.store)
        try:
            return await command(store, settings, args)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


def _endpoint_names(settings: Settings, endpoint: str | None) -> None:
    if endpoint is not None and endpoint not in {hook.label for hook in settings.webhooks}:
        known = ", ".join(hook.label for hook in settings.webhooks) or "none configured"
        raise ValueError(f"no webhook endpoint named {endpoint!r} (known: {known})")


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


async def cmd_list(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
    events = await store.list_events(type=args.type, since=parse_when(args.since), limit=args.limit)
    for event in events:
        if args.json:
            print(json.dumps({"id": event.id, "type": event.type, "created_at": event.created_at,
                              "message_id": event.message_id, "recipient": event.recipient, "data": event.data},
                             sort_keys=True))
        else:
            print(f"{_when(event.created_at)}  {event.type:<12} {event.id}  {event.message_id or '-':<14} "
                  f"{event.recipient or '-'}")
    if not args.json:
        print(f"{len(events)} event(s)", file=sys.stderr)
    return 0


async def cmd_status(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
    health = {h.endpoint: h for h in await store.endpoint_health()}
    backlog = await store.webhook_backlog()   # counted per endpoint over the partial indexes
    now = time.time()
    rows = []
    for hook in settings.webhooks:
        state = health.get(hook.label)
        paused = state is not None and state.paused(now)
        rows.append({"endpoint": hook.label, "enabled": hook.enabled, "events": hook.events or ["*"],
                     "waiting": backlog.pending.get(hook.label, 0), "dead": backlog.dead.get(hook.label, 0),
                     "consecutive_failures": state.consecutive_failures if state else 0,
                     "paused_until": state.paused_until if paused and state else None,
                     "last_error": state.last_error if state else None})
    for row in rows:
        if args.json:
            print(json.dumps(row, sort_keys=True))
        else:
            until = row["paused_until"]
            pause = f"paused until {_when(until)}" if isinstance(until, float) else "active"
            if not row["enabled"]:
                pause = "disabled"
            print(f"{row['endpoint']}: {pause}, {row['waiting']} waiting, {row['dead']} dead, "
                  f"{row['consecutive_failures']} consecutive failures"
                  + (f", last error: {row['last_error']}" if row["last_error"] else ""))
    if not rows and not args.json:
        print("no [[webhooks]] endpoint configured")
    if backlog.undispatched and not args.json:
        print(f"{backlog.undispatched} event(s) not yet handed to the endpoints")
    return 0


def _letter(delivery: WebhookDelivery) -> dict[str, Any]:
    event = delivery.event
    return {"endpoint": delivery.endpoint, "event_id": event.id, "type": event.type, "created_at": event.created_at,
            "message_id": event.message_id, "recipient": event.recipient, "attempts": delivery.attempts,
            "dead_at": delivery.dead_at, "last_error": delivery.last_error}


async def cmd_dead_letters(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
    since = parse_when(args.since) if args.since else None
    letters = await store.list_webhook_deliveries(endpoint=args.endpoint, dead=True, since=since, limit=args.limit)
    for delivery in letters:
        row = _letter(delivery)
        if args.json:
            print(json.dumps(row, sort_keys=True))
        else:
            print(f"{_when(delivery.dead_at)}  {delivery.endpoint}  {row['type']:<12} {row['event_id']}  "
                  f"{row['recipient'] or '-'}  attempts={delivery.attempts}  {delivery.last_error or ''}")
    if not args.json:
        print(f"{len(letters)} dead letter(s)", file=sys.stderr)
    return 0


async def cmd_replay(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
    _endpoint_names(settings, args.endpoint)
    targets = targets_for(settings.webhooks, args.endpoint)
    if not targets:
        raise ValueError("no [[webhooks]] endpoint configured: nothing to replay to")
    if args.all and not args.since:
        raise ValueError("--all goes with --since")
    ids = args.ids or []
    if ids:
        missing = [event_id for event_id in ids if await store.get_event(event_id) is None]
        if missing:
            raise ValueError(f"no such event: {', '.join(missing)}")
    since = parse_when(args.since) if args.since else None
    queued = await store.replay_webhook_deliveries(targets, time.time(), event_ids=ids, since=since,
                                                   dead_only=not args.all)
    print(f"queued {queued} deliver{'y' if queued == 1 else 'ies'} for "
          f"{', '.join(target.name for target in targets)}")
    return 0


__all__ = ["parse_when", "register"]
