"""Admin subcommands of the core: ``serve``, ``init``, ``check``, ``users …`` and ``db migrate``.

Passwords are read from a terminal prompt or from standard input (``--password-stdin``), never from the
command line, where every local user could read them in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.log import configure_logging
from relay.settings import PLACEHOLDER_SECRET, ConfigError, Settings, load_settings, placeholder_secrets
from relay.smtp.auth import hash_password
from relay.store.base import QueueStore, StoreError, UnknownUser, User, UserExists

if TYPE_CHECKING:
    from relay.app import Relay


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run the relay")
    serve.add_argument("--role", choices=["all", "smtp", "delivery"], help="override server.role")
    # Set by the supervising `relay serve` for the SMTP worker processes it starts (relay/workers.py).
    serve.add_argument("--smtp-worker", type=int, metavar="N", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    init = subparsers.add_parser("init", help="write a relay.toml with freshly generated secrets")
    init.add_argument("--path", default="relay.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)

    check = subparsers.add_parser("check", help="validate the configuration and reach its dependencies")
    check.set_defaults(func=cmd_check)

    db = subparsers.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_db_migrate)

    plugins = subparsers.add_parser("plugins", help="print the effective plugin chain per stage")
    plugins.set_defaults(func=cmd_plugins)

    _register_users(subparsers)


# -- serve ----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    settings, path = load_settings(args.config)
    if args.role:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"role": args.role})})
    configure_logging(settings.log.level, settings.log.format)
    from relay.app import Relay
    from relay.reload import pid_file_path, reload_status_path, remove_pid_file, write_pid_file

    if args.smtp_worker is not None:
        return _serve_as_worker(settings, path, args.smtp_worker)

    async def main() -> int:
        from relay.workers import launch_command
        relay = Relay(settings, config_path=path, worker_command=launch_command())
        if not await _started(relay, "relay"):
            return 1
        # Written once the relay serves, so `relay reload` never signals a relay still starting up.
        pid_file = pid_file_path(settings)
        try:
            write_pid_file(pid_file)
            relay.reload_status_file = reload_status_path(pid_file)
        except OSError as exc:
            print(f"relay: cannot write the pid file {pid_file}: {exc} (`relay reload` needs --pid)",
                  file=sys.stderr)
        try:
            await relay.run_until_signalled()
        finally:
            remove_pid_file(pid_file)
        return 0

    return _run(main())


def _serve_as_worker(settings: Settings, path: Path | None, number: int) -> int:
    """An SMTP worker process (relay/workers.py): no pid file, no HTTP, dies with its supervisor."""
    from relay.app import Relay
    from relay.log import set_process_fields
    from relay.workers import die_with_supervisor, worker_overrides

    die_with_supervisor()
    set_process_fields(worker=number)

    async def main() -> int:
        relay = Relay(settings, config_path=path, worker=number, overrides=worker_overrides())
        if not await _started(relay, f"relay: smtp worker {number}"):
            return 1
        await relay.run_until_signalled()
        return 0

    return _run(main())


async def _started(relay: Relay, who: str) -> bool:
    """Start ``relay``; on a start-up error say why in one line (prefixed ``who``), undo, and say False."""
    from relay.app import StartupError
    try:
        await relay.start()
    except (StartupError, ConfigError) as exc:
        print(f"{who}: {exc}", file=sys.stderr)
        await relay.stop(grace=0)
        return False
    return True


def _run(coro: Awaitable[int]) -> int:
    try:
        import uvloop  # optional: a faster event loop when installed
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


# -- init -----------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.path)
    if target.exists() and not args.force:
        print(f"relay: {target} exists; use --force to overwrite", file=sys.stderr)
        return 1
    text = render_initial_config()
    target.write_text(text)
    target.chmod(0o600)
    print(f"wrote {target} with fresh secrets (mode 0600)")
    return 0


def render_initial_config() -> str:
    """A minimal relay.toml for the embedded default, with real secrets in place of placeholders."""
    template = _MINIMAL_CONFIG
    while PLACEHOLDER_SECRET in template:
        template = template.replace(PLACEHOLDER_SECRET, secrets.token_urlsafe(32), 1)
    return template


_MINIMAL_CONFIG = f"""# relay.toml written by `relay init`. Every key, its default and what it does: relay.toml.example.
# Keys left out keep their defaults: the embedded SQLite queue under ./var, limits in memory,
# 127.0.0.1:2525 (relay, trusts loopback) and 127.0.0.1:2587 (submission, STARTTLS + AUTH).

[server]
hostname = "relay.localhost"
# Signs tracking URLs and other tokens. Keep it secret; rotating it invalidates old links.
secret_key = "{PLACEHOLDER_SECRET}"
# Guards the admin HTTP API.
admin_token = "{PLACEHOLDER_SECRET}"

[store]
url = "sqlite:///var/queue.db"

[redis]
# Set to redis://host:6379/0 when several relays share limits.
url = ""
"""


# -- check ----------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    try:
        settings, path = load_settings(args.config)
    except ConfigError as exc:
        print(f"FATAL {exc}")
        return 1
    print(f"ok    configuration {path or '(built-in defaults)'}")
    problems = asyncio.run(_check_dependencies(settings))
    fatal = [p for level, p in problems if level == "FATAL"]
    for level, message in problems:
        print(f"{level:5} {message}")
    if fatal:
        return 1
    return 2 if problems else 0


async def _check_dependencies(settings: Settings) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = [("FATAL", f"placeholder secret: {name}")
                                       for name in placeholder_secrets(settings)]
    problems += await _check_store(settings)
    problems += await _check_redis(settings)
    problems += _check_tls(settings)
    return problems


async def _check_store(settings: Settings) -> list[tuple[str, str]]:
    from relay.store import open_store
    try:
        store = await open_store(settings.store)
        await store.ping()
        await store.close()
    except (StoreError, OSError) as exc:
        return [("FATAL", f"queue store {settings.store.kind}: {exc}")]
    print(f"ok    queue store {settings.store.kind}")
    return []


async def _check_redis(settings: Settings) -> list[tuple[str, str]]:
    if not settings.redis.url:
        print("ok    limits in memory (no redis.url; right for a single relay node)")
        return []
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(settings.redis.url, socket_timeout=settings.redis.timeout,
                                     socket_connect_timeout=settings.redis.timeout)
    try:
        await client.ping()
    except Exception as exc:  # any failure to reach Redis is reported, whatever its type
        level = "WARN" if settings.redis.fail_open else "FATAL"
        return [(level, f"redis unreachable ({exc}); fail_open={settings.redis.fail_open}")]
    finally:
        await client.aclose()
    print("ok    redis")
    return []


def _check_tls(settings: Settings) -> list[tuple[str, str]]:
    from relay.tlsutil import listener_context
    problems: list[tuple[str, str]] = []
    for listener in settings.listeners:
        try:
            context = listener_context(listener, settings)
        except ConfigError as exc:
            problems.append(("FATAL", f"listener {listener.name}: {exc}"))
            continue
        if context is None:
            problems.append(("WARN", f"listener {listener.name}: no TLS certificate, STARTTLS not offered"))
        elif not (listener.cert_file or settings.tls.cert_file):
            problems.append(("WARN", f"listener {listener.name}: using the self-signed development certificate"))
    return problems


# -- plugins --------------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    """Load and validate the chain as the server would, then show who runs at each stage."""
    settings, _ = load_settings(args.config)
    from relay.chain import Chain
    from relay.limits.memory import MemoryLimiter
    from relay.plugin import PluginHost

    host = PluginHost(hostname=settings.server.hostname, secret_key=None, limiter=MemoryLimiter())
    chain = Chain.from_settings(settings.chain.plugins, settings.plugins, host)
    print("chain: " + (" -> ".join(p.name for p in chain.plugins) or "(empty)"))
    for plugin in chain.plugins:
        flags = [f"changes {', '.join(sorted(plugin.modifies))}"] if plugin.modifies else []
        flags += ["seals"] if plugin.seals else []
        flags += [f"on error: {plugin.on_error}", f"timeout {plugin.timeout:g}s"]
        print(f"  {plugin.name}: {type(plugin).__module__}.{type(plugin).__qualname__} ({'; '.join(flags)})")
    for stage, names in chain.effective().items():
        print(f"{stage:15} {' -> '.join(names) if names else '-'}")
    return 0


# -- db migrate -----------------------------------------------------------------------------------
def cmd_db_migrate(args: argparse.Namespace) -> int:
    settings, _ = load_settings(args.config)
    from relay.store import migrate_store
    try:
        applied = asyncio.run(migrate_store(settings.store))
    except StoreError as exc:
        print(f"relay: migration failed: {exc}", file=sys.stderr)
        return 1
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


# -- users ----------------------------------------------------------------------------------------
def _register_users(subparsers: Any) -> None:
    users = subparsers.add_parser("users", help="manage SMTP AUTH users")
    sub = users.add_subparsers(dest="users_command", required=True)

    add = sub.add_parser("add", help="create a user")
    add.add_argument("username")
    _password_options(add)
    add.add_argument("--sender-domains", default="", help="comma-separated domains the user may send from")
    add.add_argument("--expires", help="expiry as YYYY-MM-DD or a number of days (e.g. 30d)")
    add.add_argument("--quota-per-minute", type=int, default=0)
    add.add_argument("--quota-per-day", type=int, default=0)
    add.set_defaults(func=lambda a: _users(a, _users_add))

    sub.add_parser("list", help="list users").set_defaults(func=lambda a: _users(a, _users_list))

    passwd = sub.add_parser("passwd", help="set a new password")
    passwd.add_argument("username")
    _password_options(passwd)
    passwd.set_defaults(func=lambda a: _users(a, _users_passwd))

    for name, helptext in (("disable", "refuse AUTH for a user"), ("enable", "allow AUTH again"),
                           ("delete", "remove a user")):
        parser = sub.add_parser(name, help=helptext)
        parser.add_argument("username")
        parser.set_defaults(func=lambda a, n=name: _users(a, _USER_ACTIONS[n]))

    expire = sub.add_parser("expire", help="set or clear a user's expiry")
    expire.add_argument("username")
    expire.add_argument("when", help="YYYY-MM-DD, a number of days like 30d, 'now' or 'never'")
    expire.set_defaults(func=lambda a: _users(a, _users_expire))

    update = sub.add_parser("set", help="change a user's sender domains or quotas")
    update.add_argument("username")
    update.add_argument("--sender-domains")
    update.add_argument("--quota-per-minute", type=int)
    update.add_argument("--quota-per-day", type=int)
    update.set_defaults(func=lambda a: _users(a, _users_set))


def _password_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    parser.add_argument("--generate", action="store_true", help="generate a password and print it once")


def _users(args: argparse.Namespace, action: Callable[[QueueStore, argparse.Namespace], Awaitable[int]]) -> int:
    settings, _ = load_settings(args.config)

    async def run() -> int:
        from relay.store import open_store
        store = await open_store(settings.store)
        try:
            return await action(store, args)
        except UserExists:
            print(f"relay: user {args.username!r} already exists", file=sys.stderr)
            return 1
        except UnknownUser:
            print(f"relay: no user {args.username!r}", file=sys.stderr)
            return 1
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2


def _read_password(args: argparse.Namespace) -> str:
    if args.generate:
        password = secrets.token_urlsafe(18)
        print(f"generated password: {password}")
        return password
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise ValueError("passwords do not match")
    return first


def parse_expiry(text: str | None, now: float | None = None) -> float | None:
    """``None``/``never`` → no expiry; ``now``; ``30d`` → days from now; ``YYYY-MM-DD`` (UTC)."""
    if text is None or text == "never":
        return None
    current = time.time() if now is None else now
    if text == "now":
        return current
    if text.endswith("d") and text[:-1].isdigit():
        return current + int(text[:-1]) * 86400
    try:
        return time.mktime(time.strptime(text + " UTC", "%Y-%m-%d %Z")) - time.timezone
    except ValueError:
        raise ValueError(f"bad expiry {text!r}: use YYYY-MM-DD, 30d, now or never") from None


def _domains(text: str) -> tuple[str, ...]:
    return tuple(sorted({d.strip().lower() for d in text.split(",") if d.strip()}))


async def _users_add(store: QueueStore, args: argparse.Namespace) -> int:
    user = User(username=args.username, password_hash=hash_password(_read_password(args)),
                allowed_sender_domains=_domains(args.sender_domains), expires_at=parse_expiry(args.expires),
                quota_per_minute=args.quota_per_minute, quota_per_day=args.quota_per_day,
                created_at=time.time())
    await store.add_user(user)
    print(f"user {args.username} added")
    return 0


async def _users_list(store: QueueStore, args: argparse.Namespace) -> int:
    for user in await store.list_users():
        print(json.dumps({
            "username": user.username, "disabled": user.disabled,
            "expires_at": user.expires_at, "expired": user.is_expired(time.time()),
            "sender_domains": list(user.allowed_sender_domains),
            "quota_per_minute": user.quota_per_minute, "quota_per_day": user.quota_per_day,
        }))
    return 0


async def _existing(store: QueueStore, username: str) -> User:
    user = await store.get_user(username)
    if user is None:
        raise UnknownUser(username)
    return user


async def _replace(store: QueueStore, args: argparse.Namespace, message: str, **changes: Any) -> int:
    user = await _existing(store, args.username)
    fields = {f: getattr(user, f) for f in User.__dataclass_fields__}
    fields.update(changes)
    await store.update_user(User(**fields))
    print(f"user {args.username} {message}")
    return 0


async def _users_passwd(store: QueueStore, args: argparse.Namespace) -> int:
    await _existing(store, args.username)
    return await _replace(store, args, "password changed", password_hash=hash_password(_read_password(args)))


async def _users_disable(store: QueueStore, args: argparse.Namespace) -> int:
    return await _replace(store, args, "disabled", disabled=True)


async def _users_enable(store: QueueStore, args: argparse.Namespace) -> int:
    return await _replace(store, args, "enabled", disabled=False)


async def _users_delete(store: QueueStore, args: argparse.Namespace) -> int:
    await store.delete_user(args.username)
    print(f"user {args.username} deleted")
    return 0


async def _users_expire(store: QueueStore, args: argparse.Namespace) -> int:
    return await _replace(store, args, f"expiry set to {args.when}", expires_at=parse_expiry(args.when))


async def _users_set(store: QueueStore, args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.sender_domains is not None:
        changes["allowed_sender_domains"] = _domains(args.sender_domains)
    if args.quota_per_minute is not None:
        changes["quota_per_minute"] = args.quota_per_minute
    if args.quota_per_day is not None:
        changes["quota_per_day"] = args.quota_per_day
    return await _replace(store, args, "updated", **changes)


_USER_ACTIONS: dict[str, Callable[[QueueStore, argparse.Namespace], Awaitable[int]]] = {
    "disable": _users_disable, "enable": _users_enable, "delete": _users_delete,
}
