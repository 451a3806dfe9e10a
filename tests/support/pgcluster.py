"""A throwaway Postgres cluster for tests: initdb into a temporary directory, start on a free port.

pytest-postgresql does this too, but initdb refuses to run as root and its executor runs as the current
user; CI machines here run as root, so when we are root the cluster is created and run as the
``postgres`` system user through ``runuser``. Issue-7 fault tests also need a cluster they may stop and
restart, which must never be the machine's shared one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN_DIRS = ["/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin"]


def _pg_bin(name: str) -> str:
    for directory in PG_BIN_DIRS:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"Postgres binary {name!r} not found (install postgresql or set RELAY_TEST_POSTGRES_URL)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """initdb + pg_ctl start/stop/restart on 127.0.0.1:<port> with trust auth."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.datadir = self.root / "data"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, user="postgres")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(_pg_bin("initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-instructions")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                "-c max_connections=200 -c shared_buffers=64MB")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.datadir), "-o", opts, "-l", str(self.root / "log"),
                  "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
