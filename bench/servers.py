"""The processes a benchmark run starts: Postfix as a throwaway null client, the relay, and
the sinks each relays to. Everything listens on 127.0.0.1, on free ports, in a temp dir.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
POSTFIX_CONCURRENCY = 20  # Postfix's default_destination_concurrency_limit


def free_port() -> int:
    """A free port below the kernel's ephemeral range. One from the range, let go until the
    server binds it, could be given to any connect() meanwhile, wait_listening's probes of
    that very port included (a socket connected to itself)."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10000, ephemeral), 100):
        with contextlib.suppress(OSError), socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_listening(port: int, process: subprocess.Popen[bytes] | None = None,
                   timeout: float = 60.0) -> float:
    """Poll until 127.0.0.1:port accepts a connection; return the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return time.monotonic() - started
        except OSError:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode}") from None
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"nothing listening on port {port}") from None
            time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes, summed."""
    return _summed(pids, "status", r"VmRSS:\s+(\d+) kB")


def pss_kib(pids: list[int]) -> int:
    """Proportional set size, summed: shared pages divided among the processes sharing
    them, so a server of many processes (Postfix) is not charged for its libraries once
    per process."""
    return _summed(pids, "smaps_rollup", r"Pss:\s+(\d+) kB")


def _summed(pids: list[int], name: str, pattern: str) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        match = re.search(pattern, text)
        total += int(match.group(1)) if match else 0
    return total


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Postfix's master forks smtpd, cleanup, qmgr, ...)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


class Sink:
    """Postfix's smtp-sink (fast, C) or bench/sink.py (a fixed delay per message)."""

    def __init__(self, workdir: Path, delay: float = 0.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._count_file = workdir / f"sink-{self.port}.count"
        self._count = 0
        if delay:
            self.process = subprocess.Popen(
                [sys.executable, str(BENCH / "sink.py"), str(self.port), str(self._count_file),
                 str(delay)], stdout=subprocess.DEVNULL)
        else:
            # -c prints "... mesg=N\r" as messages arrive; -u is required when run as root.
            self.process = subprocess.Popen(
                ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            threading.Thread(target=self._read_counter, daemon=True).start()
        wait_listening(self.port, self.process)

    def _read_counter(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        while chunk := self.process.stdout.read1(4096):  # type: ignore[attr-defined]
            buffer = (buffer + chunk)[-256:]
            counts = re.findall(rb"mesg=(\d+)", buffer)
            if counts:
                self._count = int(counts[-1])

    @property
    def received(self) -> int:
        if self.process.stdout is None:
            try:
                return int(self._count_file.read_text() or 0)
            except FileNotFoundError:
                return 0
        return self._count

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Relay:
    """`relay serve` relaying to `sink`, spool in workdir."""

    name = "relay"

    def __init__(self, workdir: Path, sink: Sink,
                 connections: int = POSTFIX_CONCURRENCY, metrics: bool = False,
                 python: str = sys.executable, rate: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port() if metrics else None  # /metrics, when asked for
        self.spool = workdir / "relay-spool"
        config = {
            "listen": {"address": "127.0.0.1", "port": self.port, "max_connections": 200,
                       "max_message_size": "64MiB"},
            "spool": {"path": str(self.spool), "min_free": 0},
            "upstream": {"host": "127.0.0.1", "port": sink.port, "tls": "none",
                         "connections": connections, "timeout": "60s"},
            "log": {"level": "info"},
        }
        # Only the keys a measurement needs: an earlier build (python=) refuses later ones.
        if rate is not None:
            config["upstream"]["rate"] = rate
        if metrics:
            config["metrics"] = {"port": self.metrics_port}
        self.config_path = workdir / "relay.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in = 0.0  # seconds from start until it accepted a connection
        self.python = python  # another build's interpreter, for a comparison

    def __enter__(self) -> Relay:
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.python, "-m", "relay", "serve", "--config", str(self.config_path)],
                stderr=log, cwd=self.spool.parent)
        wait_listening(self.port, self.process, timeout=300)
        self.started_in = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)

    def pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid]


class Postfix:
    """A throwaway Postfix instance: its own config and queue directories, a null client
    (no local delivery) relaying everything to `sink`. Needs root, as Postfix does."""

    name = "postfix"

    def __init__(self, workdir: Path, sink: Sink) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.root = workdir / "postfix"
        self.config_dir = self.root / "etc"
        for sub in ("etc", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        os.chmod(self.root, 0o755)
        shutil.chown(self.root / "data", "postfix")
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.root / "queue",
            "data_directory": self.root / "data",
            "meta_directory": "/etc/postfix",
            "shlib_directory": "/usr/lib/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "bench.localdomain",
            "mydestination": "",
            "local_transport": "error:local delivery disabled",
            "relayhost": f"[127.0.0.1]:{sink.port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "maillog_file": self.root / "maillog",
            "maillog_file_prefixes": self.root,
            "message_size_limit": 64 * 1024 * 1024,
            "smtp_tls_security_level": "none",
        }
        (self.config_dir / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items()))
        # master.cf: the stock one, no chroot (the queue is a temp dir), smtpd on our port.
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line[:1].isalnum() and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = str(self.port)
                fields[4] = "n"
                lines.append(" ".join(fields))
            else:
                lines.append(line)
        (self.config_dir / "master.cf").write_text("\n".join(lines) + "\n")
        self._postfix("post-install", "create-missing")

    def _postfix(self, *args: str) -> None:
        result = subprocess.run(["postfix", "-c", str(self.config_dir), *args],
                                capture_output=True, text=True)
        if result.returncode != 0:
            log = self.root / "maillog"
            raise RuntimeError(f"postfix {' '.join(args)} failed: {result.stderr.strip()}\n"
                               + (log.read_text()[-2000:] if log.exists() else ""))

    def __enter__(self) -> Postfix:
        self._postfix("start")
        wait_listening(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._postfix("stop")

    def pids(self) -> list[int]:
        pid_file = self.root / "queue" / "pid" / "master.pid"
        return descendants(int(pid_file.read_text().split()[0]))


def ensure_postfix() -> None:
    """smtp-source, smtp-sink and postfix come with Debian's postfix package."""
    if shutil.which("smtp-source") and shutil.which("postfix"):
        return
    if os.geteuid() != 0:
        raise SystemExit("bench: Postfix is not installed and installing it needs root "
                         "(apt-get install postfix)")
    print("bench: installing Debian's postfix package (smtp-source, smtp-sink)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
    # The package may have started the system's own Postfix; it would only add noise.
    subprocess.run(["postfix", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
