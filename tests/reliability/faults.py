"""Isolation under faults: a healthy destination keeps its delivery rate while others misbehave.

:func:`run_isolation` (CI: ``tests/reliability/test_faults.py``; on demand: ``scripts/reliability``) starts
``relay serve`` (uvloop) whose DNS is a :class:`~tests.support.dnsserver.DnsTestServer` and whose routes
send each test domain to a server on loopback:

- ``healthy.example`` → a :class:`~tests.reliability.harness.RecordingSink` (the rate is measured here);
- ``tarpit.example`` → :class:`~tests.reliability.hostile.Tarpit` (1 byte/s, forever), with a backlog of
  ``backlog`` messages, more than the delivery side's in-flight budget, so that a relay which let one slow
  destination take every claim slot would starve the healthy one;
- ``reset.example`` (connection reset mid-DATA), ``garbage.example`` (a greeting that is not SMTP),
  ``endless.example`` (a multi-line EHLO reply that never ends), ``brokentls.example`` (STARTTLS offered,
  the handshake fails; the route requires TLS);
- by MX through the DNS server: ``dns-timeout`` (never answers), ``dns-servfail``, ``cname-loop``
  (MX query answered by a CNAME loop), ``huge`` (an MX RRset of 400 records: TCP fall-back), ``null-mx``
  (RFC 7505), ``mx-loopback`` and ``mx-private`` (MX hosts at 127.0.0.1 / RFC 1918 addresses: refused by
  default).

Fault mail is sent with the null sender (no bounces), in waves, and retried every few seconds; the circuit
breaker is set so high that it never pauses a destination — the faults keep running through the measurement, and the
isolation must come from the per-destination limits and the stage timeouts alone.

Measured, in one run on one relay: the healthy rate with no fault traffic (``normal``), then with every
fault running (``faulted``), then normal again after the fault traffic was drained (so drift in the
machine's load shows up). The property is ``faulted / mean(normal) >= MIN_RATIO`` — a ratio, not a speed.
Also checked: every fault was actually exercised while measuring (attempts in the relay's log), the relay
logged no crash, and it stops cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from relay.policies.retry import RetrySchedule

from relay.sink import SinkServer
from tests.reliability.harness import (
    Outgoing,
    RecordingSink,
    RelayConfig,
    RelayProcess,
    build_message,
    free_port,
    log_problems,
    relay_config,
    submit_all,
)
from tests.reliability.hostile import Tarpit, hostile_sink, misbehave
from tests.support.dnsserver import DnsTestServer

MIN_RATIO = 0.8
SMTP_FAULTS = ("tarpit", "reset", "garbage", "endless", "brokentls")
DNS_FAULTS = ("dns-timeout", "dns-servfail", "cname-loop", "huge", "null-mx", "mx-loopback", "mx-private")
#: Faults that end in a bounce (no retry), so they are only exercised once per message.
PERMANENT_FAULTS = ("null-mx",)
#: The relay's DNS timeout in these runs (``[delivery.dns] timeout``), in seconds.
DNS_TIMEOUT = 1.0
#: Fault mail is submitted in this many waves spread over one retry period: each fault then has attempts
#: due at staggered instants, so that even a measured window shorter than one retry cycle (a lookup that
#: times out, then the retry delay) sees every fault at work — not only the lucky ones.
FAULT_WAVES = 3


@dataclass
class IsolationPlan:
    workdir: Path
    healthy: int = 1500                # messages per measured phase
    backlog: int = 500                 # messages queued for the tarpit
    per_fault: int = 10                # messages for every other fault
    rounds: int = 1                    # faulted phases, each followed by a normal one
    retry: str = "3s*"                 # how often fault mail is retried (each fault runs all along)
    clients: int = 8
    seed: int = 3


@dataclass
class IsolationReport:
    normal: list[float] = field(default_factory=list)     # healthy messages/s, no fault traffic
    faulted: list[float] = field(default_factory=list)    # … with every fault running
    fault_attempts: Counter[str] = field(default_factory=Counter)
    tarpit_connections: int = 0
    healthy_refused: int = 0
    log_problems: list[str] = field(default_factory=list)
    exit_code: int | None = None
    elapsed: float = 0.0

    @property
    def ratio(self) -> float:
        """Median faulted rate over median normal rate."""
        normal = statistics.median(self.normal) if self.normal else 0.0
        return statistics.median(self.faulted) / normal if normal and self.faulted else 0.0

    def failures(self) -> list[str]:
        found = []
        if self.ratio < MIN_RATIO:
            found.append(f"healthy rate under faults is {self.ratio:.0%} of normal (< {MIN_RATIO:.0%})")
        missing = [f for f in (*SMTP_FAULTS, *DNS_FAULTS) if not self.fault_attempts.get(f)]
        if missing:
            found.append(f"faults not exercised while measuring: {missing}")
        if self.healthy_refused:
            found.append(f"{self.healthy_refused} healthy messages refused at submission")
        if self.log_problems:
            found.append(f"{len(self.log_problems)} crash lines in the log, first: {self.log_problems[0][:500]}")
        if self.exit_code != 0:
            found.append(f"graceful stop exited {self.exit_code}")
        return found

    def summary(self) -> str:
        attempts = " ".join(f"{k}={v}" for k, v in sorted(self.fault_attempts.items()))
        rates = lambda values: "/".join(f"{v:.0f}" for v in values)  # noqa: E731 - a local formatter
        return (f"healthy msgs/s normal={rates(self.normal)} faulted={rates(self.faulted)} ratio={self.ratio:.2f} "
                f"tarpit_connections={self.tarpit_connections} fault_attempts_while_measuring: {attempts} "
                f"elapsed={self.elapsed:.1f}s")


def _zone(dns: DnsTestServer) -> None:
    """The DNS faults. TTLs of one second: the relay looks them up again at every attempt while they run,
    and once they are switched off (NXDOMAIN) its cache lets go of them at once."""
    ttl = 1
    dns.behave("dns-timeout.example", "timeout")
    dns.behave("dns-servfail.example", "servfail")
    dns.add_cname_loop("cname-loop.example", "loop2.cname-loop.example", ttl=ttl)
    dns.add_many("huge.example", "MX", [f"{n % 50} mx{n}.huge.example." for n in range(400)], ttl=ttl)
    for n in range(400):
        dns.add(f"mx{n}.huge.example", "A", "127.0.0.1", ttl=ttl)
    dns.add("null-mx.example", "MX", "0 .", ttl=ttl)
    dns.add("mx-loopback.example", "MX", "10 lo.mx-loopback.example.", ttl=ttl)
    dns.add("lo.mx-loopback.example", "A", "127.0.0.1", ttl=ttl)
    dns.add("mx-private.example", "MX", "10 a.mx-private.example.", ttl=ttl)
    dns.add("mx-private.example", "MX", "20 b.mx-private.example.", ttl=ttl)
    dns.add("a.mx-private.example", "A", "10.1.2.3", ttl=ttl)
    dns.add("b.mx-private.example", "A", "192.168.7.8", ttl=ttl)
    dns.add("b.mx-private.example", "AAAA", "fd00::1", ttl=ttl)
    dns.add("example", "SOA", "ns.example. host.example. 1 3600 600 86400 1", ttl=ttl)


def _routes(ports: dict[str, int]) -> str:
    lines = ["[delivery.routes.domains]",
             f'"healthy.example" = {{ kind = "host", host = "127.0.0.1", port = {ports["healthy"]}, tls = "none" }}']
    for name in SMTP_FAULTS:
        tls = "required" if name == "brokentls" else "none"
        lines.append(f'"{name}.example" = {{ kind = "host", host = "127.0.0.1", port = {ports[name]}, tls = "{tls}" }}')
    return "\n".join(lines)


def _config(plan: IsolationPlan, ports: dict[str, int], dns_port: int, relay_port: int) -> Path:
    routes = _routes(ports)
    extra = f"""
[delivery.dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = {DNS_TIMEOUT}

[delivery.timeouts]
connect = 2.0
greeting = 3.0
ehlo = 3.0
mail = 3.0
rcpt = 3.0
data_init = 3.0
data_block = 3.0
data_end = 3.0

[delivery.circuit_breaker]
failures = 1000000

{routes}
"""
    config = RelayConfig(workdir=plan.workdir, store_url=f"sqlite:///{plan.workdir}/queue.db", port=relay_port,
                         sink_port=ports["healthy"], lease_seconds=60.0, retry_schedule=plan.retry, extra=extra)
    path = relay_config(config)
    # relay_config routes everything to the sink by default; here the default is MX (through our DNS).
    text = path.read_text().replace(
        f'default = {{ kind = "host", host = "127.0.0.1", port = {ports["healthy"]}, tls = "none" }}',
        'default = { kind = "mx" }')
    path.write_text(text)
    return path


def _messages(prefix: str, domain: str, count: int, sender: str, rng: random.Random) -> list[Outgoing]:
    out = []
    for n in range(count):
        recipient = f"r{n}@{domain}"
        message_id = f"{prefix}-{n}@reliability.test"
        out.append(Outgoing(sender, (recipient,), build_message(message_id, [recipient], rng, size=2000)))
    return out


async def _measure(relay: RelayProcess, sink: RecordingSink, phase: str, plan: IsolationPlan,
                   rng: random.Random) -> tuple[float, int]:
    """Healthy messages/s from the start of submission to the last delivery; and how many were refused."""
    messages = _messages(phase, "healthy.example", plan.healthy, "sender@healthy.example", rng)
    already = len(sink.deliveries)
    started = time.monotonic()
    replies = await submit_all(relay.port, messages, plan.clients)
    refused = sum(1 for r in replies if not r.startswith(b"250"))
    wanted = plan.healthy - refused
    deadline = started + 600
    while len(sink.deliveries) - already < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{phase}: {len(sink.deliveries) - already} of {wanted} healthy messages delivered")
        await asyncio.sleep(0.01)
    last = max(d.at for d in sink.deliveries[already:])
    return plan.healthy / (last - started), refused


def _attempts_between(relay: RelayProcess, start: float, end: float) -> Counter[str]:
    """Delivery attempts (and DNS failures) per fault domain logged between two wall-clock times."""
    counts: Counter[str] = Counter()
    for line in relay.log_lines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") != "delivery_attempt":
            continue
        stamp = _epoch(record.get("timestamp", ""))
        domain = str(record.get("domain", ""))
        if start <= stamp <= end and domain.endswith(".example"):
            counts[domain.removesuffix(".example")] += 1
    return counts


def _dns_queries_during(dns: DnsTestServer, start: float, end: float) -> Counter[str]:
    """Queries for each DNS fault's name (MX, and A for the names that are their own host) that were at work
    between two wall-clock instants. A query that is never answered keeps the relay waiting for its whole
    timeout, so one sent up to ``DNS_TIMEOUT`` before the window was still pending inside it."""
    counts: Counter[str] = Counter()
    for name in DNS_FAULTS:
        since = start - DNS_TIMEOUT if name == "dns-timeout" else start
        counts[name] = sum(dns.queries_between(f"{name}.example", rdtype, since, end) for rdtype in ("MX", "A"))
    return +counts


def _epoch(iso: str) -> float:
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


async def _submit_in_waves(port: int, traffic: list[Outgoing], plan: IsolationPlan) -> None:
    """Submit the fault mail in :data:`FAULT_WAVES` waves spread over one retry period; each fault's mail is
    dealt across the waves, so every wave holds mail for every fault."""
    period = RetrySchedule.parse(plan.retry).steps[0]   # the first retry delay
    waves: list[list[Outgoing]] = [[] for _ in range(FAULT_WAVES)]
    dealt: Counter[str] = Counter()
    for message in traffic:
        domain = message.recipients[0].rpartition("@")[2]
        waves[dealt[domain] % FAULT_WAVES].append(message)
        dealt[domain] += 1
    for number, wave in enumerate(waves):
        if number:
            await asyncio.sleep(period / FAULT_WAVES)
        await submit_all(port, wave, plan.clients)


class _Faults:
    """The fault servers and zone, switched on (misbehaving) and off (refusing at once, NXDOMAIN)."""

    def __init__(self, dns: DnsTestServer, tarpit: Tarpit, servers: dict[str, SinkServer]) -> None:
        self.dns, self.tarpit, self.servers = dns, tarpit, servers

    def on(self) -> None:
        _zone(self.dns)
        self.tarpit.refuse = False
        for name, server in self.servers.items():
            misbehave(server, name)

    def off(self) -> None:
        self.dns.clear()                  # NXDOMAIN for every fault domain: a permanent failure
        self.tarpit.refuse = True
        for server in self.servers.values():
            server.clear_rules()
            server.set_rule("*", "554 5.7.1 go away (faults off)", stage="connect")


async def run_isolation(plan: IsolationPlan) -> IsolationReport:
    report = IsolationReport()
    rng = random.Random(plan.seed)
    started = time.monotonic()
    plan.workdir.mkdir(parents=True, exist_ok=True)
    windows: list[tuple[float, float]] = []
    async with contextlib.AsyncExitStack() as stack:
        dns = await stack.enter_async_context(DnsTestServer())
        healthy = await stack.enter_async_context(RecordingSink())
        tarpit = await stack.enter_async_context(Tarpit(interval=1.0))
        servers = {name: hostile_sink(name) for name in SMTP_FAULTS if name != "tarpit"}
        for server in servers.values():
            await stack.enter_async_context(server)
        faults = _Faults(dns, tarpit, servers)
        ports = {"healthy": healthy.port, "tarpit": tarpit.port, **{k: s.port for k, s in servers.items()}}
        relay_port = free_port()
        relay = RelayProcess(_config(plan, ports, dns.port, relay_port), relay_port, plan.workdir)
        relay.start()
        try:
            await relay.wait_ready()
            await _measure(relay, healthy, "warmup", IsolationPlan(plan.workdir, healthy=200), rng)
            rate, refused = await _measure(relay, healthy, "normal-0", plan, rng)
            report.normal.append(rate)
            report.healthy_refused += refused
            for round_number in range(plan.rounds):
                faults.on()
                traffic = _messages(f"tarpit-{round_number}", "tarpit.example", plan.backlog, "", rng)
                for name in (*SMTP_FAULTS[1:], *DNS_FAULTS):
                    traffic += _messages(f"{name}-{round_number}", f"{name}.example", plan.per_fault, "", rng)
                rng.shuffle(traffic)
                await _submit_in_waves(relay.port, traffic, plan)
                await asyncio.sleep(5.0)           # every fault running, first lookups and attempts over
                window_start = time.time()
                rate, refused = await _measure(relay, healthy, f"faulted-{round_number}", plan, rng)
                window_end = time.time()
                windows.append((window_start, window_end))
                # A lookup that never gets an answer is logged when the attempt gives up, which may be after
                # the window: the queries the DNS server got while measuring show it at work.
                report.fault_attempts.update(_dns_queries_during(dns, window_start, window_end))
                # A tarpit attempt is logged only when it gives up: connections held now show it at work.
                report.fault_attempts["tarpit"] += tarpit.open
                report.faulted.append(rate)
                report.healthy_refused += refused
                faults.off()
                await asyncio.sleep(1.0)
                rate, refused = await _measure(relay, healthy, f"normal-{round_number + 1}", plan, rng)
                report.normal.append(rate)
                report.healthy_refused += refused
            report.tarpit_connections = tarpit.connections
            report.exit_code = await relay.stop()
        finally:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.kill()
        for window_start, window_end in windows:
            report.fault_attempts += _attempts_between(relay, window_start, window_end)
        for name in PERMANENT_FAULTS:   # bounced at their first attempt, before the window opened
            report.fault_attempts[name] += _attempts_between(relay, 0, windows[-1][1])[name]
        report.log_problems = log_problems(relay.log_lines())
    report.elapsed = time.monotonic() - started
    return report
