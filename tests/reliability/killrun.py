"""Durability under SIGKILL: submit mail while killing the relay again and again, then count deliveries.

:func:`run_kill_test` (used by ``tests/reliability/test_kill.py`` with CI-sized numbers and by
``scripts/reliability`` with the full ones) does this:

1. A :class:`~tests.reliability.harness.RecordingSink` on loopback; a relay process (role all, the
   chosen store) routing every domain to it, with a short lease so that the claims of a killed relay
   come back within seconds.
2. ``clients`` concurrent SMTP clients submit ``messages`` messages (1-3 recipients, 200 B - 400 KB,
   each with the SHA-256 of its body in a header), several per connection. Each submission ends in one
   of three ways: ``250`` (acknowledged); a definite refusal; or *unknown* — the connection died after
   the final dot was written and before a reply. A message that is not acknowledged is submitted again
   under a new Message-ID, until every one of the ``messages`` has an acknowledged copy. A message
   whose final dot was never written is retried under the same id (the relay cannot have it).
3. Meanwhile the relay is SIGKILLed ``kills`` times, each after a random number of acknowledgements
   since it last started (so the instants fall all over the submission stream, deliveries running
   alongside), and restarted at once. Kills left when every message is acknowledged happen at random
   instants while the queue drains.
4. The queue drains (every recipient row final, every acknowledged recipient delivered), then the relay
   gets SIGTERM and must exit 0.

What is checked (:meth:`KillReport.failures`):
- lost: an acknowledged (message, recipient) never delivered — must be 0;
- corrupt: a delivery whose body does not match its hash, or with an unknown Message-ID — 0;
- refused but delivered: a message answered with a definite refusal and delivered anyway — 0;
- unexplained duplicates: a (message, recipient) delivered twice with no kill in between — 0; duplicates
  with a kill between the copies (delivered, killed before the result was recorded) are counted;
- every recipient row in the store ends ``delivered``; no crash in the relay's logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import sqlite3
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg

from tests.reliability.harness import (
    RecordingSink,
    RelayConfig,
    RelayProcess,
    build_message,
    dot_stuffed,
    free_port,
    log_problems,
    relay_config,
)

Outcome = Literal["acked", "refused", "unknown"]
RCPT_DOMAINS = ("a.reliability.test", "b.reliability.test", "c.reliability.test")


@dataclass
class KillPlan:
    store_url: str
    workdir: Path
    messages: int = 2000
    kills: int = 10
    clients: int = 8
    seed: int = 7
    drain_timeout: float = 180.0
    lease_seconds: float = 4.0


@dataclass
class KillReport:
    store: str
    messages: int
    kills: int = 0
    submissions: int = 0
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    unknown_delivered: int = 0
    unsent_retries: int = 0
    deliveries: int = 0
    lost: int = 0
    corrupt: int = 0
    refused_delivered: int = 0
    duplicates: int = 0
    unexplained_duplicates: int = 0
    rows_not_delivered: int = 0
    final_states: dict[str, int] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    exit_code: int | None = None
    elapsed: float = 0.0
    restart_seconds: list[float] = field(default_factory=list)

    def failures(self) -> list[str]:
        found = []
        for name in ("lost", "corrupt", "refused_delivered", "unexplained_duplicates", "rows_not_delivered"):
            if getattr(self, name):
                found.append(f"{name}={getattr(self, name)}")
        if self.acked < self.messages:
            found.append(f"only {self.acked} of {self.messages} messages acknowledged")
        if self.log_problems:
            found.append(f"{len(self.log_problems)} crash lines in the relay log, first: {self.log_problems[0][:500]}")
        if self.exit_code != 0:
            found.append(f"graceful stop exited {self.exit_code}")
        return found

    def summary(self) -> str:
        restart = (sum(self.restart_seconds) / len(self.restart_seconds)) if self.restart_seconds else 0.0
        return (f"store={self.store} messages={self.messages} kills={self.kills} submissions={self.submissions} "
                f"acked={self.acked} refused={self.refused} unknown={self.unknown} "
                f"(delivered {self.unknown_delivered}) deliveries={self.deliveries} lost={self.lost} "
                f"duplicates={self.duplicates} unexplained_duplicates={self.unexplained_duplicates} "
                f"corrupt={self.corrupt} refused_delivered={self.refused_delivered} "
                f"rows_not_delivered={self.rows_not_delivered} mean_restart={restart:.2f}s "
                f"elapsed={self.elapsed:.1f}s")


@dataclass
class _Submission:
    number: int            # which of the `messages` messages
    copy: int              # resubmissions under a new Message-ID
    recipients: list[str]
    seed: int

    @property
    def message_id(self) -> str:
        return f"kill-{self.number}-{self.copy}@reliability.test"

    def data(self) -> bytes:
        """Built when sent (20,000 bodies held at once would be hundreds of megabytes), the same every time."""
        return build_message(self.message_id, self.recipients, random.Random(self.seed))


class _ConnectionLost(Exception):
    def __init__(self, after_dot: bool) -> None:
        super().__init__("connection lost")
        self.after_dot = after_dot


class _Run:
    def __init__(self, plan: KillPlan, sink: RecordingSink, relay: RelayProcess) -> None:
        self.plan = plan
        self.sink = sink
        self.relay = relay
        self.rng = random.Random(plan.seed)
        self.report = KillReport(store="sqlite" if plan.store_url.startswith("sqlite") else "postgres",
                                 messages=plan.messages)
        self.todo: deque[_Submission] = deque()
        self.outcomes: dict[str, Outcome] = {}          # Message-ID -> outcome
        self.recipients: dict[str, list[str]] = {}      # Message-ID -> recipients
        self.acked_numbers: set[int] = set()
        self.acks_since_start = 0
        self.kill_after = self._next_kill_threshold()
        self.kill_requested = asyncio.Event()
        self.relay_up = asyncio.Event()
        self.all_acked = asyncio.Event()

    # -- messages -----------------------------------------------------------------------------------
    def _new_submission(self, number: int, copy: int) -> _Submission:
        count = 1 if self.rng.random() < 0.8 else self.rng.randint(2, 3)
        recipients = [f"u{number}-{i}@{self.rng.choice(RCPT_DOMAINS)}" for i in range(count)]
        return _Submission(number, copy, recipients, self.rng.getrandbits(64))

    def _next_kill_threshold(self) -> int:
        mean = max(1, self.plan.messages // max(1, self.plan.kills))
        return max(1, int(mean * self.rng.uniform(0.2, 1.8)))

    def _note(self, submission: _Submission, outcome: Outcome) -> None:
        self.outcomes[submission.message_id] = outcome
        self.recipients[submission.message_id] = submission.recipients
        self.report.submissions += 1
        if outcome == "acked":
            self.acked_numbers.add(submission.number)
            self.report.acked = len(self.acked_numbers)
            self.acks_since_start += 1
            if self.acks_since_start >= self.kill_after and self.report.kills < self.plan.kills:
                self.kill_requested.set()
            if len(self.acked_numbers) == self.plan.messages:
                self.all_acked.set()
                self.kill_requested.set()   # the killer switches to killing on a timer
        else:
            setattr(self.report, outcome, getattr(self.report, outcome) + 1)
            self.todo.append(self._new_submission(submission.number, submission.copy + 1))

    # -- clients ------------------------------------------------------------------------------------
    async def client(self) -> None:
        while self.todo or not self.all_acked.is_set():
            if not self.todo:
                await asyncio.sleep(0.05)
                continue
            await self.relay_up.wait()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.relay.port), 5)
            except (OSError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                await self._session(reader, writer)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not (await _reply(reader)).startswith(b"220"):
                return
            writer.write(b"EHLO client.reliability.test\r\n")
            await _reply(reader)
        except _ConnectionLost:
            return
        for _ in range(self.rng.randint(1, 20)):
            if not self.todo:
                break
            submission = self.todo.popleft()
            try:
                self._note(submission, await self._transaction(reader, writer, submission))
            except _ConnectionLost as lost:
                if lost.after_dot:
                    self._note(submission, "unknown")
                else:
                    self.report.unsent_retries += 1
                    self.todo.appendleft(submission)   # the relay cannot have it: same id again
                return
        with contextlib.suppress(OSError, _ConnectionLost):
            writer.write(b"QUIT\r\n")
            await _reply(reader)

    async def _transaction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           submission: _Submission) -> Outcome:
        # Pipelined envelope (the relay offers PIPELINING), then the body.
        commands = [b"MAIL FROM:<sender@reliability.test>\r\n"]
        commands += [f"RCPT TO:<{r}>\r\n".encode() for r in submission.recipients]
        commands.append(b"DATA\r\n")
        writer.write(b"".join(commands))
        replies = [await _reply(reader) for _ in commands]
        if not replies[-1].startswith(b"354"):
            if any(not r.startswith(b"250") for r in replies[:-1]):
                writer.write(b"RSET\r\n")
                await _reply(reader)
            raise AssertionError(f"envelope refused: {replies!r}")
        try:
            writer.write(dot_stuffed(submission.data()))
            await writer.drain()
        except OSError:
            raise _ConnectionLost(after_dot=True) from None
        try:
            final = await _reply(reader)
        except _ConnectionLost:
            raise _ConnectionLost(after_dot=True) from None
        return "acked" if final.startswith(b"250") else "refused"

    # -- the killer ---------------------------------------------------------------------------------
    async def killer(self) -> None:
        while self.report.kills < self.plan.kills:
            if self.all_acked.is_set():
                # The rest of the kills at random instants while the queue drains.
                await asyncio.sleep(self.rng.uniform(0.05, 1.0))
            else:
                await self.kill_requested.wait()
                await asyncio.sleep(self.rng.uniform(0, 0.05))
            self.relay_up.clear()
            self.relay.kill()
            self.report.kills += 1
            self.sink.epoch += 1
            self.kill_requested.clear()
            started = time.monotonic()
            self.relay.start()
            await self.relay.wait_ready()
            self.report.restart_seconds.append(time.monotonic() - started)
            self.acks_since_start = 0
            self.kill_after = self._next_kill_threshold()
            if not self.all_acked.is_set():
                self.kill_requested.clear()   # set by acks of the killed incarnation read after the kill
            self.relay_up.set()

    # -- the end ------------------------------------------------------------------------------------
    def expected(self) -> set[tuple[str, str]]:
        return {(mid, rcpt) for mid, outcome in self.outcomes.items() if outcome == "acked"
                for rcpt in self.recipients[mid]}

    def delivered(self) -> Counter[tuple[str, str]]:
        return Counter((d.message_id or "?", rcpt) for d in self.sink.deliveries for rcpt in d.recipients)

    async def drain(self) -> None:
        deadline = time.monotonic() + self.plan.drain_timeout
        expected = self.expected()
        while time.monotonic() < deadline:
            states = await queue_states(self.plan.store_url)
            pending = states.get("queued", 0) + states.get("held", 0)
            if pending == 0 and expected <= set(self.delivered()):
                return
            await asyncio.sleep(0.25)

    def evaluate(self) -> None:
        report = self.report
        expected = self.expected()
        delivered = self.delivered()
        report.deliveries = len(self.sink.deliveries)
        report.lost = len(expected - set(delivered))
        report.corrupt = sum(1 for d in self.sink.deliveries
                             if not d.intact or d.message_id not in self.outcomes)
        report.refused_delivered = sum(1 for (mid, _), n in delivered.items() if self.outcomes.get(mid) == "refused")
        report.unknown_delivered = len({mid for (mid, _) in delivered if self.outcomes.get(mid) == "unknown"})
        epochs: dict[tuple[str, str], list[int]] = {}
        for d in self.sink.deliveries:
            for rcpt in d.recipients:
                epochs.setdefault((d.message_id or "?", rcpt), []).append(d.epoch)
        for copies in epochs.values():
            for earlier, later in itertools.pairwise(copies):
                report.duplicates += 1
                if later <= earlier:   # no kill between the two copies
                    report.unexplained_duplicates += 1


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (the last line), or _ConnectionLost."""
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), 60)
        except (OSError, TimeoutError, ValueError):
            raise _ConnectionLost(after_dot=False) from None
        if not line:
            raise _ConnectionLost(after_dot=False)
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def queue_states(store_url: str) -> dict[str, int]:
    """Recipient rows per state, read straight from the database (the relay may be dead right now)."""
    query = "SELECT state, COUNT(*) FROM recipients GROUP BY state"
    if store_url.startswith("sqlite"):
        path = store_url[len("sqlite:///"):]

        def read() -> dict[str, int]:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                return {state: int(n) for state, n in conn.execute(query)}
            finally:
                conn.close()

        try:
            return await asyncio.to_thread(read)
        except sqlite3.Error:
            return {"queued": -1}
    try:
        async with await psycopg.AsyncConnection.connect(store_url, connect_timeout=5) as conn:
            cursor = await conn.execute(query)
            return {str(state): int(n) for state, n in await cursor.fetchall()}
    except psycopg.Error:
        return {"queued": -1}


async def run_kill_test(plan: KillPlan) -> KillReport:
    """The whole scenario; see the module docstring. Never leaves a process behind."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    async with RecordingSink() as sink:
        port = free_port()
        config = relay_config(RelayConfig(workdir=plan.workdir, store_url=plan.store_url, port=port,
                                          sink_port=sink.port, lease_seconds=plan.lease_seconds))
        relay = RelayProcess(config, port, plan.workdir)
        run = _Run(plan, sink, relay)
        run.todo.extend(run._new_submission(n, 0) for n in range(plan.messages))
        relay.start()
        try:
            await relay.wait_ready()
            run.relay_up.set()
            killer = asyncio.create_task(run.killer())
            await asyncio.gather(*(run.client() for _ in range(plan.clients)))
            await killer
            await run.drain()
            run.report.exit_code = await relay.stop()
        finally:
            if relay.proc is not None and relay.proc.poll() is None:
                relay.kill()
        run.report.final_states = await queue_states(plan.store_url)
        run.report.rows_not_delivered = sum(n for state, n in run.report.final_states.items() if state != "delivered")
        run.evaluate()
        run.report.log_problems = log_problems(relay.log_lines())
    run.report.elapsed = time.monotonic() - started
    return run.report
