"""`relay suppress`, run as a real subprocess on both stores: add, list, remove, import, export, purge."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.plugin import Suppression
from relay.settings import StoreSettings
from relay.store import open_store

RELAY = [sys.executable, "-m", "relay.cli"]


def write_config(path: Path, store_url: str, name: str = "relay.toml") -> Path:
    config = path / name
    config.write_text(f'[server]\nhostname = "cli.test"\nstate_dir = "{path}/state"\n'
                      f'secret_key = "k-{os.urandom(8).hex()}"\n[store]\nurl = "{store_url}"\n')
    return config


def relay(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("RELAY_CONFIG", None)
    return subprocess.run([*RELAY, "--config", str(config), "suppress", *args], cwd=config.parent, input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


def listed(config: Path, *args: str) -> list[dict[str, object]]:
    result = relay(config, "list", "--json", "--limit", "0", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def config(store_url: str, tmp_path: Path) -> Path:
    return write_config(tmp_path, store_url)


def test_add_list_remove(config: Path) -> None:
    result = relay(config, "add", "<Bob@Example.COM>")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "suppressed address bob@example.com (reason manual, never expires)"
    assert "suppressed domain xn--bcher-kva.example" in relay(config, "add", "Bücher.Example").stdout
    assert "suppressed ip 192.0.2.1" in relay(config, "add", "::ffff:192.0.2.1").stdout
    result = relay(config, "add", "reader@example.org", "--reason", "unsubscribe", "--ttl", "30d", "--note",
                   "asked by phone", "--scope", "Shop.Example")
    assert result.returncode == 0 and "for mail from shop.example" in result.stdout and "expires 20" in result.stdout
    assert relay(config, "add", "example.net", "--kind", "domain", "--reason", "complaint").returncode == 0

    entries = {(e["value"], e["kind"]): e for e in listed(config)}
    assert set(entries) == {("bob@example.com", "address"), ("xn--bcher-kva.example", "domain"),
                            ("192.0.2.1", "ip"), ("reader@example.org", "address"), ("example.net", "domain")}
    reader = entries[("reader@example.org", "address")]
    assert (reader["reason"], reader["scope"], reader["note"], reader["source"], reader["expired"]) == (
        "unsubscribe", "shop.example", "asked by phone", "cli", False)
    assert isinstance(reader["expires_at"], float) and isinstance(reader["created_at"], float)
    assert reader["expires_at"] - reader["created_at"] == pytest.approx(30 * 86400)
    assert [e["value"] for e in listed(config, "--reason", "complaint")] == ["example.net"]

    text = relay(config, "list", "--limit", "2")
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 2
    assert "(2 of 5 shown" in text.stderr

    result = relay(config, "remove", "BOB@example.com")
    assert (result.returncode, result.stdout.strip()) == (0, "removed address bob@example.com")
    result = relay(config, "remove", "bob@example.com")
    assert result.returncode == 1 and "no address entry bob@example.com" in result.stderr
    # A scoped entry is removed with its scope only.
    assert relay(config, "remove", "reader@example.org").returncode == 1
    assert relay(config, "remove", "reader@example.org", "--scope", "shop.example").returncode == 0
    assert len(listed(config)) == 3


@pytest.mark.parametrize("args", [
    ["add", "not an address@"], ["add", "x@example.org", "--ttl", "soon"], ["add", "x@example.org", "--ttl", "0d"],
    ["add", "192.0.2.1", "--scope", "shop.example"], ["add", "example.org", "--kind", "ip"],
    ["add", "x@example.org", "--scope", "bad scope"],
])
def test_bad_input_is_one_line_and_exit_2(config: Path, args: list[str]) -> None:
    result = relay(config, *args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and result.stderr.startswith("relay: ")
    assert listed(config) == []


CSV_GOOD = """value,kind,reason,expires_at,note,scope
a@example.org,,hard_bounce,2999-01-01T00:00:00Z,first,
B@Example.org,address,complaint,,"with, comma",
blocked.example,domain,,,,
198.51.100.7,,other,,,
reader@example.org,,unsubscribe,,,news.example
a@example.org,,hard_bounce,2999-01-01,again,
"""
CSV_BAD = """nobody,address,manual,,,
x@example.org,mailbox,manual,,,
y@example.org,,angry,,,
z@example.org,,manual,next tuesday,,
w@example.org,,manual,,,,extra
198.51.100.8,ip,manual,,,shop.example
old@example.org,,hard_bounce,2001-01-01,,
"""


def test_import_reports_bad_rows_by_line_and_is_idempotent(config: Path, tmp_path: Path) -> None:
    source = tmp_path / "list.csv"
    source.write_text(CSV_GOOD + CSV_BAD, encoding="utf-8")
    result = relay(config, "import", str(source))
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "imported 6 of 13 rows; rejected 6, skipped 1 already expired"
    errors = [line for line in result.stderr.splitlines() if "line " in line]
    assert [line.split(": ")[2] for line in errors] == [f"line {n}" for n in (8, 9, 10, 11, 12, 13)], errors
    assert "angry" in errors[2] and "next tuesday" in errors[3] and "more fields" in errors[4]
    assert "scope" in errors[5]

    first = {(e["value"], e["kind"], e["scope"]): e for e in listed(config)}
    assert len(first) == 5  # a@example.org twice in the file: one entry, the last row's note
    assert first[("a@example.org", "address", "")]["note"] == "again"
    assert first[("b@example.org", "address", "")]["note"] == "with, comma"
    assert first[("reader@example.org", "address", "news.example")]["reason"] == "unsubscribe"
    assert first[("blocked.example", "domain", "")]["reason"] == "manual"
    assert {e["source"] for e in first.values()} == {"import"}

    again = relay(config, "import", str(source))
    assert again.stdout == result.stdout
    assert {k: (e["reason"], e["expires_at"], e["note"]) for k, e in first.items()} == {
        (e["value"], e["kind"], e["scope"]): (e["reason"], e["expires_at"], e["note"]) for e in listed(config)}


def test_import_needs_a_header(config: Path, tmp_path: Path) -> None:
    source = tmp_path / "noheader.csv"
    source.write_text("a@example.org,address,manual,,,\n")
    result = relay(config, "import", str(source))
    assert result.returncode == 2 and "header" in result.stderr
    source.write_text("value,kind,reasn\na@example.org,address,manual\n")
    result = relay(config, "import", str(source))
    assert result.returncode == 2 and "unknown column(s) reasn" in result.stderr
    assert listed(config) == []


def test_export_imports_back_as_the_same_list(config: Path, tmp_path: Path) -> None:
    source = tmp_path / "list.csv"
    source.write_text(CSV_GOOD, encoding="utf-8")
    assert relay(config, "import", str(source)).returncode == 0
    assert relay(config, "add", "jörg@bücher.example", "--note", "ünïcode").returncode == 0
    exported = relay(config, "export")  # standard output
    assert exported.returncode == 0 and "exported 6 entries" in exported.stderr
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert list(rows[0]) == ["value", "kind", "reason", "expires_at", "note", "scope", "source", "created_at"]
    assert [r["value"] for r in rows] == sorted(r["value"] for r in rows)
    by_value = {r["value"]: r for r in rows}
    assert by_value["a@example.org"]["expires_at"] == "2999-01-01T00:00:00Z"
    assert by_value["jörg@xn--bcher-kva.example"]["note"] == "ünïcode"
    assert by_value["jörg@xn--bcher-kva.example"]["source"] == "cli"

    # Into another store (an embedded one, whatever this one is) and out again: the same file.
    target = tmp_path / "copy.csv"
    assert relay(config, "export", str(target)).returncode == 0
    assert target.read_text(encoding="utf-8") == exported.stdout
    other = write_config(tmp_path, f"sqlite:///{tmp_path}/other.db", name="other.toml")
    result = relay(other, "import", str(target))
    assert (result.returncode, result.stdout.strip()) == (0, "imported 6 of 6 rows; rejected 0, skipped 0 "
                                                             "already expired")
    assert relay(other, "export").stdout == exported.stdout


def test_long_import_shows_progress(config: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    source.write_text("value\n" + "".join(f"user{n}@bulk.example\n" for n in range(25_000)))
    result = relay(config, "import", str(source))
    assert result.returncode == 0, result.stderr
    assert "... 10000 rows read" in result.stderr and "... 20000 rows read" in result.stderr
    assert result.stdout.strip() == "imported 25000 of 25000 rows; rejected 0, skipped 0 already expired"
    counted = relay(config, "list", "--limit", "1")
    assert "(1 of 25000 shown" in counted.stderr


async def test_purge_removes_expired_entries(config: Path, store_url: str) -> None:
    now = time.time()
    store = await open_store(StoreSettings(url=store_url, pool_size=2))
    try:
        await store.add_suppressions([
            Suppression("gone@example.org", "address", "hard_bounce", "test", now - 100, expires_at=now - 1),
            Suppression("soon@example.org", "address", "hard_bounce", "test", now, expires_at=now + 3600),
            Suppression("keep@example.org", "address", "complaint", "test", now)])
    finally:
        await store.close()
    assert [e["expired"] for e in listed(config)] == [True, False, False]  # gone, keep, soon
    assert relay(config, "purge").stdout.strip() == "purged 1 expired entry"
    assert [e["value"] for e in listed(config)] == ["keep@example.org", "soon@example.org"]
