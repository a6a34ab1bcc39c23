"""Shared fixtures: a real `mqd serve` subprocess on an ephemeral loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mqd.client
from mqd.launcher import allocate_ports

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class ServerProcess:
    """One `mqd serve` process; restartable on the same port and data dir."""

    def __init__(
        self, data_dir: Path, *, extra_args: tuple[str, ...] = (), config: Path | None = None
    ):
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.config = config
        self.port = 0
        self.address = ""
        self.proc: subprocess.Popen[str] | None = None
        self.log_lines: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "mqd",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
        ]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + list(self.extra_args)

    def start(self) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not self.port:
            # A port below the ephemeral range: restarts reuse it, and no outgoing
            # connection can have taken it meanwhile (see mqd.launcher.allocate_ports).
            (self.port,) = allocate_ports(1)
        self._listening.clear()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        if not self._listening.wait(START_TIMEOUT_S):
            self.kill()
            raise RuntimeError("mqd serve did not start:\n" + "\n".join(self.log_lines[-40:]))
        return self

    def _read_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log_lines.append(line.rstrip("\n"))
            if '"server.listening"' in line:
                event = json.loads(line)
                self.address = event["address"]
                self.port = int(self.address.rsplit(":", 1)[1])
                self._listening.set()

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_lines:
            if f'"{name}"' in line:
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def wait_for_event(
        self, name: str, matches=lambda event: True, timeout_s: float = 10.0
    ) -> dict:
        """The first `name` event that `matches`, waiting for it: the server logs a
        request after it has answered, so the line can trail the client's reply."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events(name):
                if matches(event):
                    return event
            if time.monotonic() >= deadline:
                raise AssertionError(f"no matching {name!r} event within {timeout_s} s")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("mqd serve did not stop on SIGTERM") from None
        self._close_log_pipe()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close_log_pipe()

    def _close_log_pipe(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def restart(self, *, hard: bool = False) -> ServerProcess:
        if hard:
            self.kill()
        else:
            self.stop()
        # The port was ours a moment ago; retry briefly if the kernel still holds it.
        deadline = time.monotonic() + 10
        while True:
            try:
                return self.start()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def server_factory(tmp_path: Path, request: pytest.FixtureRequest):
    started: list[ServerProcess] = []

    def make(name: str = "data", **kwargs) -> ServerProcess:
        server = ServerProcess(tmp_path / name, **kwargs)
        started.append(server)
        return server.start()

    yield make
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        # A failed test shows what its servers said (an INTERNAL answer names only
        # "see the server log").
        for server in started:
            noted = [line for line in server.log_lines if '"level": "info"' not in line]
            print(f"--- {server.data_dir.name}: {len(noted)} log lines above info ---")
            print("\n".join(noted[-60:]))
    for server in started:
        if server.proc is not None:
            server.kill()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


@pytest.fixture
async def client(server):
    """A client connected to `server`, closed after the test."""
    c = await mqd.client.connect(server.address)
    try:
        yield c
    finally:
        await c.close()
