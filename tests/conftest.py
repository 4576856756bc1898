"""Shared fixtures: a throwaway CA (trustme), a ledger on disk, an in-memory server."""

from __future__ import annotations

import base64
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import settings

from p2ppay import wire as p
from p2ppay.client.connection import Client, ServerError
from p2ppay.client.peer import PeerConfig, PeerKey, Policy, accept_all
from p2ppay.client.wallet import Wallet
from p2ppay.ledger import AnyLedger, Limits, open_ledger
from p2ppay.passwords import ScryptParams
from p2ppay.pki import Issuer, sign_acceptance
from p2ppay.server import Server, ServerConfig

from .pgdb import SKIP_REASON, admin_dsn, fresh_database

# Bounded examples in the normal suite; `nox -s fuzz` sets HYPOTHESIS_PROFILE=fuzz.
settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("fuzz", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Cheap hashing so that tests stay fast; the real default is tested on its own.
FAST_SCRYPT = ScryptParams(n=16, r=8, p=1)
SERVER_NAME = "p2ppay.test"

Connect = Callable[..., AbstractAsyncContextManager[Client]]
Open = Callable[..., AbstractAsyncContextManager[Wallet]]
PASSWORD = "correct horse"


@pytest.fixture(autouse=True)
def own_client_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every test (and every client process it starts) has a config and a state directory of
    its own: the developer's profile, environment and command history neither steer the
    tests nor get written by them. Returns the config directory's p2ppay folder."""
    home = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    for name in ("P2PPAY_SERVER", "P2PPAY_CAFILE", "P2PPAY_USER"):
        monkeypatch.delenv(name, raising=False)
    return home / "config" / "p2ppay"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME, "localhost", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def issuer() -> Issuer:
    return Issuer.ephemeral()


@pytest.fixture
def limits() -> Limits:
    return Limits()


@pytest.fixture
def config() -> ServerConfig:
    return ServerConfig(scrypt=FAST_SCRYPT)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | Path]:
    """Where the ``ledger`` fixture's ledger lives: an SQLite file, or a fresh PostgreSQL
    database (skipped, with the reason, without ``P2PPAY_TEST_POSTGRES``)."""
    if request.param == "sqlite":
        yield tmp_path / "ledger.sqlite3"
        return
    dsn = admin_dsn()
    if dsn is None:
        pytest.skip(SKIP_REASON)
    with fresh_database(dsn) as url:
        yield url


@pytest.fixture
async def ledger(ledger_target: str | Path, limits: Limits) -> AsyncIterator[AnyLedger]:
    """An open ledger, on each backend in turn (``ledger_target``)."""
    async with open_ledger(ledger_target, limits) as led:
        yield led


@pytest.fixture
async def server(
    ledger: AnyLedger, server_ctx: ssl.SSLContext, issuer: Issuer, config: ServerConfig
) -> AsyncIterator[Server]:
    srv = Server(ledger, server_ctx, issuer, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run_in_memory)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
def connect(server: Server, client_ctx: ssl.SSLContext) -> Connect:
    """``async with connect(ip="10.0.0.7") as client``: a client over an in-memory TLS pipe.

    Under ``autojump_clock`` pass ``request_timeout=math.inf``: the clock jumps while the
    ledger works in its thread, which would trip the client's own request timeout."""

    @asynccontextmanager
    async def _connect(ip: str = "10.0.0.1", request_timeout: float = 5) -> AsyncIterator[Client]:
        client_side, server_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.handle_connection, server_side, ip)
            stream = trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
            async with Client.over(stream, request_timeout=request_timeout) as client:
                yield client

    return _connect


#: Each test user's peer key, by name, so a test can sign a payee's acceptance.
KEYS: dict[str, PeerKey] = {}


async def registered(
    client: Client,
    name: str,
    password: str = "correct horse",
    p2p_port: int | None = None,
    deposit: int = 0,
) -> Client:
    """Register and log in ``client`` as ``name`` (with a certified peer key); deposit."""
    await client.register(name, password)
    await login(client, name, password, p2p_port)
    if deposit:
        await client.deposit(deposit)
    return client


async def login(
    client: Client, name: str, password: str = "correct horse", p2p_port: int | None = None
) -> p.LoginResult:
    KEYS[name] = key = PeerKey()
    return await client.login(name, password, p2p_port, key.csr(name))


def acceptance(payment_id: uuid.UUID, payer: str, payee: str, amount: int) -> str:
    """What the payee's listener would sign (with the payee's current key)."""
    signature = sign_acceptance(KEYS[payee].key, str(payment_id), payer, payee, amount)
    return base64.b64encode(signature).decode("ascii")


async def pay(
    payer: Client, payee: str, amount: int, payment_id: uuid.UUID | None = None
) -> p.SettleResult:
    """Settle as if ``payee`` had accepted the offer."""
    assert payer.user is not None
    pid = payment_id or uuid.uuid4()
    return await payer.settle(pid, payee, amount, acceptance(pid, payer.user, payee, amount))


async def next_event(client: Client, within: float = 5) -> p.Event:
    """The client's next pushed event, failing the test if none comes ``within`` seconds."""
    with trio.fail_after(within):
        return await client.next_event()


@pytest.fixture
async def server_port(
    ledger: AnyLedger, server_ctx: ssl.SSLContext, issuer: Issuer
) -> AsyncIterator[int]:
    server = Server(ledger, server_ctx, issuer, ServerConfig(scrypt=FAST_SCRYPT))
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(server.serve, listeners)
        yield listeners[0].socket.getsockname()[1]
        server.shutdown()


@pytest.fixture
def open_wallet(server_port: int, client_ctx: ssl.SSLContext) -> Open:
    """``async with open_wallet("bob", policy=accept_all, deposit=100) as bob``."""

    @asynccontextmanager
    async def _open(
        name: str,
        *,
        policy: Policy = accept_all,
        deposit: int = 0,
        peer_config: PeerConfig | None = None,
        connect: Callable[[], AbstractAsyncContextManager[Client]] | None = None,
        register: bool = True,
    ) -> AsyncIterator[Wallet]:
        def default_connect() -> AbstractAsyncContextManager[Client]:
            return Client.connect(
                "127.0.0.1", server_port, ssl_context=client_ctx, server_hostname="localhost"
            )

        async with Wallet.using(
            connect or default_connect,
            policy=policy,
            listen_host="127.0.0.1",
            peer_config=peer_config,
        ) as wallet:
            if register:
                await wallet.register(name, PASSWORD)
            await wallet.login(name, PASSWORD)
            if deposit:
                await wallet.deposit(deposit)
            yield wallet

    return _open


async def closed_by_peer(stream: trio.abc.Stream, within: float = 5) -> bool:
    """True once the other end has closed ``stream`` (reads hit EOF or the pipe is broken);
    False if it is still open after ``within`` seconds, so ``assert await closed_by_peer(s)``
    fails, rather than hangs, when the peer keeps the connection."""
    with trio.move_on_after(within):
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def expect_error(code: str, coro: Awaitable[object]) -> ServerError:
    """Await ``coro``; it must fail with the server error ``code``."""
    with pytest.raises(ServerError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


@asynccontextmanager
async def raw_tls(
    server: Server, client_ctx: ssl.SSLContext, ip: str
) -> AsyncIterator[trio.SSLStream[trio.abc.Stream]]:
    """A bare TLS stream to ``server`` over an in-memory pipe, for tests that speak bytes."""
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_side, ip)
        yield trio.SSLStream(client_side, client_ctx, server_hostname=SERVER_NAME)
        nursery.cancel_scope.cancel()


class SettleCutter(trio.abc.Stream):
    """A TLS stream to the server that, once ``armed``, cuts the connection at the next settle
    request: ``after`` it is sent (the request may be done, its reply is lost; then it disarms),
    or instead of sending it (the request never reaches the server; it stays armed)."""

    def __init__(self, inner: trio.SSLStream[Any], *, after: bool, op: str = "settle") -> None:
        self.inner = inner
        self.after = after
        self.armed = False
        self.marker = f'"op":"{op}"'.encode()  # (another op's requests are cut the same way)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        settle = self.armed and self.marker in bytes(data)
        if settle and not self.after:
            await trio.aclose_forcefully(self.inner.transport_stream)
            raise trio.BrokenResourceError("severed")
        await self.inner.send_all(data)
        if settle:
            self.armed = False
            await trio.aclose_forcefully(self.inner.transport_stream)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (its URL), dropped after the test; skipped without
    ``P2PPAY_TEST_POSTGRES``."""
    dsn = admin_dsn()
    if dsn is None:
        pytest.skip(SKIP_REASON)
    with fresh_database(dsn) as url:
        yield url
