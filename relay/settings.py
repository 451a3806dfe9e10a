"""Configuration: the typed model of ``relay.toml`` and how it is found, read and validated.

Where the file comes from, first match wins: ``--config PATH``, then ``$RELAY_CONFIG``, then
``./relay.toml``, then the built-in defaults (the zero-setup embedded relay on loopback).

Environment variables override the file: ``RELAY_<SECTION>__<KEY>`` (for example
``RELAY_STORE__URL=postgresql://…`` or ``RELAY_REDIS__URL=redis://…``).

Invariants:
- Every key has a default here and is documented, with that default, in ``relay.toml.example``.
- A bad file never produces a traceback: :func:`load_settings` raises :class:`ConfigError` with one line
  per problem, each naming the key (``listeners[1].port``) and what is wrong with it.
- Secrets still holding a placeholder value are refused by :func:`refuse_placeholder_secrets`, which the
  server calls before it opens a socket.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.delivery.config import DeliverySettings, check_host_name
from relay.eventsconfig import (
    AlertSettings,
    EventsSettings,
    StatsSettings,
    WebhookSettings,
    check_webhook_names,
)

PLACEHOLDER_SECRET = "CHANGE-ME"  # noqa: S105 - the marker we refuse, not a secret
DEFAULT_CONFIG_NAME = "relay.toml"


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is the message shown to the admin."""


class Section(BaseModel):
    """Base for every table of relay.toml: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(gt=0)]


class ServerSettings(Section):
    hostname: str = "relay.localhost"
    state_dir: Path = Path("var")
    role: Literal["all", "smtp", "delivery"] = "all"
    # Secret used to sign tracking URLs and other tokens; `relay init` generates one.
    secret_key: SecretStr | None = None
    # Token guarding the admin HTTP API; `relay init` generates one.
    admin_token: SecretStr | None = None

    @field_validator("hostname")
    @classmethod
    def _host_name(cls, value: str) -> str:
        # It goes into the greeting, EHLO, Received: headers and DSNs: CR/LF there would inject lines.
        return check_host_name(value)
    # Seconds open SMTP sessions and in-flight deliveries get at shutdown (SIGTERM) before sessions get
    # 421 and unfinished claims are given back.
    shutdown_grace: float = Field(default=30.0, ge=0)
    # Where `relay serve` writes its process id, for `relay reload`; None: <state_dir>/relay.pid.
    pid_file: Path | None = None
    # Processes accepting SMTP on the same sockets (SO_REUSEPORT; roles all and smtp): `relay serve` and
    # smtp_workers - 1 workers it supervises (relay/workers.py). More than one needs [redis] url.
    smtp_workers: int = Field(default=1, ge=1, le=64)


class StoreSettings(Section):
    # sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user@host/db
    url: str = "sqlite:///var/queue.db"
    pool_size: int = Field(default=10, ge=1, le=200)
    # Group commit: a batch takes every message waiting when the writer is free, up to this many …
    commit_batch_max: int = Field(default=256, ge=1, le=10_000)
    # … and may wait this long for more (0: never wait; batches form while the previous commit's
    # fsync runs, so a lone client pays no extra latency).
    commit_batch_wait_ms: float = Field(default=0.0, ge=0, le=1000)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return value

    @property
    def kind(self) -> Literal["sqlite", "postgres"]:
        return "sqlite" if self.url.startswith("sqlite://") else "postgres"


class RedisSettings(Section):
    # Empty: limits are kept in this process's memory (right for a single relay node).
    url: str = ""
    # When Redis cannot be reached: true keeps accepting (warning logged), false answers 451 4.3.0.
    fail_open: bool = True
    timeout: Seconds = 0.5
    key_prefix: str = "relay:"


class TlsSettings(Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    # With no certificate configured, generate a self-signed one under state_dir (development only).
    dev_certificate: bool = True
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class ListenerSettings(Section):
    name: str
    address: str
    kind: Literal["relay", "submission", "smtps"] = "relay"
    # "required": no MAIL before AUTH; "optional": AUTH offered, trusted networks may relay without it;
    # "off": AUTH not offered.
    auth: Literal["required", "optional", "off"] = "optional"
    trusted_networks: list[str] = Field(default_factory=list)
    max_connections: int = Field(default=1000, ge=1)
    # AUTH is only offered over TLS; this allows it in clear text for clients on a loopback address.
    allow_plain_auth_on_loopback: bool = False
    starttls: bool = True
    # Per-listener certificate; falls back to [tls].
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port, for example 127.0.0.1:2525 or [::1]:2525")
        return value

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"{net!r} is not a network: {exc}") from None
        return value

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def _default_listeners() -> list[ListenerSettings]:
    loopback = ["127.0.0.0/8", "::1/128"]
    return [
        ListenerSettings(name="relay", address="127.0.0.1:2525", kind="relay", auth="optional",
                         trusted_networks=loopback),
        ListenerSettings(name="submission", address="127.0.0.1:2587", kind="submission", auth="required"),
    ]


class SmtpSettings(Section):
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1)
    # RFC 5321 4.5.3.1.4: 512 octets for a command line; extensions may add to it.
    max_line_length: int = Field(default=1000, ge=512)
    command_timeout: Seconds = 300.0
    data_timeout: Seconds = 600.0
    max_bad_commands: int = Field(default=10, ge=1)
    smtputf8: bool = True
    greeting: str = "ESMTP relay"

    @field_validator("greeting")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # The rest of the 220 line: a CR/LF would let the configuration inject protocol lines.
        if len(value) > 200 or not value.isascii() or not (value.isprintable() or value == ""):
            raise ValueError("must be at most 200 printable ASCII characters on one line")
        return value


class RateRule(Section):
    """``count`` events per ``period`` seconds; 0 disables the rule."""

    count: int = Field(default=0, ge=0)
    period: Seconds = 60.0


class LimitSettings(Section):
    connections_per_ip: int = Field(default=50, ge=0)
    connection_rate_per_ip: RateRule = RateRule(count=600, period=60)
    auth_failures_per_ip: RateRule = RateRule(count=10, period=600)
    auth_failures_per_user: RateRule = RateRule(count=5, period=600)
    messages_per_ip: RateRule = RateRule(count=0, period=60)
    recipients_per_ip: RateRule = RateRule(count=0, period=60)
    messages_per_user: RateRule = RateRule(count=0, period=60)
    recipients_per_user: RateRule = RateRule(count=0, period=60)


class ChainSettings(Section):
    # Plugins in the order they run: built-in names (blacklist, tracking, dkim, throttle), dotted paths
    # ("package.module:Class") or entry points of the "relay.plugins" group. Each may have a
    # [plugins.<name>] table.
    plugins: list[str] = Field(default_factory=list)


class HttpSettings(Section):
    # host:port of the relay's HTTP server (health, tracking links, later metrics and the admin API);
    # empty: no HTTP server. Bound exactly there, nowhere else.
    address: str = ""
    # Base URL under which the outside world reaches that server (tracking links), e.g.
    # "https://t.example.com"; empty: no public URL (the tracking plugin then needs its own base_url).
    public_url: str = ""
    # Largest request body accepted, in bytes.
    max_request_size: int = Field(default=1024 * 1024, ge=1024)
    # Seconds open requests get to finish when the relay stops.
    shutdown_grace: Seconds = 5.0
    # /metrics: recipient domains that get a destination label of their own (the busiest seen first;
    # the rest are "other"), and seconds the queue statistics of one scrape (one grouped query) are reused.
    metrics_destinations: int = Field(default=20, ge=0, le=1000)
    metrics_queue_cache: Seconds = 5.0

    @field_validator("address")
    @classmethod
    def _http_host_port(cls, value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be host:port (for example 127.0.0.1:8025) or empty")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_public_url(cls, value: str) -> str:
        if value == "":
            return value
        parts = urlsplit(value)
        if (not value.isascii() or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.query or parts.fragment or any(c.isspace() for c in value)):
            raise ValueError("must be an ASCII http:// or https:// base URL without query or fragment")
        return value.rstrip("/")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    """The whole of relay.toml."""

    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid", frozen=True,
    )

    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    redis: RedisSettings = RedisSettings()
    tls: TlsSettings = TlsSettings()
    listeners: list[ListenerSettings] = Field(default_factory=_default_listeners)
    smtp: SmtpSettings = SmtpSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    http: HttpSettings = HttpSettings()
    chain: ChainSettings = ChainSettings()
    # Tables for subsystems that validate their own keys (plugins, …) are kept as raw data here and
    # validated by their owners at start-up.
    plugins: dict[str, Any] = Field(default_factory=dict)
    delivery: DeliverySettings = DeliverySettings()
    # The event outbox, its webhooks, hourly statistics and alerts (relay/eventsconfig.py).
    events: EventsSettings = EventsSettings()
    webhooks: list[WebhookSettings] = Field(default_factory=list)
    stats: StatsSettings = StatsSettings()
    alerts: AlertSettings = AlertSettings()

    @model_validator(mode="after")
    def _unique_webhooks(self) -> Settings:
        check_webhook_names(self.webhooks)
        return self

    @model_validator(mode="after")
    def _shared_limits_for_workers(self) -> Settings:
        # Each process's in-memory limiter would be a budget of its own: N workers would let N times the
        # configured rates, quotas and AUTH failures through. Redis is what they share.
        if self.server.smtp_workers > 1 and self.server.role != "delivery" and not self.redis.url:
            raise ValueError(f"server.smtp_workers = {self.server.smtp_workers} needs [redis] url: rate "
                             "limits, quotas and AUTH lockouts must be shared by every SMTP process")
        return self

    @model_validator(mode="after")
    def _unique_listeners(self) -> Settings:
        names = [listener.name for listener in self.listeners]
        addresses = [listener.address for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError("listener names must be unique")
        if len(set(addresses)) != len(addresses):
            raise ValueError("two listeners share one address")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first (it overrides), then the file's contents passed in as init values.
        return env_settings, init_settings


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Where relay.toml comes from: ``--config``, ``$RELAY_CONFIG``, ``./relay.toml``, else none."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("RELAY_CONFIG")
    if from_env:
        return Path(from_env)
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.is_file() else None


def load_settings(explicit: str | os.PathLike[str] | None = None) -> tuple[Settings, Path | None]:
    """Read, parse and validate the configuration; raise :class:`ConfigError` with a readable message."""
    path = find_config_path(explicit)
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(path)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from None
    return settings, path


def parse_settings(text: str, origin: str = "relay.toml") -> Settings:
    """Validate configuration given as TOML text (used by reload and tests)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, Path(origin))) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the configuration file (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line per problem: ``relay.toml: listeners[0].port: Input should be …``."""
    origin = str(path) if path else "configuration"
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        key = _dotted_location(err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against relay.toml.example)"
        lines.append(f"{origin}: {key or '(top level)'}: {message}")
    return "\n".join(lines)


def _dotted_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def placeholder_secrets(settings: Settings) -> list[str]:
    """Names of the secrets that still hold the placeholder from relay.toml.example."""
    named: dict[str, SecretStr | None] = {
        "server.secret_key": settings.server.secret_key,
        "server.admin_token": settings.server.admin_token,
    }
    for index, hook in enumerate(settings.webhooks):
        named[f"webhooks[{index}].secret"] = hook.secret
        named.update({f"webhooks[{index}].old_secrets[{n}]": old for n, old in enumerate(hook.old_secrets)})
    return [name for name, secret in named.items()
            if secret is not None and PLACEHOLDER_SECRET in secret.get_secret_value()]


def refuse_placeholder_secrets(settings: Settings) -> None:
    found = placeholder_secrets(settings)
    if found:
        raise ConfigError(
            "refusing to start: placeholder secret in " + ", ".join(found)
            + " (run `relay init` to generate real ones)"
        )
