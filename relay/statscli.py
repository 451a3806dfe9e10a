"""``relay stats``: hourly delivery statistics per sender or destination domain, in the terminal.

``relay stats [--by sender|destination] [--hours 24] [--domain D] [--top 10] [--json] [--recompute]``

Reads the materialised hours (:mod:`relay.stats`) after recomputing the current and the previous one (so
the numbers are fresh even where no delivery node runs the job; ``--recompute`` recomputes every hour
shown). Prints, per domain, the totals and rates of the period, then the pictures:

- every domain: a sparkline of recipients sent per hour (``·`` an hour without any) and a bar of its
  bounce rate — a spike or a long bar stands out where a column of numbers does not;
- one domain (``--domain``): an hour-by-hour table with a stacked bar per hour (delivered ``█``, bounced
  ``▓``, deferred ``░``).

``--json`` prints one object per domain (totals, rates, hourly series) instead.

Exit codes: 0 shown, 1 the store failed, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from relay.log import configure_logging
from relay.settings import load_settings
from relay.stats import HOUR, RATE_KINDS, Totals, hour_start, read_window, refresh_hours, series, totals_by_domain
from relay.store.base import HourlyStats, QueueStore, StoreError

SPARKS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉"
EMPTY_HOUR = "·"
COLUMNS = (("sent", "sent"), ("delivered", "deliv"), ("bounced_hard", "hard"), ("bounced_soft", "soft"),
           ("deferred", "defer"), ("complained", "compl"), ("opened", "open"), ("clicked", "click"))
RATE_HEADS = {"delivery_rate": "deliv%", "bounce_rate": "bounce%", "complaint_rate": "compl%"}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("stats", help="hourly delivery statistics per sender or destination domain",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by", choices=("sender", "destination"), default="destination",
                        help="group by sender domain or by destination domain (default: destination)")
    parser.add_argument("--hours", type=int, default=24, help="hours back from now, this one included (default 24)")
    parser.add_argument("--domain", help="one domain, hour by hour")
    parser.add_argument("--top", type=int, default=15, help="domains shown, busiest first (default 15)")
    parser.add_argument("--json", action="store_true", help="one JSON object per domain")
    parser.add_argument("--recompute", action="store_true", help="recompute every hour shown from the events")
    parser.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> int:
    if not 1 <= args.hours <= 24 * 90:
        print("relay: --hours must be between 1 and 2160", file=sys.stderr)
        return 2
    settings, _ = load_settings(args.config)
    configure_logging("warning", settings.log.format)

    async def run() -> int:
        from relay.store import open_store
        store = await open_store(settings.store)
        try:
            print(await render(store, args.by, args.hours, domain=args.domain, top=args.top, as_json=args.json,
                               recompute=args.recompute), end="")
            return 0
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (StoreError, OSError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


async def render(store: QueueStore, dimension: str, hours: int, *, domain: str | None = None, top: int = 15,
                 as_json: bool = False, recompute: bool = False, now: float | None = None,
                 width: int | None = None) -> str:
    """The report as text (what ``relay stats`` prints)."""
    now = time.time() if now is None else now
    await refresh_hours(store, now, hours if recompute else 2, now)
    hour_list = [hour_start(now) - HOUR * n for n in range(hours - 1, -1, -1)]
    rows = await read_window(store, dimension, hour_list[0], hour_list[-1] + HOUR, domain)
    if as_json:
        return _json(rows, hour_list)
    width = width or shutil.get_terminal_size((100, 24)).columns
    head = (f"{'Sender' if dimension == 'sender' else 'Destination'} domains, last {hours} h "
            f"({_stamp(hour_list[0])} to {_stamp(now)} UTC)\n")
    if not rows:
        return head + "\nno mail in this period\n"
    if domain is not None:
        return head + "\n" + domain_report(rows, hour_list, width)
    return head + "\n" + overview(rows, hour_list, dimension, top, width)


def _stamp(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def label(domain: str, dimension: str) -> str:
    if domain:
        return domain
    return "(null sender)" if dimension == "sender" else "(unknown)"


def _rate_text(totals: Totals, kind: str) -> str:
    rate, _ = totals.rate(kind)
    return "-" if rate is None else f"{rate:.1f}" if kind != "complaint_rate" else f"{rate:.2f}"


def overview(rows: Sequence[HourlyStats], hours: Sequence[float], dimension: str, top: int, width: int) -> str:
    by_domain = totals_by_domain(rows)
    ranked = sorted(by_domain.items(), key=lambda item: (-item[1].sent, -item[1].delivered, item[0]))
    shown, rest = ranked[:max(top, 1)], ranked[max(top, 1):]
    lines: list[tuple[str, Totals]] = [(label(d, dimension), t) for d, t in shown]
    if rest:
        others = Totals()
        for _, totals in rest:
            others.add(totals)
        lines.append((f"({len(rest)} more)", others))
    total = Totals()
    for totals in by_domain.values():
        total.add(totals)
    name_width = min(max(len(name) for name, _ in [*lines, ("total", total)]), 40)
    out = [_table(lines, total, name_width)]
    out.append("\nRecipients sent per hour (oldest left, one character an hour) and bounce rate\n")
    spark_width = len(hours)
    bar_width = max(10, min(30, width - name_width - spark_width - 16))
    worst = max((t.rate("bounce_rate")[0] or 0.0 for _, t in shown), default=0.0)
    for domain, totals in shown:
        spark = sparkline(series([r for r in rows if r.domain == domain], hours, "sent"))
        rate = totals.rate("bounce_rate")[0]
        bar = hbar(rate or 0.0, max(worst, 1.0), bar_width)
        rate_text = "   -  " if rate is None else f"{rate:5.1f} %"
        out.append(f"{label(domain, dimension)[:name_width]:<{name_width}}  {spark}  {bar:<{bar_width}} {rate_text}")
    return "\n".join(out) + "\n"


def _table(lines: Sequence[tuple[str, Totals]], total: Totals, name_width: int) -> str:
    heads = [head for _, head in COLUMNS] + [RATE_HEADS[kind] for kind in ("delivery_rate", "bounce_rate",
                                                                             "complaint_rate")]
    cells = [[str(getattr(t, name)) for name, _ in COLUMNS]
             + [_rate_text(t, kind) for kind in ("delivery_rate", "bounce_rate", "complaint_rate")]
             for _, t in [*lines, ("total", total)]]
    widths = [max(len(head), *(len(row[i]) for row in cells)) for i, head in enumerate(heads)]
    rendered = [f"{'domain':<{name_width}}  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for (name, _), row in zip([*lines, ("total", total)], cells, strict=True):
        if name == "total":
            rendered.append("-" * len(rendered[0]))
        rendered.append(f"{name[:name_width]:<{name_width}}  "
                        + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(rendered)


def domain_report(rows: Sequence[HourlyStats], hours: Sequence[float], width: int) -> str:
    """One domain hour by hour: numbers and a stacked bar (delivered █, bounced ▓, deferred ░)."""
    by_hour = {hour: Totals() for hour in hours}
    for row in rows:
        if row.hour in by_hour:
            by_hour[row.hour].add(row)
    peak = max((t.delivered + t.bounced + t.deferred for t in by_hour.values()), default=0) or 1
    bar_width = max(10, min(60, width - 52))
    out = [f"{'hour (UTC)':<16}  {'sent':>6} {'deliv':>6} {'bounce':>6} {'defer':>6} {'compl':>5}  "
           f"delivered █  bounced ▓  deferred ░"]
    total = Totals()
    for hour, t in by_hour.items():
        total.add(t)
        bar = stacked_bar([(t.delivered, "█"), (t.bounced, "▓"), (t.deferred, "░")], peak, bar_width)
        out.append(f"{_stamp(hour):<16}  {t.sent:>6} {t.delivered:>6} {t.bounced:>6} {t.deferred:>6} "
                   f"{t.complained:>5}  {bar}")
    rates = ", ".join(f"{kind.replace('_', ' ')} {_rate_text(total, kind)} %" for kind in RATE_KINDS)
    out.append(f"\ntotal: {total.sent} sent, {total.delivered} delivered, {total.bounced_hard} hard and "
               f"{total.bounced_soft} soft bounces, {total.deferred} deferred, {total.complained} complaints, "
               f"{total.opened} opens, {total.clicked} clicks; {rates}")
    return "\n".join(out) + "\n"


def sparkline(values: Sequence[int]) -> str:
    """One character per value: ``·`` for 0, else ▁…█ scaled to the largest value."""
    peak = max(values, default=0)
    if peak <= 0:
        return EMPTY_HOUR * len(values)
    return "".join(EMPTY_HOUR if v <= 0 else SPARKS[min(len(SPARKS) - 1, (v * len(SPARKS) - 1) // peak)]
                   for v in values)


def hbar(value: float, scale: float, width: int) -> str:
    """A horizontal bar of ``value`` out of ``scale`` in ``width`` characters, in eighths of a character."""
    eighths = round(max(0.0, min(value / scale, 1.0)) * width * 8) if scale > 0 else 0
    return "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")


def stacked_bar(parts: Sequence[tuple[int, str]], scale: int, width: int) -> str:
    """Whole characters per part, scaled to ``scale`` over ``width``; a non-zero part gets at least one."""
    out = ""
    for value, char in parts:
        if value > 0:
            out += char * max(1, round(value / scale * width))
    return out


def _json(rows: Sequence[HourlyStats], hours: Sequence[float]) -> str:
    by_domain = totals_by_domain(rows)
    lines = []
    for domain, totals in sorted(by_domain.items(), key=lambda item: (-item[1].sent, item[0])):
        mine = [r for r in rows if r.domain == domain]
        rates = {kind: totals.rate(kind)[0] for kind in RATE_KINDS}
        lines.append(json.dumps({"domain": domain, "totals": totals.as_dict(), "rates": rates, "hours": list(hours),
                                 "hourly": {name: series(mine, hours, name) for name, _ in COLUMNS}},
                                sort_keys=True))
    return "".join(line + "\n" for line in lines)


__all__ = ["domain_report", "hbar", "overview", "register", "render", "sparkline", "stacked_bar"]
