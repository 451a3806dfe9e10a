"""End to end: how long from the first message submitted until every message reached the sink.

Two scenarios, each for the relay (SQLite; optionally Postgres) and for a private Postfix, both relaying
every domain to a loopback ``smtp-sink`` that counts what arrives:

- **flow** — the server accepts and delivers at once (relay ``--role all``; Postfix with
  ``relayhost = [127.0.0.1]:SINK``). ``smtp-source`` submits ``--count`` messages at
  ``--submit-concurrency``; the clock runs from the start of submission until the sink has them all.
- **drain** — a held backlog: ``--count`` messages are queued first without being delivered (relay:
  ``--role smtp``, then stopped; Postfix: every message put on hold), then delivery is let go (relay: a
  ``--role delivery`` process on the same queue; Postfix: ``postsuper -H ALL`` + ``postqueue -f``) and
  the clock runs until the sink has them all. Because the relay's trigger includes starting a Python
  process, the time from the first to the last delivery is reported too.

Repetitions are interleaved (relay rep 1, Postfix rep 1, relay rep 2, …); medians and relay/Postfix
ratios are reported. A sink count above ``--count`` after a short settle is reported as duplicates.
Every server and sink is started fresh per run and stopped by PID; every wait is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    HarnessError,
    Processes,
    command_line,
    fmt_rate,
    fmt_ratio,
    machine_section,
    markdown_table,
    median,
    require_tools,
    run_smtp_source,
    terminate_on_sigterm,
)
from references import (
    PostfixInstance,
    Reference,
    RelayRole,
    RelayServer,
    SmtpSink,
    ThrowawayDatabase,
    add_relay_options,
    prepare_relay,
)

SERVERS = ("relay", "relay-pg", "postfix")
SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class Delivery:
    """One timed run: seconds from the trigger to the last arrival (and to the first), and what arrived."""

    seconds: float
    first: float
    expected: int
    arrived: int
    submit_seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.arrived >= self.expected

    @property
    def rate(self) -> float:
        return self.expected / self.seconds if self.ok and self.seconds > 0 else 0.0

    @property
    def lag(self) -> float:
        """Seconds from the end of submission to the last arrival (flow runs)."""
        return self.seconds - self.submit_seconds

    @property
    def drain_rate(self) -> float:
        """Messages per second from the first arrival to the last."""
        span = self.seconds - self.first
        return self.expected / span if self.ok and span > 0 else 0.0


@dataclass
class Findings:
    runs: dict[tuple[str, str], list[Delivery]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    harness_failed: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end delivery: relay vs Postfix into a loopback smtp-sink")
    parser.add_argument("--count", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--size", type=int, default=10240, help="payload bytes per message (default 10240)")
    parser.add_argument("--submit-concurrency", type=int, default=20, help="smtp-source sessions (default 20)")
    parser.add_argument("--scenarios", default="flow,drain", help="flow, drain or both (default flow,drain)")
    parser.add_argument("--servers", default="relay,postfix", help=f"from {','.join(SERVERS)}")
    parser.add_argument("--postgres", metavar="ADMIN_URL", nargs="?",
                        const="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="also run the relay on Postgres, in throwaway databases made through ADMIN_URL")
    parser.add_argument("--dest-concurrency", type=int,
                        help="connections to the one destination, for both: relay [delivery.concurrency] "
                             "per_destination and Postfix default_destination_concurrency_limit (default: "
                             "each server's own default, 10 and 20)")
    parser.add_argument("--warmup", type=int, default=20, help="messages delivered before a timed flow run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before one run is abandoned")
    parser.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                        help="event loop of the relay: auto = as shipped (uvloop when installed); asyncio = "
                             "uvloop hidden from it")
    add_relay_options(parser)
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.postgres and "relay-pg" not in args.server_list:
        args.server_list.insert(1, "relay-pg")
    if "relay-pg" in args.server_list and not args.postgres:
        args.postgres = "postgresql://postgres@127.0.0.1:5432/postgres"
    if set(args.scenario_list) - {"flow", "drain"} or set(args.server_list) - set(SERVERS):
        parser.error("unknown scenario or server")
    if min(args.count, args.reps, args.size, args.submit_concurrency) < 1:
        parser.error("--count, --reps, --size and --submit-concurrency must be positive")
    return args


def wait_for_arrivals(sink: SmtpSink, target: int, started: float, timeout: float,
                      server: Reference | None = None) -> tuple[float, float, int, str]:
    """Poll the sink until ``target`` messages arrived: (seconds to last, seconds to first, count, error).

    For the relay, its log is watched too: a failed attempt or a paused destination ends the wait at
    once with that log line as the error (its retry would come minutes later, past any timeout).
    """
    first = float("nan")
    deadline = started + timeout
    next_check = 0.0
    count = sink.messages()
    while count < target:
        now = time.perf_counter()
        if count and first != first:
            first = now - started
        if now > deadline:
            return now - started, first, count, f"timed out: {count}/{target} arrived"
        if isinstance(server, RelayServer) and now >= next_check:
            next_check = now + 0.25
            trouble = server.delivery_failure()
            if trouble:
                return now - started, first, count, f"delivery failing ({count}/{target} arrived): {trouble[:600]}"
        time.sleep(0.01)
        count = sink.messages()
    seconds = time.perf_counter() - started
    return seconds, (seconds if first != first else first), count, ""


def settle_and_count(sink: SmtpSink, expected: int) -> str:
    """After a short settle, anything beyond ``expected`` is a duplicate delivery."""
    time.sleep(SETTLE_SECONDS)
    extra = sink.messages() - expected
    return f"{extra} duplicate deliveries at the sink" if extra > 0 else ""


# --- flow ------------------------------------------------------------------------------------------


def flow_server(args: argparse.Namespace, procs: Processes, name: str, sink_port: int) -> Reference:
    if name == "postfix":
        return PostfixInstance(procs, mode="relay", relay_port=sink_port,
                               destination_concurrency=args.dest_concurrency)
    return RelayServer(procs, role="all", route_port=sink_port, per_destination=args.dest_concurrency,
                       relay_bin=args.relay_bin, label=name, loop=args.loop,
                       postgres_admin_url=args.postgres if name == "relay-pg" else "")


def run_flow(args: argparse.Namespace, procs: Processes, name: str) -> tuple[Delivery, list[str]]:
    with SmtpSink(procs) as sink, flow_server(args, procs, name, sink.port) as server:
        base = 0
        if args.warmup:
            warm = run_smtp_source(server.port, 1, args.warmup, args.size, 60)
            _, _, base, trouble = wait_for_arrivals(sink, args.warmup, time.perf_counter(), 60, server)
            if not warm.ok or trouble:
                return Delivery(0, 0, args.count, base, error=f"warm-up failed: {warm.error or trouble}"), \
                    _problems(server)
        started = time.perf_counter()
        submitted = run_smtp_source(server.port, args.submit_concurrency, args.count, args.size, args.timeout)
        submit_seconds = time.perf_counter() - started
        if not submitted.ok:
            return Delivery(submit_seconds, 0, args.count, sink.messages() - base, submit_seconds,
                            f"submission failed: {submitted.error}"), _problems(server)
        seconds, first, count, error = wait_for_arrivals(sink, base + args.count, started, args.timeout, server)
        error = error or settle_and_count(sink, base + args.count)
        return Delivery(seconds, first, args.count, count - base, submit_seconds, error), _problems(server)


# --- drain -----------------------------------------------------------------------------------------


def run_drain(args: argparse.Namespace, procs: Processes, name: str) -> tuple[Delivery, list[str]]:
    with SmtpSink(procs) as sink:
        if name == "postfix":
            return drain_postfix(args, procs, sink), []
        return drain_relay(args, procs, sink, name)


def drain_postfix(args: argparse.Namespace, procs: Processes, sink: SmtpSink) -> Delivery:
    with PostfixInstance(procs, mode="hold", relay_port=sink.port,
                         destination_concurrency=args.dest_concurrency) as server:
        queued = run_smtp_source(server.port, args.submit_concurrency, args.count, args.size, args.timeout)
        if not queued.ok:
            return Delivery(0, 0, args.count, 0, error=f"queueing failed: {queued.error}")
        deadline = time.monotonic() + 60
        while server.held() < args.count and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.held() != args.count:
            return Delivery(0, 0, args.count, 0, error=f"{server.held()} held, expected {args.count}")
        started = time.perf_counter()
        server.release_and_flush()
        seconds, first, count, error = wait_for_arrivals(sink, args.count, started, args.timeout)
        return Delivery(seconds, first, args.count, count, error=error or settle_and_count(sink, args.count))


def drain_relay(args: argparse.Namespace, procs: Processes, sink: SmtpSink,
                name: str) -> tuple[Delivery, list[str]]:
    with contextlib.ExitStack() as stack:
        state = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-drain-")))
        store_url = ""
        if name == "relay-pg":
            store_url = stack.enter_context(ThrowawayDatabase(args.postgres)).url

        def relay(role: RelayRole) -> RelayServer:
            # Both processes share one queue: the same state directory (SQLite) or database.
            return RelayServer(procs, role=role, route_port=sink.port, state_dir=state, store_url=store_url,
                               per_destination=args.dest_concurrency, relay_bin=args.relay_bin, label=name,
                               loop=args.loop)

        with relay("smtp") as acceptor:
            queued = run_smtp_source(acceptor.port, args.submit_concurrency, args.count, args.size, args.timeout)
            problems = _problems(acceptor)
        if not queued.ok:
            return Delivery(0, 0, args.count, 0, error=f"queueing failed: {queued.error}"), problems
        if sink.messages():
            return Delivery(0, 0, args.count, 0, error="role smtp delivered mail"), problems
        started = time.perf_counter()
        with relay("delivery") as deliverer:
            seconds, first, count, error = wait_for_arrivals(sink, args.count, started, args.timeout, deliverer)
            error = error or settle_and_count(sink, args.count)
            problems += _problems(deliverer)
        return Delivery(seconds, first, args.count, count, error=error), problems


def _problems(ref: Reference) -> list[str]:
    return ref.problems() if isinstance(ref, RelayServer) else []


# --- the run and its report ------------------------------------------------------------------------


def measure(args: argparse.Namespace, procs: Processes, findings: Findings, say: Callable[[str], None]) -> None:
    runners = {"flow": run_flow, "drain": run_drain}
    for rep in range(1, args.reps + 1):
        for scenario in args.scenario_list:
            for name in args.server_list:
                try:
                    delivery, problems = runners[scenario](args, procs, name)
                except HarnessError as exc:
                    findings.harness_failed = True
                    findings.notes.append(f"{scenario} {name} rep {rep}: harness: {exc}")
                    say(findings.notes[-1])
                    continue
                findings.runs[(scenario, name)].append(delivery)
                if problems:
                    findings.notes.append(f"{scenario} {name} rep {rep}: the relay logged {len(problems)} "
                                          "warning/error lines, first: " + " | ".join(p[:300] for p in problems[:3]))
                say(f"rep {rep} {scenario:<5} {name:<9} {_describe(delivery)}")


def _describe(d: Delivery) -> str:
    if not d.ok:
        return f"FAILED: {d.error} ({d.arrived}/{d.expected} arrived after {d.seconds:.2f} s)"
    if d.submit_seconds:
        return (f"{d.seconds:6.2f} s = {d.rate:6.0f} msg/s (submission took {d.submit_seconds:.2f} s, "
                f"last arrival {d.lag:.2f} s after it)")
    return (f"{d.seconds:6.2f} s = {d.rate:6.0f} msg/s (first arrival after {d.first:.2f} s; "
            f"first→last {d.drain_rate:.0f} msg/s)")


# What each scenario reports: (column title, Delivery attribute, a rate (ratio-able) or seconds).
COLUMNS = {
    "flow": [("s", "seconds", False), ("msg/s", "rate", True), ("lag after submit, s", "lag", False)],
    "drain": [("s", "seconds", False), ("msg/s", "rate", True), ("first→last msg/s", "drain_rate", True)],
}


def report(args: argparse.Namespace, findings: Findings, elapsed: float) -> str:
    headers = ["server"]
    for scenario in args.scenario_list:
        headers += [f"{scenario}: {title}" for title, _, _ in COLUMNS[scenario]]

    def med(scenario: str, name: str, attr: str) -> float:
        return median([getattr(d, attr) for d in findings.runs.get((scenario, name), []) if d.ok])

    rows = []
    for name in args.server_list:
        row = [name]
        for scenario in args.scenario_list:
            failed = sum(1 for d in findings.runs.get((scenario, name), []) if not d.ok)
            for i, (_, attr, is_rate) in enumerate(COLUMNS[scenario]):
                value = med(scenario, name, attr)
                cell = fmt_rate(value) if is_rate else ("—" if value != value else f"{value:.2f}")
                row.append(cell + (f" ({failed} failed)" if failed and i == 0 else ""))
        rows.append(row)
    if "postfix" in args.server_list:
        for relay in (s for s in args.server_list if s.startswith("relay")):
            row = [f"**{relay} / postfix**"]
            for scenario in args.scenario_list:
                row += [fmt_ratio(med(scenario, relay, attr), med(scenario, "postfix", attr)) if is_rate else ""
                        for _, attr, is_rate in COLUMNS[scenario]]
            rows.append(row)

    dest = (f"{args.dest_concurrency} connections to the sink for both" if args.dest_concurrency else
            "each server's default destination concurrency (relay per_destination 10, Postfix 20)")
    out = ["# End-to-end benchmark", "",
           f"{args.count} messages per run ({args.size}-byte payload, one recipient), submitted with smtp-source "
           f"at c={args.submit_concurrency}, delivered to a loopback smtp-sink; {dest}. Median of {args.reps} "
           "interleaved repetitions; every server and sink started fresh per run.", "",
           "- flow: clock from the start of submission to the last arrival at the sink; lag: from the "
           "last 250 of the submission to the last arrival.",
           "- drain: clock from the release of a held backlog (relay: start of a `--role delivery` process "
           "on the queue a `--role smtp` process filled; Postfix: `postsuper -H ALL; postqueue -f`) to the "
           "last arrival; first→last: the rate between the first and the last arrival, which leaves out "
           "the relay's process start.",
           "- Ratios > 1: the relay is faster.", "",
           markdown_table(headers, rows), "", "## Raw runs", ""]
    for scenario in args.scenario_list:
        for name in args.server_list:
            runs = findings.runs.get((scenario, name), [])
            out.append(f"- {scenario} {name}: " + "; ".join(_describe(d) for d in runs))
    if findings.notes:
        out += ["", "## Problems seen", "", *(f"- {n}" for n in findings.notes)]
    out += ["", "## Machine", "", machine_section(args.relay_source),
            f"- event loop of the Python servers in this run: {args.loop}", "",
            "## Command", "", f"    {command_line()}", "", f"Total time: {elapsed:.0f} s."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools("smtp-source", "smtp-sink", "postfix", "postconf", "postsuper", "postqueue")
    findings = Findings()
    procs = Processes()
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    try:
        with terminate_on_sigterm(), contextlib.ExitStack() as stack:
            args.relay_source = prepare_relay(args, stack)
            say(f"relay: {args.relay_source}")
            measure(args, procs, findings, say)
    except HarnessError as exc:
        print(f"e2e.py: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    text = report(args, findings, time.monotonic() - started)
    print("\n" + text)
    if args.output:
        args.output.write_text(text + "\n")
    return 1 if findings.harness_failed else 0


if __name__ == "__main__":
    sys.exit(main())
