"""The plugin API: everything a chain step may use, in one module.

A plugin is a class deriving from :class:`Plugin`. It declares its name, its configuration (a pydantic
model validated at start-up from ``[plugins.<name>]``), whether it changes the message (headers, body)
and whether it *seals* it (DKIM: nothing may change the message after it). It implements any of the
stage hooks below; the chain calls only the hooks a plugin overrides.

Decision hooks, named after the SMTP conversation and the delivery attempt, return a :class:`Verdict`:

============== =========================================================== =======================
hook           when                                                        changes to the message
============== =========================================================== =======================
connect        a client connected, before the greeting                     —
helo           HELO/EHLO                                                   —
mail_from      MAIL FROM                                                   —
rcpt_to        each RCPT TO                                                —
data           end of DATA, before the commit                              kept (stored)
before_attempt before every delivery attempt                               thrown away afterwards
============== =========================================================== =======================

Observers see what happened and cannot decide: ``queued``, ``delivered``, ``deferred``, ``bounced`` (per
recipient) and ``after_attempt`` — once per delivery attempt the chain was asked about, whatever became of
it (sent, deferred or refused by a plugin, crashed), with the very :class:`AttemptContext` that
``before_attempt`` saw, ``notes`` included. It is where a plugin gives back what it took for the attempt
(the throttle's connection slots); ``AttemptFinished.attempted`` says whether a connection was tried.

Verdicts: ``CONTINUE`` (next plugin), ``ACCEPT`` (stop the chain for this stage, accepted), ``reject
temporarily`` / ``reject permanently`` with a reply code, an RFC 3463 enhanced code, a generic text for
the client and a private reason for the log — optionally disconnecting. A plugin that raises or times
out is turned into ``451 4.3.0`` in one place (the runner, :mod:`relay.chain`), or into ``CONTINUE``
when it declares ``on_error = "continue"``.

Invariant: a plugin imports nothing from relay but this module (and ``relay.policies``, which are pure).
What it needs from the relay — the queue database's suppression list, the rate limiter, the HTTP server,
secrets — reaches it through the :class:`PluginHost` given to its constructor.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from relay.limits.base import Decision, LimiterUnavailable, RateLimiter, ValueStore
from relay.log import get_logger
from relay.policies.bounce import Classification, Reply
from relay.store.base import Event, RecipientRow, StoredMessage, Suppression

__all__ = [
    "ACCEPT", "CONTINUE", "PLUGIN_FAILURE", "Action", "AttemptContext", "AttemptFinished", "ConnectContext",
    "DataContext",
    "Decision", "DeliveryEvent", "Event", "EventRecorder", "HeloContext", "HttpRoutes", "LimiterUnavailable",
    "MailContext",
    "Plugin", "PluginConfig", "PluginError", "PluginHost", "QueuedEvent", "RateLimiter", "RcptContext",
    "SessionInfo", "Stage", "Suppression", "SuppressionList", "ValueStore", "Verdict", "get_logger",
]


class PluginError(Exception):
    """A plugin cannot start (bad key file, bad setting); ``str()`` is shown to the admin."""


class Stage(enum.StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL_FROM = "mail_from"
    RCPT_TO = "rcpt_to"
    DATA = "data"
    BEFORE_ATTEMPT = "before_attempt"
    QUEUED = "queued"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    AFTER_ATTEMPT = "after_attempt"


DECISION_STAGES = (Stage.CONNECT, Stage.HELO, Stage.MAIL_FROM, Stage.RCPT_TO, Stage.DATA, Stage.BEFORE_ATTEMPT)
OBSERVER_STAGES = (Stage.QUEUED, Stage.DELIVERED, Stage.DEFERRED, Stage.BOUNCED, Stage.AFTER_ATTEMPT)


class Action(enum.StrEnum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT_TEMPORARY = "reject_temporary"
    REJECT_PERMANENT = "reject_permanent"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    code: int = 250
    enhanced: str = "2.0.0"
    text: str = "Ok"
    reason: str = ""             # private: logged, never sent to the client
    disconnect: bool = False
    # For a temporary rejection before a delivery attempt: when to try again (epoch seconds).
    retry_at: float | None = None

    @property
    def is_reject(self) -> bool:
        return self.action in (Action.REJECT_TEMPORARY, Action.REJECT_PERMANENT)

    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @classmethod
    def tempfail(cls, text: str = "Temporary failure, try again later", *, code: int = 451,
                 enhanced: str = "4.7.1", reason: str = "", disconnect: bool = False,
                 retry_at: float | None = None) -> Verdict:
        _check_reply(code, enhanced, 4)
        return cls(Action.REJECT_TEMPORARY, code, enhanced, text, reason, disconnect, retry_at)

    @classmethod
    def reject(cls, text: str = "Rejected", *, code: int = 550, enhanced: str = "5.7.1", reason: str = "",
               disconnect: bool = False) -> Verdict:
        _check_reply(code, enhanced, 5)
        return cls(Action.REJECT_PERMANENT, code, enhanced, text, reason, disconnect)


def _check_reply(code: int, enhanced: str, klass: int) -> None:
    if code // 100 != klass or not enhanced.startswith(f"{klass}."):
        raise ValueError(f"reply {code} {enhanced} is not of class {klass}")


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)
PLUGIN_FAILURE = Verdict(Action.REJECT_TEMPORARY, 451, "4.3.0", "Temporary failure, try again later")


# -- what the hooks see -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SessionInfo:
    client_ip: str
    listener: str
    helo: str = ""
    auth_user: str | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class ConnectContext:
    session: SessionInfo


@dataclass(frozen=True, slots=True)
class HeloContext:
    session: SessionInfo
    helo: str


@dataclass(frozen=True, slots=True)
class MailContext:
    session: SessionInfo
    sender: str                    # "" is the null sender


@dataclass(frozen=True, slots=True)
class RcptContext:
    session: SessionInfo
    sender: str
    recipient: str
    accepted: Sequence[str]        # recipients accepted so far in this transaction


@dataclass(slots=True)
class DataContext:
    """End of DATA. Replace ``data`` to change the message; the change is stored and delivered."""

    session: SessionInfo
    queue_id: str
    sender: str
    recipients: Sequence[str]
    data: bytes
    # Headers to remove before delivery are the plugin's business; notes for later plugins of the
    # same stage go here (namespaced by plugin name).
    notes: dict[str, Any] = field(default_factory=dict)
    # Set by a plugin that took the message in itself (a feedback-loop report recorded as a complaint)
    # and returned ACCEPT: the session answers that verdict's 2xx reply and queues nothing. Honoured only
    # when every recipient is one the chain receives mail for (Plugin.accepts_mail_for), so relayed mail
    # is never swallowed; set it only once what the plugin keeps of the message is durably stored.
    consumed: bool = False


@dataclass(slots=True)
class AttemptContext:
    """Before one delivery attempt of one message to one destination. Replace ``data`` to change
    what is sent this time only (the stored message is never changed)."""

    message: StoredMessage
    recipients: list[RecipientRow]
    destination: str               # the destination key (MX set, host or smarthost)
    route_kind: str
    data: bytes
    notes: dict[str, Any] = field(default_factory=dict)
    # Recipients to leave out of this attempt, by RecipientRow.id, and what becomes of each instead
    # (the others are sent as usual; when none is left nothing is sent):
    # - a permanent rejection (Verdict.reject) fails the recipient with that reply: bounced, with a DSN to
    #   the sender as for any permanent failure, and the ``bounced`` observers are told;
    # - a temporary one (Verdict.tempfail) defers it without counting an attempt (``retry_at`` honoured);
    # - ACCEPT settles it without sending: dropped (state ``deleted``), no DSN, no attempt counted.
    # CONTINUE entries are ignored. A verdict for the whole attempt (the hook's return value) still
    # applies to every recipient and takes precedence.
    skip: dict[int, Verdict] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    queue_id: str
    sender: str
    recipients: Sequence[str]
    size: int
    auth_user: str | None


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    message: StoredMessage
    recipient: RecipientRow
    destination: str
    classification: Classification | None = None
    reply: Reply | None = None
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One delivery attempt is over. ``attempt`` is the context ``before_attempt`` saw (its ``notes`` say
    what each plugin took for it); ``attempted`` is False when no connection was tried (a plugin
    deferred or refused the attempt, or it ended before sending)."""

    attempt: AttemptContext
    attempted: bool


# -- what the relay offers plugins ----------------------------------------------------------------------
Reason = Literal["hard_bounce", "complaint", "unsubscribe", "manual", "spam_trap", "other"]


@runtime_checkable
class SuppressionList(Protocol):
    """The suppression list in the queue database (both stores).

    Values are stored and looked up in the normal form of :mod:`relay.policies.addresses` (the store
    normalises whatever spelling it is given); the semantics of each method are documented on
    :class:`relay.store.base.QueueStore`. ``find_suppression`` is one indexed query.
    """

    async def add_suppression(self, entry: Suppression) -> None: ...
    async def remove_suppression(self, value: str, kind: str, scope: str = "") -> bool: ...
    async def find_suppression(self, address: str, ip: str | None = None, scope: str = "",
                               now: float | None = None) -> Suppression | None: ...
    async def list_suppressions(self, limit: int = 1000, offset: int = 0, reason: str | None = None
                                ) -> list[Suppression]: ...
    async def count_suppressions(self, reason: str | None = None) -> int: ...
    async def purge_expired_suppressions(self, now: float | None = None) -> int: ...


@runtime_checkable
class EventRecorder(Protocol):
    """Appends events to the durable outbox in the queue database."""

    async def record_event(self, event: Event) -> None: ...


Handler = Callable[[Any], Awaitable[Any]]


class HttpRoutes(Protocol):
    """Registers handlers on the relay's HTTP server (aiohttp request → response)."""

    def add_route(self, method: str, path: str, handler: Handler) -> None: ...


@dataclass(slots=True)
class PluginHost:
    """What the relay gives a plugin. Fields a deployment does not have are None.

    ``limiter`` is shared by every relay node when ``[redis] url`` is set (process memory otherwise).
    Both backends are also a :class:`ValueStore` (small shared values with a TTL): test
    ``isinstance(host.limiter, ValueStore)`` before using it that way.
    """

    hostname: str
    secret_key: bytes | None
    limiter: RateLimiter
    suppressions: SuppressionList | None = None
    events: EventRecorder | None = None
    http: HttpRoutes | None = None
    # Base URL the relay's HTTP endpoint is reachable at from the outside (tracking links).
    public_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- the plugin base class ----------------------------------------------------------------------------
class PluginConfig(BaseModel):
    """Base for plugin configuration models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


class Plugin(abc.ABC, Generic[ConfigT]):
    """Base class of every plugin. Override the hooks you need; leave the others alone."""

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    # What the plugin changes in the message at DATA or before an attempt.
    modifies: ClassVar[frozenset[Literal["headers", "body"]]] = frozenset()
    # True for a plugin after which nothing may change the message (a signature).
    seals: ClassVar[bool] = False
    # On an exception or timeout: "tempfail" answers 451 4.3.0; "continue" ignores the plugin.
    on_error: ClassVar[Literal["tempfail", "continue"]] = "tempfail"
    # Seconds a hook may take before it counts as failed.
    timeout: ClassVar[float] = 10.0

    def __init__(self, config: ConfigT, host: PluginHost) -> None:
        self.config = config
        self.host = host
        self.log = get_logger(f"relay.plugins.{self.name}")

    async def start(self) -> None:
        """Load keys, open resources; raise :class:`PluginError` to refuse start-up."""

    async def stop(self) -> None:
        """Release resources."""

    def accepts_mail_for(self, address: str) -> bool:
        """True for an address this plugin receives mail for itself (a feedback-loop address): the relay
        accepts it at RCPT from any client, without relay permission — it is not relayed anywhere. The
        plugin must then consume such mail at DATA (:attr:`DataContext.consumed`). Must be cheap and pure."""
        return False

    # Decision hooks (defaults are never called: the chain only calls overridden hooks).
    async def connect(self, ctx: ConnectContext) -> Verdict:
        return CONTINUE

    async def helo(self, ctx: HeloContext) -> Verdict:
        return CONTINUE

    async def mail_from(self, ctx: MailContext) -> Verdict:
        return CONTINUE

    async def rcpt_to(self, ctx: RcptContext) -> Verdict:
        return CONTINUE

    async def data(self, ctx: DataContext) -> Verdict:
        return CONTINUE

    async def before_attempt(self, ctx: AttemptContext) -> Verdict:
        return CONTINUE

    # Observers.
    async def queued(self, event: QueuedEvent) -> None:
        return None

    async def delivered(self, event: DeliveryEvent) -> None:
        return None

    async def deferred(self, event: DeliveryEvent) -> None:
        return None

    async def bounced(self, event: DeliveryEvent) -> None:
        return None

    async def after_attempt(self, event: AttemptFinished) -> None:
        return None

    @classmethod
    def hooks(cls) -> list[Stage]:
        """The stages this plugin takes part in (the hooks it overrides)."""
        return [stage for stage in (*DECISION_STAGES, *OBSERVER_STAGES)
                if getattr(cls, stage.value) is not getattr(Plugin, stage.value)]
