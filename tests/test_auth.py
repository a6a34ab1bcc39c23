"""Authentication and authorisation against a real `mqd serve` (protocol.md §8, DESIGN.md §7).

Principals are made the way an operator makes them: `mqd admin user add` on
the node's host, writing the catalog of the running server's data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqd.client
from mqd import auth, cli
from mqd.certs import client_context, init_ca, issue
from mqd.config import load_config
from mqd.errors import (
    ConfigError,
    ConnectionClosed,
    ErrorCode,
    Forbidden,
    QueueNotFound,
    Unauthenticated,
)
from mqd.protocol import messages
from tests.test_server_protocol import RawConnection, expect_error

AUTH_REQUIRED = "[auth]\nrequired = true\nfailure_delay_ms = 200\n"


def write_config(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def admin(server, *args: str) -> str:
    """`mqd admin ARGS --data-dir DIR` in this process; its stdout (raises on failure)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["admin", *args, "--data-dir", str(server.data_dir)])
    assert code == 0, err.getvalue()
    return out.getvalue()


def add_user(server, name: str, *options: str) -> str:
    return admin(server, "user", "add", name, *options).strip()


@pytest.fixture
def secured(server_factory, tmp_path):
    """A single node with `[auth] required = true` and no principals yet."""
    return server_factory(config=write_config(tmp_path, AUTH_REQUIRED))


async def connect(server, token: str | None = None, **options) -> mqd.client.Client:
    return await mqd.client.connect(server.address, token=token, **options)


# --- authentication --------------------------------------------------------------------------


def test_required_auth_starts_with_no_users_and_the_first_is_made_on_the_host(secured):
    raw = RawConnection(secured.address)
    started = time.monotonic()
    answer = raw.request(messages.HelloRequest(client_name="anonymous"))
    error = expect_error(answer, ErrorCode.UNAUTHENTICATED)
    assert time.monotonic() - started >= 0.19, "answered before the fixed failure delay"
    assert "token" in error.message
    assert raw.is_closed_by_server()
    raw.close()

    token = add_user(secured, "alice")
    assert token.startswith("mqd_") and len(token) > 40

    async def main() -> None:
        async with await connect(secured, token) as client:
            assert await client.list_queues() == []

    asyncio.run(main())


def test_the_catalog_holds_only_a_salted_hash(secured):
    token = add_user(secured, "alice")
    catalog = (secured.data_dir / "catalog.db").read_bytes()
    secret = token.split("_", 2)[2]
    assert secret.encode() not in catalog
    listing = json.loads(admin(secured, "user", "list", "--json"))
    assert [row["name"] for row in listing] == ["alice"]
    assert secret not in json.dumps(listing)


@pytest.mark.parametrize(
    "kind", ["wrong secret", "unknown id", "not a token", "missing"], ids=lambda k: k
)
def test_a_bad_token_gets_unauthenticated_after_the_same_delay_and_the_connection_closes(
    secured, kind
):
    token = add_user(secured, "alice")
    token_id, secret = auth.parse_token(token)
    bad = {
        "wrong secret": f"mqd_{token_id}_{secret[:-2]}xx",
        "unknown id": f"mqd_{'0' * 12}_{secret}",
        "not a token": "hunter2",
        "missing": "",
    }[kind]
    raw = RawConnection(secured.address)
    started = time.monotonic()
    answer = raw.request(messages.HelloRequest(client_name="t", token=bad))
    elapsed = time.monotonic() - started
    expect_error(answer, ErrorCode.UNAUTHENTICATED)
    assert 0.19 <= elapsed < 1.5
    assert raw.is_closed_by_server()
    raw.close()

    async def main() -> None:
        with pytest.raises(Unauthenticated):
            await connect(secured, bad)

    asyncio.run(main())


def test_rotate_invalidates_the_old_token_even_on_an_open_connection(secured):
    old = add_user(secured, "alice")
    admin(secured, "grant", "alice", "admin", "*")

    async def main() -> None:
        open_client = await connect(secured, old)
        await open_client.create_queue("jobs")
        new = admin(secured, "user", "rotate", "alice").strip()
        assert new != old
        with pytest.raises(Unauthenticated):
            await connect(secured, old)
        async with await connect(secured, new) as client:
            assert await client.list_queues() == ["jobs"]
        # The connection that logged in with the old token ends at its next request
        # (the frontend re-reads the catalog within a second).
        await asyncio.sleep(1.1)
        with pytest.raises((Unauthenticated, ConnectionClosed)):
            await open_client.list_queues()
        await open_client.close()

    asyncio.run(main())


def test_remove_ends_a_principal(secured):
    token = add_user(secured, "alice")
    admin(secured, "grant", "alice", "send", "*")
    admin(secured, "user", "remove", "alice")
    assert json.loads(admin(secured, "user", "list", "--json")) == []
    assert json.loads(admin(secured, "acl", "--json")) == []

    async def main() -> None:
        with pytest.raises(Unauthenticated):
            await connect(secured, token)

    asyncio.run(main())


def test_user_add_refuses_a_duplicate_and_a_bad_name(secured, capsys):
    add_user(secured, "alice")
    assert cli.main(["admin", "user", "add", "alice", "--data-dir", str(secured.data_dir)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["admin", "user", "add", "no spaces", "--data-dir", str(secured.data_dir)]) == 1
    assert "principal name" in capsys.readouterr().err


def test_a_client_certificate_names_the_principal(server_factory, tmp_path):
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "node1", ["localhost", "127.0.0.1"])
    issue(certs, "carol", client=True)
    config = write_config(
        tmp_path,
        f"[tls]\ncert = '{certs / 'node1.pem'}'\nkey = '{certs / 'node1.key'}'\n"
        f"ca = '{certs / 'ca.pem'}'\nrequire_client_cert = true\n" + AUTH_REQUIRED,
    )
    server = server_factory(config=config)
    admin(server, "grant", "carol", "admin", "carol-*")
    admin(server, "grant", "carol", "send", "carol-*")
    admin(server, "grant", "carol", "send", "shared")
    context = client_context(
        str(certs / "ca.pem"), str(certs / "carol.pem"), str(certs / "carol.key")
    )

    async def main() -> None:
        async with await connect(server, tls=context) as client:
            await client.create_queue("carol-jobs")
            await client.queue("carol-jobs").send(b"hi")
            with pytest.raises(Forbidden) as caught:
                await client.create_queue("shared")
            assert caught.value.details["permission"] == "admin"
            assert await client.list_queues() == ["carol-jobs"]
        grants = json.loads(admin(server, "acl", "carol", "--json"))
        assert {
            "principal": "carol",
            "pattern": "carol-jobs",
            "permission": "admin",
            "owner": True,
        } in grants

    asyncio.run(main())


# --- authorisation ---------------------------------------------------------------------------


@pytest.fixture
def team(secured):
    """root, and principals with one permission each on `orders-*`."""
    tokens = {"root": add_user(secured, "root")}
    for name, permission in (("sender", "send"), ("reader", "receive"), ("boss", "admin")):
        tokens[name] = add_user(secured, name)
        admin(secured, "grant", name, permission, "orders-*")

    async def setup() -> None:
        async with await connect(secured, tokens["root"]) as root:
            await root.create_queue("orders-eu")
            await root.create_queue("orders-dlq")
            await root.create_queue("payroll")
            await root.queue("orders-eu").send(b"first")

    asyncio.run(setup())
    return secured, tokens


def test_every_permission_allowed_and_denied_names_the_permission(team):
    server, tokens = team

    async def forbidden(call, permission: str) -> None:
        with pytest.raises(Forbidden) as caught:
            await call
        assert caught.value.details["permission"] == permission
        assert repr(permission) in caught.value.message

    async def main() -> None:
        sender = await connect(server, tokens["sender"])
        reader = await connect(server, tokens["reader"])
        boss = await connect(server, tokens["boss"])
        orders = "orders-eu"
        # send
        await sender.queue(orders).send(b"from sender")
        await forbidden(reader.queue(orders).send(b"x"), "send")
        await forbidden(boss.queue(orders).send(b"x"), "send")
        # receive, ack, change visibility, peek
        await forbidden(sender.queue(orders).receive(max_messages=1), "receive")
        await forbidden(sender.queue(orders).peek(), "receive")
        got = await reader.queue(orders).receive(max_messages=10, visibility_timeout=30)
        assert len(got) == 2
        await reader.queue(orders).change_visibility(got[0], 60)
        await forbidden(sender.queue(orders).change_visibility(got[0], 0), "receive")
        await forbidden(sender.queue(orders).ack(got[0]), "receive")
        await reader.queue(orders).ack(got[0])
        # admin: create, delete, set attributes, purge, redrive
        for client in (sender, reader):
            await forbidden(client.create_queue("orders-us"), "admin")
            await forbidden(client.delete_queue(orders), "admin")
            await forbidden(client.set_queue_attributes(orders, visibility_timeout=5), "admin")
            await forbidden(client.purge_queue(orders), "admin")
            await forbidden(client.queue("orders-dlq").redrive(to=orders), "admin")
            await forbidden(client.stats(), "admin")
        await boss.set_queue_attributes(orders, visibility_timeout=5)
        await boss.purge_queue(orders)
        await boss.queue("orders-dlq").redrive(to=orders)
        await boss.create_queue("orders-us")
        await boss.delete_queue("orders-us")
        # A principal that may see a queue may look at it.
        for client in (sender, reader, boss):
            assert (await client.get_queue(orders))["name"] == orders
        # STATS is server-wide: admin on `*`.
        await forbidden(boss.stats(), "admin")
        for client in (sender, reader, boss):
            await client.close()

    asyncio.run(main())


def test_a_forbidden_queue_and_a_missing_queue_answer_alike(team):
    server, tokens = team

    async def main() -> None:
        async with await connect(server, tokens["sender"]) as sender:
            answers = []
            for name in ("payroll", "no-such-queue"):
                with pytest.raises(Forbidden) as caught:
                    await sender.queue(name).send(b"x")
                answers.append((caught.value.code, caught.value.details, caught.value.message))
                with pytest.raises(Forbidden):
                    await sender.get_queue(name)
            (code_a, details_a, message_a), (code_b, details_b, message_b) = answers
            assert (code_a, details_a) == (code_b, details_b)
            assert message_a.replace("payroll", "X") == message_b.replace("no-such-queue", "X")
            # Inside its pattern, a missing queue is simply missing.
            with pytest.raises(QueueNotFound):
                await sender.queue("orders-nowhere").send(b"x")

    asyncio.run(main())


def test_list_shows_only_visible_queues_and_prefix_patterns_match(team):
    server, tokens = team
    admin(server, "grant", "sender", "send", "payroll")

    async def main() -> None:
        async with await connect(server, tokens["sender"]) as sender:
            assert await sender.list_queues() == ["orders-dlq", "orders-eu", "payroll"]
            assert await sender.list_queues("orders") == ["orders-dlq", "orders-eu"]
        async with await connect(server, tokens["reader"]) as reader:
            assert await reader.list_queues() == ["orders-dlq", "orders-eu"]
        async with await connect(server, tokens["root"]) as root:
            assert await root.list_queues() == ["orders-dlq", "orders-eu", "payroll"]
        admin(server, "revoke", "sender", "send", "payroll")
        await asyncio.sleep(1.1)  # the frontend re-reads grants within a second
        async with await connect(server, tokens["sender"]) as sender:
            assert await sender.list_queues() == ["orders-dlq", "orders-eu"]

    asyncio.run(main())


def test_the_creator_gets_admin_and_a_dead_letter_target_needs_send(team):
    server, _tokens = team
    maker = add_user(server, "maker")
    admin(server, "grant", "maker", "admin", "team-*")

    async def main() -> None:
        async with await connect(server, maker) as client:
            await client.create_queue("team-dlq")
            await client.create_queue(
                "team-a", redrive_policy={"dead_letter_queue": "team-dlq", "max_receive_count": 3}
            )
            with pytest.raises(Forbidden) as caught:
                await client.create_queue(
                    "team-b",
                    redrive_policy={"dead_letter_queue": "payroll", "max_receive_count": 3},
                )
            assert caught.value.details["permission"] == "send"
        # Revoking the pattern leaves what maker created: creator grants are exact.
        admin(server, "revoke", "maker", "admin", "team-*")
        await asyncio.sleep(1.1)
        async with await connect(server, maker) as client:
            await client.set_queue_attributes("team-a", visibility_timeout=7)
            assert await client.list_queues() == ["team-a", "team-dlq"]
            with pytest.raises(Forbidden):
                await client.create_queue("team-c")
            await client.set_queue_attributes("team-a", redrive_policy={})
            await client.delete_queue("team-a")
        grants = json.loads(admin(server, "acl", "maker", "--json"))
        assert [g["pattern"] for g in grants] == ["team-dlq"], "a deleted queue's grants go with it"

    asyncio.run(main())


# --- secure defaults ---------------------------------------------------------------------------


def test_beyond_loopback_without_tls_the_server_refuses_to_start(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqd",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "not a loopback address" in result.stderr and "TLS and authentication" in result.stderr


def test_insecure_beyond_loopback_starts_with_a_warning_and_no_auth(server_factory, tmp_path):
    config = write_config(tmp_path, "[frontend]\ninsecure = true\n")
    server = server_factory(config=config, extra_args=("--listen", "0.0.0.0:0"))
    assert server.events("server.insecure"), "no warning at start"
    port = server.address.rsplit(":", 1)[1]

    async def main() -> None:
        async with await mqd.client.connect(f"127.0.0.1:{port}") as client:
            await client.create_queue("open")

    asyncio.run(main())


def test_tls_beyond_loopback_turns_authentication_on(tmp_path):
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "node1", ["localhost"])
    path = write_config(
        tmp_path,
        f"[frontend]\nlisten = '0.0.0.0:6470'\n[tls]\ncert = '{certs / 'node1.pem'}'\n"
        f"key = '{certs / 'node1.key'}'\n",
    )
    assert load_config(path).auth_enabled
    assert not load_config().auth_enabled
    insecure = write_config(
        tmp_path, "[frontend]\nlisten = '0.0.0.0:1'\ninsecure = true\n", "i.toml"
    )
    assert not load_config(insecure).auth_enabled
    with pytest.raises(ConfigError, match=r"quotas\.messages_per_s"):
        load_config(write_config(tmp_path, "[quotas]\nmessages_per_s = -1\n", "q.toml"))


# --- unit: tokens, verifiers, patterns ----------------------------------------------------------


def test_tokens_parse_and_verify_in_constant_form():
    token_id, secret, token = auth.new_token()
    assert auth.parse_token(token) == (token_id, secret)
    verifier = auth.make_verifier(secret)
    assert verifier.startswith("scrypt$") and secret not in verifier
    assert auth.check_secret(secret, verifier)
    assert not auth.check_secret(secret + "x", verifier)
    assert not auth.check_secret(secret, "garbage")
    assert auth.make_verifier(secret) != verifier, "salted"
    for bad in ("", "mqd_", "mqd_abc_def", "xyz_0123456789ab_s", f"mqd_{token_id}_"):
        assert auth.parse_token(bad) is None


@pytest.mark.parametrize(
    ("pattern", "queue", "matches"),
    [
        ("*", "anything", True),
        ("orders-*", "orders-eu", True),
        ("orders-*", "orders", False),
        ("orders", "orders", True),
        ("orders", "orders-eu", False),
        ("orders*", "orders.fifo", True),
    ],
)
def test_patterns(pattern, queue, matches):
    assert auth.validate_pattern(pattern) == pattern
    assert auth.pattern_matches(pattern, queue) is matches


@pytest.mark.parametrize("pattern", ["", "*-orders", "a b", "or*ders", "**"])
def test_bad_patterns(pattern):
    with pytest.raises(Exception, match="queue pattern"):
        auth.validate_pattern(pattern)


def test_root_has_everything_and_others_only_their_grants():
    state = auth.AuthState(grants=[auth.Grant("a", "x-*", "send")])
    assert state.allows("root", "admin", "anything")
    assert state.allows("a", "send", "x-1")
    assert not state.allows("a", "receive", "x-1")
    assert not state.allows("a", "send", "y")
    assert state.visible("a", "x-1") and not state.visible("b", "x-1")


def test_a_cluster_frontend_starts_with_authentication_on(tmp_path):
    """It authenticates against metadata's catalog (protocol.md §8.5, tests/test_cluster_auth.py)."""
    certs = tmp_path / "certs"
    init_ca(certs)
    issue(certs, "f1", ["localhost"])
    path = write_config(
        tmp_path,
        "[node]\nid = 'f1'\nroles = ['frontend']\n"
        "[frontend]\nlisten = '127.0.0.1:6471'\n"
        "[cluster]\nlisten = '127.0.0.1:7201'\nmetadata = ['127.0.0.1:7001']\n"
        f"[tls]\ncert = '{certs / 'f1.pem'}'\nkey = '{certs / 'f1.key'}'\nca = '{certs / 'ca.pem'}'\n"
        + AUTH_REQUIRED,
    )
    assert load_config(path).auth_enabled


def test_a_grant_to_a_name_without_a_token_says_so(secured):
    # Granting to a misspelt principal passed unnoticed. It is no error (a client
    # certificate's name needs no token), but the command now says so.
    add_user(secured, "alice")

    def granted(name: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(
                ["admin", "grant", name, "send", "q-*", "--data-dir", str(secured.data_dir)]
            )
        assert code == 0, err.getvalue()
        return err.getvalue()

    assert "no principal 'alcie' has a token" in granted("alcie")
    assert "note:" not in granted("alice")
