"""Group commit for delivery results: many transactions' outcomes in one ``record_results`` call.

Every finished transaction must be recorded before its worker moves on (a result not yet committed is a
delivery that could be repeated). Committing each alone costs one durable commit per message, which is
what limits throughput (fsync on SQLite, a round trip and WAL flush on Postgres). The
:class:`ResultRecorder` lets results arriving while a commit is under way wait for the next one, which
then carries all of them.

Invariants:
- :meth:`ResultRecorder.record` returns only once its results (and the DSNs generated with them) are
  committed, and raises if the commit failed; a batch is committed all or nothing, so each caller's
  results and bounces stay atomic together. Each DSN travels as a :class:`~relay.store.base.Bounce`
  paired with the recipients it reports on, so the store commits it only with their results (a result
  ignored for a lost lease takes its DSN with it, never another caller's).
- One commit at a time per recorder; a batch carries at most ``max_results`` results (a single caller's
  results are never split).
- The committing task is not the caller's: a caller cancelled while waiting does not cancel a commit
  that carries other callers' results. :meth:`drain` waits until nothing is being committed (used at
  shutdown before claims are released, so a release never overtakes a commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from relay.log import get_logger
from relay.store.base import Bounce, QueueStore, RecipientResult, StoreError

log = get_logger(__name__)

#: Tries per commit before the waiting callers get the error.
COMMIT_TRIES = 3
RETRY_FIRST_DELAY = 0.2


@dataclass(slots=True)
class _Pending:
    results: Sequence[RecipientResult]
    bounces: Sequence[Bounce]
    done: asyncio.Future[None]


class ResultRecorder:
    def __init__(self, store: QueueStore, owner: str, max_results: int = 1000) -> None:
        self.store = store
        self.owner = owner
        self.max_results = max_results
        self.commits = 0
        self._queue: list[_Pending] = []
        self._task: asyncio.Task[None] | None = None

    async def record(self, results: Sequence[RecipientResult], bounces: Sequence[Bounce] = ()) -> None:
        """Commit with the next batch; raise :class:`StoreError` (or the store's error) if it failed."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(results, bounces, done))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._commit_all(), name="delivery-recorder")
        await asyncio.shield(done)

    async def drain(self) -> None:
        """Wait until every result handed in so far is committed (or has failed)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def _commit_all(self) -> None:
        while self._queue:
            batch = self._take_batch()
            error: BaseException | None = None
            try:
                await self._commit(batch)
            except Exception as exc:  # handed to every waiting caller, which decides what it means
                error = exc
            for pending in batch:
                if pending.done.done():
                    continue
                if error is None:
                    pending.done.set_result(None)
                else:
                    pending.done.set_exception(error)
                    pending.done.exception()  # retrieved: a caller cancelled meanwhile must not log it

    def _take_batch(self) -> list[_Pending]:
        batch = [self._queue.pop(0)]
        size = len(batch[0].results)
        while self._queue and size + len(self._queue[0].results) <= self.max_results:
            pending = self._queue.pop(0)
            size += len(pending.results)
            batch.append(pending)
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        results = [result for pending in batch for result in pending.results]
        bounces = [bounce for pending in batch for bounce in pending.bounces]
        delay = RETRY_FIRST_DELAY
        for attempt in range(1, COMMIT_TRIES + 1):
            try:
                await self.store.record_results(results, self.owner, bounces)
                self.commits += 1
                return
            except StoreError:
                if attempt == COMMIT_TRIES:
                    raise
                log.warning("delivery_record_retry", recipients=len(results), attempt=attempt)
                await asyncio.sleep(delay)
                delay *= 4


__all__ = ["ResultRecorder"]
