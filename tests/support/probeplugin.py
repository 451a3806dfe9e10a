"""A plugin for reload tests: it says which instance (``tag``) handled each stage, and can hold an attempt.

``[chain] plugins = ["tests.support.probeplugin:Probe"]`` with ``[plugins.probe] tag = "…"``. At DATA it
adds ``X-Probe: <tag>``; before an attempt it adds ``X-Probe-Attempt: <tag>`` and, when ``hold_attempts``
is set, waits until the test opens :data:`GATES` for its tag; with ``route`` set it serves that path
(GET) answering its tag. Every instance is listed in :data:`INSTANCES` with what happened to it.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Literal

from aiohttp import web

from relay.plugin import CONTINUE, AttemptContext, AttemptFinished, DataContext, Plugin, PluginConfig, Verdict


class ProbeConfig(PluginConfig):
    tag: str = "probe"
    hold_attempts: bool = False
    route: str = ""


INSTANCES: list[Probe] = []
GATES: dict[str, asyncio.Event] = {}


class Probe(Plugin[ProbeConfig]):
    name: ClassVar[str] = "probe"
    Config: ClassVar[type[PluginConfig]] = ProbeConfig
    modifies: ClassVar[frozenset[Literal["headers", "body"]]] = frozenset({"headers"})
    timeout: ClassVar[float] = 60.0

    def __init__(self, config: ProbeConfig, host: Any) -> None:
        super().__init__(config, host)
        self.started = False
        self.stopped = asyncio.Event()
        self.attempts_begun = 0
        self.attempts_ended = 0
        self.attempt_started = asyncio.Event()
        INSTANCES.append(self)

    @property
    def tag(self) -> str:
        return self.config.tag

    async def start(self) -> None:
        if self.config.route and self.host.http is not None:
            self.host.http.add_route("GET", self.config.route, self.answer)
        self.started = True

    async def stop(self) -> None:
        self.stopped.set()

    async def answer(self, request: web.Request) -> web.Response:
        return web.Response(text=self.tag)

    async def data(self, ctx: DataContext) -> Verdict:
        ctx.data = f"X-Probe: {self.tag}\r\n".encode() + ctx.data
        return CONTINUE

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        self.attempts_begun += 1
        self.attempt_started.set()
        if self.config.hold_attempts:
            await GATES.setdefault(self.tag, asyncio.Event()).wait()
        ctx.data = f"X-Probe-Attempt: {self.tag}\r\n".encode() + ctx.data
        return CONTINUE

    async def after_attempt(self, event: AttemptFinished) -> None:
        self.attempts_ended += 1


def reset() -> None:
    """Forget every instance and gate (an autouse fixture calls this before each test)."""
    INSTANCES.clear()
    GATES.clear()


def instance(tag: str) -> Probe:
    """The newest instance with this tag."""
    return [probe for probe in INSTANCES if probe.tag == tag][-1]
