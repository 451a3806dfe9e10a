"""Static checks of deploy/: the container image, the compose file, the systemd unit and the alert rules.

No container engine runs here, so the Dockerfile and compose file are read, not run: the checks are what
must hold whatever the engine — a multi-stage build on python:3.11-slim, a non-root user, a HEALTHCHECK
on /healthz, no secret in the image or the compose file, services wired by environment overrides, the
mounted relay.compose.toml valid for the relay with those overrides, and ports that line up. The alert
rules may only name metrics a running relay's /metrics actually exposes (scraped here from a real relay).
deploy/check.sh runs the external validators (systemd-analyze, promtool, shellcheck, docker compose) where
they are installed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from relay.app import Relay
from relay.settings import Settings, load_settings, placeholder_secrets

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SECRET_WORDS = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|_KEY\b", re.IGNORECASE)


# -- Dockerfile ---------------------------------------------------------------------------------------
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert pending == "", "a continuation line runs off the end of the Dockerfile"
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            out.append([])
        out[-1].append(instruction)
    return out


def test_the_image_is_multi_stage_slim_non_root_and_checks_its_health() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    build, runtime = stages(instructions)
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert runtime[0] == ("FROM", "python:3.11-slim")
    # The final stage takes the built environment, not the sources or the build tools.
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert copies == ["--from=build /opt/relay /opt/relay"]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] == "relay"
    assert any(keyword == "RUN" and "useradd --system" in args and "--uid 10025" in args for keyword, args in runtime)
    [healthcheck] = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "RELAY_HEALTH_URL" in healthcheck
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")
    assert "RELAY_HEALTH_URL=http://127.0.0.1:8025/healthz" in env and "RELAY_HTTP__ADDRESS=0.0.0.0:8025" in env
    assert ("ENTRYPOINT", '["relay"]') in runtime and ("CMD", '["serve"]') in runtime
    assert ("STOPSIGNAL", "SIGTERM") in runtime


def test_no_secret_is_baked_into_the_image() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    for keyword, args in instructions:
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not SECRET_WORDS.search(args), f"{keyword} {args}"
    copied = " ".join(args for keyword, args in instructions if keyword in ("COPY", "ADD"))
    assert "relay.toml" not in copied and ".pem" not in copied and ".env" not in copied
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"                       # everything out, then only the package back in
    assert set(ignore[1:]) >= {"!pyproject.toml", "!relay/", "!plugins/", "!policies/", "!migrations/"}


def test_the_image_exposes_the_ports_the_compose_config_listens_on() -> None:
    [exposed] = [args for keyword, args in dockerfile_instructions(DEPLOY / "Dockerfile") if keyword == "EXPOSE"]
    config = tomllib.loads((DEPLOY / "relay.compose.toml").read_text())
    ports = {listener["address"].rpartition(":")[2] for listener in config["listeners"]}
    assert ports | {config["http"]["address"].rpartition(":")[2]} == set(exposed.split())


# -- compose ------------------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def interpolated(value: str) -> str:
    """A compose value with ${VAR…} references replaced as compose would from a filled-in .env."""
    return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda m: f"<{m.group(1)}>", value)


def test_compose_runs_relay_postgres_redis_and_a_sink_with_health_checks() -> None:
    services = compose()["services"]
    assert set(services) == {"relay", "postgres", "redis", "sink"}
    for name, service in services.items():
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
    relay = services["relay"]
    assert relay["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                   "redis": {"condition": "service_healthy"}}
    assert relay["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "http://127.0.0.1:8025/healthz" in " ".join(relay["healthcheck"]["test"])
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in relay["security_opt"]
    sink = services["sink"]
    assert sink["profiles"] == ["smoke"] and sink["command"][0] == "sink" and sink["image"] == relay["image"]
    # Stopping waits longer than the relay's own grace period.
    grace = tomllib.loads((DEPLOY / "relay.compose.toml").read_text())["server"]["shutdown_grace"]
    assert float(relay["stop_grace_period"].rstrip("s")) > grace


def test_compose_configures_the_relay_by_environment_and_a_mounted_file_without_secrets() -> None:
    relay = compose()["services"]["relay"]
    env = relay["environment"]
    assert interpolated(env["RELAY_STORE__URL"]) == "postgresql://relay:<POSTGRES_PASSWORD>@postgres:5432/relay"
    assert env["RELAY_REDIS__URL"] == "redis://redis:6379/0"
    for key, value in env.items():
        if SECRET_WORDS.search(key) or "PASSWORD" in value:
            assert "${" in value, f"{key} holds a literal secret"
    assert "./relay.compose.toml:/etc/relay/relay.toml:ro" in relay["volumes"]
    postgres_env = compose()["services"]["postgres"]["environment"]
    assert postgres_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # Published container ports are the ones the relay listens on; HTTP only on the host's loopback.
    config = tomllib.loads((DEPLOY / "relay.compose.toml").read_text())
    listening = {int(listener["address"].rpartition(":")[2]) for listener in config["listeners"]}
    published = {int(interpolated(port).rpartition(":")[2]) for port in relay["ports"]}
    assert published == listening | {8025}
    assert [port for port in relay["ports"] if port.endswith(":8025")] == ["127.0.0.1:${RELAY_HTTP_PORT:-8025}:8025"]
    example = (DEPLOY / "env.example").read_text()
    for name in ("POSTGRES_PASSWORD", "RELAY_SECRET_KEY", "RELAY_ADMIN_TOKEN"):
        assert f"{name}=replace-me" in example and f"${{{name}" in (DEPLOY / "compose.yaml").read_text()


def test_the_mounted_config_is_valid_with_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in compose()["services"]["relay"]["environment"].items():
        monkeypatch.setenv(key, interpolated(value).replace("<", "").replace(">", ""))
    # What the image sets (state dir, HTTP address) applies too.
    for keyword, args in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if keyword == "ENV":
            for name, value in re.findall(r"(RELAY_\w+)=(\S+)", args):
                monkeypatch.setenv(name, value)
    settings, _ = load_settings(DEPLOY / "relay.compose.toml")
    assert settings.store.url == "postgresql://relay:POSTGRES_PASSWORD@postgres:5432/relay"
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.server.state_dir == Path("/var/lib/relay") and settings.http.address == "0.0.0.0:8025"
    assert placeholder_secrets(settings) == []
    assert {listener.name: listener.kind for listener in settings.listeners} == {
        "relay": "relay", "submission": "submission", "smtps": "smtps"}
    relay_listener = settings.listeners[0]
    assert relay_listener.trusted_networks == ["127.0.0.0/8"]        # no open relay out of the box
    assert settings.delivery.routes.domains["smoke.test"]["host"] == "sink"


# -- systemd ------------------------------------------------------------------------------------------
def unit_directives(path: Path) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_the_systemd_unit_is_hardened_reloads_with_hup_and_stops_gracefully() -> None:
    unit = unit_directives(DEPLOY / "relay.service")
    expected = {
        "User": "relay", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ReadWritePaths": "/var/lib/relay",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "LimitNOFILE": "65536",
        "ExecReload": "/bin/kill -HUP $MAINPID", "ExecStart": "/opt/relay/bin/relay serve",
        "KillSignal": "SIGTERM", "StateDirectory": "relay", "PrivateTmp": "yes", "ProtectHome": "yes",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert "@system-service" in unit["SystemCallFilter"]
    assert "RELAY_SERVER__PID_FILE=/run/relay/relay.pid" in unit["Environment"]
    assert unit["RuntimeDirectory"] == ["relay"]
    # systemd waits longer than the relay's default grace period (30 s) before SIGKILL.
    assert int(unit["TimeoutStopSec"][0]) > Settings().server.shutdown_grace


# -- Prometheus alert rules -------------------------------------------------------------------------
async def exposed_metric_names(tmp_path: Path) -> set[str]:
    """Series names a real relay (all roles, HTTP, the throttle plugin) serves on /metrics."""
    settings = Settings(server={"role": "all", "state_dir": str(tmp_path)}, store={"url": f"sqlite:///{tmp_path}/q.db"},
                        http={"address": "127.0.0.1:0"}, chain={"plugins": ["throttle"]},
                        listeners=[{"name": "relay", "address": "127.0.0.1:0"}], log={"format": "json"})
    relay = Relay(settings)
    await relay.start()
    try:
        assert relay.http is not None
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{relay.http.port}/metrics") as page:
            text = await page.text()
    finally:
        await relay.stop(grace=1)
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((DEPLOY / "prometheus" / "relay-alerts.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


async def test_alert_rules_name_only_metrics_the_relay_exposes(tmp_path: Path) -> None:
    exposed = await exposed_metric_names(tmp_path)
    rules = alert_rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used: set[str] = set()
    for rule in rules:
        used |= set(re.findall(r"\b((?:relay|process)_[a-z_]+)\b", rule["expr"]))
        for name in re.findall(r"\b(relay:[a-z_:0-9]+)", rule["expr"]):
            assert name in recorded, f"{name} is not a recording rule of this file"
    assert used - exposed == set()
    # Every alert is actionable: a severity and both annotations.
    alerts = [rule for rule in rules if "alert" in rule]
    assert len(alerts) >= 15
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_thresholds_follow_the_issue_defaults() -> None:
    exprs = {(rule["alert"], rule["labels"]["severity"]): rule["expr"] for rule in alert_rules() if "alert" in rule}
    assert "> 0.05" in exprs[("RelayBounceRateHigh", "warning")]
    assert "> 0.10" in exprs[("RelayBounceRateHigh", "critical")]
    assert "< 0.95" in exprs[("RelayDeliveryRateLow", "warning")]
    assert "< 0.90" in exprs[("RelayDeliveryRateLow", "critical")]
