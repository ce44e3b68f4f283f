"""A real ``defectlab serve`` process on a free loopback port, for tests that need its own
memory (``/proc``), its own log, or to kill it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proc_status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def rss_mb(self) -> float:
        return proc_status_kb(self.process.pid, "VmRSS") / 1024

    def peak_mb(self) -> float:
        return proc_status_kb(self.process.pid, "VmHWM") / 1024

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def start(run: Path, log: Path, *args: str, port: int | None = None) -> Service:
    """Start ``defectlab serve`` and wait until ``/health`` answers (the deadline only stops
    a test from hanging on a service that never comes up; nothing is timed)."""
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "defectlab", "serve", "--run", str(run), "--port", str(port)]
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [*command, *args, "--device", "cpu"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    service = Service(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{service.url}/health", timeout=5).status_code == 200:
                return service
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            service.kill()
            raise RuntimeError("the service did not come up")
        time.sleep(0.1)
