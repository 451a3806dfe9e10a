"""Listeners: sockets, admission (connection limits) and what every session of a listener shares.

Each configured listener gets a :class:`ListenerRuntime` (its sessions and counters, and its current
:class:`ListenerConfig`: settings, TLS context, trusted networks, chain) and an asyncio server on the main
event loop — never aiosmtpd's threaded Controller, because the store's and Redis's connections belong to
this loop.

Reload (:mod:`relay.reload`): :meth:`SmtpServer.prepare` builds every listener's configuration of a new
generation (TLS files are loaded there, so a bad certificate refuses the reload before anything changed)
and :meth:`SmtpServer.apply` installs them. A session holds the configuration it took until its next
transaction boundary (see :class:`relay.smtp.session.RelaySession`); new connections get the new one. An
implicit-TLS (smtps) listener's socket keeps the context it was created with, whose SNI callback hands
each handshake the current configuration's context, so renewed certificates count there too.

Invariants:
- Past ``max_connections`` a listener still accepts the TCP connection, answers
  ``421 4.7.0`` and closes: clients get a clear answer instead of a stalled accept queue.
- Connections per client IP (concurrent, counted in this process) and the connection rate per IP (in
  the shared limiter) are checked before the greeting.
- With ``[server] smtp_workers`` = N > 1 (:mod:`relay.workers`) N processes bind each listener with
  SO_REUSEPORT; the counts above are per process, so each enforces ``limit // N`` (at least 1).
- Limits that cannot be decided because Redis is down follow ``redis.fail_open``; fail-closed answers
  ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections import Counter
from dataclasses import dataclass, field

from relay import metrics
from relay.chain import Chain
from relay.limits import limit_key
from relay.limits.base import LimiterUnavailable, RateLimiter
from relay.log import get_logger
from relay.reload import Generation, Generations
from relay.settings import ListenerSettings, Settings
from relay.smtp.auth import Authenticator
from relay.smtp.session import RelaySession
from relay.store.base import QueueStore
from relay.tlsutil import listener_context
from relay.transports import stream_transport

log = get_logger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_BUSY_REPLY = b"421 4.7.0 %s Too many connections, try again later\r\n"
_TRUSTED_MEMO_SIZE = 4096


@dataclass
class SharedState:
    """What all listeners of one process share."""

    store: QueueStore
    limiter: RateLimiter
    generations: Generations
    connections_per_ip: Counter[str] = field(default_factory=Counter)
    # How many processes accept on these listeners' sockets ([server] smtp_workers): the sockets are then
    # bound with SO_REUSEPORT, and the per-process counters enforce this process's share of each limit.
    processes: int = 1

    def share(self, limit: int) -> int:
        """This process's share of a connection limit counted per process (0, unlimited, stays 0): never
        less than 1, and the shares of all processes never add up to more than the limit (for limit >= N)."""
        return max(1, limit // self.processes) if limit else 0

    @property
    def settings(self) -> Settings:
        """The current generation's settings (a session reads its own :class:`ListenerConfig`'s)."""
        return self.generations.current.settings

    @property
    def chain(self) -> Chain:
        return self.generations.current.chain


@dataclass(frozen=True, eq=False)
class ListenerConfig:
    """One listener's configuration in one generation: what a session reads while it holds it."""

    generation: Generation
    listener: ListenerSettings
    tls_context: ssl.SSLContext | None
    trusted: tuple[IpNetwork, ...]
    authenticator: Authenticator
    # Verdicts of is_trusted per client IP text: the networks never change within one configuration, and
    # parsing the address for every RCPT was a visible share of a message's CPU. Bounded (cleared when full).
    _trusted_seen: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, generation: Generation, listener: ListenerSettings,
              authenticator: Authenticator) -> ListenerConfig:
        """Load the listener's TLS files; :class:`~relay.settings.ConfigError` when they cannot be used."""
        return cls(generation, listener, listener_context(listener, generation.settings),
                   tuple(ipaddress.ip_network(n, strict=False) for n in listener.trusted_networks), authenticator)

    @property
    def settings(self) -> Settings:
        return self.generation.settings

    @property
    def chain(self) -> Chain:
        return self.generation.chain

    def is_trusted(self, ip: str) -> bool:
        verdict = self._trusted_seen.get(ip)
        if verdict is None:
            verdict = self._trusted_uncached(ip)
            if len(self._trusted_seen) >= _TRUSTED_MEMO_SIZE:
                self._trusted_seen.clear()
            self._trusted_seen[ip] = verdict
        return verdict

    def _trusted_uncached(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


class ListenerRuntime:
    def __init__(self, config: ListenerConfig, shared: SharedState) -> None:
        self.name = config.listener.name
        self.shared = shared
        self.current = config
        self.implicit_tls = config.listener.kind == "smtps"
        # The context the socket is created with (smtps); it hands each handshake the current one.
        self.socket_context = self._socket_context(config) if self.implicit_tls else None
        self.sessions: set[RelaySession] = set()
        # Set at shutdown: sessions finish the transaction they are in, then get 421.
        self.draining = False
        self.accepted_messages = 0

    def _socket_context(self, config: ListenerConfig) -> ssl.SSLContext:
        context = listener_context(config.listener, config.settings)
        assert context is not None   # an smtps listener without a certificate is refused by listener_context
        context.sni_callback = self._current_context
        return context

    def _current_context(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                         _context: ssl.SSLContext) -> None:
        current = self.current.tls_context
        if current is not None:
            ssl_object.context = current

    def install(self, config: ListenerConfig) -> None:
        """Use ``config`` for new sessions (and sessions at their next transaction boundary)."""
        self.current = config
        if self.socket_context is not None and config.tls_context is not None:
            self.socket_context.minimum_version = config.tls_context.minimum_version

    @property
    def active(self) -> int:
        return len(self.sessions)

    # The current configuration (a session reads the one it holds, ``session.cfg``).
    @property
    def listener(self) -> ListenerSettings:
        return self.current.listener

    @property
    def settings(self) -> Settings:
        return self.current.settings

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self.current.tls_context

    @property
    def store(self) -> QueueStore:
        return self.shared.store

    @property
    def chain(self) -> Chain:
        return self.current.chain

    @property
    def authenticator(self) -> Authenticator:
        return self.current.authenticator

    def is_trusted(self, ip: str) -> bool:
        return self.current.is_trusted(ip)

    @staticmethod
    def is_loopback(ip: str) -> bool:
        return _is_loopback(ip)

    async def admit_client(self, ip: str) -> str | None:
        """Count the connection against the per-IP limits; the 421 reply to refuse with, or None."""
        limits = self.settings.limits
        per_ip = self.shared.connections_per_ip
        busy = f"421 4.7.0 {self.settings.server.hostname} Too many connections, try again later"
        if limits.connections_per_ip and per_ip[ip] >= self.shared.share(limits.connections_per_ip):
            metrics.connection_refused(self.listener.name, "per_ip_connections")
            return busy
        rate = limits.connection_rate_per_ip
        refusal = await self.check_limits([(limit_key("conn", "ip", ip), rate.count, rate.period)]
                                          if rate.count else [], peek=False)
        if refusal is not None:
            limited = refusal.startswith("450")
            metrics.connection_refused(self.listener.name, "connection_rate" if limited else "limiter_unavailable")
            # At the greeting only 421 is meaningful: it tells the client to come back later.
            return busy if limited else "421 4.3.0 Temporary failure, try again later"
        per_ip[ip] += 1
        return None

    def release_client(self, ip: str) -> None:
        per_ip = self.shared.connections_per_ip
        per_ip[ip] -= 1
        if per_ip[ip] <= 0:
            del per_ip[ip]

    async def check_limits(self, rules: list[tuple[str, int, float]], *, peek: bool) -> str | None:
        """Apply rate rules (key, count, period); the SMTP reply for the first one exceeded."""
        limiter = self.shared.limiter
        try:
            for key, count, period in rules:
                decision = await (limiter.peek(key, count, period) if peek else limiter.hit(key, count, period))
                if not decision.allowed:
                    log.warning("rate_limited", key=key, retry_after=round(decision.retry_after, 1))
                    return "450 4.7.1 Rate limit exceeded, try again later"
        except LimiterUnavailable:
            log.error("limiter_unavailable", fail_open=False)
            return "451 4.3.0 Temporary failure, try again later"
        return None


class _BusyProtocol(asyncio.Protocol):
    """Answers 421 to a connection over the listener's limit, then closes it."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = stream_transport(transport)   # not isinstance: uvloop's transports fail it
        if stream is None:
            transport.close()
            return
        stream.write(_BUSY_REPLY % self._hostname.encode())
        stream.close()


class _CountedSession(RelaySession):
    """A session that keeps its listener's active-connection count."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.rt.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.rt.sessions.discard(self)
        super().connection_lost(error)


class SmtpServer:
    """Starts and stops every configured listener."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        generation = shared.generations.current
        authenticator = self._authenticator(generation)
        self.runtimes = [ListenerRuntime(ListenerConfig.build(generation, listener, authenticator), shared)
                         for listener in generation.settings.listeners]
        self._servers: list[asyncio.Server] = []

    def _authenticator(self, generation: Generation) -> Authenticator:
        return Authenticator(self.shared.store, self.shared.limiter, generation.settings.limits)

    def prepare(self, generation: Generation) -> list[ListenerConfig]:
        """Every running listener's configuration in ``generation`` (matched by name; the reload keeps
        the running listeners). Raises ConfigError, changing nothing, when TLS files cannot be used."""
        authenticator = self._authenticator(generation)
        by_name = {listener.name: listener for listener in generation.settings.listeners}
        return [ListenerConfig.build(generation, by_name[runtime.name], authenticator) for runtime in self.runtimes]

    def apply(self, configs: list[ListenerConfig]) -> None:
        for runtime, config in zip(self.runtimes, configs, strict=True):
            runtime.install(config)

    def _factory(self, runtime: ListenerRuntime) -> asyncio.Protocol:
        if runtime.active >= self.shared.share(runtime.listener.max_connections):
            log.warning("listener_full", listener=runtime.listener.name, active=runtime.active)
            metrics.connection_refused(runtime.listener.name, "listener_full")
            return _BusyProtocol(self.shared.settings.server.hostname)
        return _CountedSession(runtime)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for runtime in self.runtimes:
            listener = runtime.listener
            server = await loop.create_server(
                lambda rt=runtime: self._factory(rt),
                host=listener.host, port=listener.port, reuse_address=True, backlog=1024,
                ssl=runtime.socket_context, reuse_port=self.shared.processes > 1,
            )
            self._servers.append(server)
            log.info("listening", listener=listener.name, address=self.bound_address(server),
                     kind=listener.kind, auth=listener.auth)

    @staticmethod
    def bound_address(server: asyncio.Server) -> str:
        sock = server.sockets[0]
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"

    def bound_addresses(self) -> dict[str, str]:
        """Listener name → the address it is bound to, in relay.toml's form (``host:port``, ``[v6]:port``)."""
        return {rt.listener.name: self.bound_address(server)
                for rt, server in zip(self.runtimes, self._servers, strict=True)}

    def ports(self) -> dict[str, int]:
        """Listener name → bound port (useful when a listener was configured with port 0)."""
        return {rt.listener.name: int(server.sockets[0].getsockname()[1])
                for rt, server in zip(self.runtimes, self._servers, strict=True)}

    @property
    def serving(self) -> bool:
        """Every listener is bound and accepting connections (readiness)."""
        return bool(self._servers) and all(server.is_serving() for server in self._servers)

    async def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, grace: float) -> None:
        """Graceful stop: no new connections; idle sessions get 421 now, sessions inside a mail
        transaction may finish it within ``grace`` seconds, then whatever is left is cut off."""
        await self.stop_accepting()
        for runtime in self.runtimes:
            runtime.draining = True
            for session in list(runtime.sessions):
                if not session.in_transaction:
                    session.shut_down()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # Sessions end on their own schedule; a short poll during shutdown is simpler than an event
        # threaded through every listener.
        while self.open_sessions and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        await self.stop()

    async def stop(self) -> None:
        """Stop listening and cut off every session still open."""
        await self.stop_accepting()
        for runtime in self.runtimes:
            for session in list(runtime.sessions):
                session.shut_down(abort=True)
        self._servers.clear()

    @property
    def open_sessions(self) -> int:
        return sum(runtime.active for runtime in self.runtimes)


@functools.lru_cache(maxsize=4096)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
