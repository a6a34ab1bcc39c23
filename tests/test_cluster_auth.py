"""Authentication in a cluster (protocol.md §7.17, §8.5): frontends authenticate
against the metadata role's catalog, through a cached AUTH_SNAPSHOT copy.

A real cluster of `mqd serve` processes (the local launcher), every node
configured with `[auth] required = true`; principals are made the way an
operator makes them, `mqd admin user|grant --data-dir <metadata's data dir>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import stat
import time

import pytest

import mqd.client
from mqd import auth, cli, launcher
from mqd.cluster.remote import RemoteAuthCatalog
from mqd.errors import Forbidden, QueueNotFound, Unauthenticated, Unavailable
from mqd.protocol import messages
from tests.cluster_helpers import running, tls_for

pytestmark = pytest.mark.timeout(240)

# How soon a change made with `mqd admin` must count on every frontend.
PROPAGATION_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("auth-cluster")
    manifest = launcher.create_cluster(directory, metadata=1, backends=2, frontends=2)
    for node in manifest.nodes:
        path = manifest.path(node.config)
        path.write_text(path.read_text() + "\n[auth]\nrequired = true\nfailure_delay_ms = 50\n")
    with running(manifest):
        yield manifest


def frontends(manifest: launcher.Manifest) -> list[str]:
    return [node.client_address for node in manifest.by_role("frontend")]


def root_token(manifest: launcher.Manifest) -> str:
    token = launcher.root_token(manifest)
    assert token is not None
    return token


def admin(manifest: launcher.Manifest, *args: str) -> str:
    """`mqd admin ARGS --data-dir <metadata-1's data dir>` in this process; its stdout."""
    (metadata,) = manifest.by_role("metadata")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["admin", *args, "--data-dir", str(manifest.path(metadata.data_dir))])
    assert code == 0, err.getvalue()
    return out.getvalue()


async def connect(manifest: launcher.Manifest, address: str, token: str | None):
    return await mqd.client.connect(address, tls=tls_for(manifest), token=token)


async def eventually(check, timeout_s: float = PROPAGATION_S):  # type: ignore[no-untyped-def]
    """Run `check` until it stops raising; fail if it still raises after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await check()
        except Exception:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.1)


async def test_a_client_without_a_valid_token_is_unauthenticated(cluster):
    for address in frontends(cluster):
        with pytest.raises(Unauthenticated):
            await connect(cluster, address, None)
        with pytest.raises(Unauthenticated):
            await connect(cluster, address, "mqd_0123456789ab_not-a-secret")


async def test_root_is_made_with_the_cluster_and_works_from_every_frontend(cluster):
    path = cluster.path(launcher.ROOT_TOKEN_NAME)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = root_token(cluster)
    one, two = frontends(cluster)
    async with (
        await connect(cluster, one, token) as first,
        await connect(cluster, two, token) as second,
    ):
        queue = await first.create_queue("root-queue", partitions=2)
        await second.queue("root-queue").send(b"from root")
        got = await queue.receive(wait=5)
        assert [m.body for m in got] == [b"from root"]
        await second.queue("root-queue").ack(*got)
        assert "root-queue" in await second.list_queues()
        stats = await second.stats()
        assert stats["cluster"]["nodes"]


async def test_a_user_added_on_metadata_works_on_every_frontend_at_once(cluster):
    token = admin(cluster, "user", "add", "alice").strip()
    started = time.monotonic()
    for address in frontends(cluster):

        async def hello(address: str = address) -> None:
            client = await connect(cluster, address, token)
            await client.ping()
            await client.close()

        await eventually(hello)
    assert time.monotonic() - started < PROPAGATION_S + 1


async def test_grants_are_enforced_through_the_cluster(cluster):
    token = admin(cluster, "user", "add", "carol").strip()
    one, two = frontends(cluster)
    async with await connect(cluster, one, root_token(cluster)) as root:
        await root.create_queue("orders-eu")
        await root.queue("orders-eu").send(b"for carol")
    async with (
        await connect(cluster, one, token) as first,
        await connect(cluster, two, token) as second,
    ):
        with pytest.raises(Forbidden) as caught:
            await first.queue("orders-eu").send(b"nope")
        assert caught.value.details["permission"] == "send"
        assert "'send'" in caught.value.message
        with pytest.raises(Forbidden) as caught:
            await second.create_queue("orders-us")
        assert caught.value.details["permission"] == "admin"
        # A forbidden queue and a missing one answer alike (protocol.md §8.2).
        with pytest.raises(Forbidden):
            await second.queue("no-such-queue").send(b"x")
        assert await first.list_queues() == []

        admin(cluster, "grant", "carol", "receive", "orders-*")

        async def can_receive(client: mqd.client.Client) -> list:
            return await client.queue("orders-eu").peek(max_messages=10)

        # Open connections see the grant within about a second, on either frontend.
        assert [m.body for m in await eventually(lambda: can_receive(first))] == [b"for carol"]
        assert [m.body for m in await eventually(lambda: can_receive(second))] == [b"for carol"]
        assert await second.list_queues() == ["orders-eu"]
        with pytest.raises(Forbidden) as caught:
            await second.queue("orders-eu").send(b"still no")
        assert caught.value.details["permission"] == "send"

        admin(cluster, "revoke", "carol", "receive", "orders-*")

        async def cannot_receive(client: mqd.client.Client) -> None:
            try:
                await can_receive(client)
            except Forbidden:
                return
            raise AssertionError("the revoked grant still counts")

        await eventually(lambda: cannot_receive(first))
        await eventually(lambda: cannot_receive(second))


async def test_the_creator_of_a_queue_gets_admin_on_it(cluster):
    token = admin(cluster, "user", "add", "bob").strip()
    admin(cluster, "grant", "bob", "admin", "bob-*")
    one, two = frontends(cluster)
    async with await connect(cluster, one, token) as first:
        await eventually(lambda: first.create_queue("bob-jobs"))
    acl = json.loads(admin(cluster, "acl", "bob", "--json"))
    assert {"principal": "bob", "pattern": "bob-jobs", "permission": "admin", "owner": True} in acl
    # Without the pattern grant, the creator grant alone still lets bob run his queue.
    admin(cluster, "revoke", "bob", "admin", "bob-*")
    async with await connect(cluster, two, token) as second:

        async def admin_own_queue() -> None:
            await second.set_queue_attributes("bob-jobs", visibility_timeout=45)

        await eventually(admin_own_queue)
        with pytest.raises(Forbidden):
            await second.create_queue("bob-other")
        assert await second.list_queues() == ["bob-jobs"]
        # `admin` only: sending needs a `send` grant.
        with pytest.raises(Forbidden) as caught:
            await second.queue("bob-jobs").send(b"mine")
        assert caught.value.details["permission"] == "send"
        await second.delete_queue("bob-jobs")
    # Deleting the queue took its grants with it (protocol.md §8.2).
    acl = json.loads(admin(cluster, "acl", "bob", "--json"))
    assert not any(g["pattern"] == "bob-jobs" for g in acl), acl


async def test_the_queue_quota_holds_across_frontends(cluster):
    # Each frontend counted a principal's creates on its own: creates made together
    # through two frontends all passed the check before any was counted. Metadata
    # now checks, creates and records the creator grant as one step.
    token = admin(cluster, "user", "add", "quinn", "--queues-per-principal-max", "3").strip()
    admin(cluster, "grant", "quinn", "admin", "quinn-*")
    one, two = frontends(cluster)
    async with (
        await connect(cluster, one, token) as first,
        await connect(cluster, two, token) as second,
    ):
        await eventually(lambda: first.list_queues("quinn-"))
        await eventually(lambda: second.list_queues("quinn-"))
        creates = [
            client.create_queue(f"quinn-{n}-{side}")
            for n in range(4)
            for side, client in enumerate((first, second))
        ]
        results = await asyncio.gather(*creates, return_exceptions=True)
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(refused) == 5, results
        for error in refused:
            assert isinstance(error, Forbidden), error
            assert error.details["limit"] == "queues_per_principal_max"
        made = await first.list_queues("quinn-")
        assert len(made) == 3
        acl = json.loads(admin(cluster, "acl", "quinn", "--json"))
        assert sorted(g["pattern"] for g in acl if g["owner"]) == made
        # Room again once one is deleted, through either frontend.
        await second.delete_queue(made[0])
        await first.create_queue("quinn-again")
        for name in [*made[1:], "quinn-again"]:
            await first.delete_queue(name)


async def test_known_tokens_log_in_while_metadata_is_down(cluster):
    token = admin(cluster, "user", "add", "dave").strip()
    admin(cluster, "grant", "dave", "send", "dave-*")
    async with await connect(cluster, frontends(cluster)[0], root_token(cluster)) as root:
        await root.create_queue("dave-q")
    for address in frontends(cluster):
        # Every frontend has the current snapshot (a HELLO refreshes it).
        client = await eventually(lambda address=address: connect(cluster, address, token))
        await client.close()
    (metadata,) = cluster.by_role("metadata")
    await asyncio.to_thread(launcher.stop_nodes, cluster, [metadata])
    try:
        for address in frontends(cluster):
            started = time.monotonic()
            async with await connect(cluster, address, token) as client:
                await client.queue("dave-q").send(b"metadata is down")
                with pytest.raises(Forbidden):
                    await client.queue("root-queue").send(b"still enforced")
            assert time.monotonic() - started < 5, "HELLO waited long on metadata"
            async with await connect(cluster, address, root_token(cluster)) as root:
                with pytest.raises(QueueNotFound):
                    await root.get_queue("never-made")
            with pytest.raises(Unauthenticated):
                await connect(cluster, address, None)
        # The frontends did notice, and went on with their cached copy.
        for node in cluster.by_role("frontend"):
            assert "auth.metadata_unreachable" in cluster.path(node.log).read_text()
    finally:
        await asyncio.to_thread(launcher.restart_node, cluster, metadata)
    # Back: changes count again.
    token2 = admin(cluster, "user", "rotate", "dave").strip()

    async def new_token_works() -> None:
        client = await connect(cluster, frontends(cluster)[1], token2)
        await client.close()

    await eventually(new_token_works, timeout_s=15)
    with pytest.raises(Unauthenticated):
        await connect(cluster, frontends(cluster)[1], token)


# --- the frontend's cache, without processes -------------------------------------------------


class FakeMetadata:
    """A `PlacementView` whose metadata answers AUTH_SNAPSHOT from an `auth.AuthState`."""

    def __init__(self) -> None:
        self.state = auth.AuthState()
        self.down = False
        self.requests: list[messages.AuthSnapshotRequest] = []

    async def metadata_call(self, request, *, timeout_s=None):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        if self.down:
            raise Unavailable("metadata is unreachable")
        grants = [g for gs in self.state.grants.values() for g in gs]
        grants += [
            auth.Grant(g.principal, g.pattern, g.permission, g.owner) for g in request.add_grants
        ]
        self.state = auth.AuthState(self.state.principals.values(), grants)
        if self.state.version == request.since_version:
            return messages.AuthSnapshotResponse(version=self.state.version)
        return messages.AuthSnapshotResponse(
            version=self.state.version,
            principals=[
                messages.AuthPrincipal(p.name, p.token_id, p.verifier, p.created_at_ms, p.limits)
                for p in self.state.principals.values()
            ],
            grants=[
                messages.AuthGrant(g.principal, g.pattern, g.permission, g.owner) for g in grants
            ],
        )


async def test_remote_auth_catalog_caches_and_survives_metadata_loss():
    now = [0.0]
    metadata = FakeMetadata()
    alice = auth.Principal("alice", "0123456789ab", "scrypt$1$1$1$00$00", 1, {"bytes_per_s": 5})
    metadata.state = auth.AuthState([alice], [auth.Grant("alice", "a-*", "send")])
    catalog = RemoteAuthCatalog(metadata, monotonic=lambda: now[0])  # type: ignore[arg-type]
    assert catalog.auth_state().principals == {} and catalog.version == 0

    state = await catalog.refresh_auth()
    assert state.principals == {"alice": alice} and state.allows("alice", "send", "a-1")
    assert catalog.version == metadata.state.version

    # Unchanged: metadata answers with the version only, the copy stays the same object.
    assert await catalog.refresh_auth() is state
    assert metadata.requests[-1].since_version == catalog.version

    # Metadata down: the cached copy, and no call again for AUTH_RETRY_S.
    metadata.down = True
    calls = len(metadata.requests)
    assert (await catalog.refresh_auth()).principals == {"alice": alice}
    assert (await catalog.refresh_auth()).principals == {"alice": alice}
    assert len(metadata.requests) == calls + 1
    now[0] += 1.5
    await catalog.refresh_auth()
    assert len(metadata.requests) == calls + 2

    # Back: changes arrive.
    metadata.down = False
    metadata.state = auth.AuthState([alice], [])
    now[0] += 1.5
    assert not (await catalog.refresh_auth()).allows("alice", "send", "a-1")


def test_auth_state_version_is_a_digest_of_the_contents():
    alice = auth.Principal("alice", "0123456789ab", "v", 1, {})
    one = auth.AuthState(
        [alice], [auth.Grant("alice", "q", "send"), auth.Grant("alice", "*", "receive")]
    )
    two = auth.AuthState(
        [alice], [auth.Grant("alice", "*", "receive"), auth.Grant("alice", "q", "send")]
    )
    assert one.version == two.version != 0
    assert auth.AuthState([alice], []).version != one.version
    rotated = auth.Principal("alice", "ba9876543210", "w", 1, {})
    assert auth.AuthState([rotated], []).version != auth.AuthState([alice], []).version
