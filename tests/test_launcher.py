"""`mqd cluster` (mqd/launcher.py): configs, ports, manifest, pid safety, and a
real cluster of `mqd serve` processes on loopback driven end to end."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqd import certs, launcher
from mqd.config import load_config
from mqd.launcher import LauncherError, Manifest
from mqd.storage.config import FSYNC_POLICIES

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "config" / "cluster"


def run_cli(*argv: str) -> int:
    """`mqd cluster ARGV...` in this process (the lead wires it into mqd.cli)."""
    return launcher.main(launcher.build_parser().parse_args(list(argv)))


def small_cluster(directory: Path) -> Manifest:
    return launcher.create_cluster(directory, metadata=1, backends=2, frontends=1)


# ---------------------------------------------------------------------------
# Unit: ports, configs, manifest


def test_allocate_ports_are_distinct_and_free() -> None:
    ports = launcher.allocate_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # closed again, so free to bind


def test_create_cluster_writes_configs_that_load(tmp_path: Path) -> None:
    manifest = small_cluster(tmp_path / "c")
    assert [(n.id, n.role) for n in manifest.nodes] == [
        ("metadata-1", "metadata"),
        ("backend-1", "backend"),
        ("backend-2", "backend"),
        ("frontend-1", "frontend"),
    ]
    addresses = [n.cluster_address for n in manifest.nodes] + [
        n.client_address for n in manifest.by_role("frontend")
    ]
    assert len(set(addresses)) == len(addresses)
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert (tmp_path / "c" / "certs" / "ca.pem").is_file()
    (metadata,) = manifest.by_role("metadata")
    for node in manifest.nodes:
        config = load_config(manifest.path(node.config))  # validates, and the TLS files exist
        assert config.node.id == node.id
        assert config.node.roles == [node.role]
        assert Path(config.node.data_dir) == (manifest.path(node.data_dir)).resolve()
        assert config.cluster.listen == node.cluster_address
        assert config.cluster.metadata == [metadata.cluster_address]
        assert config.storage.fsync == "always"
        assert Path(config.tls.ca) == manifest.client_ca.resolve()
        assert Path(config.tls.cert).is_file() and Path(config.tls.key).is_file()
        assert not config.tls.require_client_cert
        if node.role == "frontend":
            assert config.frontend.listen == node.client_address
    # The node certificates carry the SANs a client dialling 127.0.0.1 checks.
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(manifest.path("certs/backend-1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_fsync_policy_is_set_when_made_and_rewritten_later(tmp_path: Path) -> None:
    assert launcher.FSYNC_POLICIES == FSYNC_POLICIES  # spelled out there, kept equal here
    manifest = launcher.create_cluster(
        tmp_path / "c", metadata=1, backends=2, frontends=1, fsync="never"
    )
    assert {load_config(manifest.path(n.config)).storage.fsync for n in manifest.nodes} == {"never"}
    # An edit a user made to a config survives the rewrite of the fsync line.
    backend = manifest.path(manifest.node("backend-1").config)
    backend.write_text(backend.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    assert launcher.set_fsync(manifest, "interval") == [n.id for n in manifest.nodes]
    assert launcher.set_fsync(manifest, "interval") == []  # nothing left to change
    for node in manifest.nodes:
        config = load_config(manifest.path(node.config))
        assert config.storage.fsync == "interval"
    assert load_config(backend).metrics.listen == "127.0.0.1:0"
    with pytest.raises(LauncherError, match="--fsync: must be one of always, interval, never"):
        launcher.set_fsync(manifest, "sometimes")
    # A config whose fsync line is gone: nothing is rewritten, and the error says where.
    frontend = manifest.path(manifest.node("frontend-1").config)
    frontend.write_text(frontend.read_text().replace('fsync = "interval"', ""))
    with pytest.raises(LauncherError, match=r"frontend-1.*no single `fsync = \.\.\.` line"):
        launcher.set_fsync(manifest, "always")
    assert load_config(backend).storage.fsync == "interval"


def test_config_strings_are_escaped(tmp_path: Path) -> None:
    directory = tmp_path / 'we"ird \\dir'
    manifest = small_cluster(directory)
    node = manifest.node("backend-1")
    assert load_config(manifest.path(node.config)).node.data_dir.startswith(str(directory))


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = small_cluster(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded.nodes == manifest.nodes
    assert loaded.client_ca == manifest.client_ca
    assert loaded.node("frontend-1").address == manifest.node("frontend-1").client_address
    assert loaded.node("backend-2").address == manifest.node("backend-2").cluster_address
    with pytest.raises(LauncherError, match="no node 'backend-9'"):
        loaded.node("backend-9")


def test_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="no cluster here"):
        Manifest.load(tmp_path)
    (tmp_path / "cluster.json").write_text('{"format": 99, "nodes": []}')
    with pytest.raises(LauncherError, match="format 99"):
        Manifest.load(tmp_path)
    (tmp_path / "cluster.json").write_text("{not json")
    with pytest.raises(LauncherError, match="unreadable"):
        Manifest.load(tmp_path)


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LauncherError, match="--backends"):
        launcher.create_cluster(tmp_path, metadata=1, backends=0, frontends=1)
    with pytest.raises(LauncherError, match="--frontends"):
        launcher.create_cluster(tmp_path, metadata=1, backends=1, frontends=0)


def test_status_of_a_cluster_never_started(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    small_cluster(tmp_path)
    assert run_cli("status", "--dir", str(tmp_path), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"frontends", "backends", "metadata", "client_ca"}
    assert [e["id"] for e in status["backends"]] == ["backend-1", "backend-2"]
    for key in ("frontends", "backends", "metadata"):
        for entry in status[key]:
            assert set(entry) == {"id", "address", "pid", "up"}
            assert entry["up"] is False and entry["pid"] is None
    assert status["client_ca"] == str(tmp_path / "certs" / "ca.pem")
    assert run_cli("status", "--dir", str(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "backend-2" in text and "down" in text


def test_actions_without_a_cluster_fail_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_cli("stop", "--dir", str(tmp_path)) == 1
    assert "no cluster here" in capsys.readouterr().err
    small_cluster(tmp_path)
    assert run_cli("kill", "--dir", str(tmp_path), "backend-1") == 1
    assert "not running" in capsys.readouterr().err
    assert run_cli("kill", "--dir", str(tmp_path), "nope-1") == 1
    assert "no node 'nope-1'" in capsys.readouterr().err
    assert run_cli("stop", "--dir", str(tmp_path)) == 0
    assert "not running" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# Unit: readiness from the log, the frontend's cluster view


def test_listening_events_are_read_from_this_run_only(tmp_path: Path) -> None:
    node = launcher.NodeEntry(
        id="frontend-1",
        role="frontend",
        cluster_address="127.0.0.1:7201",
        client_address="127.0.0.1:6471",
    )
    log = tmp_path / "node.log"
    earlier = [
        {"event": "server.listening", "address": "127.0.0.1:6471"},
        {"event": "server.listening", "address": "127.0.0.1:7201"},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in earlier))
    assert launcher.log_ready(node, log, 0)
    offset = log.stat().st_size
    assert launcher.listening_ports(log, offset) is None
    assert not launcher.log_ready(node, log, offset)
    with open(log, "a") as handle:
        handle.write("not json server.listening\n")
        handle.write(json.dumps({"event": "server.listening", "address": "127.0.0.1:6471"}) + "\n")
        handle.write('{"event": "server.listening", "addr')  # a line being written
    assert launcher.listening_ports(log, offset) == {6471}
    assert not launcher.log_ready(node, log, offset)  # the cluster port is not up yet
    with open(log, "a") as handle:
        handle.write('ess": "x"}\n')
        handle.write(json.dumps({"event": "server.listening", "address": "127.0.0.1:7201"}) + "\n")
    assert launcher.log_ready(node, log, offset)
    assert launcher.listening_ports(tmp_path / "missing.log") is None
    assert "no log" in launcher.log_tail(tmp_path / "missing.log")


def test_backends_not_up() -> None:
    view = {
        "placement_version": 3,
        "nodes": [
            {"id": "backend-1", "roles": ["backend"], "up": True},
            {"id": "backend-2", "roles": ["backend"], "up": False},
            {"id": "frontend-1", "roles": ["frontend"], "up": True},
        ],
    }
    ids = ["backend-1", "backend-2", "backend-3"]
    assert launcher.backends_not_up(view, ids) == ["backend-2", "backend-3"]
    assert launcher.backends_not_up({}, ["backend-1"]) == ["backend-1"]


# ---------------------------------------------------------------------------
# Unit: the pid safety check


def _impostor(config: Path) -> subprocess.Popen[bytes]:
    """A process whose argv looks like `mqd serve --config CONFIG` but that only sleeps."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "mqd",
            "serve",
            "--config",
            str(config),
        ],
        stdin=subprocess.DEVNULL,
    )


def test_pid_check_matches_only_mqd_serve_of_this_config(tmp_path: Path) -> None:
    config = tmp_path / "nodes" / "backend-1" / "config.toml"
    proc = _impostor(config)
    try:
        deadline = time.monotonic() + 10
        while launcher._proc_argv(proc.pid) in (None, [sys.executable]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert launcher.is_node_process(proc.pid, config)
        assert not launcher.is_node_process(proc.pid, tmp_path / "other" / "config.toml")
        assert not launcher.is_node_process(os.getpid(), config)  # pytest, not a node
    finally:
        proc.kill()
        proc.wait(10)
    assert not launcher.is_node_process(proc.pid, config)  # gone


def test_spawned_processes_are_recognised_once_exec_has_published_their_argv() -> None:
    # posix_spawn returns while the child is still in execve; its command line reads
    # empty for a moment (24 of 300 spawns here), and a node checked then was taken
    # for one that had exited (a cluster start failed in CI on it). spawn_node waits.
    for _ in range(100):
        argv = [sys.executable, "-c", "import time; time.sleep(5)", "--config", "x.toml"]
        pid = os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True)
        try:
            launcher._wait_exec(pid)
            assert (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))[-2:] == [b"x.toml", b""]
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_pid_exited_counts_zombies_as_exited() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )
    try:
        assert not launcher.pid_exited(proc.pid)
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not launcher.pid_exited(proc.pid):  # a zombie of ours is reaped on the way
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(10)


def test_kill_never_signals_a_reused_pid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = small_cluster(tmp_path)
    node = manifest.node("backend-1")
    # The recorded pid now belongs to some other process (as after a pid reuse).
    stranger = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL
    )
    try:
        manifest.path(node.pid_file).write_text(f"{stranger.pid}\n")
        assert launcher.running_pid(manifest, node) is None
        assert run_cli("kill", "--dir", str(tmp_path), "backend-1") == 1
        assert run_cli("stop", "--dir", str(tmp_path)) == 0
        capsys.readouterr()
        assert stranger.poll() is None  # untouched
    finally:
        stranger.kill()
        stranger.wait(10)


# ---------------------------------------------------------------------------
# The example configs in config/cluster/


def test_example_cluster_configs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = sorted(p.stem for p in EXAMPLES.glob("*.toml"))
    assert names == [
        "backend-1",
        "backend-2",
        "backend-3",
        "frontend-1",
        "frontend-2",
        "metadata-1",
    ]
    assert (EXAMPLES / "README.md").is_file()
    for path in EXAMPLES.glob("*.toml"):
        shutil.copy(path, tmp_path)
    certs.init_ca(tmp_path / "certs")
    for name in names:
        certs.issue(tmp_path / "certs", name, sans=["localhost", "127.0.0.1"])
    monkeypatch.chdir(tmp_path)  # the examples' paths are relative to the working directory
    expected_cluster_ports = {
        "metadata-1": 7001,
        "backend-1": 7101,
        "backend-2": 7102,
        "backend-3": 7103,
        "frontend-1": 7201,
        "frontend-2": 7202,
    }
    for name in names:
        config = load_config(Path(f"{name}.toml"))
        role = name.rsplit("-", 1)[0]
        assert config.node.id == name
        assert config.node.roles == [role]
        assert config.node.data_dir == f"./cluster-data/{name}"
        assert config.cluster.listen == f"127.0.0.1:{expected_cluster_ports[name]}"
        assert config.cluster.metadata == ["127.0.0.1:7001"]
        assert config.tls.cert == f"./certs/{name}.pem"
        assert config.tls.ca == "./certs/ca.pem"
        if role == "frontend":
            assert config.frontend.listen == f"127.0.0.1:647{name[-1]}"


# ---------------------------------------------------------------------------
# End to end: a real cluster of `mqd serve` processes


def _status(directory: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert run_cli("status", "--dir", str(directory), "--json") == 0
    return json.loads(capsys.readouterr().out)


def _entry(status: dict, node_id: str) -> dict:
    for key in ("frontends", "backends", "metadata"):
        for entry in status[key]:
            if entry["id"] == node_id:
                return entry
    raise AssertionError(node_id)


async def _send_and_receive(address: str, ca: str, queue_name: str) -> None:
    import mqd.client

    async with await mqd.client.connect(address, tls=launcher.client_ssl_context(ca)) as client:
        queue = await client.create_queue(queue_name, exist_ok=True)
        await queue.send(b"through the frontend")
        messages = await queue.receive(wait=5)
        assert [m.body for m in messages] == [b"through the frontend"]
        await queue.ack(*messages)


async def _backends_up_seen_by(address: str, ca: str, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            view = await launcher.frontend_cluster_view(address, Path(ca))
            if not launcher.backends_not_up(view, ids):
                return
        except Exception:
            if time.monotonic() >= deadline:
                raise
        assert time.monotonic() < deadline, f"frontend does not see {ids} up"
        await asyncio.sleep(0.2)


async def _list_queues(address: str, ca: str) -> list[str]:
    import mqd.client

    async with await mqd.client.connect(address, tls=launcher.client_ssl_context(ca)) as client:
        return await client.list_queues()


def _kill_everything_recorded(directory: Path) -> None:
    """Last-resort cleanup after a failed test: SIGKILL every node still running."""
    if not Manifest.exists(directory):
        return
    manifest = Manifest.load(directory)
    pids = {}
    for node in manifest.nodes:
        pid = launcher.running_pid(manifest, node)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            pids[node.id] = pid
    launcher._wait_exited(pids, 5)


@pytest.mark.timeout(120)
def test_cluster_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    directory = tmp_path / "cluster"
    d = str(directory)
    try:
        # start: 1 metadata, 2 backends, 1 frontend; prints the frontend address.
        code = run_cli(
            "start", "--dir", d, "--metadata", "1", "--backends", "2", "--frontends", "1",
            "--timeout", "45",
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        manifest = Manifest.load(directory)
        frontend = manifest.node("frontend-1").client_address
        assert out.split() == [frontend]

        status = _status(directory, capsys)
        assert [e["id"] for e in status["frontends"]] == ["frontend-1"]
        assert [e["id"] for e in status["backends"]] == ["backend-1", "backend-2"]
        assert [e["id"] for e in status["metadata"]] == ["metadata-1"]
        assert status["frontends"][0]["address"] == frontend
        for key in ("frontends", "backends", "metadata"):
            for entry in status[key]:
                assert set(entry) == {"id", "address", "pid", "up"}
                assert entry["up"] is True and isinstance(entry["pid"], int), entry
        ca = status["client_ca"]
        assert ca == str(directory / "certs" / "ca.pem")

        # A second start on a running cluster is refused.
        assert run_cli("start", "--dir", d) == 1
        assert "already running" in capsys.readouterr().err

        # A client over TLS, trusting client_ca only.
        asyncio.run(_send_and_receive(frontend, ca, "launcher-e2e"))

        # kill a backend: status shows it down, the rest up.
        killed_pid = _entry(status, "backend-2")["pid"]
        assert run_cli("kill", "--dir", d, "backend-2") == 0
        status = _status(directory, capsys)
        assert _entry(status, "backend-2") == {
            "id": "backend-2",
            "address": manifest.node("backend-2").cluster_address,
            "pid": None,
            "up": False,
        }
        assert _entry(status, "backend-1")["up"] and _entry(status, "frontend-1")["up"]
        with pytest.raises(ProcessLookupError):
            os.kill(killed_pid, 0)

        # restart it: up again, and the frontend sees it up.
        assert run_cli("restart", "--dir", d, "backend-2", "--timeout", "30") == 0
        assert "backend-2: started" in capsys.readouterr().out
        assert _entry(_status(directory, capsys), "backend-2")["up"] is True
        asyncio.run(_backends_up_seen_by(frontend, ca, ["backend-1", "backend-2"], 20))

        # stop: every node down, exit 0.
        assert run_cli("stop", "--dir", d) == 0
        report = capsys.readouterr().out
        assert report.splitlines()[0].startswith("frontend-1:")  # frontends first
        assert report.splitlines()[-1].startswith("metadata-1:")  # metadata last
        status = _status(directory, capsys)
        assert not any(e["up"] for k in ("frontends", "backends", "metadata") for e in status[k])

        # start again on the stopped cluster: same nodes and addresses, data kept;
        # --fsync rewrites the policy of every node's config on the way.
        assert run_cli("start", "--dir", d, "--fsync", "never", "--timeout", "45") == 0
        out, err = capsys.readouterr()
        assert out.split() == [frontend]
        assert 'fsync = "never" in every node\'s config now' in err
        for node in manifest.nodes:
            assert load_config(manifest.path(node.config)).storage.fsync == "never"
        assert "launcher-e2e" in asyncio.run(_list_queues(frontend, ca))
        asyncio.run(_send_and_receive(frontend, ca, "launcher-e2e-never"))
        assert run_cli("stop", "--dir", d) == 0
    finally:
        _kill_everything_recorded(directory)
