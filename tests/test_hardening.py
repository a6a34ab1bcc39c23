"""Hardened input (DESIGN.md §7): the timeouts of protocol.md §1.7, the decoder fuzzer
(tools/fuzz_decoder.py, briefly), and a storm of 50,000 random and mutated frames
against a real server, after which it still serves and its store verifies clean."""

from __future__ import annotations

import asyncio
import json
import random
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqd.client
from mqd.certs import init_ca, issue
from mqd.client.sync import connect as sync_connect
from mqd.errors import ErrorCode, ProtocolError
from mqd.frontend import HANDLERS
from mqd.protocol import codec, messages
from mqd.protocol.frame import FLAG_RESPONSE, PROTOCOL_VERSION, Frame, FrameDecoder
from mqd.protocol.messages import ErrorBody
from tests.conftest import ServerProcess

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import fuzz_decoder  # noqa: E402


def _config(tmp_path: Path, text: str, name: str = "mqd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class Raw:
    """A client that speaks raw frames, to see exactly what the server sends and when."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.decoder = FrameDecoder(64 * 1024 * 1024)
        self.opened = time.monotonic()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self) -> None:
        self.send(codec.encode_request(1, messages.HelloRequest(client_name="hardening")))
        assert isinstance(codec.decode_response(self.read_frame()), messages.HelloResponse)

    def read_frame(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.decoder.feed(data)
        return frame

    def expect_timeout_then_close(self, says: str) -> float:
        """The server's TIMEOUT (id 0, opcode 0) and EOF; returns seconds since connect."""
        frame = self.read_frame()
        elapsed = time.monotonic() - self.opened
        assert frame.correlation_id == 0 and frame.opcode == 0
        error = codec.decode_response(frame)
        assert isinstance(error, ErrorBody), error
        assert error.code == ErrorCode.TIMEOUT, (ErrorCode(error.code).name, error.message)
        assert says in error.message
        assert self.closed_by_server()
        return elapsed

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect():
    opened: list[Raw] = []

    def make(address: str) -> Raw:
        opened.append(Raw(address))
        return opened[-1]

    yield make
    for raw in opened:
        raw.close()


# --- timeouts (protocol.md §1.7) ---------------------------------------------------------


def test_no_hello_is_closed_after_the_handshake_timeout(server_factory, tmp_path, connect):
    server = server_factory(config=_config(tmp_path, "[limits]\nhandshake_timeout_ms = 500\n"))
    raw = connect(server.address)
    elapsed = raw.expect_timeout_then_close("handshake_timeout_ms")
    assert 0.45 <= elapsed < 3


def test_an_idle_connection_is_closed_after_the_idle_timeout(server_factory, tmp_path, connect):
    limits = "[limits]\nhandshake_timeout_ms = 500\nidle_timeout_ms = 1000\n"
    server = server_factory(config=_config(tmp_path, limits))
    raw = connect(server.address)
    raw.hello()
    elapsed = raw.expect_timeout_then_close("idle_timeout_ms")
    assert 1.0 <= elapsed < 4


def test_the_idle_clock_starts_when_a_long_poll_ends(server_factory, tmp_path, connect):
    # A 3 s long poll on a connection with a 1.5 s idle timeout: it keeps the connection
    # alive while it waits, and the idle clock starts only when it is answered (§1.7).
    limits = "[limits]\nhandshake_timeout_ms = 500\nidle_timeout_ms = 1500\n"
    server = server_factory(config=_config(tmp_path, limits))
    raw = connect(server.address)
    raw.hello()
    raw.send(codec.encode_request(2, messages.CreateQueueRequest("jobs")))
    assert isinstance(codec.decode_response(raw.read_frame()), messages.CreateQueueResponse)
    started = time.monotonic()
    raw.send(codec.encode_request(3, messages.ReceiveRequest("jobs", 1, 3000)))
    answer = raw.read_frame()
    assert answer.correlation_id == 3
    assert isinstance(codec.decode_response(answer), messages.ReceiveResponse)
    assert time.monotonic() - started >= 2.9
    raw.opened = time.monotonic()  # the connection has had nothing outstanding since
    elapsed = raw.expect_timeout_then_close("idle_timeout_ms")
    assert 1.45 <= elapsed < 4


@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_slowloris_a_partial_frame_gets_timeout_and_close(
    server_factory, tmp_path, connect, after_hello
):
    # The handshake timeout stays long: what cuts the connection is the stalled frame.
    limits = "[limits]\nframe_timeout_ms = 500\n"
    server = server_factory(config=_config(tmp_path, limits))
    raw = connect(server.address)
    if after_hello:
        raw.hello()
    frame = codec.encode_request(2, messages.PingRequest(payload=b"p" * 100))
    started = time.monotonic()
    raw.send(frame[:5])  # the length prefix and the version byte, then nothing
    raw.opened = started
    elapsed = raw.expect_timeout_then_close("frame_timeout_ms")
    assert 0.45 <= elapsed < 3


def test_a_trickling_frame_is_cut_even_while_bytes_keep_coming(server_factory, tmp_path, connect):
    limits = "[limits]\nframe_timeout_ms = 1000\nframe_bytes_per_s_min = 0\n"
    server = server_factory(config=_config(tmp_path, limits))
    raw = connect(server.address)
    raw.hello()
    frame = codec.encode_request(2, messages.PingRequest(payload=b"p" * 100))
    raw.opened = time.monotonic()
    raw.sock.settimeout(0.2)
    for byte in frame:  # one byte every 100 ms: 11 s for the frame, if we were let
        raw.send(bytes([byte]))
        try:
            data = raw.sock.recv(65536)
        except TimeoutError:
            continue
        raw.decoder.feed(data)
        break
    raw.sock.settimeout(10)
    elapsed = raw.expect_timeout_then_close("frame_timeout_ms")
    assert 0.95 <= elapsed < 3


def test_a_large_frame_on_a_slow_link_gets_through_at_the_minimum_rate(
    server_factory, tmp_path, connect
):
    # 12 KB at about 8 KB/s takes 1.5 s, three times frame_timeout_ms, yet arrives
    # faster than frame_bytes_per_s_min: it is answered, not cut.
    limits = "[limits]\nframe_timeout_ms = 500\nframe_bytes_per_s_min = 2000\n"
    server = server_factory(config=_config(tmp_path, limits))
    raw = connect(server.address)
    raw.hello()
    payload = bytes(range(256)) * 48
    frame = codec.encode_request(3, messages.PingRequest(payload=payload))
    started = time.monotonic()
    for start in range(0, len(frame), 800):
        raw.send(frame[start : start + 800])
        time.sleep(0.1)
    assert time.monotonic() - started > 1.2
    response = codec.decode_response(raw.read_frame())
    assert isinstance(response, messages.PingResponse) and response.payload == payload


def test_a_tls_client_that_never_handshakes_is_dropped(server_factory, tmp_path, connect):
    certs = tmp_path / "certs"
    init_ca(certs)
    cert, key = issue(certs, "node1", ["localhost", "127.0.0.1"])
    config = _config(
        tmp_path,
        f"[tls]\ncert = '{cert}'\nkey = '{key}'\n[limits]\nhandshake_timeout_ms = 500\n",
    )
    server = server_factory(config=config)
    silent = connect(server.address)
    # Half a TLS record header and nothing more: a handshake that never finishes.
    stalled = connect(server.address)
    stalled.send(b"\x16\x03\x01")
    for raw in (silent, stalled):
        assert raw.closed_by_server()
        assert 0.45 <= time.monotonic() - raw.opened < 5
    # The server still serves TLS clients that do handshake.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        import ssl

        context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(codec.encode_request(1, messages.HelloRequest(client_name="tls")))
            decoder = FrameDecoder(1 << 24)
            while (frame := decoder.next_frame()) is None:
                decoder.feed(tls.recv(65536))
            assert isinstance(codec.decode_response(frame), messages.HelloResponse)


# --- backpressure (protocol.md §1.7) ------------------------------------------------------


def _rss_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def test_a_client_that_sends_without_reading_does_not_fill_the_servers_memory(server, connect):
    # 60 pipelined PEEKs, each answered with 4 messages of 1000 KiB: 240 MiB of answers.
    # Before, every one was encoded and queued at once (RSS ~2x that); now the answers
    # wait their turn while the client leaves 1 MiB unread.
    body = b"m" * (1000 * 1024)
    with sync_connect(server.address) as client:
        queue = client.create_queue("big")
        for _ in range(4):
            queue.send(body)
    raw = connect(server.address)
    raw.hello()
    peeks = 60
    raw.send(
        b"".join(
            codec.encode_request(10 + i, messages.PeekRequest(queue="big", max_messages=4))
            for i in range(peeks)
        )
    )
    assert server.proc is not None
    baseline = _rss_mib(server.proc.pid)
    peak = baseline
    for _ in range(15):
        time.sleep(0.1)
        peak = max(peak, _rss_mib(server.proc.pid))
    assert peak - baseline < 60, (baseline, peak)
    # A client that then reads gets every answer, whole.
    raw.sock.settimeout(30)
    answered = set()
    for _ in range(peeks):
        frame = raw.read_frame()
        answer = codec.decode_response(frame)
        assert isinstance(answer, messages.PeekResponse), answer
        assert [bytes(m.body) for m in answer.messages] == [body] * 4
        answered.add(frame.correlation_id)
    assert answered == {10 + i for i in range(peeks)}


# --- the decoder fuzzer (tools/fuzz_decoder.py), CI-sized --------------------------------


def test_fuzz_decoders_with_hypothesis():
    fuzz_decoder.hypothesis_test(examples=400, seed=0)()


def test_fuzz_target_accepts_every_valid_frame_and_refuses_garbage_cleanly():
    rng = random.Random(1)
    for _ in range(300):
        fuzz_decoder.check_input(fuzz_decoder.random_valid_frame(rng), rng.randrange(1, 64))
        fuzz_decoder.check_input(fuzz_decoder.random_mutated_frame(rng), rng.randrange(1, 64))


def test_fuzz_tool_command_line():
    done = subprocess.run(
        [sys.executable, str(TOOLS / "fuzz_decoder.py"), "--examples", "30", "--seed", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no bug found" in done.stdout


# --- the storm ---------------------------------------------------------------------------

STORM_FRAMES = 50_000
STORM_CONNECTIONS_AT_ONCE = 16
STORM_BATCH_FRAMES_MAX = 64
STORM_READ_TIMEOUT_S = 10.0
_CLIENT_OPS = frozenset(int(op) for op in HANDLERS)


class Batch:
    """What one storm connection sends, and how many answers the server owes for it."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.storm_frames = 0  # parts that came from the storm (not our HELLO)
        self.answers_due = 0  # whole frames before (and including) the one that ends it
        self.ends_connection = False  # the server will close after its last frame


def storm_batches(rng: random.Random, total: int, frame_bytes_max: int):
    """Batches of random and mutated frames; each ends at its first frame the server may
    close the connection for, so nothing is sent after it goes unread."""
    frames = fuzz_decoder.storm_frames(rng)
    sent = 0
    while sent < total:
        batch = Batch()
        if rng.random() < 0.5:
            # Half the connections say HELLO first, so that requests reach the handlers.
            batch.parts.append(codec.encode_request(0, messages.HelloRequest(client_name="storm")))
            batch.answers_due += 1
        decoder = FrameDecoder(frame_bytes_max)
        while sent < total and len(batch.parts) < STORM_BATCH_FRAMES_MAX:
            data = next(frames)
            batch.parts.append(data)
            batch.storm_frames += 1
            sent += 1
            decoder.feed(data)
            try:
                while (frame := decoder.next_frame()) is not None:
                    batch.answers_due += 1
                    if _may_close(frame):
                        batch.ends_connection = True
                        break
            except ProtocolError:  # broken framing: one error frame (id 0), then close
                batch.answers_due += 1
                batch.ends_connection = True
            # A frame still incomplete (a truncation, a length prefix that promises more) would
            # swallow whatever follows as its body: end the batch there instead, so that
            # most storm frames reach the server as frames of their own.
            if batch.ends_connection or decoder.buffered_bytes:
                break
        yield batch


def _may_close(frame: Frame) -> bool:
    """Whether the server may answer this request with a fatal error (protocol.md §1.6)."""
    if frame.flags & FLAG_RESPONSE:
        return True
    if frame.version != PROTOCOL_VERSION or frame.opcode not in _CLIENT_OPS:
        return False
    try:
        codec.decode_request(frame)
    except ProtocolError:
        return True
    except Exception:
        return False
    # A well-formed HELLO with a bad token could be UNAUTHENTICATED; auth is off here.
    return False


async def _throw(address: str, batch: Batch, tally: dict[str, int]) -> None:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    # Close with RST rather than FIN: tens of thousands of connections must not leave as many
    # sockets in TIME_WAIT on the client's side of loopback.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    decoder = FrameDecoder(1 << 26)
    answers = 0
    try:
        writer.write(b"".join(batch.parts))
        tally["frames"] += batch.storm_frames
        async with asyncio.timeout(STORM_READ_TIMEOUT_S):
            while answers < batch.answers_due:
                data = await reader.read(65536)
                if not data:
                    tally["closed_by_server"] += 1
                    break
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    answers += 1
                    # Whatever we sent, what comes back is well-formed (§1, §2).
                    answer = codec.decode_response(frame)
                    if isinstance(answer, ErrorBody):
                        tally[ErrorCode(answer.code).name] += 1
                    else:
                        tally["ok"] += 1
    except TimeoutError:
        tally["read_timeouts"] += 1
    except (ConnectionResetError, BrokenPipeError):
        tally["reset"] += 1
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionResetError, BrokenPipeError):
            pass
    tally["answers"] += answers


async def _storm(address: str, seed: int, frame_bytes_max: int) -> dict[str, int]:
    from collections import Counter

    tally: Counter[str] = Counter()
    batches = storm_batches(random.Random(seed), STORM_FRAMES, frame_bytes_max)

    async def worker() -> None:
        for batch in batches:  # one generator shared by every worker
            tally["connections"] += 1
            await _throw(address, batch, tally)

    async with asyncio.TaskGroup() as group:
        for _ in range(STORM_CONNECTIONS_AT_ONCE):
            group.create_task(worker())
    return dict(tally)


def _trouble(log_lines: list[str]) -> list[str]:
    """Log lines that mean a bug: errors, failed requests, anything not a JSON log line
    (asyncio prints an unhandled callback exception as plain text)."""
    found = []
    for line in log_lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            found.append(line)
            continue
        if event.get("level") in ("error", "critical") or event.get("event") == "request.failed":
            found.append(line)
    return found


async def test_storm_of_random_and_mutated_frames(server_factory, tmp_path):
    server = server_factory(config=_config(tmp_path, "[limits]\nhandshake_timeout_ms = 2000\n"))
    bodies = [f"before the storm {i}".encode() for i in range(50)]
    async with await mqd.client.connect(server.address) as client:
        keep = await client.create_queue("keep")
        await keep.send_batch(bodies)
        frame_bytes_max = client.server_limits["frame_bytes_max"]

    started = time.monotonic()
    tally = await _storm(server.address, seed=20240601, frame_bytes_max=frame_bytes_max)
    elapsed = time.monotonic() - started
    print(f"storm: {elapsed:.1f} s, {json.dumps(tally, sort_keys=True)}")

    assert tally["frames"] == STORM_FRAMES
    assert server.proc.poll() is None, "the server died in the storm"
    assert tally.get("read_timeouts", 0) == 0, tally
    # Most storm frames reached the server as frames of their own and were answered.
    assert tally["answers"] >= STORM_FRAMES // 2, tally
    # Unhandled exceptions in handlers, callbacks or the loop are bugs, whatever the input.
    trouble = _trouble(server.log_lines)
    assert not trouble, "\n".join(trouble[:20])

    # A well-formed client is served as before, and nothing stored before the storm moved.
    async with await mqd.client.connect(server.address) as client:
        after = await client.create_queue("after-the-storm")
        await after.send(b"still here")
        (message,) = await after.receive(wait=1)
        assert message.body == b"still here"
        await after.ack(message)
        keep = client.queue("keep")
        kept = await keep.peek(max_messages=100)
        assert sorted(m.body for m in kept) == sorted(bodies)

    assert server.stop() == 0
    verified = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqd", "storage", "verify", str(server.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


class _LowFilesLimitServer(ServerProcess):
    """`mqd serve` started with a soft limit of 256 open files (the hard one kept)."""

    def command(self) -> list[str]:
        wrapper = (
            "import os, resource, sys; "
            "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "os.execv(sys.executable, sys.argv[1:])"
        )
        return [sys.executable, "-c", wrapper, *super().command()]


def _open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open-files line")


async def test_a_node_takes_the_hard_open_files_limit_as_its_soft_one(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to raise")
    server = _LowFilesLimitServer(tmp_path / "data").start()
    try:
        soft_now, hard_now = _open_files_limits(server.proc.pid)
        unlimited = hard == resource.RLIM_INFINITY
        assert soft_now == ("1048576" if unlimited else str(hard))
        assert hard_now == ("unlimited" if unlimited else str(hard))  # left as it was
        async with await mqd.client.connect(server.address) as client:
            queue = await client.create_queue("many-files")
            await queue.send(b"x")
    finally:
        server.kill()
