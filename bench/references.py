"""The servers the benchmarks measure, each started on a free loopback port and stopped by its PID.

- :class:`SmtpSink` — Postfix's ``smtp-sink``: accepts and stores nothing (the ceiling), and the
  delivery target of the end-to-end runs (it counts what it received).
- :class:`BareAiosmtpd` — aiosmtpd answering 250 and storing nothing (``aiosmtpd_bare.py``).
- :class:`PostfixInstance` — a private Postfix in a temp directory, accepting into its own queue (with
  fsync) and either relaying everything to a loopback sink or holding it.
- :class:`Haraka` — optional; one Node process that accepts and discards.
- :class:`RelayServer` — ``relay serve`` with a generated config (SQLite in the temp dir, or a
  throwaway Postgres database from :class:`ThrowawayDatabase`).

Invariants:
- Every listener is on 127.0.0.1. Postfix is checked after its config is written: its master.cf has
  exactly one inet service, on 127.0.0.1:PORT, ``inet_interfaces = 127.0.0.1``, and all its paths are in
  its temp directory — it never binds port 25 and never reads or writes /etc/postfix's main.cf.
- Each reference is a context manager; leaving it stops the process by PID (Postfix: ``postfix -c DIR
  stop``, then its master PID) and deletes its temp directory.
- Start-up is bounded; a reference that does not come up raises :class:`~common.HarnessError` with the
  tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import pwd
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, LiteralString, Self

from common import (
    BENCH_DIR,
    DEFAULT_RELAY_BIN,
    LOOPBACK,
    HarnessError,
    Processes,
    free_port,
    tool,
    wait_for_smtp,
)

START_TIMEOUT = 60.0

PythonLoop = Literal["auto", "asyncio"]


def python_env(workdir: Path, loop: PythonLoop) -> dict[str, str] | None:
    """Environment for a Python server: ``asyncio`` hides uvloop (which the relay and the bare aiosmtpd
    use whenever it is importable) behind a module that refuses to import, so both fall back to asyncio."""
    if loop == "auto":
        return None
    shim = workdir / "no-uvloop"
    shim.mkdir(exist_ok=True)
    (shim / "uvloop.py").write_text('raise ImportError("uvloop hidden by the benchmark (--loop asyncio)")\n')
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))


class Reference:
    """A server under measurement: ``with X(procs) as server: … server.port … server.pid``."""

    name = "reference"

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None

    @property
    def pid(self) -> int:
        """The PID whose memory is the server's (the listening process)."""
        if self.proc is None:
            raise HarnessError(f"{self.name} is not running")
        return self.proc.pid

    @property
    def log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "server.log"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def make_workdir(self) -> Path:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-"))
        return self.workdir

    def remove_workdir(self) -> None:
        if self.workdir is not None and os.environ.get("BENCH_KEEP_TMP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        if self.workdir is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            self.remove_workdir()


# --- Redis, for relays with several SMTP processes -------------------------------------------------


class RedisServer(Reference):
    """A throwaway ``redis-server`` on a free loopback port, no persistence; stopped by its PID."""

    name = "redis"

    def start(self) -> None:
        workdir = self.make_workdir()
        self.port = free_port()
        self.proc = self.procs.spawn([tool("redis-server"), "--bind", LOOPBACK, "--port", str(self.port),
                                      "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                                     log=self.log, cwd=workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise HarnessError(f"redis-server did not answer on {LOOPBACK}:{self.port}:\n{self.log_tail()}")

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"


# --- smtp-sink -------------------------------------------------------------------------------------


class SmtpSink(Reference):
    """``smtp-sink -c -u nobody -m MAXCONN 127.0.0.1:PORT BACKLOG``: throws everything away, counts it.

    ``-c`` makes it print running counters (``sess=… quit=… mesg=N`` separated by CR) on stdout, which
    goes to a file; :meth:`messages` reads the last one, so the harness can watch deliveries arrive.
    """

    name = "smtp-sink"

    def __init__(self, procs: Processes, port: int = 0, max_connections: int = 1024) -> None:
        super().__init__(procs)
        self.port = port
        self.max_connections = max_connections
        self._baseline = 0

    def start(self) -> None:
        workdir = self.make_workdir()
        self.port = self.port or free_port()
        argv = [tool("smtp-sink"), "-c", "-m", str(self.max_connections)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # required as root: it drops privileges after binding
        argv += [f"{LOOPBACK}:{self.port}", "1024"]
        self.proc = self.procs.spawn(argv, log=self.log, cwd=workdir)
        wait_for_smtp(self.port, START_TIMEOUT, self.proc, self.name, self.log)
        self._baseline = self.messages()  # the readiness probe is a session, not a message; be exact

    def messages(self) -> int:
        """Messages received so far (the last ``mesg=`` counter it printed)."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 256))
                tail = fh.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) - self._baseline if found else 0


# --- bare aiosmtpd ---------------------------------------------------------------------------------


class BareAiosmtpd(Reference):
    name = "aiosmtpd"

    def __init__(self, procs: Processes, loop: PythonLoop = "auto") -> None:
        super().__init__(procs)
        self.loop = loop

    def start(self) -> None:
        workdir = self.make_workdir()
        self.port = free_port()
        argv = [sys.executable, str(BENCH_DIR / "aiosmtpd_bare.py"), "--listen", f"{LOOPBACK}:{self.port}"]
        self.proc = self.procs.spawn(argv, log=self.log, cwd=workdir, env=python_env(workdir, self.loop))
        wait_for_smtp(self.port, START_TIMEOUT, self.proc, self.name, self.log)


# --- Postfix ---------------------------------------------------------------------------------------


PostfixMode = Literal["relay", "hold"]

# The daemons a relaying Postfix needs, with master.cf's defaults except chroot = n (the temp queue has
# no chroot jail set up). No `smtp inet` line: the one listener is added with our loopback port.
_POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance(Reference):
    """A private Postfix: its own config, queue and data directories under one temp directory.

    ``mode="relay"`` sends every message to ``[127.0.0.1]:relay_port`` (a sink); ``mode="hold"`` puts
    every accepted message on hold (``check_client_access static:HOLD``), so it is written and fsync'd
    into the queue and then left alone — acceptance only, like ``relay serve --role smtp`` — until
    :meth:`release_and_flush` sends it on to ``relay_port`` (when given).
    Everything else is Postfix's defaults, except ``default_process_limit`` (so c=200 gets 200 smtpd
    processes; 100 by default) and, when given, ``default_destination_concurrency_limit``.
    """

    name = "postfix"

    def __init__(self, procs: Processes, mode: PostfixMode = "relay", relay_port: int = 0,
                 process_limit: int = 250, destination_concurrency: int | None = None) -> None:
        super().__init__(procs)
        if mode == "relay" and not relay_port:
            raise ValueError("a relaying Postfix needs relay_port")
        self.mode = mode
        self.relay_port = relay_port
        self.process_limit = process_limit
        self.destination_concurrency = destination_concurrency
        self.master_pid = 0

    @property
    def config_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "etc"

    @property
    def queue_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "spool"

    @property
    def log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "maillog"

    @property
    def pid(self) -> int:
        if not self.master_pid:
            raise HarnessError("postfix is not running")
        return self.master_pid

    def start(self) -> None:
        workdir = self.make_workdir()
        workdir.chmod(0o755)  # the postfix user must reach its queue and data directories
        self.port = free_port()
        for sub in ("etc", "spool", "data"):
            (workdir / sub).mkdir()
        owner = pwd.getpwnam("postfix")
        os.chown(workdir / "data", owner.pw_uid, owner.pw_gid)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        self._check_loopback_only()
        self._postfix("check")
        self._postfix("start")
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + START_TIMEOUT
        while not self.master_pid and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pid_file.read_text().strip())
            time.sleep(0.05)
        wait_for_smtp(self.port, START_TIMEOUT, None, self.name, self.log)

    def stop(self) -> None:
        if self.workdir is None or not self.config_dir.exists():
            return
        if self.master_pid:
            with contextlib.suppress(HarnessError):
                self._postfix("stop")
            deadline = time.monotonic() + 15
            while _alive(self.master_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(self.master_pid):  # by its PID, never by name
                os.kill(self.master_pid, 9)
            self.master_pid = 0

    def _main_cf(self) -> str:
        assert self.workdir is not None
        lines = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.workdir / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.localhost",
            "mydomain": "localhost",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "biff": "no",
            "default_process_limit": str(self.process_limit),
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.workdir),
        }
        if self.relay_port:
            lines["relayhost"] = f"[{LOOPBACK}]:{self.relay_port}"
        if self.mode == "hold":
            # Nothing leaves the queue until released: every message goes on hold as it is accepted.
            lines["smtpd_recipient_restrictions"] = "check_client_access static:HOLD, permit_mynetworks, reject"
        if self.destination_concurrency:
            lines["default_destination_concurrency_limit"] = str(self.destination_concurrency)
        return "".join(f"{key} = {value}\n" for key, value in lines.items())

    def _master_cf(self) -> str:
        return f"{LOOPBACK}:{self.port} inet n - n - - smtpd\n" + _POSTFIX_SERVICES

    def _check_loopback_only(self) -> None:
        """Refuse to start unless the only network listener is ours, on loopback."""
        out = subprocess.run([tool("postconf"), "-c", str(self.config_dir), "-M"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        inet = [line.split()[0] for line in out.splitlines() if len(line.split()) > 1 and
                line.split()[1] in ("inet", "pass")]
        if inet != [f"{LOOPBACK}:{self.port}"]:
            raise HarnessError(f"refusing to start postfix: unexpected network services {inet}")
        got = subprocess.run([tool("postconf"), "-c", str(self.config_dir), "-h", "inet_interfaces",
                              "queue_directory"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.split()
        if got != [LOOPBACK, str(self.queue_dir)]:
            raise HarnessError(f"refusing to start postfix: unexpected inet_interfaces/queue_directory {got}")

    def _postfix(self, command: str) -> None:
        rc, output = run_on_tty([tool("postfix"), "-c", str(self.config_dir), command], timeout=60)
        if rc != 0:
            raise HarnessError(f"postfix -c {self.config_dir} {command} failed ({rc}):\n{output}"
                               f"\n{self.log_tail()}")

    # -- queue operations for the drain benchmark --------------------------------------------------

    def held(self) -> int:
        """Messages in the hold queue."""
        return sum(len(files) for _, _, files in os.walk(self.queue_dir / "hold"))

    def release_and_flush(self) -> None:
        """Release everything on hold and ask for immediate delivery (``postsuper -H ALL``, ``postqueue -f``)."""
        for argv in ([tool("postsuper"), "-c", str(self.config_dir), "-H", "ALL"],
                     [tool("postqueue"), "-c", str(self.config_dir), "-f"]):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise HarnessError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def run_on_tty(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run a command on a pseudo-terminal: Postfix reports start-up errors on stderr only to a tty."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                start_new_session=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: every writer has closed the terminal
                    data = b""
                if not data and proc.poll() is not None:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                break
    finally:
        os.close(master)
    rc = proc.wait(timeout=10)
    return rc, b"".join(chunks).decode(errors="replace").strip()


# --- Haraka ----------------------------------------------------------------------------------------


_HARAKA_PLUGIN = """\
// Benchmark reference: accept every recipient, discard every message (stores nothing).
exports.register = function () {
    this.register_hook('rcpt', 'accept_rcpt')
    this.register_hook('queue', 'discard_message')
}
exports.accept_rcpt = (next) => next(OK)
exports.discard_message = (next) => next(OK)
"""


class Haraka(Reference):
    """Haraka in one process (``nodes=0``), log level warn, one plugin that accepts and discards."""

    name = "haraka"

    @staticmethod
    def binary() -> Path | None:
        candidates = [os.environ.get("HARAKA_BIN", ""), str(BENCH_DIR / ".haraka/node_modules/.bin/haraka"),
                      shutil.which("haraka") or ""]
        for candidate in candidates:
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    @classmethod
    def unavailable_reason(cls) -> str:
        if cls.binary() is None:
            return "Haraka is not installed (bench/setup.sh runs `npm install Haraka` into bench/.haraka)"
        if shutil.which("node") is None:
            return "node is not installed"
        return ""

    def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise HarnessError(self.unavailable_reason())
        workdir = self.make_workdir()
        instance = workdir / "haraka"
        made = subprocess.run([str(binary), "-i", str(instance)], capture_output=True, text=True,
                              timeout=60, check=False)
        if made.returncode != 0:
            raise HarnessError(f"haraka -i failed: {made.stderr.strip()[-500:]}")
        self.port = free_port()
        config = instance / "config"
        (config / "smtp.ini").write_text(f"listen={LOOPBACK}:{self.port}\nnodes=0\n")
        (config / "plugins").write_text("bench_accept\n")
        (config / "log.ini").write_text("[main]\nlevel=warn\n")
        (config / "me").write_text("haraka-bench.localhost\n")
        (instance / "plugins").mkdir(exist_ok=True)
        (instance / "plugins" / "bench_accept.js").write_text(_HARAKA_PLUGIN)
        self.proc = self.procs.spawn([str(binary), "-c", str(instance)], log=self.log, cwd=workdir)
        wait_for_smtp(self.port, START_TIMEOUT, self.proc, self.name, self.log)


# --- the relay -------------------------------------------------------------------------------------


RelayRole = Literal["all", "smtp", "delivery"]


class RelayServer(Reference):
    """``relay --config FILE serve`` with a generated config on loopback.

    Limits that would refuse a benchmark's own load from one IP (connections per IP, connection rate
    per IP) are off; the listener trusts 127.0.0.0/8, has no AUTH and no STARTTLS, and takes up to
    ``max_connections``. Every other key keeps its default (log level info, group commit, …).
    ``store_url`` empty: SQLite in ``state_dir`` (or the temp dir), or with ``postgres_admin_url`` a
    throwaway Postgres database made for this process and dropped when it stops. ``route_port``: every
    domain is delivered to 127.0.0.1:route_port without TLS.
    """

    name = "relay"

    def __init__(self, procs: Processes, *, role: RelayRole = "smtp", store_url: str = "",
                 route_port: int = 0, state_dir: Path | None = None, max_connections: int = 20_000,
                 per_destination: int | None = None, relay_bin: Path = DEFAULT_RELAY_BIN,
                 label: str = "relay", postgres_admin_url: str = "", loop: PythonLoop = "auto",
                 smtp_workers: int = 1, redis_url: str = "") -> None:
        super().__init__(procs)
        # [server] smtp_workers: that many processes accept on the listener (more than one needs Redis).
        self.smtp_workers = smtp_workers
        self.redis_url = redis_url
        self.loop = loop
        self._log_offset = 0
        self.role = role
        self.store_url = store_url
        self.postgres_admin_url = postgres_admin_url
        self.database: ThrowawayDatabase | None = None
        self.route_port = route_port
        self.state_dir = state_dir
        self.max_connections = max_connections
        self.per_destination = per_destination
        self.relay_bin = relay_bin
        self.name = label

    def start(self) -> None:
        workdir = self.make_workdir()
        if self.postgres_admin_url and not self.store_url:
            # A database of its own for this run, dropped in stop(): every run starts from an empty queue.
            self.database = ThrowawayDatabase(self.postgres_admin_url).__enter__()
            self.store_url = self.database.url
        state = self.state_dir or workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = workdir / "relay.toml"
        config.write_text(self.config_text(state))
        self.proc = self.procs.spawn([str(self.relay_bin), "--config", str(config), "serve"],
                                     log=self.log, cwd=workdir, env=python_env(workdir, self.loop))
        if self.role == "delivery":
            self._wait_for_log("relay_started")
        else:
            wait_for_smtp(self.port, START_TIMEOUT, self.proc, self.name, self.log)
            # Every SMTP process bound and serving, not only the first: a run must not start half-staffed.
            self._wait_for_log("relay_started", times=self.smtp_workers)

    def config_text(self, state: Path) -> str:
        store = self.store_url or f"sqlite:///{state}/queue.db"
        route = (f'{{ kind = "host", host = "{LOOPBACK}", port = {self.route_port}, tls = "none" }}'
                 if self.route_port else '{ kind = "reject", reject_code = 451, reject_enhanced = "4.4.0", '
                 'reject_text = "no route in this benchmark" }')
        concurrency = (f"\n[delivery.concurrency]\nper_destination = {self.per_destination}\n"
                       if self.per_destination else "")
        redis = (f'\n[redis]\nurl = "{self.redis_url}"\nkey_prefix = "bench-{secrets.token_hex(4)}:"\n'
                 if self.redis_url else "")
        return f"""\
# Generated by bench/references.py for one benchmark run.
[server]
hostname = "relay-bench.localhost"
state_dir = "{state}"
role = "{self.role}"
secret_key = "{secrets.token_urlsafe(32)}"
admin_token = "{secrets.token_urlsafe(32)}"
smtp_workers = {self.smtp_workers}

[store]
url = "{store}"

[tls]
dev_certificate = false

[limits]
connections_per_ip = 0
connection_rate_per_ip = {{ count = 0, period = 60 }}

[log]
format = "json"

[[listeners]]
name = "bench"
address = "{LOOPBACK}:{self.port}"
kind = "relay"
auth = "off"
trusted_networks = ["127.0.0.0/8"]
max_connections = {self.max_connections}
starttls = false
{concurrency}{redis}
[delivery.routes]
default = {route}
"""

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.database is not None:
                self.database.__exit__(None, None, None)
                self.database = None
                self.store_url = ""

    def _wait_for_log(self, event: str, times: int = 1) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if self.log.exists() and self.log.read_text(errors="replace").count(f'"{event}"') >= times:
                return
            time.sleep(0.05)
        raise HarnessError(f"{self.name} did not log {event} within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def delivery_failure(self) -> str:
        """The first sign, since the last call, that delivery is not working: a failed attempt, a failed
        session, a paused destination, a crash — or the process gone. Empty while all is well."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"the relay exited with status {self.proc.returncode}"
        if self.workdir is None or not self.log.exists():
            return ""
        with open(self.log, "rb") as fh:
            fh.seek(self._log_offset)
            chunk = fh.read()
        complete = chunk.rfind(b"\n") + 1  # a line still being written is read next time
        self._log_offset += complete
        for raw in chunk[:complete].splitlines():
            line = raw.decode(errors="replace")
            if ('"delivery_attempt"' in line and '"outcome": "delivered"' not in line) or any(
                    f'"{event}"' in line for event in _DELIVERY_TROUBLE):
                return line
        return ""

    def problems(self) -> list[str]:
        """Log lines at warning level or above (what went wrong under load, in the relay's words)."""
        if self.workdir is None or not self.log.exists():
            return []
        return [line for line in self.log.read_text(errors="replace").splitlines()
                if '"level": "warning"' in line or '"level": "error"' in line or '"level": "critical"' in line
                or "Traceback" in line]


_DELIVERY_TROUBLE = ("delivery_session_failed", "destination_paused", "delivery_loop_error",
                     "delivery_task_crashed", "delivery_job_crashed", "delivery_transaction_crashed",
                     "delivery_record_failed")


# --- a committed revision of the relay, away from the working tree -------------------------------


class RelaySnapshot:
    """The relay as committed at ``rev``, staged in a temp directory with a launcher for ``relay``.

    The working tree is shared with people editing it; a benchmark of a committed revision is not
    disturbed by their half-done changes. The snapshot is ``git archive REV``, laid out the way the
    package installs (pyproject's ``[tool.setuptools.package-dir]``: plugins/, policies/ and migrations/
    under ``relay``), run by this interpreter (the project's .venv, which has every dependency) with the
    snapshot first on ``sys.path``.
    """

    def __init__(self, rev: str) -> None:
        self.rev = rev
        self.commit = ""
        self.root: Path | None = None

    @property
    def relay_bin(self) -> Path:
        assert self.root is not None
        return self.root / "bin" / "relay"

    def __enter__(self) -> Self:
        import tomllib

        from common import REPO_DIR

        self.root = Path(tempfile.mkdtemp(prefix="bench-relay-rev-"))
        try:
            done = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "--short", f"{self.rev}^{{commit}}"],
                                  capture_output=True, text=True, timeout=30, check=False)
            if done.returncode != 0:
                raise HarnessError(f"--relay-rev {self.rev}: {done.stderr.strip()}")
            self.commit = done.stdout.strip()
            src = self.root / "src"
            src.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", "--format=tar", self.commit],
                                     capture_output=True, timeout=120, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, timeout=120, check=True)
            with open(src / "pyproject.toml", "rb") as fh:
                package_dirs = tomllib.load(fh)["tool"]["setuptools"]["package-dir"]
            site = self.root / "site"
            for package, directory in sorted(package_dirs.items()):  # "relay" before "relay.x"
                shutil.copytree(src / directory, site / package.replace(".", "/"), dirs_exist_ok=True)
            self.relay_bin.parent.mkdir()
            self.relay_bin.write_text(f"#!{sys.executable}\n"
                                      "import sys\n"
                                      f"sys.path.insert(0, {str(site)!r})\n"
                                      "from relay.cli import main\n"
                                      "sys.exit(main())\n")
            self.relay_bin.chmod(0o755)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.root is not None and os.environ.get("BENCH_KEEP_TMP") != "1":
            shutil.rmtree(self.root, ignore_errors=True)


def add_relay_options(parser: argparse.ArgumentParser) -> None:
    """``--relay-rev`` and ``--relay-bin``: which relay the benchmark runs."""
    parser.add_argument("--relay-rev", metavar="REV",
                        help="measure the relay as committed at REV (e.g. HEAD), from a snapshot, instead of "
                             "the working tree that others may be editing")
    parser.add_argument("--relay-bin", type=Path, default=DEFAULT_RELAY_BIN,
                        help=f"the relay command for the working tree (default {DEFAULT_RELAY_BIN})")


def prepare_relay(args: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    """Point ``args.relay_bin`` at the relay to measure; returns a line saying which relay that is."""
    if not args.relay_rev:
        return f"working tree ({args.relay_bin})"
    snapshot = stack.enter_context(RelaySnapshot(args.relay_rev))
    args.relay_bin = snapshot.relay_bin
    return f"committed revision {args.relay_rev} = {snapshot.commit} (snapshot, not the working tree)"


# --- a throwaway Postgres database -----------------------------------------------------------------


class ThrowawayDatabase:
    """``CREATE DATABASE relay_bench_<random>`` on the machine's Postgres; dropped (FORCE) on exit."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"relay_bench_{secrets.token_hex(6)}"
        base, _, _ = admin_url.rpartition("/")
        self.url = f"{base}/{self.name}"

    def __enter__(self) -> ThrowawayDatabase:
        self._execute("CREATE DATABASE {}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._execute("DROP DATABASE IF EXISTS {} WITH (FORCE)")

    def _execute(self, template: LiteralString) -> None:
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL(template).format(sql.Identifier(self.name)))
        except psycopg.Error as exc:
            raise HarnessError(f"postgres ({self.admin_url}): {exc}") from None
