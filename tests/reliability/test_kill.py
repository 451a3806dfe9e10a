"""Durability under SIGKILL, CI-sized: 2,000 messages, 10 kills, on each store.

The driver (:mod:`tests.reliability.killrun`) says what is checked. The on-demand run is the same code with
``--messages 20000 --kills 200`` (``scripts/reliability``); its figures are in RELIABILITY.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.killrun import KillPlan, run_kill_test

MESSAGES = 2000
KILLS = 10


def _check(report_text: str, failures: list[str]) -> None:
    print(report_text)
    assert not failures, report_text + "\n" + "\n".join(failures)


async def test_sigkill_loses_nothing_on_sqlite(tmp_path: Path) -> None:
    plan = KillPlan(store_url=f"sqlite:///{tmp_path}/queue.db", workdir=tmp_path, messages=MESSAGES, kills=KILLS)
    report = await run_kill_test(plan)
    _check(report.summary(), report.failures())
    assert report.kills == KILLS and report.acked == MESSAGES


@pytest.mark.postgres
async def test_sigkill_loses_nothing_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    plan = KillPlan(store_url=postgres_url, workdir=tmp_path, messages=MESSAGES, kills=KILLS, seed=11)
    report = await run_kill_test(plan)
    _check(report.summary(), report.failures())
    assert report.kills == KILLS and report.acked == MESSAGES
