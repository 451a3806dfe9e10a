"""Live reconfiguration: configuration generations, what a reload may change, and ``relay reload``.

A reload (SIGHUP, or ``relay reload``, which sends SIGHUP to the relay named by its pid file) re-reads
relay.toml and the environment exactly as at start, validates it, builds and starts a new plugin chain
and new TLS contexts, and only when all of that succeeded swaps them in; anything that fails refuses the
whole reload with one log line (``reload_refused``) and the running configuration stays as it was.

What a reload applies (each value is read where it is used, so the new one counts from the next use):

- ``[smtp]``, ``[limits]``, ``server.hostname``/``secret_key``, ``[tls]`` certificates, per-listener
  ``auth``, ``trusted_networks``, ``max_connections``, ``starttls``, ``cert_file``/``key_file``;
- ``[chain]`` and ``[plugins.*]``: a new chain (new plugin instances; DKIM keys are read again and
  self-tested by its ``start``);
- ``[delivery]``: routes, retry schedule and lifetime, classification rules, timeouts, DNS, delivery TLS,
  concurrency, batch and lease sizes (see :meth:`relay.delivery.scheduler.DeliveryService.reconfigure`);
- ``[log]`` level and format; ``server.shutdown_grace``; ``http.public_url`` (seen by the new chain).

What needs a restart (a changed value is logged as ``reload_needs_restart`` with the key, and the
running value is kept): ``server.role``, ``server.state_dir``, ``server.pid_file``, ``[store]``,
``[redis]``, ``http.address``/``max_request_size``/``shutdown_grace``, and the set of listeners (a
listener's ``name``, ``address`` and ``kind``; listeners added or removed).

Atomicity — the unit is the mail transaction, and the delivery attempt:

- An SMTP session holds one :class:`Generation` (settings + chain). It takes the newest one when it
  starts and again at EHLO, HELO, RSET and MAIL — that is, only between transactions. A transaction
  (MAIL … the reply to the end of DATA, including the chain's DATA stage and the commit) runs entirely on
  the generation it started with; a new connection sees the new one at once.
- A delivery attempt holds the generation current at its ``before_attempt`` until its ``after_attempt``
  (so a plugin that took something for the attempt, like the throttle's connection slot, gets it back in
  the same instance); observers of that attempt run on the same generation.
- A replaced generation's chain is stopped once nothing holds it any more (last transaction finished,
  last attempt over), never while one of its stages may still run.

Invariants:
- The swap itself is synchronous (no ``await`` between installing the generation, the listeners' new
  configuration and the delivery settings), so no session or attempt can see half of a reload.
- Plugins' HTTP routes are served through a :class:`RouteSwitch`: the HTTP server's router is frozen
  once it serves, so the routes registered at start are trampolines that call the current generation's
  handler; a route that was not served at start cannot appear on reload (that reload is refused).
- The pid file holds this process's id only while it serves; it is removed at a clean exit (only when it
  still names this process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.chain import Chain
from relay.delivery.chainhook import ChainHook
from relay.delivery.scheduler import AttemptContext as SchedulerAttempt
from relay.log import get_logger
from relay.plugin import HttpRoutes, PluginError, Verdict
from relay.policies.bounce import Classification, Reply
from relay.settings import ConfigError, ListenerSettings, Settings, load_settings
from relay.store.base import RecipientRow

log = get_logger(__name__)

__all__ = [
    "Generation", "GenerationHook", "Generations", "ReloadOutcome", "RouteSwitch", "RouteTable",
    "pid_file_path", "read_pid_file", "read_reload_status", "reconcile", "register", "reload_status_path",
    "remove_pid_file", "write_pid_file", "write_reload_status",
]

Handler = Callable[[Any], Awaitable[Any]]
RouteKey = tuple[str, str]


# -- what a reload may change ---------------------------------------------------------------------
_SERVER_RESTART_KEYS = ("role", "state_dir", "pid_file", "smtp_workers")
_HTTP_RESTART_KEYS = ("address", "max_request_size", "shutdown_grace")


def reconcile(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """The settings a reload applies — ``new`` with every restart-only value kept from ``running`` —
    and the restart-only keys whose value changed (names only: values may hold credentials)."""
    pending: list[str] = []
    server_update = _keep(running.server, new.server, _SERVER_RESTART_KEYS, "server", pending)
    http_update = _keep(running.http, new.http, _HTTP_RESTART_KEYS, "http", pending)
    for section in ("store", "redis"):
        old_values, new_values = getattr(running, section).model_dump(), getattr(new, section).model_dump()
        pending += [f"{section}.{key}" for key in old_values if old_values[key] != new_values.get(key)]
    listeners = _reconcile_listeners(running.listeners, new.listeners, pending)
    merged = new.model_copy(update={
        "server": new.server.model_copy(update=server_update),
        "http": new.http.model_copy(update=http_update),
        "store": running.store, "redis": running.redis, "listeners": listeners,
    })
    return merged, pending


def _keep(running: Any, new: Any, keys: tuple[str, ...], section: str, pending: list[str]) -> dict[str, Any]:
    update = {}
    for key in keys:
        if getattr(running, key) != getattr(new, key):
            pending.append(f"{section}.{key}")
        update[key] = getattr(running, key)
    return update


def _reconcile_listeners(running: list[ListenerSettings], new: list[ListenerSettings],
                         pending: list[str]) -> list[ListenerSettings]:
    """The running listeners (same names, addresses and kinds: those are sockets) with the new values of
    everything else; additions and removals wait for a restart."""
    by_name = {listener.name: listener for listener in new}
    kept = []
    for old in running:
        fresh = by_name.get(old.name)
        if fresh is None:
            pending.append(f"listeners.{old.name} (removed)")
            kept.append(old)
            continue
        for key in ("address", "kind"):
            if getattr(old, key) != getattr(fresh, key):
                pending.append(f"listeners.{old.name}.{key}")
        kept.append(fresh.model_copy(update={"address": old.address, "kind": old.kind}))
    running_names = {listener.name for listener in running}
    pending += [f"listeners.{listener.name} (new)" for listener in new if listener.name not in running_names]
    return kept


# -- generations ----------------------------------------------------------------------------------
@dataclass(eq=False)
class Generation:
    """One applied configuration: the settings and the chain built from them."""

    number: int
    settings: Settings
    chain: Chain
    # HTTP routes its plugins registered: (METHOD, path pattern) -> handler.
    routes: dict[RouteKey, Handler] = field(default_factory=dict)
    holders: int = 0
    retired: bool = False
    stopped: bool = False


class Generations:
    """The current generation, and replaced ones until the last session or attempt holding them lets go."""

    def __init__(self, first: Generation) -> None:
        self.current = first
        self._held_retired: set[Generation] = set()
        self._stopping: set[asyncio.Task[None]] = set()

    def hold(self, generation: Generation) -> Generation:
        generation.holders += 1
        return generation

    def release(self, generation: Generation) -> None:
        generation.holders -= 1
        if generation.retired and generation.holders <= 0:
            self._stop(generation)

    def install(self, generation: Generation) -> Generation:
        """Make ``generation`` current; the previous one stops when nothing holds it. Returns it."""
        old, self.current = self.current, generation
        old.retired = True
        if old.holders <= 0:
            self._stop(old)
        else:
            self._held_retired.add(old)
            log.info("chain_retiring", generation=old.number, holders=old.holders)
        return old

    @property
    def retiring(self) -> list[Generation]:
        """Replaced generations still held by a transaction or an attempt."""
        return sorted(self._held_retired, key=lambda g: g.number)

    def _stop(self, generation: Generation) -> None:
        if generation.stopped:
            return
        generation.stopped = True
        self._held_retired.discard(generation)
        task = asyncio.get_running_loop().create_task(self._stop_chain(generation),
                                                      name=f"chain-stop-{generation.number}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    @staticmethod
    async def _stop_chain(generation: Generation) -> None:
        await generation.chain.stop()
        log.info("chain_retired", generation=generation.number)

    async def close(self) -> None:
        """Relay shutdown: stop every chain, the current one last, whoever still holds them."""
        for generation in [*self._held_retired, self.current]:
            self._stop(generation)
        while self._stopping:
            await asyncio.gather(*set(self._stopping), return_exceptions=True)


class GenerationHook:
    """The delivery side's chain (the scheduler's ``DeliveryChain`` and ``AttemptEndHook``): each attempt
    runs on the generation current at its ``before_attempt``, held until its ``after_attempt``."""

    _KEY = "relay.reload.generation"

    def __init__(self, generations: Generations) -> None:
        self.generations = generations

    async def before_attempt(self, ctx: SchedulerAttempt) -> Verdict | None:
        generation = self.generations.hold(self.generations.current)
        ctx.extra[self._KEY] = generation
        return await ChainHook(generation.chain).before_attempt(ctx)

    async def after_attempt(self, ctx: SchedulerAttempt) -> None:
        generation = ctx.extra.pop(self._KEY, None)
        if not isinstance(generation, Generation):
            return
        try:
            await ChainHook(generation.chain).after_attempt(ctx)
        finally:
            self.generations.release(generation)

    async def delivered(self, ctx: SchedulerAttempt, recipient: RecipientRow, reply: Reply) -> None:
        async with self._hook(ctx) as hook:
            await hook.delivered(ctx, recipient, reply)

    async def deferred(self, ctx: SchedulerAttempt, recipient: RecipientRow, classification: Classification,
                       next_attempt_at: float) -> None:
        async with self._hook(ctx) as hook:
            await hook.deferred(ctx, recipient, classification, next_attempt_at)

    async def bounced(self, ctx: SchedulerAttempt, recipient: RecipientRow,
                      classification: Classification) -> None:
        async with self._hook(ctx) as hook:
            await hook.bounced(ctx, recipient, classification)

    @contextlib.asynccontextmanager
    async def _hook(self, ctx: SchedulerAttempt) -> AsyncIterator[ChainHook]:
        """The attempt's own generation; outcomes without an attempt (DNS, expiry) use the current one."""
        pinned = ctx.extra.get(self._KEY)
        if isinstance(pinned, Generation):
            yield ChainHook(pinned.chain)
            return
        generation = self.generations.hold(self.generations.current)
        try:
            yield ChainHook(generation.chain)
        finally:
            self.generations.release(generation)


# -- HTTP routes of plugins -----------------------------------------------------------------------
class RouteSwitch:
    """Serves plugins' HTTP routes through trampolines that call the current generation's handler."""

    def __init__(self, http: HttpRoutes | None) -> None:
        self.http = http
        self._served: set[RouteKey] = set()
        self._live: dict[RouteKey, Handler] = {}

    def table(self) -> RouteTable | None:
        """What a new chain's plugins register their routes on (None: this relay serves no HTTP)."""
        return None if self.http is None else RouteTable(self)

    def activate(self, routes: dict[RouteKey, Handler]) -> None:
        """From now on these handlers answer; a served route missing here answers 404."""
        self._live = dict(routes)

    def serve(self, key: RouteKey) -> None:
        if key in self._served:
            return
        assert self.http is not None
        try:
            self.http.add_route(key[0], key[1], self._trampoline(key))
        except RuntimeError:
            raise PluginError(f"HTTP route {key[0]} {key[1]} was not served at start; it needs a restart") from None
        self._served.add(key)

    def _trampoline(self, key: RouteKey) -> Handler:
        async def handle(request: web.Request) -> Any:
            handler = self._live.get(key)
            if handler is None:
                raise web.HTTPNotFound()
            return await handler(request)
        return handle


class RouteTable:
    """One generation's view of the HTTP server (implements :class:`relay.plugin.HttpRoutes`)."""

    def __init__(self, switch: RouteSwitch) -> None:
        self.switch = switch
        self.routes: dict[RouteKey, Handler] = {}

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        key = (method.upper(), path)
        self.switch.serve(key)
        self.routes[key] = handler


# -- outcome, pid file and status file --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    ok: bool
    generation: int
    attempt: int
    error: str | None = None
    needs_restart: tuple[str, ...] = ()


def pid_file_path(settings: Settings) -> Path:
    return settings.server.pid_file or settings.server.state_dir / "relay.pid"


def reload_status_path(pid_file: Path) -> Path:
    """Where the relay owning ``pid_file`` reports the outcome of each reload (JSON)."""
    return pid_file.with_name(pid_file.stem + ".reload.json")


def write_pid_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = read_pid_file(path)
    if previous is not None and previous != os.getpid() and _alive(previous):
        log.warning("pid_file_replaced", pid_file=str(path), previous_pid=previous)
    _write_atomically(path, f"{os.getpid()}\n")


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it still names this process (another relay may have taken it over)."""
    if read_pid_file(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            reload_status_path(path).unlink()


def read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def write_reload_status(path: Path, outcome: ReloadOutcome) -> None:
    status = {"pid": os.getpid(), "attempt": outcome.attempt, "ok": outcome.ok, "generation": outcome.generation,
              "error": outcome.error, "needs_restart": list(outcome.needs_restart), "at": time.time()}
    _write_atomically(path, json.dumps(status) + "\n")


def read_reload_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # it exists, it is just not ours
    return True


# -- relay reload ---------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reload", help="make the running relay re-read relay.toml (SIGHUP) and report the outcome",
        description="Check the configuration, send SIGHUP to the relay named by its pid file ([server] "
                    "pid_file, default <state_dir>/relay.pid) or by --pid, then wait for its answer: exit 0 when "
                    "the new configuration was applied, 1 when it was refused (the relay keeps running on the "
                    "old one). Use the same --config as the relay.")
    parser.add_argument("--pid", type=int, help="process id of the relay (default: read the pid file)")
    parser.add_argument("--pid-file", help="pid file of the relay (default: from the configuration)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the outcome (30)")
    parser.add_argument("--no-wait", action="store_true", help="only send the signal")
    parser.set_defaults(func=cmd_reload)


def cmd_reload(args: argparse.Namespace) -> int:
    # The file is checked here first, as the relay will check it: a broken file is reported at once and
    # the relay is left alone (it would refuse it and keep its configuration anyway).
    try:
        settings, _ = load_settings(args.config)
    except ConfigError as exc:
        print(f"relay: reload refused, the running relay keeps its configuration:\n{exc}", file=sys.stderr)
        return 1
    pid_file = Path(args.pid_file) if args.pid_file else pid_file_path(settings)
    pid = args.pid or read_pid_file(pid_file)
    if pid is None:
        print(f"relay: no running relay found: {pid_file} is missing (is the relay running? use --pid)",
              file=sys.stderr)
        return 1
    status_file = reload_status_path(pid_file)
    before = _attempt_of(read_reload_status(status_file), pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"relay: no process {pid} (stale pid file {pid_file}?)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"relay: not allowed to signal process {pid} (run as the relay's user)", file=sys.stderr)
        return 1
    if args.no_wait:
        print(f"sent SIGHUP to relay {pid}")
        return 0
    return _await_outcome(status_file, pid, before, args.timeout)


def _attempt_of(status: dict[str, Any] | None, pid: int) -> int:
    if status is None or status.get("pid") != pid:
        return 0
    attempt = status.get("attempt")
    return attempt if isinstance(attempt, int) else 0


def _await_outcome(status_file: Path, pid: int, before: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_reload_status(status_file)
        if status is not None and _attempt_of(status, pid) > before:
            for key in status.get("needs_restart") or []:
                print(f"needs a restart to change: {key}")
            if status.get("ok"):
                print(f"relay {pid}: configuration reloaded (generation {status.get('generation')})")
                return 0
            print(f"relay {pid}: reload refused, running configuration kept: {status.get('error')}",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"relay: sent SIGHUP to {pid} but saw no outcome in {status_file} within {timeout:g}s",
          file=sys.stderr)
    return 1
