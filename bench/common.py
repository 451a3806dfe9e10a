"""Shared helpers of the benchmark harness: ports, processes, timing, statistics, machine facts, tables.

Invariants every benchmark relies on:
- Everything binds or connects to 127.0.0.1 only (:data:`LOOPBACK`); nothing here takes another host.
- Every process is started in its own session and stopped by its PID (SIGTERM, then SIGKILL to the
  process group it leads) — never by name. :class:`Processes` remembers what it started so a crash or
  Ctrl-C in the harness still stops everything.
- Every wait is bounded by a timeout; nothing here loops forever.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DEFAULT_RELAY_BIN = REPO_DIR / ".venv" / "bin" / "relay"
SENDER = "from@example.com"
RECIPIENT = "to@example.org"


class HarnessError(Exception):
    """The harness itself cannot go on (a tool is missing, a reference will not start, …)."""


# --- ports and readiness ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def smtp_greets(port: int, timeout: float = 2.0) -> bool:
    """True once something on ``port`` answers a connection with a 220 greeting."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    return False
                data += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
                sock.recv(512)
            return data.startswith(b"220")
    except OSError:
        return False


def wait_for_smtp(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                  what: str = "server", log: Path | None = None) -> None:
    """Wait until ``port`` greets; :class:`HarnessError` if ``proc`` dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what} exited with status {proc.returncode} before listening"
                               + _log_tail(log))
        if smtp_greets(port):
            return
        time.sleep(0.05)
    raise HarnessError(f"{what} did not greet on {LOOPBACK}:{port} within {timeout:.0f} s" + _log_tail(log))


def _log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(text) if text else ""


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Processes:
    """Every long-running process the harness started, so that all of them are stopped on any exit."""

    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, argv: Sequence[str], *, log: Path | None = None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            # A session of its own: the process leads a group we can signal as a whole, by its PID.
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=cwd, env=env, start_new_session=True)
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
        """SIGTERM by PID, wait ``grace`` seconds, then SIGKILL its process group. Returns its status."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        # Children it left behind (or the process itself, if it ignored SIGTERM) go with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self.running:
            self.running.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc, grace=5.0)


def run_bounded(argv: Sequence[str], timeout: float, *, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion, killed (by PID) after ``timeout`` seconds."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False)


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks stop what the harness started."""
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_nofile(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to ``needed`` (and the hard one as root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) and Threads from /proc/PID/status, plus open file descriptors."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


# --- smtp-source -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRun:
    """One timed smtp-source run: wall-clock seconds, messages it completed, and the error if any."""

    seconds: float
    count: int
    completed: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.completed >= self.count

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.ok and self.seconds > 0 else 0.0


def smtp_source_argv(port: int, concurrency: int, count: int, size: int) -> list[str]:
    """One recipient, a new connection per message (no -d), ``size`` payload bytes, counter on."""
    return [tool("smtp-source"), "-c", "-s", str(concurrency), "-m", str(count), "-l", str(size),
            "-f", SENDER, "-t", RECIPIENT, f"{LOOPBACK}:{port}"]


def run_smtp_source(port: int, concurrency: int, count: int, size: int, timeout: float) -> SourceRun:
    """Send ``count`` messages with smtp-source; wall-clock from spawn to exit."""
    argv = smtp_source_argv(port, concurrency, count, size)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        seconds = time.perf_counter() - started
        return SourceRun(seconds, count, _last_counter(out), f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - started
    completed = _last_counter(out)
    error = ""
    if proc.returncode != 0:
        error = err.decode(errors="replace").strip().splitlines()[-1] if err.strip() else \
            f"smtp-source exit status {proc.returncode}"
    elif completed < count:
        error = f"only {completed} of {count} messages completed"
    return SourceRun(seconds, count, completed, error)


def _last_counter(output: bytes) -> int:
    # smtp-source -c prints a running count of completed DATA commands, separated by \r.
    numbers = re.findall(rb"(\d+)", output[-64:])
    return int(numbers[-1]) if numbers else 0


# --- statistics and tables -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def fmt_rate(value: float) -> str:
    return "—" if value != value or value <= 0 else f"{value:,.0f}"


def fmt_ratio(numerator: float, denominator: float) -> str:
    if numerator != numerator or denominator != denominator or numerator <= 0 or denominator <= 0:
        return "—"
    return f"{numerator / denominator:.2f}×"


def fmt_ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1000:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


# --- the machine -----------------------------------------------------------------------------------


def machine_facts(relay_source: str = "") -> list[tuple[str, str]]:
    """What the figures were measured on: CPUs, CPU model, kernel, memory, versions, relay commit."""
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
    mem_gib = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem_gib = f"{kib / 1024 / 1024:.1f} GiB"
    facts = [
        ("nproc", str(len(os.sched_getaffinity(0)))),
        ("CPU", cpu_model),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("memory", mem_gib),
        ("python", platform.python_version()),
        ("postfix", _postfix_version()),
        ("uvloop", _uvloop_version()),
        ("repository HEAD", _relay_commit()),
    ]
    if relay_source:
        facts.append(("relay measured", relay_source))
    return facts


def _uvloop_version() -> str:
    from importlib import metadata

    try:
        version = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        return "not installed (the relay runs on asyncio)"
    return f"{version} installed (the relay uses it unless a run says --loop asyncio)"


def _postfix_version() -> str:
    try:
        return run_bounded([tool("postconf"), "-d", "-h", "mail_version"], 10).stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired, HarnessError):
        return "not installed"


def _relay_commit() -> str:
    try:
        head = run_bounded(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"], 10).stdout.strip()
        dirty = run_bounded(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "relay"], 10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return head + (" (relay/ has uncommitted changes)" if dirty.strip() else "")


def machine_section(relay_source: str = "") -> str:
    return "\n".join(f"- {key}: {value}" for key, value in machine_facts(relay_source))


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def tool(name: str) -> str:
    """Full path of a Postfix tool; they live in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise HarnessError(f"{name} not found: run `bash bench/setup.sh` (as root) first")
    return found


def require_tools(*names: str) -> None:
    for name in names:
        tool(name)
