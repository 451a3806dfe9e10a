"""The on-demand reliability run: the CI tests' drivers with the full numbers (``scripts/reliability``).

    scripts/reliability --kills 200 --messages 20000 --fuzz 100000 --rounds 3

runs, in order: the SIGKILL durability test on SQLite and on Postgres (a throwaway database in the server
named by ``$RELAY_TEST_POSTGRES_URL``, else in a throwaway cluster of its own), the fuzzer, the fault
isolation test (``--rounds`` faulted phases), then greps every relay log line of the run for the secrets
the run used. It prints one summary line per part and writes every figure as JSON (``--report``); the
exit status is 1 if any part failed. ``--only kill,fuzz,faults`` runs a subset. Everything runs on
127.0.0.1; every process it starts is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.reliability.faults import IsolationPlan, run_isolation
from tests.reliability.fuzz import run_fuzz
from tests.reliability.killrun import KillPlan, run_kill_test
from tests.support.logtap import find_leaks, registered_secrets
from tests.support.pgcluster import PgCluster

PARTS = ("kill", "fuzz", "faults")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per store (default 200)")
    parser.add_argument("--messages", type=int, default=20000, help="messages per store (default 20000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent SMTP clients (default 8)")
    parser.add_argument("--fuzz", type=int, default=100000, help="fuzzed sessions (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="faulted phases of the isolation test (default 3)")
    parser.add_argument("--healthy", type=int, default=3000, help="healthy messages per measured phase")
    parser.add_argument("--stores", default="sqlite,postgres", help="stores for the kill test")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run (default {','.join(PARTS)})")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000, help="random seed")
    parser.add_argument("--workdir", type=Path, help="where logs and databases go (default: a new temp dir)")
    parser.add_argument("--report", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {sorted(unknown)}")
    return args


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    """A fresh database in $RELAY_TEST_POSTGRES_URL's server, or in a cluster of our own; dropped after."""
    server = os.environ.get("RELAY_TEST_POSTGRES_URL", "")
    cluster: PgCluster | None = None
    if not server:
        cluster = PgCluster()
        cluster.init()
        cluster.start()
        server = cluster.url
    name = "relay_reliability_" + secrets.token_hex(6)
    parts = urlsplit(server)
    try:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
        finally:
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if cluster is not None:
            cluster.destroy()


def _figures(report: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
    data = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for key in ("log_problems", "malformed", "slowloris_problems"):
        if key in data:
            data[key] = data[key][:10]
    if hasattr(report, "ratio"):
        data["ratio"] = report.ratio
    if hasattr(report, "rss_growth"):
        data["rss_growth"] = report.rss_growth
    return data


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    results: dict[str, Any] = {"seed": args.seed, "workdir": str(workdir), "started": time.time(), "parts": {}}
    failed: list[str] = []

    def record(name: str, report: Any) -> None:
        problems = report.failures()
        results["parts"][name] = {"figures": _figures(report), "failures": problems}
        print(f"[{name}] {report.summary()}", flush=True)
        for problem in problems:
            print(f"[{name}] FAILED: {problem}", flush=True)
        if problems:
            failed.append(name)

    if "kill" in parts:
        for store in args.stores.split(","):
            where = workdir / f"kill-{store}"
            if store == "sqlite":
                url = f"sqlite:///{where}/queue.db"
                record(f"kill-{store}", await run_kill_test(KillPlan(url, where, args.messages, args.kills,
                                                                     args.clients, args.seed)))
            else:
                with throwaway_database() as url:
                    record(f"kill-{store}", await run_kill_test(KillPlan(url, where, args.messages, args.kills,
                                                                         args.clients, args.seed)))
    if "fuzz" in parts:
        where = workdir / "fuzz"
        where.mkdir(exist_ok=True)
        record("fuzz", await asyncio.to_thread(run_fuzz, args.fuzz, where, seed=args.seed))
    if "faults" in parts:
        record("faults", await run_isolation(IsolationPlan(workdir / "faults", healthy=args.healthy,
                                                           rounds=args.rounds, seed=args.seed)))
    logs = sorted(workdir.rglob("relay-*.log"))
    lines = ((path.name, line) for path in logs for line in path.read_text(errors="replace").splitlines())
    leaks = find_leaks(lines, registered_secrets())
    results["secret_scan"] = {"log_files": len(logs), "secrets": len(registered_secrets()), "leaks": len(leaks)}
    print(f"[secrets] {len(logs)} log files scanned for {len(registered_secrets())} secrets: {len(leaks)} leaks",
          flush=True)
    for leak in leaks[:10]:
        print(f"[secrets] FAILED: {leak}", flush=True)
    if leaks:
        failed.append("secrets")
    results["failed"] = failed
    results["elapsed"] = time.time() - results["started"]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = asyncio.run(run(args))
    if args.report:
        args.report.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"{'FAILED: ' + ', '.join(results['failed']) if results['failed'] else 'all passed'} "
          f"in {results['elapsed']:.0f}s (workdir {results['workdir']})", flush=True)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
