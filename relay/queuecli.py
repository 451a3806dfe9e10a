"""``relay queue …`` and ``relay trace``: look at and steer the queue, against the store directly.

Subcommands::

    relay queue summary [--state pending|queued|held] [--top N] [--json]
    relay queue list [--state S] [--domain D] [--sender S] [--recipient R] [--older-than 1h] [--limit N] [--json]
    relay queue show ID [--json]
    relay queue retry|hold|release ID… | --domain D | --sender S | --all   [--recipient R]
    relay queue delete ID… | --domain D | --sender S | --all [--yes]
    relay queue bounce ID… | --domain D | --sender S | --all [--reason TEXT] [--yes]
    relay queue flush DOMAIN
    relay trace ID [--json]

Why the store and not an HTTP API: there is no network endpoint to secure, and the commands work while the
relay is down (a crash loop, a migration); both stores, and several relays on one Postgres, see the same
rows. The relay notices changes by itself: Postgres relays are woken by NOTIFY, an SQLite relay notices
another process's commit within a few seconds (:data:`relay.store.sqlite.CROSS_PROCESS_POLL`).

How a change is made, so it never fights a delivery worker: the command pages through the selection
(:meth:`~relay.store.base.QueueStore.find_recipients`), leases what it will change exactly as a worker
claims (:meth:`~relay.store.base.QueueStore.claim_recipients`: rows a worker holds are skipped and
reported as "in flight"), and records the new state through ``record_results`` — the same transaction a
worker's result uses, so a bounce's DSN commits with the BOUNCED states or not at all.

What each action does to a recipient:

======= ================= ==================================================================================
action  from              to
======= ================= ==================================================================================
retry   queued            queued, due now (attempts and history unchanged); the relay is woken
flush   queued            as retry, for every recipient of one domain
hold    queued            held: never claimed until released (the queue lifetime still applies)
release held              queued, due now; the relay is woken
delete  queued, held      deleted (final; no DSN); asks first unless --yes
bounce  queued, held      bounced (final) with an RFC 3464 DSN to the sender (status 5.0.0, the reason as
                          diagnostic; never to the null sender; NOTIFY honoured); bulk selections ask first
======= ================= ==================================================================================

Progress: long operations print their counts as they go — on the terminal's line when standard output is
one, else on standard error, so that standard output stays the command's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from relay.delivery.dsn import FailedRecipient, build_bounce
from relay.ids import new_queue_id
from relay.log import configure_logging
from relay.metrics import AGE_EDGES
from relay.settings import Settings, load_settings
from relay.store.base import (
    PENDING_STATES,
    Bounce,
    Claim,
    Event,
    NewMessage,
    QueueEntry,
    QueueStore,
    RecipientQuery,
    RecipientResult,
    RecipientState,
    StoreError,
)

#: Recipients looked at (and changed) per transaction of an admin action.
PAGE = 500
#: How long an admin command leases what it is changing (it records within one page's work).
LEASE_SECONDS = 120.0
BOUNCE_STATUS = "5.0.0"
DEFAULT_BOUNCE_REASON = "returned to the sender by the mail system administrator"
DELETED_REPLY = "deleted by the mail system administrator"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$", re.ASCII)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
STATE_CHOICES = ("pending", "all", *(state.value for state in RecipientState))

# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    queue = subparsers.add_parser("queue", help="inspect and steer the queue (summary, list, show, retry, hold, "
                                  "release, delete, bounce, flush)", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = queue.add_subparsers(dest="queue_command", required=True)

    summary = sub.add_parser("summary", help="recipient domains × age buckets, like qshape")
    summary.add_argument("--state", default="pending", choices=("pending", "queued", "held"))
    summary.add_argument("--top", type=int, default=0, help="show the N biggest domains (0: all)")
    summary.add_argument("--json", action="store_true")
    summary.set_defaults(func=lambda a: _run(a, cmd_summary))

    listing = sub.add_parser("list", help="recipients in the queue, oldest first")
    listing.add_argument("--state", default="pending", choices=STATE_CHOICES,
                         help="pending (queued and held, the default), all, or one state")
    _filters(listing)
    listing.add_argument("--older-than", help="received longer ago than this: 90s, 30m, 1h, 2d")
    listing.add_argument("--limit", type=int, default=100, help="at most N rows (0: all)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=lambda a: _run(a, cmd_list))

    show = sub.add_parser("show", help="a message: envelope, headers, recipients and every attempt")
    show.add_argument("id", help="queue id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=lambda a: _run(a, cmd_show))

    for action in ACTIONS.values():
        parser = sub.add_parser(action.name, help=action.help)
        _selection(parser)
        if action.name == "bounce":
            parser.add_argument("--reason", default=DEFAULT_BOUNCE_REASON, help="said in the DSN")
        if action.confirm != "never":
            parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        parser.set_defaults(func=lambda a, act=action: _run(a, lambda s, args: cmd_action(s, args, act)))

    flush = sub.add_parser("flush", help="every queued recipient of a domain due now")
    flush.add_argument("domain")
    flush.set_defaults(func=lambda a: _run(a, cmd_flush))

    trace = subparsers.add_parser("trace", help="the whole life of a message: reception, attempts, events")
    trace.add_argument("id", help="queue id")
    trace.add_argument("--json", action="store_true")
    trace.set_defaults(func=lambda a: _run(a, cmd_trace))


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", help="recipient domain")
    parser.add_argument("--sender", help="sender address, or a domain for every sender address there")
    parser.add_argument("--recipient", help="one recipient address")


def _selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    _filters(parser)
    parser.add_argument("--all", action="store_true", help="every recipient the action applies to")


Command = Callable[[QueueStore, argparse.Namespace], Awaitable[int]]


class UsageError(ValueError):
    """A selection or value the command cannot use (exit 2)."""


def _run(args: argparse.Namespace, command: Command) -> int:
    settings, _ = load_settings(args.config)
    configure_logging("warning", settings.log.format)  # stdout is the answer; the store logs only trouble
    args.settings = settings

    async def run() -> int:
        from relay.store import open_store
        store = await open_store(settings.store)
        try:
            return await command(store, args)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except UsageError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except (StoreError, OSError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d`` → seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise UsageError(f"bad duration {text!r}: use a number with s, m, h or d (30m, 1h, 2d)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def states_for(choice: str) -> tuple[RecipientState, ...]:
    if choice == "pending":
        return PENDING_STATES
    if choice == "all":
        return tuple(RecipientState)
    return (RecipientState(choice),)


# ---------------------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------------------

def age_text(seconds: float) -> str:
    """A short age: 45s, 12m, 3h05m, 4d02h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def when_text(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + "Z"


class Progress:
    """Counts of a long operation as it goes: on the terminal's line when stdout is a terminal (rewritten
    in place), else one line per step on stderr."""

    def __init__(self, verb: str, total: int | None, stream: IO[str] | None = None) -> None:
        self.verb = verb
        self.total = total
        self.on_terminal = stream is None and sys.stdout.isatty()
        self.stream = stream or (sys.stdout if self.on_terminal else sys.stderr)
        self.shown = False

    def update(self, done: int, skipped: int) -> None:
        of = f" of {self.total}" if self.total is not None else ""
        text = f"... {done}{of} recipients {self.verb}" + (f", {skipped} skipped" if skipped else "")
        if self.on_terminal:
            self.stream.write("\r" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.on_terminal and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _emit(rows: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------

def shape_columns() -> list[str]:
    """qshape's column names: upper edges in minutes, then the open-ended last bucket."""
    minutes = [f"{edge / 60:g}" for edge in AGE_EDGES]
    return [*minutes, f"{minutes[-1]}+"]


async def cmd_summary(store: QueueStore, args: argparse.Namespace) -> int:
    now = time.time()
    cells = await store.queue_shape(now, AGE_EDGES, by_domain=True, states=states_for(args.state))
    columns = shape_columns()
    table: dict[str, list[int]] = {}
    for cell in cells:
        table.setdefault(cell.domain, [0] * len(columns))[cell.bucket] += cell.count
    domains = sorted(table, key=lambda d: (-sum(table[d]), d))
    if args.top > 0:
        domains = domains[:args.top]
    totals = [sum(table[d][i] for d in table) for i in range(len(columns))]
    if args.json:
        _emit([{"domain": d, "total": sum(table[d]), "buckets": dict(zip(columns, table[d], strict=True))}
               for d in domains])
        _emit([{"domain": "TOTAL", "total": sum(totals), "buckets": dict(zip(columns, totals, strict=True))}])
        return 0
    width = max([len("TOTAL"), *(len(d) for d in domains)])
    numbers = [sum(totals), *totals]
    cell_width = max(5, *(len(str(n)) for n in numbers))
    print(" " * width + " " + f"{'T':>{cell_width}}" + "".join(f" {c:>{cell_width}}" for c in columns))
    for name, row in (("TOTAL", totals), *((d, table[d]) for d in domains)):
        print(f"{name:>{width}} {sum(row):>{cell_width}}" + "".join(f" {n:>{cell_width}}" for n in row))
    return 0


# ---------------------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------------------

def _query(args: argparse.Namespace, states: Sequence[RecipientState], ids: Sequence[str] = (),
           received_before: float | None = None) -> RecipientQuery:
    return RecipientQuery(states=tuple(states), message_ids=tuple(ids), domain=args.domain or None,
                          sender=args.sender or None, recipient=args.recipient or None,
                          received_before=received_before)


async def iter_entries(store: QueueStore, query: RecipientQuery, now: float, limit: int = 0,
                       page: int = PAGE) -> list[QueueEntry]:
    """Every entry of the selection (at most ``limit`` when > 0), paging by id."""
    found: list[QueueEntry] = []
    after = 0
    while limit <= 0 or len(found) < limit:
        size = page if limit <= 0 else min(page, limit - len(found))
        batch = await store.find_recipients(query, now=now, limit=size, after_id=after)
        found.extend(batch)
        if len(batch) < size:
            break
        after = batch[-1].recipient.id
    return found


async def count_entries(store: QueueStore, query: RecipientQuery, now: float) -> int:
    """How many recipients the selection holds now (paging; nothing kept in memory)."""
    count, after = 0, 0
    while True:
        batch = await store.find_recipients(query, now=now, limit=PAGE, after_id=after)
        count += len(batch)
        if len(batch) < PAGE:
            return count
        after = batch[-1].recipient.id


def entry_dict(entry: QueueEntry, now: float) -> dict[str, Any]:
    rcpt = entry.recipient
    return {"queue_id": rcpt.message_id, "recipient_id": rcpt.id, "recipient": rcpt.address,
            "domain": rcpt.domain, "state": rcpt.state.value, "sender": entry.sender,
            "received_at": entry.received_at, "age": round(now - entry.received_at, 3), "size": entry.size,
            "attempts": rcpt.attempts,
            "next_attempt_at": rcpt.next_attempt_at if rcpt.state is RecipientState.QUEUED else None,
            "last_reply": rcpt.last_reply, "in_flight": entry.leased}


async def cmd_list(store: QueueStore, args: argparse.Namespace) -> int:
    now = time.time()
    before = now - parse_duration(args.older_than) if args.older_than else None
    query = _query(args, states_for(args.state), received_before=before)
    limit = max(args.limit, 0)
    # One more than asked tells whether the listing was cut.
    entries = await iter_entries(store, query, now, limit + 1 if limit else 0)
    cut = bool(limit) and len(entries) > limit
    entries = entries[:limit] if limit else entries
    if args.json:
        _emit(entry_dict(entry, now) for entry in entries)
    else:
        _print_entries(entries, now)
    if cut:
        print(f"({limit} shown; more match: raise --limit, 0 for all)", file=sys.stderr)
    return 0


def _print_entries(entries: Sequence[QueueEntry], now: float) -> None:
    if not entries:
        print("(no recipient matches)", file=sys.stderr)
        return
    print(f"{'QUEUE-ID':<18} {'STATE':<9} {'AGE':>7} {'TRIES':>5} {'NEXT':>7}  {'SENDER':<28} RECIPIENT / LAST REPLY")
    for entry in entries:
        rcpt = entry.recipient
        state = "in-fl." if entry.leased else rcpt.state.value
        due = rcpt.next_attempt_at - now if rcpt.state is RecipientState.QUEUED else None
        next_text = "-" if due is None else ("now" if due <= 0 else age_text(due))
        print(f"{rcpt.message_id:<18} {state:<9} {age_text(now - entry.received_at):>7} {rcpt.attempts:>5} "
              f"{next_text:>7}  {(entry.sender or '<>')[:28]:<28} {rcpt.address}")
        if rcpt.last_reply:
            print(f"{'':<60}{_one_line(rcpt.last_reply)[:120]}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------------
# show and trace
# ---------------------------------------------------------------------------------------------------------

async def _message_or_error(store: QueueStore, message_id: str) -> Any:
    message = await store.get_message(message_id)
    if message is None:
        print(f"relay: no message {message_id} in the queue (delivered and purged, or never queued)",
              file=sys.stderr)
    return message


def _headers(data: bytes) -> list[tuple[str, str]]:
    end = data.find(b"\r\n\r\n")
    block = data[:end + 2] if end >= 0 else data
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block)
    return [(name, _one_line(str(value))) for name, value in parsed.items()]


async def cmd_show(store: QueueStore, args: argparse.Namespace) -> int:
    message = await _message_or_error(store, args.id)
    if message is None:
        return 1
    recipients = await store.recipients_of(message.id)
    attempts = {r.id: await store.attempts_of(r.id) for r in recipients}
    try:
        headers = _headers(await store.message_data(message.id))
    except StoreError:
        headers = []
    now = time.time()
    if args.json:
        _emit([{
            "queue_id": message.id, "sender": message.sender, "received_at": message.received_at,
            "size": message.size, "client_ip": message.client_ip, "client_helo": message.client_helo,
            "auth_user": message.auth_user, "listener": message.listener, "envid": message.envid,
            "ret": message.ret, "smtputf8": message.smtputf8, "headers": [[n, v] for n, v in headers],
            "recipients": [{
                "recipient_id": r.id, "address": r.address, "state": r.state.value, "attempts": r.attempts,
                "next_attempt_at": r.next_attempt_at if r.state is RecipientState.QUEUED else None,
                "last_reply": r.last_reply, "notify": r.notify, "orcpt": r.orcpt, "updated_at": r.updated_at,
                "history": [_attempt_dict(a) for a in attempts[r.id]]} for r in recipients],
        }])
        return 0
    print(f"queue id      {message.id}")
    print(f"sender        <{message.sender}>")
    print(f"received      {when_text(message.received_at)} ({age_text(now - message.received_at)} ago) on "
          f"listener {message.listener or '-'} from [{message.client_ip or '-'}] helo {message.client_helo or '-'}")
    print(f"auth user     {message.auth_user or '-'}")
    print(f"size          {message.size} bytes" + (" (SMTPUTF8)" if message.smtputf8 else ""))
    if message.envid or message.ret:
        print(f"dsn           envid {message.envid or '-'} ret {message.ret or '-'}")
    print("headers")
    for name, value in headers:
        print(f"  {name}: {value[:200]}")
    print("recipients")
    for r in recipients:
        due = f", next attempt {when_text(r.next_attempt_at)}" if r.state is RecipientState.QUEUED else ""
        print(f"  {r.address}  [{r.state.value}, {r.attempts} attempt{'s' if r.attempts != 1 else ''}{due}]")
        if r.last_reply:
            print(f"    last reply: {_one_line(r.last_reply)}")
        for attempt in attempts[r.id]:
            print(f"    {when_text(attempt.started_at)}  {attempt.outcome:<9} {attempt.category or '-':<18} "
                  f"mx {attempt.mx_host or '-'} tls {attempt.tls_version or '-'} {attempt.duration:.3f}s: "
                  f"{_one_line(attempt.reply or '')}")
    return 0


def _attempt_dict(attempt: Any) -> dict[str, Any]:
    return {"started_at": attempt.started_at, "duration": attempt.duration, "mx": attempt.mx_host,
            "tls": attempt.tls_version, "reply": attempt.reply, "category": attempt.category,
            "outcome": attempt.outcome}


async def cmd_trace(store: QueueStore, args: argparse.Namespace) -> int:
    message = await _message_or_error(store, args.id)
    if message is None:
        return 1
    recipients = await store.recipients_of(message.id)
    steps: list[dict[str, Any]] = [{
        "at": message.received_at, "what": "received", "sender": message.sender,
        "recipients": [r.address for r in recipients], "client_ip": message.client_ip,
        "helo": message.client_helo, "auth_user": message.auth_user, "listener": message.listener,
        "size": message.size}]
    for rcpt in recipients:
        for attempt in await store.attempts_of(rcpt.id):
            steps.append({"at": attempt.started_at, "what": "attempt", "recipient": rcpt.address,
                          **_attempt_dict(attempt)})
    for event in await store.message_events(message.id):
        steps.append({"at": event.created_at, "what": "event", "type": event.type, "recipient": event.recipient,
                      "id": event.id, "data": event.data})
    steps.sort(key=lambda step: (step["at"], step["what"] != "received"))
    final: list[dict[str, Any]] = [
        {"recipient": r.address, "state": r.state.value, "attempts": r.attempts, "last_reply": r.last_reply,
         "since": r.updated_at} for r in recipients]
    if args.json:
        _emit([{"queue_id": message.id, "steps": steps, "recipients": final,
                "chain_verdicts": "not recorded in the queue (see the relay's log: plugin_rejected lines)"}])
        return 0
    start = message.received_at
    print(f"trace of {message.id}")
    for step in steps:
        offset = f"+{age_text(step['at'] - start)}"
        print(f"{when_text(step['at'])} {offset:>8}  {_describe(step)}")
    print("chain verdicts: not recorded in the queue (the relay logs them as plugin_rejected)")
    print("now")
    for item in final:
        print(f"  {item['recipient']}: {item['state']} after {item['attempts']} attempt(s)"
              + (f" — {_one_line(str(item['last_reply']))}" if item["last_reply"] else ""))
    return 0


def _describe(step: dict[str, Any]) -> str:
    if step["what"] == "received":
        auth = f" as {step['auth_user']}" if step["auth_user"] else ""
        return (f"received from [{step['client_ip'] or '-'}] helo {step['helo'] or '-'}{auth} on "
                f"{step['listener'] or '-'}: <{step['sender']}> to {len(step['recipients'])} recipient(s), "
                f"{step['size']} bytes")
    if step["what"] == "attempt":
        return (f"attempt {step['recipient']}: {step['outcome']} ({step['category'] or '-'}) mx {step['mx'] or '-'} "
                f"tls {step['tls'] or '-'} {step['duration']:.3f}s: {_one_line(step['reply'] or '')}")
    details = ", ".join(f"{k}={v}" for k, v in sorted(step["data"].items())) if step["data"] else ""
    return f"event {step['type']} {step['recipient'] or ''} {details}".rstrip()


# ---------------------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    name: str
    help: str
    verb: str                                # past tense, for the report
    from_states: tuple[RecipientState, ...]
    to_state: RecipientState
    due_now: bool = False                    # next attempt now, and wake the relay
    confirm: str = "never"                   # never | always | bulk (when not selected by ids)


ACTIONS = {action.name: action for action in (
    Action("retry", "make queued recipients due now", "made due", (RecipientState.QUEUED,), RecipientState.QUEUED,
           due_now=True),
    Action("hold", "hold queued recipients (never delivered until released)", "held", (RecipientState.QUEUED,),
           RecipientState.HELD),
    Action("release", "release held recipients (due now)", "released", (RecipientState.HELD,),
           RecipientState.QUEUED, due_now=True),
    Action("delete", "delete recipients without a DSN (asks first)", "deleted", PENDING_STATES,
           RecipientState.DELETED, confirm="always"),
    Action("bounce", "fail recipients now with a DSN to the sender", "bounced", PENDING_STATES,
           RecipientState.BOUNCED, confirm="bulk"),
)}


@dataclass
class ActionReport:
    changed: int = 0
    skipped: int = 0                         # in flight, or changed by someone else meanwhile
    dsns: int = 0
    messages: set[str] = field(default_factory=set)


def admin_owner() -> str:
    return f"relay-cli:{socket.gethostname()}:{os.getpid()}"


async def apply_action(store: QueueStore, query: RecipientQuery, action: Action, settings: Settings, *,
                       reason: str = DEFAULT_BOUNCE_REASON, progress: Progress | None = None,
                       now: float | None = None) -> ActionReport:
    """Change every recipient of ``query`` (in the action's from-states) page by page; see the module
    docstring. Returns the counts; wakes the relay when recipients became due."""
    owner = admin_owner()
    query = RecipientQuery(**{**_fields(query), "states": tuple(s for s in query.states if s in action.from_states)})
    report = ActionReport()
    after = 0
    while query.states:
        moment = time.time() if now is None else now
        page = await store.find_recipients(query, now=moment, limit=PAGE, after_id=after)
        if not page:
            break
        after = page[-1].recipient.id
        free = [entry.recipient.id for entry in page if not entry.leased]
        claims = await store.claim_recipients(free, owner, LEASE_SECONDS, now=moment, states=action.from_states)
        report.skipped += len(page) - len(claims)
        if claims:
            await _settle(store, claims, action, settings, owner, reason, moment, report)
        if progress is not None:
            progress.update(report.changed, report.skipped)
        if len(page) < PAGE:
            break
    if action.due_now and report.changed:
        await store.notify_new_mail()
    return report


def _fields(query: RecipientQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in RecipientQuery.__dataclass_fields__}


async def _settle(store: QueueStore, claims: list[Claim], action: Action, settings: Settings, owner: str,
                  reason: str, now: float, report: ActionReport) -> None:
    if action.to_state is RecipientState.BOUNCED:
        results, bounces = await _bounce(store, claims, settings, reason, now)
        report.dsns += len(bounces)
    else:
        last = DELETED_REPLY if action.to_state is RecipientState.DELETED else None
        due = now if action.due_now else None
        results = [RecipientResult(c.recipient.id, action.to_state, due, last, None, count_attempt=False,
                                   events=_events(c, action.to_state, last or "", now))
                   for c in claims]
        bounces = []
    try:
        await store.record_results(results, owner, bounces)
    except BaseException:
        await store.release([c.recipient.id for c in claims], owner)
        raise
    report.changed += len(results)
    report.messages.update(c.message.id for c in claims)


async def _bounce(store: QueueStore, claims: list[Claim], settings: Settings, reason: str,
                  now: float) -> tuple[list[RecipientResult], list[Bounce]]:
    """BOUNCED results and one DSN per message (each paired with the recipients it reports on)."""
    reporting_mta = settings.delivery.ehlo_hostname(settings.server.hostname)
    reply = f"550 {BOUNCE_STATUS} {_one_line(reason)}"
    results: list[RecipientResult] = []
    bounces: list[Bounce] = []
    by_message: dict[str, list[Claim]] = {}
    for claim in claims:
        by_message.setdefault(claim.message.id, []).append(claim)
        results.append(RecipientResult(claim.recipient.id, RecipientState.BOUNCED, None, reply, None,
                                       count_attempt=False, events=_events(claim, RecipientState.BOUNCED, reply, now)))
    for group in by_message.values():
        message = group[0].message
        try:
            original = await store.message_data(message.id)
        except StoreError:
            original = b""
        failures = [FailedRecipient(address=c.recipient.address, orcpt=c.recipient.orcpt, status=BOUNCE_STATUS,
                                    action="failed", remote_mta=None, diagnostic=reply, last_attempt_at=now,
                                    notify=c.recipient.notify) for c in group]
        dsn: NewMessage | None = build_bounce(message=message, original=original, failures=failures,
                                              reporting_mta=reporting_mta, kind="failed",
                                              new_id=new_queue_id(now), now=now)
        if dsn is not None:
            bounces.append(Bounce(dsn, tuple(c.recipient.id for c in group)))
    return results, bounces


def _events(claim: Claim, state: RecipientState, reply: str, now: float) -> tuple[Event, ...]:
    """The outbox events of an operator's final decision, committed with the state: ``bounced`` (category
    ``operator``, no bounce type: it says nothing about the address, so bounce-rate statistics leave it
    out) or ``dropped``. Holds, releases and retries are not events."""
    if state not in (RecipientState.BOUNCED, RecipientState.DELETED):
        return ()
    message, rcpt = claim.message, claim.recipient
    data: dict[str, Any] = {"sender": message.sender, "sender_domain": message.sender.rpartition("@")[2].lower(),
                            "domain": rcpt.domain, "reply": reply, "attempt": rcpt.attempts, "operator": True}
    if state is RecipientState.BOUNCED:
        data |= {"category": "operator", "status": BOUNCE_STATUS, "bounce_type": ""}
        kind = "bounced"
    else:
        data["reason"] = "deleted by the operator"
        kind = "dropped"
    return (Event(id=uuid.uuid4().hex, type=kind, created_at=now, message_id=message.id, recipient=rcpt.address,
                  data=data),)


def _action_query(args: argparse.Namespace, action: Action) -> RecipientQuery:
    if not (args.ids or args.domain or args.sender or args.all):
        raise UsageError(f"queue {action.name}: name queue ids, or select with --domain, --sender or --all")
    if args.all and (args.ids or args.domain or args.sender):
        raise UsageError(f"queue {action.name}: --all selects everything; give it alone")
    return _query(args, action.from_states, ids=args.ids)


def _confirmed(action: Action, args: argparse.Namespace, count: int) -> bool:
    needed = action.confirm == "always" or (action.confirm == "bulk" and not args.ids)
    if not needed or getattr(args, "yes", False):
        return True
    prompt = f"{action.name} {count} recipient{'s' if count != 1 else ''}? [y/N] "
    print(prompt, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def cmd_action(store: QueueStore, args: argparse.Namespace, action: Action) -> int:
    query = _action_query(args, action)
    now = time.time()
    if args.ids:
        missing = [i for i in args.ids if await store.get_message(i) is None]
        if missing:
            print(f"relay: no message {', '.join(missing)} in the queue", file=sys.stderr)
            return 1
    total = await count_entries(store, query, now)
    if total == 0:
        print(f"nothing to {action.name}: no {'/'.join(s.value for s in action.from_states)} recipient matches")
        return 0
    if not _confirmed(action, args, total):
        print("relay: not confirmed; nothing changed", file=sys.stderr)
        return 1
    progress = Progress(action.verb, total)
    try:
        report = await apply_action(store, query, action, args.settings, reason=getattr(args, "reason", ""),
                                    progress=progress)
    finally:
        progress.close()
    _report(action, report)
    return 0


def _report(action: Action, report: ActionReport) -> None:
    line = (f"{action.verb} {report.changed} recipient{'s' if report.changed != 1 else ''} of "
            f"{len(report.messages)} message{'s' if len(report.messages) != 1 else ''}")
    if report.dsns:
        line += f"; {report.dsns} DSN{'s' if report.dsns != 1 else ''} queued"
    if report.skipped:
        line += f"; {report.skipped} skipped (being delivered right now, or changed meanwhile: try again)"
    print(line)


async def cmd_flush(store: QueueStore, args: argparse.Namespace) -> int:
    args.ids, args.sender, args.recipient, args.all = [], None, None, False
    return await cmd_action(store, args, ACTIONS["retry"])


__all__ = [
    "ACTIONS", "Action", "ActionReport", "Progress", "age_text", "apply_action", "iter_entries", "parse_duration",
    "register", "shape_columns", "states_for",
]
