"""``relay serve`` as a real subprocess: started with a config file, ready once its pid file exists, its JSON
log lines collected by a thread, signalled and awaited by its own pid (never by name)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RELAY_BIN = Path(sys.executable).parent / "relay"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without RELAY_* overrides (the config file says everything), plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update(extra)
    return env


class RelayProcess:
    def __init__(self, config: Path, *args: str, pid_file: Path, env: dict[str, str] | None = None) -> None:
        self.pid_file = pid_file
        self.process = subprocess.Popen(
            [str(RELAY_BIN), "--config", str(config), "serve", *args], cwd=config.parent,
            env=clean_env(RELAY_SERVER__PID_FILE=str(pid_file), **(env or {})),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                self.events.append(entry)
                self._lines.put(entry)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid_file.exists() and self.pid_file.read_text().strip() == str(self.pid):
                return
            if self.process.poll() is not None:
                raise AssertionError(f"relay serve exited with {self.process.returncode}: {''.join(self.stderr)}")
            time.sleep(0.05)
        raise AssertionError(f"relay serve not ready within {timeout}s: {''.join(self.stderr)}")

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The first log line with this event (already seen or still to come)."""
        for entry in self.events:
            if entry.get("event") == name:
                return entry
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                entry = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if entry is None:
                break
            if entry.get("event") == name:
                return entry
        raise AssertionError(f"no {name!r} in the relay's log: {''.join(self.stderr)}")

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        self._close_pipe(timeout)
        return code

    def _close_pipe(self, timeout: float) -> None:
        self._reader.join(timeout)
        if self.process.stderr is not None and not self._reader.is_alive():
            self.process.stderr.close()

    def event_names(self) -> list[str]:
        return [str(entry.get("event")) for entry in self.events]

    def kill(self) -> None:
        """Test clean-up: make sure the process is gone (by its pid) and its pipe closed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._close_pipe(30)
