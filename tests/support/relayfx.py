"""Starting a real relay inside a test: real listeners on loopback port 0, a real store, real TLS.

``RelayFactory.start(...)`` builds Settings from keyword overrides (whole sections as dicts), starts
:class:`relay.app.Relay` on the test's event loop and returns a handle with the bound ports and the
store. Every relay started is stopped when the test ends.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trustme

from relay.app import Relay
from relay.settings import Settings
from relay.smtp.auth import hash_password
from relay.store.base import QueueStore, User
from tests.support.logtap import register_secret


@dataclass
class RunningRelay:
    relay: Relay
    settings: Settings
    ports: dict[str, int]

    @property
    def store(self) -> QueueStore:
        assert self.relay.store is not None
        return self.relay.store

    async def add_user(self, username: str, password: str, **fields: Any) -> None:
        register_secret(password)
        await self.store.add_user(User(username=username, password_hash=hash_password(password), **fields))


class RelayFactory:
    def __init__(self, tmp_path: Path, ca: trustme.CA) -> None:
        self.tmp_path = tmp_path
        self.ca = ca
        cert = ca.issue_cert("relay.test", "localhost", "127.0.0.1", "127.0.0.2")
        self.cert_file = tmp_path / "cert.pem"
        self.key_file = tmp_path / "key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.cert_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        self.running: list[RunningRelay] = []

    def client_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def settings(self, *, store_url: str | None = None, **sections: Any) -> Settings:
        listeners = sections.pop("listeners", [
            {"name": "relay", "address": "127.0.0.1:0", "kind": "relay", "auth": "optional",
             "trusted_networks": ["127.0.0.0/8"]},
            {"name": "submission", "address": "127.0.0.2:0", "kind": "submission", "auth": "required"},
        ])
        data: dict[str, Any] = {
            "server": {"hostname": "relay.test", "state_dir": str(self.tmp_path / "state"), "role": "smtp"},
            "store": {"url": store_url or f"sqlite:///{self.tmp_path}/queue.db"},
            "tls": {"cert_file": str(self.cert_file), "key_file": str(self.key_file)},
            "listeners": listeners,
            "log": {"level": "debug", "format": "json"},
        }
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
        settings = Settings(**data)
        register_settings_secrets(settings)
        return settings

    async def start(self, **kwargs: Any) -> RunningRelay:
        settings = self.settings(**kwargs)
        relay = Relay(settings)
        await relay.start()
        assert relay.smtp is not None
        running = RunningRelay(relay, settings, relay.smtp.ports())
        self.running.append(running)
        return running

    async def stop_all(self) -> None:
        for running in self.running:
            await running.relay.stop(grace=1)
        self.running.clear()


def register_settings_secrets(settings: Settings) -> None:
    """Every secret a relay configuration holds, for the end-of-run log scan (tests/support/logtap.py)."""
    for secret in (settings.server.secret_key, settings.server.admin_token):
        register_secret(secret.get_secret_value() if secret is not None else None)
    routes = settings.delivery.routes
    for route in [routes.default, *routes.domains.values()]:
        register_secret(route.get("password"))
    register_secret(urlsplit(settings.redis.url).password)
    register_secret(urlsplit(settings.store.url).password)
    for key in settings.plugins.get("tracking", {}).get("old_keys", ()):
        register_secret(key.get("secret") if isinstance(key, dict) else None)
    for hook in settings.webhooks:
        for secret in (hook.secret, *hook.old_secrets):
            register_secret(secret.get_secret_value())
        register_secret(urlsplit(hook.url).password)
