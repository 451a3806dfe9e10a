"""SMTP worker processes: several processes accept SMTP on the same listener sockets.

One Python process runs its SMTP sessions on one core. With ``[server] smtp_workers = N`` (N > 1, roles
``all`` and ``smtp``) ``relay serve`` — the *supervisor* — binds its listeners with SO_REUSEPORT and starts
N - 1 *workers*: ``relay serve --smtp-worker K`` on the same configuration, which bind the same addresses
with SO_REUSEPORT. The kernel spreads new connections over the N sockets; each process runs whole
sessions, chain included, and commits to the shared queue before it answers 250, exactly as one process
does. The delivery loop, the event consumers, the HTTP server (/metrics, /readyz, tracking links) and the
pid file stay with the supervisor: the delivery side is single-claim as before.

Invariants:
- Accept means durable in every process: a worker is a full relay process with role ``smtp``; nothing is
  handed between processes, so no accepted message depends on two processes being alive.
- Limits hold across processes: more than one worker needs ``[redis] url`` (refused at load otherwise,
  :class:`relay.settings.Settings`); connection counts kept per process enforce ``limit // N``.
- A worker that exits while the supervisor runs is restarted, after 1 s doubling to 30 s while it keeps
  dying within a minute of its start (a broken worker never spins).
- A worker never outlives its supervisor: it asks the kernel for :data:`SUPERVISOR_GONE` (SIGUSR2) when
  the supervisor dies (``PR_SET_PDEATHSIG``) and also checks its parent every second; either asks for
  one graceful stop. Not SIGTERM: the kernel may send the death signal more than once (once per thread
  of the dying supervisor that the worker gets re-parented to), and a second SIGTERM means "exit now".
- Signals: SIGHUP on the supervisor is forwarded (every worker re-reads the file itself); at SIGTERM or
  SIGINT the supervisor forwards SIGTERM, drains its own sessions meanwhile and waits for the workers
  (their own ``shutdown_grace``, plus a margin) before it exits; a worker still there then is killed.
- Workers bind the supervisor's actual addresses (``RELAY_WORKER_LISTENERS``), so a listener configured
  with port 0 is shared too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from relay.log import get_logger
from relay.settings import Settings

log = get_logger(__name__)

#: Environment of a worker: the supervisor's bound listener addresses (JSON, name → "host:port") …
LISTENERS_ENV = "RELAY_WORKER_LISTENERS"
#: … and the supervisor's pid (a worker whose parent is no longer this pid stops).
SUPERVISOR_ENV = "RELAY_WORKER_SUPERVISOR"

RESTART_FIRST = 1.0
RESTART_MAX = 30.0
#: A worker that ran this long before it exited is restarted after RESTART_FIRST again.
STABLE_AFTER = 60.0
#: Beyond a worker's own shutdown_grace, how long the supervisor waits before it kills it.
STOP_MARGIN = 10.0
_PR_SET_PDEATHSIG = 1
#: How to start ``relay`` when the way this process was started is not known: the installed package.
_PACKAGE_COMMAND = (sys.executable, "-m", "relay.cli")
#: The signal a worker gets when its supervisor dies; handled as "stop gracefully", however often it comes.
SUPERVISOR_GONE = signal.SIGUSR2


class WorkerPool:
    """The supervisor's side: starts ``count - 1`` workers, restarts them, signals and stops them."""

    def __init__(self, count: int, config_path: Path | None, addresses: dict[str, str], grace: float,
                 command: list[str] | None = None) -> None:
        self.count = count
        # How to start ``relay`` the way this process was started (see launch_command).
        self.command = command or list(_PACKAGE_COMMAND)
        self.config_path = config_path
        self.addresses = addresses
        self.grace = grace
        self.restarts = 0
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def is_stopping(self) -> bool:
        return self._stopping

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs.values() if proc.returncode is None]

    async def start(self) -> None:
        for number in range(2, self.count + 1):   # the supervisor itself is worker 1
            await self._spawn(number)
            self._tasks.append(asyncio.get_running_loop().create_task(self._supervise(number),
                                                                      name=f"smtp-worker-{number}"))
        log.info("smtp_workers_started", workers=self.count, pids=self.pids)

    def argv(self, number: int) -> list[str]:
        config = ["--config", str(self.config_path)] if self.config_path is not None else []
        return [*self.command, *config, "serve", "--smtp-worker", str(number)]

    async def _spawn(self, number: int) -> None:
        env = {**os.environ, LISTENERS_ENV: json.dumps(self.addresses), SUPERVISOR_ENV: str(os.getpid())}
        # stdout/stderr inherited: the workers' JSON lines go where the supervisor's go (one write each).
        self._procs[number] = await asyncio.create_subprocess_exec(*self.argv(number), env=env,
                                                                   stdin=asyncio.subprocess.DEVNULL)

    async def _supervise(self, number: int) -> None:
        delay = RESTART_FIRST
        while True:
            started = time.monotonic()
            code = await self._procs[number].wait()
            if self.is_stopping():
                return
            ran = time.monotonic() - started
            delay = RESTART_FIRST if ran >= STABLE_AFTER else delay
            log.error("smtp_worker_exited", worker=number, exit_code=code, ran_seconds=round(ran, 1),
                      restart_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            if self.is_stopping():   # stop() was called while we slept
                return
            try:
                await self._spawn(number)
            except OSError as exc:   # e.g. out of processes: try again later, never give up on the slot
                log.error("smtp_worker_not_restarted", worker=number, error=str(exc))
                continue
            self.restarts += 1
            log.info("smtp_worker_restarted", worker=number, pid=self._procs[number].pid)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every live worker (a reload: SIGHUP)."""
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM every worker and wait for it (its shutdown_grace plus a margin), then kill what is left."""
        self._stopping = True
        self.signal(signal.SIGTERM)
        live = [proc for proc in self._procs.values() if proc.returncode is None]
        if live:
            _done, pending = await asyncio.wait([asyncio.ensure_future(proc.wait()) for proc in live],
                                                timeout=self.grace + STOP_MARGIN)
            for proc in live:
                if proc.returncode is None:
                    log.error("smtp_worker_killed", pid=proc.pid, reason="did not stop within the grace")
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        log.info("smtp_workers_stopped", restarts=self.restarts)


def launch_command() -> list[str]:
    """The command line that started this ``relay`` process, without its arguments: the interpreter and
    the console script, a launcher, or ``-m relay.cli``. Workers started with it run the same code with the
    same import path as the supervisor (a launcher may put its own directory first on ``sys.path``)."""
    arguments = len(sys.argv) - 1
    original = list(getattr(sys, "orig_argv", []))
    if arguments < 0 or len(original) <= arguments or original[len(original) - arguments:] != sys.argv[1:]:
        return list(_PACKAGE_COMMAND)
    return original[:len(original) - arguments]


# -- the worker's side ---------------------------------------------------------------------------------------

def worker_settings(settings: Settings, addresses: dict[str, str]) -> Settings:
    """What a worker runs: role smtp, no HTTP server, and the supervisor's bound listener addresses."""
    listeners = [listener.model_copy(update={"address": addresses.get(listener.name, listener.address)})
                 for listener in settings.listeners]
    return settings.model_copy(update={
        "server": settings.server.model_copy(update={"role": "smtp"}),
        "http": settings.http.model_copy(update={"address": ""}),
        "listeners": listeners,
    })


def worker_overrides() -> Callable[[Settings], Settings]:
    """The override a worker applies to every configuration it loads (at start and at each reload)."""
    addresses = json.loads(os.environ.get(LISTENERS_ENV) or "{}")
    if not isinstance(addresses, dict):
        raise ValueError(f"{LISTENERS_ENV} is not a JSON object")
    return lambda settings: worker_settings(settings, {str(k): str(v) for k, v in addresses.items()})


def die_with_supervisor() -> None:
    """Ask the kernel for SUPERVISOR_GONE when the parent dies (Linux); a no-op elsewhere (the parent
    check still runs)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(SUPERVISOR_GONE), 0, 0, 0)


def supervisor_pid() -> int | None:
    text = os.environ.get(SUPERVISOR_ENV, "")
    return int(text) if text.isdigit() else None


async def watch_supervisor(expected: int | None, on_gone: Callable[[], None], interval: float = 1.0) -> None:
    """Call ``on_gone`` once when this process's parent is no longer ``expected`` (it died: we were
    re-parented), then return. Covers the instant before PR_SET_PDEATHSIG took effect."""
    while True:
        if expected is not None and os.getppid() != expected:
            log.warning("smtp_worker_orphaned", supervisor=expected)
            on_gone()
            return
        await asyncio.sleep(interval)
