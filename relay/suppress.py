"""``relay suppress``: manage the suppression list in the queue database (see :mod:`relay.plugins.blacklist`).

Subcommands::

    relay suppress add VALUE [--kind address|domain|ip] [--reason R] [--ttl 30d|never] [--note N] [--scope DOMAIN]
    relay suppress remove VALUE [--kind K] [--scope DOMAIN]
    relay suppress list [--reason R] [--limit N] [--json]
    relay suppress import FILE.csv        (``-`` reads standard input)
    relay suppress export [FILE|-]
    relay suppress purge                  (delete expired entries now; the delivery loop also does it)

Values are normalised as everywhere else (:mod:`relay.policies.addresses`): case, brackets and IDNA
spellings of one address are one entry. Without ``--kind`` the kind is guessed: an ``@`` makes an
address, an IP address an ip, anything else a domain.

CSV (import and export): a header line is required and names the columns; ``value`` is mandatory, the
others optional: ``kind`` (guessed when empty), ``reason`` (``manual`` when empty), ``expires_at`` (empty:
never; ISO 8601 such as ``2026-03-01`` or ``2026-03-01T12:00:00Z``, UTC when no offset is given, or epoch
seconds), ``note``, ``scope`` (a sender domain; empty: every sender), ``source`` (``import`` when absent)
and ``created_at`` (as ``expires_at``; now when absent). Export writes all of them, so an export imports
back as the same list. Import is idempotent (an entry already present is refreshed), commits in batches,
shows progress every :data:`PROGRESS_EVERY` rows on standard error, skips rows already expired, and
reports every bad row with its line number without stopping; it exits 1 when any row was rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

from relay.log import configure_logging
from relay.policies.addresses import KINDS, Kind, check_value, guess_kind
from relay.settings import load_settings
from relay.store.base import QueueStore, StoreError, Suppression

HELP = """\
Manage the suppression list: recipients (addresses, or every address of a domain) that are never sent
to, and client IPs refused at connect. Values are normalised (case, <brackets>, IDNA), so one address
is one entry however it is spelled. Without --kind: an @ makes an address, an IP address an ip,
anything else a domain. --scope limits an entry to mail from one sender domain.

CSV for import and export: a header line naming the columns is required. value is mandatory; kind,
reason (default manual), expires_at (empty: never; ISO 8601 like 2026-03-01T12:00:00Z, UTC unless an
offset is given, or epoch seconds), note, scope, source and created_at are optional. Import refreshes
entries already present, skips rows already expired, reports bad rows by line number and exits 1 if
there were any. Export writes every column, so its output imports back as the same list."""

REASONS = ("hard_bounce", "complaint", "unsubscribe", "manual", "spam_trap", "other")
CSV_COLUMNS = ("value", "kind", "reason", "expires_at", "note", "scope", "source", "created_at")
IMPORT_BATCH = 1000
PROGRESS_EVERY = 10_000
EXPORT_PAGE = 5000
MAX_REPORTED_ERRORS = 100
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$", re.ASCII)
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("suppress", help="manage the suppression list (addresses, domains, IPs)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suppress_command", required=True)

    add = sub.add_parser("add", help="add or refresh an entry")
    add.add_argument("value")
    _kind_option(add)
    add.add_argument("--reason", default="manual", choices=REASONS)
    add.add_argument("--ttl", default="never", help="lifetime: 30d, 12h, 90m, 3600s or never (default)")
    add.add_argument("--note", default="")
    _scope_option(add)
    add.set_defaults(func=lambda a: _run(a, cmd_add))

    remove = sub.add_parser("remove", help="remove an entry")
    remove.add_argument("value")
    _kind_option(remove)
    _scope_option(remove)
    remove.set_defaults(func=lambda a: _run(a, cmd_remove))

    listing = sub.add_parser("list", help="show entries (expired ones too, until purged)")
    listing.add_argument("--reason", choices=REASONS)
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (0: all; default 1000)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=lambda a: _run(a, cmd_list))

    importing = sub.add_parser("import", help="add the entries of a CSV file (see `relay suppress --help`)")
    importing.add_argument("file", help="CSV file with a header line; - for standard input")
    importing.set_defaults(func=lambda a: _run(a, cmd_import))

    export = sub.add_parser("export", help="write every entry as CSV")
    export.add_argument("file", nargs="?", default="-", help="output file; - (default) for standard output")
    export.set_defaults(func=lambda a: _run(a, cmd_export))

    sub.add_parser("purge", help="delete expired entries").set_defaults(func=lambda a: _run(a, cmd_purge))


def _kind_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, help="address, domain or ip (guessed when omitted)")


def _scope_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", default="", help="only for mail from this sender domain (default: every sender)")


Command = Callable[[QueueStore, argparse.Namespace], Awaitable[int]]


def _run(args: argparse.Namespace, command: Command) -> int:
    settings, _ = load_settings(args.config)
    # Standard output carries the command's answer (CSV, JSON lines): the store's log goes to stderr, and
    # only what needs attention.
    configure_logging("warning", settings.log.format)

    async def run() -> int:
        from relay.store import open_store
        store = await open_store(settings.store)
        try:
            return await command(store, args)
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


# -- values ---------------------------------------------------------------------------------------------
def parse_ttl(text: str) -> float | None:
    """``never`` → None; ``30d`` / ``12h`` / ``90m`` / ``3600s`` / ``3600`` → seconds (more than 0)."""
    cleaned = text.strip().lower()
    if cleaned == "never":
        return None
    match = _DURATION.match(cleaned)
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"bad --ttl {text!r}: use a duration such as 30d, 12h, 90m, 3600s, or never")
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def parse_time(text: str) -> float | None:
    """Empty → None; epoch seconds; or ISO 8601 (a date, or date and time; no offset means UTC)."""
    cleaned = text.strip()
    if not cleaned:
        return None
    try:
        return float(cleaned)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"{cleaned!r} is not a time (ISO 8601 such as 2026-03-01T12:00:00Z, or epoch "
                         "seconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def format_time(value: float | None) -> str:
    if value is None:
        return ""
    moment = datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _kind_of(value: str, kind: str | None) -> Kind:
    return cast(Kind, kind) if kind else guess_kind(value)


def _scope_of(scope: str, kind: str) -> str:
    if not scope.strip():
        return ""
    if kind == "ip":
        raise ValueError("IP entries apply to every sender; they take no scope")
    return check_value(scope, "domain")


# -- add, remove, list, purge -----------------------------------------------------------------------------
async def cmd_add(store: QueueStore, args: argparse.Namespace) -> int:
    kind = _kind_of(args.value, args.kind)
    value = check_value(args.value, kind)
    scope = _scope_of(args.scope, kind)
    ttl = parse_ttl(args.ttl)
    now = time.time()
    entry = Suppression(value=value, kind=kind, reason=args.reason, source="cli", created_at=now,
                        expires_at=None if ttl is None else now + ttl, note=args.note, scope=scope)
    await store.add_suppression(entry)
    print(f"suppressed {kind} {value}{_for(scope)} (reason {args.reason}, "
          f"{'never expires' if ttl is None else 'expires ' + format_time(entry.expires_at)})")
    return 0


async def cmd_remove(store: QueueStore, args: argparse.Namespace) -> int:
    kind = _kind_of(args.value, args.kind)
    value = check_value(args.value, kind)
    scope = _scope_of(args.scope, kind)
    if not await store.remove_suppression(value, kind, scope):
        print(f"relay: no {kind} entry {value}{_for(scope)}", file=sys.stderr)
        return 1
    print(f"removed {kind} {value}{_for(scope)}")
    return 0


def _for(scope: str) -> str:
    return f" for mail from {scope}" if scope else ""


async def cmd_list(store: QueueStore, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise ValueError("--limit must be 0 (all) or more")
    now = time.time()
    shown = 0
    async for entry in _AsyncEntries(store, args.reason, args.limit or None):
        shown += 1
        if args.json:
            print(json.dumps({"value": entry.value, "kind": entry.kind, "reason": entry.reason,
                              "scope": entry.scope, "source": entry.source, "created_at": entry.created_at,
                              "expires_at": entry.expires_at, "expired": not entry.is_active(now),
                              "note": entry.note}, ensure_ascii=False))
        else:
            expires = "never" if entry.expires_at is None else format_time(entry.expires_at)
            expired = " (expired)" if not entry.is_active(now) else ""
            print(f"{entry.value}\t{entry.kind}\t{entry.reason}\t{entry.scope or '*'}\t{expires}{expired}\t"
                  f"{entry.source}\t{entry.note}")
    total = await store.count_suppressions(args.reason)
    if total > shown:
        print(f"({shown} of {total} shown; --limit 0 shows all, `relay suppress export` writes CSV)",
              file=sys.stderr)
    return 0


@dataclass
class _AsyncEntries:
    """Every entry (or the first ``limit``) in key order, fetched a page at a time."""

    store: QueueStore
    reason: str | None
    limit: int | None
    _page: list[Suppression] = field(default_factory=list)
    _offset: int = 0
    _done: bool = False

    def __aiter__(self) -> _AsyncEntries:
        return self

    async def __anext__(self) -> Suppression:
        if self.limit is not None and self._offset >= self.limit:
            raise StopAsyncIteration
        if not self._page:
            if self._done:
                raise StopAsyncIteration
            size = EXPORT_PAGE if self.limit is None else min(EXPORT_PAGE, self.limit - self._offset)
            self._page = await self.store.list_suppressions(limit=size, offset=self._offset, reason=self.reason)
            self._page.reverse()
            self._done = len(self._page) < size
            if not self._page:
                raise StopAsyncIteration
        self._offset += 1
        return self._page.pop()


async def cmd_purge(store: QueueStore, args: argparse.Namespace) -> int:
    removed = await store.purge_expired_suppressions()
    print(f"purged {removed} expired entr{'y' if removed == 1 else 'ies'}")
    return 0


# -- import -------------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    rows: int = 0
    imported: int = 0
    skipped_expired: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, line: int, message: str) -> None:
        self.errors.append(f"line {line}: {message}")


def entry_from_row(row: dict[str, str | None], now: float) -> Suppression:
    """One CSV row as an entry; ValueError says what is wrong with it."""
    def column(name: str) -> str:
        return (row.get(name) or "").strip()

    raw_kind = column("kind").lower()
    if raw_kind and raw_kind not in KINDS:
        raise ValueError(f"kind {raw_kind!r} is not one of {', '.join(KINDS)}")
    kind = _kind_of(column("value"), raw_kind or None)
    value = check_value(column("value"), kind)
    reason = column("reason") or "manual"
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
    created = parse_time(column("created_at"))
    return Suppression(value=value, kind=kind, reason=reason, source=column("source") or "import",
                       created_at=now if created is None else created, expires_at=parse_time(column("expires_at")),
                       note=column("note"), scope=_scope_of(column("scope"), kind))


def _rows(stream: IO[str], report: ImportReport) -> Iterator[tuple[int, dict[str, str | None]]]:
    reader = csv.DictReader(stream)
    columns = [name.strip() for name in reader.fieldnames or []]
    if "value" not in columns:
        raise ValueError("the first line must be a header naming the columns, including 'value' "
                         f"(known columns: {','.join(CSV_COLUMNS)})")
    unknown = [name for name in columns if name not in CSV_COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)} (known: {','.join(CSV_COLUMNS)})")
    reader.fieldnames = columns
    for row in reader:
        report.rows += 1
        if None in row:  # more fields than the header names
            report.error(reader.line_num, "more fields than the header has columns")
            continue
        yield reader.line_num, cast(dict[str, str | None], row)


async def import_csv(store: QueueStore, stream: IO[str], progress: IO[str] | None = None) -> ImportReport:
    """Import every good row of ``stream``; bad rows are reported, never stop the import."""
    report = ImportReport()
    now = time.time()
    batch: list[Suppression] = []
    for line, row in _rows(stream, report):
        if progress is not None and report.rows % PROGRESS_EVERY == 0:
            print(f"... {report.rows} rows read, {report.imported} imported", file=progress, flush=True)
        try:
            entry = entry_from_row(row, now)
        except ValueError as exc:
            report.error(line, str(exc))
            continue
        if not entry.is_active(now):
            report.skipped_expired += 1
            continue
        batch.append(entry)
        if len(batch) >= IMPORT_BATCH:
            await _flush(store, batch, report)
    await _flush(store, batch, report)
    return report


async def _flush(store: QueueStore, batch: list[Suppression], report: ImportReport) -> None:
    if batch:
        await store.add_suppressions(batch)
        report.imported += len(batch)
        batch.clear()


async def cmd_import(store: QueueStore, args: argparse.Namespace) -> int:
    if args.file == "-":
        report = await import_csv(store, sys.stdin, progress=sys.stderr)
    else:
        # ASYNC230: a CLI command alone on its own event loop; nothing else waits while the file is read.
        with open(args.file, encoding="utf-8-sig", newline="") as stream:  # noqa: ASYNC230
            report = await import_csv(store, stream, progress=sys.stderr)
    for message in report.errors[:MAX_REPORTED_ERRORS]:
        print(f"relay: {args.file}: {message}", file=sys.stderr)
    if len(report.errors) > MAX_REPORTED_ERRORS:
        print(f"relay: … and {len(report.errors) - MAX_REPORTED_ERRORS} more bad rows", file=sys.stderr)
    print(f"imported {report.imported} of {report.rows} rows; rejected {len(report.errors)}, "
          f"skipped {report.skipped_expired} already expired")
    return 1 if report.errors else 0


# -- export -------------------------------------------------------------------------------------------------
async def export_csv(store: QueueStore, stream: IO[str]) -> int:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    async for entry in _AsyncEntries(store, None, None):
        writer.writerow([entry.value, entry.kind, entry.reason, format_time(entry.expires_at), entry.note,
                         entry.scope, entry.source, format_time(entry.created_at)])
        count += 1
    return count


async def cmd_export(store: QueueStore, args: argparse.Namespace) -> int:
    if args.file == "-":
        count = await export_csv(store, sys.stdout)
        sys.stdout.flush()
    else:
        with open(args.file, "w", encoding="utf-8", newline="") as stream:  # noqa: ASYNC230 - as above
            count = await export_csv(store, stream)
    where = f" to {args.file}" if args.file != "-" else ""
    print(f"exported {count} entr{'y' if count == 1 else 'ies'}{where}", file=sys.stderr)
    return 0
