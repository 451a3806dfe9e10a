"""A relay.toml on disk for tests that reload or run ``relay serve``: render sections, rewrite, start.

``ConfigFile(tmp_path, ca).write(smtp={...}, chain={...})`` renders the test defaults (loopback listeners
on port 0, SQLite under tmp_path, a trustme certificate, JSON debug logs) merged with the given sections
to ``tmp_path/relay.toml``; calling it again rewrites the file, which is what a reload then reads.
"""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Any

import trustme

from relay.app import Relay
from relay.settings import load_settings

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def render_toml(data: dict[str, Any]) -> str:
    """Top-level tables (nested tables inline) and arrays of tables (``listeners``)."""
    out: list[str] = []
    for section, value in data.items():
        if isinstance(value, list):
            for item in value:
                out.append(f"[[{section}]]")
                out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        out.append("")
    return "\n".join(out)


class ConfigFile:
    def __init__(self, tmp_path: Path, ca: trustme.CA, name: str = "relay.toml") -> None:
        self.dir = tmp_path
        self.ca = ca
        self.path = tmp_path / name
        self.cert_file, self.key_file = self.certificate("localhost", "relay.test", "127.0.0.1")

    def certificate(self, *names: str, stem: str = "cert") -> tuple[Path, Path]:
        """A leaf certificate for ``names`` from the test CA (files ``<stem>.pem``/``<stem>.key``)."""
        cert = self.ca.issue_cert(*names)
        cert_file, key_file = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file

    def defaults(self) -> dict[str, Any]:
        return {
            "server": {"hostname": "relay.test", "state_dir": self.dir / "state", "role": "smtp"},
            "store": {"url": f"sqlite:///{self.dir}/queue.db"},
            "tls": {"cert_file": self.cert_file, "key_file": self.key_file},
            "log": {"level": "debug", "format": "json"},
            "listeners": [{"name": "relay", "address": "127.0.0.1:0", "kind": "relay", "auth": "optional",
                           "trusted_networks": ["127.0.0.0/8"]}],
        }

    def write(self, **sections: Any) -> Path:
        data = self.defaults()
        for name, value in sections.items():
            data[name] = {**data[name], **value} if isinstance(value, dict) and name in data else value
        self.path.write_text(render_toml(data))
        return self.path

    def client_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    async def start(self) -> Relay:
        settings, path = load_settings(self.path)
        relay = Relay(settings, config_path=path)
        await relay.start()
        return relay
