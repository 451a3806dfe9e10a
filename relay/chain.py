"""The plugin-chain runner: loads the configured plugins and runs them at each stage.

The order is ``[chain] plugins = [...]`` in relay.toml; each entry is a built-in name (``blacklist``,
``tracking``, ``dkim``, ``throttle`` — modules of :mod:`relay.plugins`), a dotted path
(``package.module:ClassName``) or the name of an entry point in the ``relay.plugins`` group. Each plugin's
``[plugins.<name>]`` table is validated by its own model at start-up.

Invariants:
- A stage never raises to its caller. A plugin that raises or exceeds its timeout becomes
  ``451 4.3.0`` here, in one place, logged with the plugin's name (or is skipped when it declares
  ``on_error = "continue"``). Observers can only be logged, never answer.
- Decision stages stop at the first verdict other than CONTINUE: ACCEPT ends the chain for the stage
  (accepted), a rejection is returned to the caller.
- Start-up refuses a chain in which a plugin that changes the message runs after one that seals it
  (DKIM), counting DATA before every delivery attempt.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import time
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from relay.log import get_logger
from relay.plugin import (
    CONTINUE,
    DECISION_STAGES,
    OBSERVER_STAGES,
    PLUGIN_FAILURE,
    Action,
    AttemptContext,
    AttemptFinished,
    ConnectContext,
    DataContext,
    DeliveryEvent,
    HeloContext,
    MailContext,
    Plugin,
    PluginError,
    PluginHost,
    QueuedEvent,
    RcptContext,
    Stage,
    Verdict,
)
from relay.settings import ConfigError

log = get_logger(__name__)

BUILTIN_PACKAGE = "relay.plugins"
ENTRY_POINT_GROUP = "relay.plugins"

__all__ = ["Action", "Chain", "Stage", "Verdict", "load_plugin_class"]


def load_plugin_class(entry: str) -> type[Plugin[Any]]:
    """Resolve a chain entry to a plugin class; :class:`ConfigError` when it cannot be found."""
    if ":" in entry:
        module_name, _, attr = entry.partition(":")
        obj = getattr(_import(module_name, entry), attr, None)
    else:
        obj = _entry_point(entry) or getattr(_import(f"{BUILTIN_PACKAGE}.{entry}", entry, builtin=True),
                                             "PLUGIN", None)
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise ConfigError(f"chain.plugins: {entry!r} is not a relay plugin class")
    return obj


def _import(module_name: str, entry: str, *, builtin: bool = False) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        what = "no built-in plugin, entry point or module" if builtin else "cannot import"
        raise ConfigError(f"chain.plugins: {entry!r}: {what} ({exc})") from None


def _entry_point(name: str) -> Any:
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if point.name == name:
            return point.load()
    return None


def _validated_config(cls: type[Plugin[Any]], raw: Any) -> Any:
    try:
        return cls.Config.model_validate(raw or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            key = ".".join(str(p) for p in err["loc"])
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"plugins.{cls.name}.{key}: {message}")
        raise ConfigError("\n".join(lines)) from None


def check_seal_order(plugins: Sequence[Plugin[Any]]) -> None:
    """Refuse a message-changing plugin that runs after a sealing one (DATA, then every attempt)."""
    sealed_by: str | None = None
    for stage in (Stage.DATA, Stage.BEFORE_ATTEMPT):
        for plugin in plugins:
            if stage not in plugin.hooks():
                continue
            if sealed_by and plugin.modifies:
                raise ConfigError(
                    f"chain.plugins: {plugin.name!r} changes the message ({', '.join(sorted(plugin.modifies))}) "
                    f"after {sealed_by!r} sealed it; put it before {sealed_by!r}")
            if plugin.seals:
                sealed_by = plugin.name


class Chain:
    """The configured plugins, ready to run per stage."""

    def __init__(self, plugins: Sequence[Plugin[Any]] = ()) -> None:
        check_seal_order(plugins)
        self.plugins = list(plugins)
        self._by_stage: dict[Stage, list[Plugin[Any]]] = {
            stage: [p for p in self.plugins if stage in p.hooks()] for stage in (*DECISION_STAGES,
                                                                                  *OBSERVER_STAGES)}

    @classmethod
    def from_settings(cls, entries: Sequence[str], tables: dict[str, Any], host: PluginHost) -> Chain:
        plugins = []
        for entry in entries:
            plugin_cls = load_plugin_class(entry)
            config = _validated_config(plugin_cls, tables.get(plugin_cls.name))
            plugins.append(plugin_cls(config, host))
        unknown = set(tables) - {p.name for p in plugins}
        if unknown:
            raise ConfigError(f"plugins: table for a plugin not in chain.plugins: {', '.join(sorted(unknown))}")
        return cls(plugins)

    async def start(self) -> None:
        for plugin in self.plugins:
            try:
                await plugin.start()
            except PluginError as exc:
                raise ConfigError(f"plugin {plugin.name}: {exc}") from None

    async def stop(self) -> None:
        for plugin in reversed(self.plugins):
            try:
                await plugin.stop()
            except Exception:  # stopping must go on for the others whatever one does
                log.exception("plugin_stop_failed", plugin=plugin.name)

    @property
    def is_empty(self) -> bool:
        return not self.plugins

    def runs_at(self, stage: Stage) -> bool:
        return bool(self._by_stage[stage])

    def accepts_locally(self, address: str) -> bool:
        """True when a plugin receives mail for ``address`` itself (see :meth:`Plugin.accepts_mail_for`)."""
        return any(plugin.accepts_mail_for(address) for plugin in self.plugins)

    def effective(self) -> dict[str, list[str]]:
        """Stage → plugin names in the order they run (what ``relay plugins`` prints)."""
        return {stage.value: [p.name for p in plugins] for stage, plugins in self._by_stage.items()}

    # -- decisions -----------------------------------------------------------------------------------
    async def connect(self, ctx: ConnectContext) -> Verdict:
        return await self._decide(Stage.CONNECT, ctx)

    async def helo(self, ctx: HeloContext) -> Verdict:
        return await self._decide(Stage.HELO, ctx)

    async def mail_from(self, ctx: MailContext) -> Verdict:
        return await self._decide(Stage.MAIL_FROM, ctx)

    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        return await self._decide(Stage.RCPT_TO, ctx)

    async def data(self, ctx: DataContext) -> Verdict:
        return await self._decide(Stage.DATA, ctx)

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        return await self._decide(Stage.BEFORE_ATTEMPT, ctx)

    async def _decide(self, stage: Stage, ctx: Any) -> Verdict:
        for plugin in self._by_stage[stage]:
            verdict = await self._call(plugin, stage, ctx)
            if verdict.action is Action.CONTINUE:
                continue
            if verdict.is_reject:
                log.info("plugin_rejected", plugin=plugin.name, stage=stage.value, reply=verdict.reply(),
                         reason=verdict.reason)
            return verdict
        return CONTINUE

    async def _call(self, plugin: Plugin[Any], stage: Stage, ctx: Any) -> Verdict:
        started = time.monotonic()
        try:
            async with asyncio.timeout(plugin.timeout):
                verdict = await getattr(plugin, stage.value)(ctx)
            if not isinstance(verdict, Verdict):
                raise TypeError(f"hook returned {type(verdict).__name__}, not a Verdict")
            return verdict
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.error("plugin_timeout", plugin=plugin.name, stage=stage.value, timeout=plugin.timeout)
        except Exception as exc:  # a plugin's failure of any kind is contained here, in one place
            log.exception("plugin_failed", plugin=plugin.name, stage=stage.value, error=repr(exc),
                          elapsed=round(time.monotonic() - started, 3))
        return CONTINUE if plugin.on_error == "continue" else PLUGIN_FAILURE

    # -- observers -----------------------------------------------------------------------------------
    async def queued(self, event: QueuedEvent) -> None:
        await self._observe(Stage.QUEUED, event)

    async def delivered(self, event: DeliveryEvent) -> None:
        await self._observe(Stage.DELIVERED, event)

    async def deferred(self, event: DeliveryEvent) -> None:
        await self._observe(Stage.DEFERRED, event)

    async def bounced(self, event: DeliveryEvent) -> None:
        await self._observe(Stage.BOUNCED, event)

    async def after_attempt(self, event: AttemptFinished) -> None:
        await self._observe(Stage.AFTER_ATTEMPT, event)

    async def _observe(self, stage: Stage, event: Any) -> None:
        for plugin in self._by_stage[stage]:
            try:
                async with asyncio.timeout(plugin.timeout):
                    await getattr(plugin, stage.value)(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # observers cannot decide anything: log and go on
                log.error("plugin_observer_failed", plugin=plugin.name, stage=stage.value, error=repr(exc))
