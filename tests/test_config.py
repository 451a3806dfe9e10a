"""Configuration: where it is read from, how it is validated, how errors read, what the example documents."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from relay.settings import ConfigError, Settings, load_settings, parse_settings, refuse_placeholder_secrets

ROOT = Path(__file__).resolve().parent.parent


def test_builtin_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    settings, path = load_settings(None)
    assert path is None
    assert [(x.address, x.kind, x.auth) for x in settings.listeners] == [
        ("127.0.0.1:2525", "relay", "optional"), ("127.0.0.1:2587", "submission", "required")]
    assert settings.store.kind == "sqlite" and settings.redis.url == ""


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relay.toml").write_text('[server]\nhostname = "local.example"\n')
    env_file = tmp_path / "env.toml"
    env_file.write_text('[server]\nhostname = "env.example"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[server]\nhostname = "explicit.example"\n')
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    assert load_settings(None)[0].server.hostname == "local.example"
    monkeypatch.setenv("RELAY_CONFIG", str(env_file))
    assert load_settings(None)[0].server.hostname == "env.example"
    assert load_settings(str(explicit))[0].server.hostname == "explicit.example"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[store]\nurl = "sqlite:///a.db"\n[redis]\nfail_open = true\n')
    monkeypatch.setenv("RELAY_STORE__URL", "postgresql://relay@db/relay")
    monkeypatch.setenv("RELAY_REDIS__FAIL_OPEN", "false")
    settings, _ = load_settings(str(config))
    assert settings.store.url == "postgresql://relay@db/relay" and settings.store.kind == "postgres"
    assert settings.redis.fail_open is False


@pytest.mark.parametrize(("text", "expected"), [
    ('[smtp]\nmax_recipients = "many"\n', r"smtp\.max_recipients: Input should be a valid integer"),
    ('[smtp]\nmax_recipent = 5\n', r"smtp\.max_recipent: unknown key"),
    ('[[listeners]]\nname = "x"\naddress = "nowhere"\n', r"listeners\[0\]\.address: .*host:port"),
    ('[[listeners]]\nname = "x"\naddress = "127.0.0.1:25"\ntrusted_networks = ["10.0.0.0/33"]\n',
     r"listeners\[0\]\.trusted_networks: .*not a network"),
    ('[store]\nurl = "mysql://x"\n', r"store\.url: .*sqlite:// or postgresql://"),
    ('[server\nhostname = 1', r"not valid TOML"),
    ('[limits]\nauth_failures_per_ip = { count = -1 }\n', r"limits\.auth_failures_per_ip\.count"),
])
def test_bad_files_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(str(config))
    message = str(info.value)
    assert re.search(expected, message), message
    assert str(config) in message and "Traceback" not in message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(str(tmp_path / "absent.toml"))


def test_placeholder_secrets_are_refused() -> None:
    settings = parse_settings('[server]\nsecret_key = "CHANGE-ME"\n')
    with pytest.raises(ConfigError, match=r"server\.secret_key"):
        refuse_placeholder_secrets(settings)
    refuse_placeholder_secrets(parse_settings('[server]\nsecret_key = "9sd8f7g6h5j4k3l2"\n'))


def test_secrets_are_not_shown_in_reprs() -> None:
    settings = parse_settings('[server]\nsecret_key = "do-not-print-me-123"\n')
    assert "do-not-print-me-123" not in repr(settings) and "do-not-print-me-123" not in str(settings)


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            keys += _leaf_keys(nested[0], f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _flatten(data: object, prefix: str = "") -> set[str]:
    if isinstance(data, list):
        return set().union(*(_flatten(item, prefix) for item in data)) if data else {prefix.rstrip(".")}
    if isinstance(data, dict):
        keys: set[str] = {prefix.rstrip(".")} if prefix else set()
        for name, value in data.items():
            keys |= _flatten(value, f"{prefix}{name}.")
        return keys
    return {prefix.rstrip(".")}


def test_example_file_is_valid_and_documents_every_key() -> None:
    """Every key of the model is set in relay.toml.example, or shown there commented out."""
    text = (ROOT / "relay.toml.example").read_text()
    parsed = tomllib.loads(text)
    Settings(**parsed)
    present = _flatten(parsed)
    commented = set(re.findall(r"^#\s*([a-z_]+)\s*=", text, re.MULTILINE))
    missing = [key for key in _leaf_keys(Settings)
               if key not in present and key.rsplit(".", 1)[-1] not in commented]
    assert missing == []
