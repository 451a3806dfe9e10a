"""Acceptance throughput and latency: how fast each server takes mail and answers 250.

For every server (smtp-sink, bare aiosmtpd, Haraka when installed, a private Postfix accepting into its
own fsync'd queue, the relay on SQLite, optionally the relay on Postgres), at every concurrency
(default 1, 20, 200): Postfix's ``smtp-source`` sends ``--count`` messages (one recipient, a new
connection per message, ``--size`` payload bytes) and the wall clock gives messages/s = count / seconds.
Then :mod:`loadclient` measures p50/p99 latency from the end of DATA to the 250 at ``--latency-concurrency``.

Method:
- Each server is started fresh for each run (nothing left from an earlier run), warmed up with
  ``--warmup`` messages, then measured, then stopped by PID.
- Repetitions are interleaved: rep 1 of every server at one concurrency, then the next concurrency, …
  then rep 2 of everything — so a noisy minute on a shared machine hits every server alike.
- The table reports the median of the repetitions, the raw figures, and relay/Postfix and
  relay/aiosmtpd ratios. Only ratios within one run mean anything on a shared machine.
- A run that failed (a 4xx, a dropped connection, a timeout) is shown as such with the server's words;
  it is a finding, not a harness failure. The exit status is non-zero only when the harness itself
  could not do its job (a tool missing, a server that would not start).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    HarnessError,
    Processes,
    SourceRun,
    command_line,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    machine_section,
    markdown_table,
    median,
    percentile,
    require_tools,
    run_smtp_source,
    smtp_source_argv,
    terminate_on_sigterm,
)
from loadclient import LoadResult, run_load_sync
from references import (
    BareAiosmtpd,
    Haraka,
    PostfixInstance,
    RedisServer,
    Reference,
    RelayServer,
    SmtpSink,
    add_relay_options,
    prepare_relay,
)

ALL_SERVERS = ("smtp-sink", "aiosmtpd", "haraka", "postfix", "relay", "relay-pg", "relay-mp", "relay-pg-mp")
DEFAULT_SERVERS = "smtp-sink,aiosmtpd,haraka,postfix,relay"


@dataclass
class Findings:
    """Everything measured, keyed by server, plus what went wrong along the way."""

    rates: dict[tuple[str, int], list[SourceRun]] = field(default_factory=lambda: defaultdict(list))
    latency: dict[str, list[LoadResult]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    server_logs: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    harness_failed: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SMTP acceptance throughput and latency against references")
    parser.add_argument("--count", type=int, default=2000, help="messages per timed run (default 2000)")
    parser.add_argument("--concurrency", default="1,20,200", help="comma-separated (default 1,20,200)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--size", type=int, default=10240, help="payload bytes per message (default 10240)")
    parser.add_argument("--servers", default=DEFAULT_SERVERS,
                        help=f"comma-separated from {','.join(ALL_SERVERS)} (default {DEFAULT_SERVERS})")
    parser.add_argument("--postgres", metavar="ADMIN_URL", nargs="?",
                        const="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="also measure the relay on Postgres: each run gets a throwaway database created "
                             "through ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres), "
                             "dropped when the run ends")
    parser.add_argument("--latency-count", type=int, help="messages per latency run (default: --count)")
    parser.add_argument("--latency-concurrency", type=int, default=20)
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument("--warmup", type=int, default=20, help="messages sent before each timed run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before one run is cut short")
    parser.add_argument("--postfix-mode", choices=["hold", "relay"], default="hold",
                        help="hold: accepted mail stays in Postfix's queue (acceptance only, like relay "
                             "--role smtp; default); relay: Postfix also delivers to a loopback smtp-sink")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop of the Python servers (relay, bare aiosmtpd): auto = as shipped "
                             "(uvloop when installed); asyncio = uvloop hidden from both")
    parser.add_argument("--smtp-workers", type=int, default=1, metavar="N",
                        help="also measure the relay with [server] smtp_workers = N (N SMTP processes on one "
                             "listener, limits in a throwaway loopback redis-server) as relay-mp (and "
                             "relay-pg-mp with --postgres); default 1: not measured")
    add_relay_options(parser)
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.postgres and "relay-pg" not in args.server_list:
        args.server_list.append("relay-pg")
    if args.smtp_workers > 1:
        for single, multi in (("relay", "relay-mp"), ("relay-pg", "relay-pg-mp")):
            if single in args.server_list and multi not in args.server_list:
                args.server_list.append(multi)
    unknown = set(args.server_list) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    if any(s.endswith("-mp") for s in args.server_list) and args.smtp_workers < 2:
        parser.error("relay-mp / relay-pg-mp need --smtp-workers N with N >= 2")
    if any(s.startswith("relay-pg") for s in args.server_list) and not args.postgres:
        args.postgres = "postgresql://postgres@127.0.0.1:5432/postgres"
    if min(args.count, args.reps, args.size, *args.concurrencies) < 1:
        parser.error("--count, --reps, --size and concurrencies must be positive")
    args.latency_count = args.latency_count or args.count
    return args


class ServerFactory:
    """Builds a fresh reference per run; owns the shared pieces (a sink for relaying Postfix, the DB)."""

    def __init__(self, args: argparse.Namespace, procs: Processes) -> None:
        self.args = args
        self.procs = procs
        self.sink: SmtpSink | None = None
        self.redis: RedisServer | None = None

    def build(self, name: str) -> Reference:
        if name == "smtp-sink":
            return SmtpSink(self.procs)
        if name == "aiosmtpd":
            return BareAiosmtpd(self.procs, loop=self.args.loop)
        if name == "haraka":
            return Haraka(self.procs)
        if name == "postfix":
            if self.args.postfix_mode == "relay":
                return PostfixInstance(self.procs, mode="relay", relay_port=self._sink_port())
            return PostfixInstance(self.procs, mode="hold")
        if name == "relay":
            return RelayServer(self.procs, role="smtp", relay_bin=self.args.relay_bin, loop=self.args.loop)
        if name == "relay-pg":
            return RelayServer(self.procs, role="smtp", postgres_admin_url=self.args.postgres,
                               relay_bin=self.args.relay_bin, label="relay-pg", loop=self.args.loop)
        if name == "relay-mp":
            return RelayServer(self.procs, role="smtp", relay_bin=self.args.relay_bin, label="relay-mp",
                               loop=self.args.loop, smtp_workers=self.args.smtp_workers, redis_url=self._redis_url())
        if name == "relay-pg-mp":
            return RelayServer(self.procs, role="smtp", postgres_admin_url=self.args.postgres,
                               relay_bin=self.args.relay_bin, label="relay-pg-mp", loop=self.args.loop,
                               smtp_workers=self.args.smtp_workers, redis_url=self._redis_url())
        raise ValueError(name)

    def _redis_url(self) -> str:
        """One throwaway redis-server for the whole run (each relay run gets its own key prefix)."""
        if self.redis is None:
            self.redis = RedisServer(self.procs)
            self.redis.start()
        return self.redis.url

    def _sink_port(self) -> int:
        if self.sink is None:
            self.sink = SmtpSink(self.procs)
            self.sink.start()
        return self.sink.port

    def close(self) -> None:
        if self.sink is not None:
            self.sink.stop()
            self.sink.remove_workdir()
        if self.redis is not None:
            self.redis.stop()
            self.redis.remove_workdir()


def measure(args: argparse.Namespace, servers: list[str], factory: ServerFactory, findings: Findings,
            say: Callable[[str], None]) -> None:
    for rep in range(1, args.reps + 1):
        for concurrency in args.concurrencies:
            for name in servers:
                run = timed_run(factory, name, findings, say, _smtp_source_work(args, concurrency))
                if isinstance(run, SourceRun):
                    findings.rates[(name, concurrency)].append(run)
                    say(f"rep {rep} c={concurrency:<4} {name:<10} {_describe(run)}")
        if args.no_latency:
            continue
        for name in servers:
            result = timed_run(factory, name, findings, say, lambda ref: run_load_sync(
                ref.port, args.latency_count, args.latency_concurrency, args.size, args.timeout))
            if isinstance(result, LoadResult):
                findings.latency[name].append(result)
                say(f"rep {rep} latency c={args.latency_concurrency} {name:<10} "
                    f"p50 {fmt_ms(percentile(result.latencies, 50))} ms "
                    f"p99 {fmt_ms(percentile(result.latencies, 99))} ms"
                    + (f" errors {dict(result.errors)}" if result.errors else ""))


def _smtp_source_work(args: argparse.Namespace, concurrency: int) -> Callable[[Reference], SourceRun]:
    def work(ref: Reference) -> SourceRun:
        return run_smtp_source(ref.port, concurrency, args.count, args.size, args.timeout)
    return work


def timed_run(factory: ServerFactory, name: str, findings: Findings, say: Callable[[str], None],
              work: Callable[[Reference], SourceRun | LoadResult]) -> SourceRun | LoadResult | None:
    """Start ``name`` fresh, warm it up, run ``work`` against it, stop it; None if it would not start."""
    ref = factory.build(name)
    try:
        ref.start()
    except HarnessError as exc:
        findings.notes.append(f"{name}: did not start: {exc}")
        findings.harness_failed = True
        say(f"{name}: did not start: {exc}")
        ref.stop()
        ref.remove_workdir()
        return None
    try:
        if factory.args.warmup:
            warm = run_smtp_source(ref.port, 1, factory.args.warmup, factory.args.size, 60)
            if not warm.ok:
                findings.notes.append(f"{name}: warm-up failed: {warm.error}")
        result = work(ref)
        if isinstance(ref, RelayServer):
            problems = ref.problems()
            if problems:
                findings.server_logs[name].extend(problems[:20])
        if isinstance(result, SourceRun) and not result.ok and ref.log_tail():
            findings.notes.append(f"{name}: run failed ({result.error}); its log ends:\n"
                                  + _indent(ref.log_tail(8)))
        return result
    finally:
        ref.stop()
        ref.remove_workdir()


def _describe(run: SourceRun) -> str:
    if run.ok:
        return f"{run.rate:8.0f} msg/s ({run.seconds:.2f} s)"
    return f"FAILED after {run.seconds:.2f} s, {run.completed}/{run.count} done: {run.error}"


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def median_rate(runs: list[SourceRun]) -> float:
    """Median msg/s over the successful runs (a failed run has no rate)."""
    return median([r.rate for r in runs if r.ok])


def report(args: argparse.Namespace, servers: list[str], findings: Findings, elapsed: float) -> str:
    conc = args.concurrencies
    headers = ["server", *(f"c={c} msg/s" for c in conc)]
    if not args.no_latency:
        headers += [f"p50 ms (c={args.latency_concurrency})", f"p99 ms (c={args.latency_concurrency})"]
    rows = []
    for name in servers:
        row = [_server_label(name, args)]
        for c in conc:
            runs = findings.rates.get((name, c), [])
            failed = sum(1 for r in runs if not r.ok)
            cell = fmt_rate(median_rate(runs))
            row.append(cell + (f" ({failed}/{len(runs)} failed)" if failed else ""))
        if not args.no_latency:
            samples = [x for res in findings.latency.get(name, []) for x in res.latencies]
            row += [fmt_ms(percentile(samples, 50)), fmt_ms(percentile(samples, 99))]
        rows.append(row)
    for relay in (s for s in servers if s.startswith("relay")):
        for ref in ("postfix", "aiosmtpd"):
            if ref not in servers:
                continue
            row = [f"**{relay} / {ref}**"]
            for c in conc:
                row.append(fmt_ratio(median_rate(findings.rates.get((relay, c), [])),
                                     median_rate(findings.rates.get((ref, c), []))))
            if not args.no_latency:
                row += [_latency_ratio(findings, relay, ref, 50), _latency_ratio(findings, relay, ref, 99)]
            rows.append(row)

    out = ["# Acceptance benchmark", "",
           f"{args.count} messages per run, {args.size}-byte payload, one recipient, a new connection per "
           f"message; median of {args.reps} interleaved repetitions; each server started fresh per run and "
           f"warmed up with {args.warmup} messages. Ratios > 1 mean the relay is faster (msg/s) — for "
           "latency columns the ratio is relay/reference, so < 1 means the relay answers sooner.", "",
           markdown_table(headers, rows), "", "## Raw runs (msg/s per repetition)", ""]
    for name in servers:
        for c in conc:
            runs = findings.rates.get((name, c), [])
            out.append(f"- {name} c={c}: " + ", ".join(
                f"{r.rate:.0f}" if r.ok else f"FAILED ({r.completed}/{r.count}: {r.error})" for r in runs))
    if not args.no_latency:
        out += ["", "## Latency runs", ""]
        for name in servers:
            for i, res in enumerate(findings.latency.get(name, []), 1):
                s = res.summary()
                out.append(f"- {name} rep {i}: {s['accepted']}/{s['attempted']} accepted in {s['seconds']} s, "
                           f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms"
                           + (f", errors {s['errors']}" if res.errors else ""))
    if findings.notes or findings.server_logs:
        out += ["", "## Problems seen", ""]
        out += [f"- {note}" for note in findings.notes]
        for name, lines in findings.server_logs.items():
            out.append(f"- {name} logged {len(lines)} warning/error lines (first ones):")
            out += [f"    {line[:300]}" for line in lines[:10]]
    out += ["", "## Machine", "", machine_section(args.relay_source),
            f"- event loop of the Python servers in this run: {args.loop}", "",
            "## Command", "", f"    {command_line()}", "",
            "Load generator per run: `" + " ".join(smtp_source_argv(0, 0, args.count, args.size))
            .replace(":0", ":PORT").replace("-s 0", "-s C") + "`", "",
            f"Total time: {elapsed:.0f} s."]
    return "\n".join(out)


def _latency_ratio(findings: Findings, relay: str, ref: str, pct: float) -> str:
    mine = [x for r in findings.latency.get(relay, []) for x in r.latencies]
    theirs = [x for r in findings.latency.get(ref, []) for x in r.latencies]
    return fmt_ratio(percentile(mine, pct), percentile(theirs, pct))


def _server_label(name: str, args: argparse.Namespace) -> str:
    return {
        "smtp-sink": "smtp-sink (stores nothing)",
        "aiosmtpd": "aiosmtpd bare (stores nothing)",
        "haraka": "Haraka (discards)",
        "postfix": f"Postfix ({'queue held' if args.postfix_mode == 'hold' else 'queue + relay to sink'}, fsync)",
        "relay": "relay (SQLite, role smtp)",
        "relay-pg": "relay (Postgres, role smtp)",
        "relay-mp": f"relay (SQLite, role smtp, smtp_workers = {args.smtp_workers})",
        "relay-pg-mp": f"relay (Postgres, role smtp, smtp_workers = {args.smtp_workers})",
    }[name]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools("smtp-source", "smtp-sink", "postfix", "postconf")
    servers = list(args.server_list)
    notes = []
    if "haraka" in servers and Haraka.unavailable_reason():
        notes.append(f"haraka skipped: {Haraka.unavailable_reason()}")
        print(f"note: {notes[-1]}", flush=True)
        servers.remove("haraka")
    findings = Findings(notes=notes)
    procs = Processes()
    factory = ServerFactory(args, procs)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    try:
        with terminate_on_sigterm(), contextlib.ExitStack() as stack:
            args.relay_source = prepare_relay(args, stack)
            say(f"relay: {args.relay_source}")
            measure(args, servers, factory, findings, say)
    except HarnessError as exc:
        print(f"accept.py: {exc}", file=sys.stderr)
        return 1
    finally:
        factory.close()
        procs.stop_all()
    text = report(args, servers, findings, time.monotonic() - started)
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if findings.harness_failed else 0


if __name__ == "__main__":
    sys.exit(main())
