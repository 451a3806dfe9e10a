"""The `relay` command, run as a real subprocess: config errors, init, check, users, db migrate, serve."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.pgcluster import free_port

RELAY = [sys.executable, "-m", "relay.cli"]


def run(args: list[str], cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("RELAY_CONFIG", None)
    return subprocess.run([*RELAY, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=60,
                          env=full_env)


def write_config(path: Path, store_url: str, extra: str = "") -> Path:
    config = path / "relay.toml"
    config.write_text(f'[server]\nhostname = "cli.test"\nstate_dir = "{path}/state"\n'
                      f'secret_key = "k-{os.urandom(8).hex()}"\n[store]\nurl = "{store_url}"\n{extra}')
    return config


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    return str(request.getfixturevalue("postgres_url"))


def test_bad_config_is_one_clear_line_and_nonzero(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text("[smtp]\nmax_recipients = 'lots'\n")
    for command in (["serve"], ["check"], ["users", "list"]):
        result = run(command, tmp_path)
        assert result.returncode in (1, 2), command
        output = result.stdout + result.stderr
        assert "smtp.max_recipients" in output and "Traceback" not in output, output


def test_placeholder_secret_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text('[server]\nsecret_key = "CHANGE-ME"\n'
                                         f'state_dir = "{tmp_path}/state"\n'
                                         f'[store]\nurl = "sqlite:///{tmp_path}/q.db"\n')
    result = run(["serve"], tmp_path)
    assert result.returncode == 1
    assert "placeholder secret in server.secret_key" in result.stderr and "Traceback" not in result.stderr


def test_init_writes_fresh_secrets(tmp_path: Path) -> None:
    result = run(["init", "--path", "relay.toml"], tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "relay.toml").read_text()
    assert "CHANGE-ME" not in text and "secret_key" in text
    assert (tmp_path / "relay.toml").stat().st_mode & 0o777 == 0o600
    assert run(["init", "--path", "relay.toml"], tmp_path).returncode == 1      # never overwrites silently
    other = tmp_path / "other"
    other.mkdir()
    run(["init", "--path", "relay.toml"], other)
    assert (other / "relay.toml").read_text() != text                           # secrets are fresh each time


def test_check_exit_codes(tmp_path: Path, redis_url: str) -> None:
    cert = tmp_path / "cert.pem"
    write_config(tmp_path, f"sqlite:///{tmp_path}/q.db",
                 f'[redis]\nurl = "{redis_url}"\n[tls]\ndev_certificate = true\n')
    result = run(["check"], tmp_path)
    # The development certificate is a warning.
    assert result.returncode == 2, result.stdout + result.stderr
    assert "development certificate" in result.stdout
    dead = f"redis://127.0.0.1:{free_port()}/0"
    write_config(tmp_path, f"sqlite:///{tmp_path}/q.db", f'[redis]\nurl = "{dead}"\nfail_open = false\n'
                 f'[tls]\ncert_file = "{cert}"\nkey_file = "{cert}"\n')
    result = run(["check"], tmp_path)
    assert result.returncode == 1
    assert "redis unreachable" in result.stdout and "file not found" in result.stdout


def test_users_lifecycle(tmp_path: Path, store_url: str) -> None:
    write_config(tmp_path, store_url)
    assert run(["users", "add", "alice", "--password-stdin", "--sender-domains", "Example.com,b.example",
                "--quota-per-day", "500"], tmp_path, stdin="pw-alice-1\n").returncode == 0
    duplicate = run(["users", "add", "alice", "--password-stdin"], tmp_path, stdin="x\n")
    assert duplicate.returncode == 1 and "already exists" in duplicate.stderr
    listing = run(["users", "list"], tmp_path).stdout
    assert '"username": "alice"' in listing and '"example.com"' in listing and '"quota_per_day": 500' in listing
    assert "pw-alice-1" not in listing and "$2b$" not in listing
    assert run(["users", "disable", "alice"], tmp_path).returncode == 0
    assert '"disabled": true' in run(["users", "list"], tmp_path).stdout
    assert run(["users", "enable", "alice"], tmp_path).returncode == 0
    assert run(["users", "expire", "alice", "now"], tmp_path).returncode == 0
    assert '"expired": true' in run(["users", "list"], tmp_path).stdout
    assert run(["users", "expire", "alice", "never"], tmp_path).returncode == 0
    assert run(["users", "passwd", "alice", "--password-stdin"], tmp_path, stdin="pw-2\n").returncode == 0
    assert run(["users", "delete", "alice"], tmp_path).returncode == 0
    missing = run(["users", "delete", "alice"], tmp_path)
    assert missing.returncode == 1 and "no user" in missing.stderr


def test_db_migrate_applies_once(tmp_path: Path, postgres_url: str) -> None:
    write_config(tmp_path, postgres_url)
    first = run(["db", "migrate"], tmp_path)
    assert first.returncode == 0 and "applied: 0001" in first.stdout, first.stdout + first.stderr
    second = run(["db", "migrate"], tmp_path)
    assert second.returncode == 0 and "up to date" in second.stdout


def wait_port(port: int, deadline: float = 20) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def test_serve_accepts_mail_logs_json_and_stops_on_sigterm(tmp_path: Path, store_url: str) -> None:
    relay_port, sub_port = free_port(), free_port()
    write_config(tmp_path, store_url, f'''
[log]
format = "json"
[[listeners]]
name = "relay"
address = "127.0.0.1:{relay_port}"
trusted_networks = ["127.0.0.0/8"]
[[listeners]]
name = "submission"
address = "127.0.0.1:{sub_port}"
kind = "submission"
auth = "required"
''')
    assert run(["users", "add", "carol", "--password-stdin"], tmp_path, stdin="hunter2-secret\n").returncode == 0
    proc = subprocess.Popen([*RELAY, "serve", "--role", "smtp"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port(relay_port)
        with smtplib.SMTP("127.0.0.1", relay_port, timeout=10) as smtp:
            code, _text = smtp.docmd("EHLO", "cli.client")
            assert code == 250
            smtp.sendmail("a@example.com", ["b@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        with smtplib.SMTP("127.0.0.1", sub_port, timeout=10) as smtp:
            smtp.starttls()   # the development certificate (not verified by this client)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("carol", "wrong-password-zz")
            smtp.login("carol", "hunter2-secret")
            smtp.sendmail("carol@example.com", ["d@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _out, err = proc.communicate()
    assert proc.returncode == 0, err
    lines = [line for line in err.splitlines() if line.startswith("{")]
    queued = [line for line in lines if '"event": "queued"' in line]
    assert len(queued) == 2
    assert all('"queue_id"' in line and '"conn_id"' in line and '"client_ip"' in line for line in queued)
    assert any('"auth_user": "carol"' in line for line in queued)
    assert "hunter2-secret" not in err and "wrong-password-zz" not in err
    assert "Traceback" not in err
