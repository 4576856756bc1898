"""The security properties (docs/security.md): who may move money, who a peer is, and what
hostile input, guessing and floods get."""

from __future__ import annotations

import base64
import math
import os
import ssl
import uuid

import pytest
import trio
import trio.testing

from p2ppay import wire as p
from p2ppay.client.peer import Dialer, PeerConfig, PeerError, PeerIdentity, PeerKey
from p2ppay.ledger import SqliteLedger
from p2ppay.pki import Issuer, sign_acceptance
from p2ppay.server import Server, ServerConfig
from p2ppay.server.addresses import address_key
from p2ppay.server.throttle import (
    LoginThrottle,
    Refusal,
    RegistrationConfig,
    RegistrationLimit,
    ThrottleConfig,
)

from .conftest import (
    FAST_SCRYPT,
    KEYS,
    Connect,
    Open,
    acceptance,
    closed_by_peer,
    expect_error,
    login,
    pay,
    raw_tls,
    registered,
)

# --- P1: only an account's owner moves money out of it --------------------------------------


async def test_nobody_settles_a_payment_from_someone_elses_account(
    connect: Connect, ledger: SqliteLedger
) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob, connect() as carol:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob", deposit=100)
            await registered(carol, "carol")
            # carol accepted a payment from bob; alice (logged in) tries to settle it.
            pid = uuid.uuid4()
            bobs = acceptance(pid, "bob", "carol", 50)
            await expect_error("bad_acceptance", alice.settle(pid, "carol", 50, bobs))
            # The protocol has no way to name a payer: the session's account always pays.
            assert "payer" not in p.Settle.__struct_fields__
            assert (await bob.list()).balance == 100
            assert (await alice.list()).balance == 100
            assert (await carol.list()).balance == 0
    assert (await ledger.audit()).transfers == 0


async def test_forged_altered_and_replayed_acceptances_are_refused(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob:
            await registered(alice, "alice", deposit=100)
            await registered(bob, "bob")
            pid = uuid.uuid4()
            good = acceptance(pid, "alice", "bob", 10)
            forged_by_alice = base64.b64encode(
                sign_acceptance(KEYS["alice"].key, str(pid), "alice", "bob", 10)
            ).decode()
            for bad in (
                base64.b64encode(os.urandom(70)).decode(),  # random bytes
                forged_by_alice,  # signed, but not by bob
                "not base64 at all!",
            ):
                await expect_error("bad_acceptance", alice.settle(pid, "bob", 10, bad))
            # altered: bob accepted 10, not 99
            await expect_error("bad_acceptance", alice.settle(pid, "bob", 99, good))
            assert (await alice.settle(pid, "bob", 10, good)).balance == 90
            # replayed for another payment: refused; for the same one: the stored outcome
            other = uuid.uuid4()
            await expect_error("bad_acceptance", alice.settle(other, "bob", 10, good))
            assert (await alice.settle(pid, "bob", 10, good)).balance == 90
            assert (await bob.list()).balance == 10


async def test_a_replaced_sessions_key_stops_counting(connect: Connect) -> None:
    with trio.fail_after(10):
        async with connect() as alice, connect() as bob_old:
            await registered(alice, "alice", deposit=100)
            await registered(bob_old, "bob")
            settled = uuid.uuid4()
            old_acceptance = acceptance(settled, "alice", "bob", 10)
            await alice.settle(settled, "bob", 10, old_acceptance)
            old_key = KEYS["bob"]
            pending = uuid.uuid4()
            signed_earlier = base64.b64encode(
                sign_acceptance(old_key.key, str(pending), "alice", "bob", 20)
            ).decode()
            async with connect() as bob_new:
                await login(bob_new, "bob")  # a new session with a new key
                await expect_error(
                    "bad_acceptance", alice.settle(pending, "bob", 20, signed_earlier)
                )
                # ...while a retry of what was settled with the old key still gets its outcome
                assert (await alice.settle(settled, "bob", 10, old_acceptance)).balance == 90
                assert (await pay(alice, "bob", 20)).balance == 70  # the new key works


# --- P2: peers are who they claim ------------------------------------------------------------


async def test_payer_refuses_a_payee_with_another_name(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100) as alice,
            open_wallet("bob"),
            open_wallet("carol") as carol,
        ):
            assert alice.dialer is not None and carol.p2p_port is not None
            # The server says bob listens where carol does (a stale or lying address).
            where = p.Presence("bob", "127.0.0.1", carol.p2p_port)
            with pytest.raises(PeerError) as info:
                await alice.dialer.offer(where, p.Offer(uuid.uuid4(), "alice", "bob", 5))
            assert info.value.code == "wrong_peer"
            assert "'carol', not bob" in info.value.message


def foreign_identity(name: str) -> PeerIdentity:
    """A perfectly good certificate for ``name``, from a CA that is not the server's."""
    import datetime as dt

    stranger = Issuer.ephemeral()
    key = PeerKey()
    cert = stranger.issue(key.csr(name), name, dt.timedelta(hours=1))
    return PeerIdentity.build(name, key, cert.pem, stranger.ca_pem)


async def connects(ctx: ssl.SSLContext, port: int) -> bool:
    """True if a TLS connection to the listener works far enough to get an answer."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    try:
        await stream.do_handshake()
        await stream.send_all(p.encode_peer_message(p.Offer(uuid.uuid4(), "x", "y", 1)))
        return bool(await stream.receive_some())
    except trio.BrokenResourceError:
        return False
    finally:
        await trio.aclose_forcefully(stream)


async def test_certificates_not_from_the_servers_ca_are_refused(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            assert bob.p2p_port is not None and alice.identity is not None
            assert await connects(alice.identity.dialer_context, bob.p2p_port)  # the control
            impostor = await trio.to_thread.run_sync(foreign_identity, "alice")
            assert not await connects(impostor.dialer_context, bob.p2p_port)
            # ...and a payee with a foreign certificate is refused by the payer.
            fake_bob = await trio.to_thread.run_sync(foreign_identity, "bob")
            from p2ppay.client.peer import OfferListener, accept_all

            listener = OfferListener(fake_bob, accept_all)
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                await nursery.start(listener.serve, listeners)
                port = listeners[0].socket.getsockname()[1]
                dialer = Dialer(alice.identity, PeerConfig())
                with pytest.raises(PeerError) as info:
                    await dialer.offer(
                        p.Presence("bob", "127.0.0.1", port),
                        p.Offer(uuid.uuid4(), "alice", "bob", 5),
                    )
                assert info.value.code == "unreachable"
                nursery.cancel_scope.cancel()


async def test_a_client_without_a_certificate_cannot_reach_a_payee(open_wallet: Open) -> None:
    with trio.fail_after(30):
        async with open_wallet("bob") as bob:
            assert bob.identity is not None and bob.p2p_port is not None
            anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            anonymous.check_hostname = False
            anonymous.load_verify_locations(cadata=bob.identity.peer_ca)
            assert not await connects(anonymous, bob.p2p_port)
            assert bob.listener is not None and bob.listener.connections_accepted == 1


async def test_offers_waiting_per_payer_are_limited(open_wallet: Open) -> None:
    pondering = trio.Event()

    async def ponder(offer: p.Offer) -> bool:
        pondering.set()
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(30):
        async with (
            open_wallet("alice", deposit=100) as alice,
            open_wallet("bob", policy=ponder, peer_config=PeerConfig(max_offers_per_payer=1)),
        ):
            assert alice.identity is not None
            where = await alice.list()
            bob_at = next(u for u in where.online if u.name == "bob")
            first, second = Dialer(alice.identity), Dialer(alice.identity)  # two connections
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first.offer, bob_at, p.Offer(uuid.uuid4(), "alice", "bob", 1))
                await pondering.wait()  # the first offer is waiting for bob's decision
                answer = await second.offer(bob_at, p.Offer(uuid.uuid4(), "alice", "bob", 2))
                assert isinstance(answer, p.Decline)
                assert answer.reason == "too many of your offers are waiting already"
                nursery.cancel_scope.cancel()
            await first.aclose()
            await second.aclose()


# --- P5: hostile input and floods ------------------------------------------------------------


async def test_a_one_mebibyte_line_is_refused(
    server: Server, client_ctx: ssl.SSLContext, connect: Connect
) -> None:
    async with raw_tls(server, client_ctx, "10.7.7.7") as stream:
        client = p.ClientConnection()
        with trio.fail_after(10):
            await stream.send_all(
                b'{"id": 1, "op": "hello", "version": 1, "client": "' + b"x" * (1 << 20) + b'"}\n'
            )
            replies = []
            while True:
                event = client.next_event()
                if event is p.CLOSED:
                    break
                if event is p.NEED_DATA:
                    try:
                        client.receive_data(await stream.receive_some())
                    except trio.BrokenResourceError:
                        break
                    continue
                replies.append(event)
        assert replies == [p.ReplyError(None, "line_too_long", "line longer than 65536 bytes")]
    async with connect() as fine:  # and the server goes on
        await registered(fine, "after")


async def test_garbage_floods_leave_normal_clients_served(
    open_wallet: Open, server_port: int
) -> None:
    """200 hostile connections at once (silent, plain HTTP, random bytes) while two normal
    clients register, log in and pay."""
    rng = __import__("random").Random(1)
    opened: list[tuple[trio.SocketStream, str]] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def hostile(i: int) -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", server_port)
                kind = ("silent", "http", "random")[i % 3]
                opened.append((stream, kind))
                if kind == "http":
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: p2ppay\r\n\r\n")
                elif kind == "random":
                    await stream.send_all(rng.randbytes(512))
                # i % 3 == 0: say nothing at all, hold the connection open

            for i in range(200):
                nursery.start_soon(hostile, i)
        async with open_wallet("alice", deposit=100) as alice, open_wallet("bob") as bob:
            paid = await alice.pay("bob", 40)
            assert paid.balance == 60
            assert await bob.balance() == 40
        # Everything that was not TLS has been dropped by the server.
        for stream, kind in opened:
            if kind != "silent":
                assert await closed_by_peer(stream), kind
            await trio.aclose_forcefully(stream)


async def test_connection_limits(
    ledger: SqliteLedger, server_ctx: ssl.SSLContext, issuer: Issuer
) -> None:
    server = Server(ledger, server_ctx, issuer, ServerConfig(max_connections_per_ip=2))
    holders = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            client_side, server_side = trio.testing.memory_stream_pair()
            holders.append(client_side)
            nursery.start_soon(server.handle_connection, server_side, "10.8.8.8")
        await trio.testing.wait_all_tasks_blocked()
        assert server.admission.per_ip == {"10.8.8.8": 2}
        third_client, third_server = trio.testing.memory_stream_pair()
        with trio.fail_after(5):
            await server.handle_connection(third_server, "10.8.8.8")  # refused at once
        assert await third_client.receive_some() == b""
        _other_client, other_server = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_connection, other_server, "10.9.9.9")
        await trio.testing.wait_all_tasks_blocked()
        assert server.admission.per_ip == {"10.8.8.8": 2, "10.9.9.9": 1}
        nursery.cancel_scope.cancel()
    assert server.admission.connections == 0 and server.admission.per_ip == {}


# --- P6: guessing is rate limited -------------------------------------------------------------


async def test_twenty_wrong_passwords_lock_out_the_guessers_address_not_the_owner(
    autojump_clock: trio.testing.MockClock, connect: Connect, server: Server
) -> None:
    """Issue 9: 20 wrong guesses used to lock the account for everyone, renewably for ever.
    Now they lock the guessing address out of that account; the owner elsewhere is not."""
    lockout = server.config.throttle.account_lockout
    async with connect(request_timeout=math.inf) as owner:
        await registered(owner, "alice")
    async with connect("10.66.0.1", request_timeout=math.inf) as guesser:
        for i in range(20):
            await expect_error("auth_failed", guesser.login("alice", f"guess number {i}"))
        # The guesser's address is locked out, even with the right password...
        err = await expect_error("rate_limited", guesser.login("alice", "correct horse"))
        assert err.message.startswith(
            "too many failed logins to this account from your address; try again in "
        )
        first_wait = int(err.message.split()[-2])
        assert 0 < first_wait <= math.ceil(lockout)
    # ...but the owner, from another address, logs in...
    async with connect("10.1.1.1", request_timeout=math.inf) as owner:
        assert (await owner.login("alice", "correct horse")).name == "alice"
    # ...and that does not unlock the guesser, whose refused tries do not renew its lock.
    async with connect("10.66.0.1", request_timeout=math.inf) as guesser:
        for _ in range(3):
            err = await expect_error("rate_limited", guesser.login("alice", "correct horse"))
            assert int(err.message.split()[-2]) <= first_wait
    await trio.sleep(lockout + 1)
    async with connect("10.66.0.1", request_timeout=math.inf) as guesser:
        assert (await guesser.login("alice", "correct horse")).name == "alice"


async def test_an_address_block_does_not_stop_accounts_that_logged_in_from_it(
    autojump_clock: trio.testing.MockClock, connect: Connect, server: Server
) -> None:
    """Issue 22.10: 100 wrong logins from one address used to block every user there (a
    classroom behind one NAT; the walk-through on 127.0.0.1). The block now stops only accounts
    that have never logged in from that address; guessing at one that has is still held to the
    per-(account, address) lockout."""
    shared = "10.5.0.1"
    cfg = server.config.throttle
    async with connect(shared, request_timeout=math.inf) as client:
        await registered(client, "alice")
    async with connect(shared, request_timeout=math.inf) as client:
        await registered(client, "bob")
    async with connect("10.9.0.1", request_timeout=math.inf) as client:
        await registered(client, "carol")  # has logged in, but never from the shared address
    async with connect(shared, request_timeout=math.inf) as guesser:
        for i in range(cfg.max_address_failures):  # names that do not exist: no pair lockout
            await expect_error("auth_failed", guesser.login(f"nobody{i}", "a guess"))
        err = await expect_error("rate_limited", guesser.login("carol", "correct horse"))
        assert err.message.startswith("too many failed logins from your address; try again in ")
    for name in ("alice", "bob"):
        async with connect(shared, request_timeout=math.inf) as owner:
            assert (await owner.login(name, "correct horse")).name == name
    async with connect(shared, request_timeout=math.inf) as guesser:
        for i in range(cfg.max_account_failures):
            await expect_error("auth_failed", guesser.login("alice", f"guess {i}"))
        err = await expect_error("rate_limited", guesser.login("alice", "correct horse"))
        assert err.message.startswith("too many failed logins to this account from your address")


def test_a_blocked_address_admits_only_the_accounts_that_logged_in_from_it() -> None:
    now = [0.0]
    throttle = LoginThrottle(
        ThrottleConfig(max_address_failures=3, address_window=60), lambda: now[0]
    )
    throttle.succeeded("alice", "10.0.0.1")
    throttle.succeeded("bob", "10.0.0.2")
    for name in ("x", "y", "z"):
        throttle.failed(name, "10.0.0.1")
    assert throttle.admit("Alice", "10.0.0.1") is None  # canonical names: the same account
    assert throttle.admit("bob", "10.0.0.1") == Refusal(
        "too many failed logins from your address", 60
    )
    assert throttle.admit("carol", "10.0.0.1") is not None


def test_throttle_per_address_and_memory_bound() -> None:
    now = [0.0]
    throttle = LoginThrottle(
        ThrottleConfig(max_address_failures=3, address_window=60), lambda: now[0]
    )
    for name in ("a", "b", "c"):
        assert throttle.admit(name, "10.0.0.1") is None
        throttle.failed(name, "10.0.0.1")
    refusal = throttle.admit("d", "10.0.0.1")  # the address is blocked...
    assert refusal == Refusal("too many failed logins from your address", 60)
    assert throttle.admit("d", "10.0.0.2") is None  # ...not the next one
    now[0] = 61
    assert throttle.admit("d", "10.0.0.1") is None
    throttle.succeeded("a", "10.0.0.1")
    assert throttle.failures_in_a_row("a", "10.0.0.1") == 0
    assert throttle.failures_in_a_row("b", "10.0.0.1") == 1
    # An attacker cycling through names and addresses cannot grow the tables without bound.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("p2ppay.server.throttle.MAX_TRACKED", 50)
        for i in range(200):
            throttle.failed(f"name{i}", f"10.1.{i // 256}.{i % 256}")
    assert max(throttle.tracked().values()) <= 50


def test_a_guessed_at_account_slows_new_addresses_not_the_owners() -> None:
    """Many addresses guessing one account (each below the per-address lockout) put it on
    guard: addresses it has never logged in from share one check per interval, while the
    addresses its owner logged in from are not slowed; the guard ends after a quiet window."""
    now = [0.0]
    cfg = ThrottleConfig(guard_failures=10, guard_window=300, guard_interval=15)
    throttle = LoginThrottle(cfg, lambda: now[0])
    throttle.succeeded("alice", "10.1.1.1")  # the owner's usual address
    for i in range(10):
        assert throttle.admit("alice", f"10.66.0.{i}") is None
        throttle.failed("alice", f"10.66.0.{i}")
    # On guard: one new address gets its check...
    assert throttle.admit("alice", "10.77.0.1") is None
    # ...and the next ones, from anywhere new, wait for the interval...
    refusal = throttle.admit("alice", "10.77.0.2")
    assert refusal is not None and refusal.retry_after == 15
    assert refusal.reason.startswith("this account is being guessed at")
    # ...while the owner's address is let through every time, and other accounts are not
    # affected.
    for _ in range(3):
        assert throttle.admit("alice", "10.1.1.1") is None
    assert throttle.admit("bob", "10.77.0.2") is None
    now[0] = 15
    assert throttle.admit("alice", "10.77.0.2") is None
    throttle.succeeded("alice", "10.77.0.2")  # the owner, travelling: now a known address
    assert throttle.admit("alice", "10.77.0.2") is None
    # Each failure keeps the guard up; a full window without one ends it.
    throttle.failed("alice", "10.66.0.1")
    now[0] = 15 + 299
    assert throttle.admit("alice", "10.88.0.1") is None
    assert throttle.admit("alice", "10.88.0.2") is not None
    now[0] = 15 + 301
    assert throttle.admit("alice", "10.88.0.2") is None
    assert throttle.admit("alice", "10.88.0.3") is None


def test_an_ipv6_64_counts_as_one_address() -> None:
    assert (
        address_key("2001:db8:1:2::1")
        == address_key("2001:db8:1:2:ffff::9")
        == ("2001:db8:1:2::/64")
    )
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:10.0.0.1") == address_key("10.0.0.1") == "10.0.0.1"
    assert address_key("unknown") == "unknown"
    now = [0.0]
    throttle = LoginThrottle(ThrottleConfig(max_account_failures=2), lambda: now[0])
    throttle.failed("alice", "2001:db8:1:2::1")
    throttle.failed("alice", "2001:db8:1:2::2")  # another address, the same subscriber
    assert throttle.admit("alice", "2001:db8:1:2::3") is not None
    assert throttle.admit("alice", "2001:db8:1:3::1") is None


def test_the_throttle_counts_names_in_any_letter_case_as_one() -> None:
    now = [0.0]
    throttle = LoginThrottle(ThrottleConfig(max_account_failures=2), lambda: now[0])
    throttle.failed("Alice", "10.0.0.1")
    throttle.failed("ALICE", "10.0.0.1")
    assert throttle.admit("alice", "10.0.0.1") is not None  # one account, one count
    throttle.succeeded("alice", "10.0.0.2")
    assert throttle.admit("aLiCe", "10.0.0.2") is None


async def test_hashing_never_runs_on_the_event_loop(
    connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from p2ppay.passwords import verify_password

    in_thread: list[bool] = []

    def spy(password: str, stored: str) -> bool:
        in_thread.append(threading.current_thread() is not threading.main_thread())
        return verify_password(password, stored)

    monkeypatch.setattr("p2ppay.server.accounts.verify_password", spy)
    async with connect() as alice:
        await registered(alice, "alice")
    assert in_thread == [True]


def test_new_accounts_per_address_come_from_an_allowance_that_refills() -> None:
    now = [0.0]
    limit = RegistrationLimit(RegistrationConfig(3, 60), lambda: now[0])
    assert [limit.admit("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert limit.admit("10.0.0.1") == pytest.approx(20)  # 3 per 60 s: one each 20 s
    assert limit.admit("10.0.0.2") is None  # another address has its own
    assert limit.admit("2001:db8::1") is None
    assert limit.admit("2001:db8::2") is None  # ...and an IPv6 /64 is one address
    now[0] = 15
    assert limit.admit("10.0.0.1") == pytest.approx(5)
    now[0] = 20
    assert limit.admit("10.0.0.1") is None
    assert limit.admit("10.0.0.1") is not None
    limit.refund("10.0.0.1")  # no account was made after all: given back
    assert limit.admit("10.0.0.1") is None
    now[0] = 1000  # a long pause refills it, but no further than the allowance
    assert [limit.admit("10.0.0.1") for _ in range(4)][-1] is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("p2ppay.server.throttle.MAX_TRACKED", 50)
        for i in range(200):
            limit.admit(f"10.1.{i // 256}.{i % 256}")
    assert limit.tracked() <= 50


@pytest.mark.parametrize(
    "config",
    [ServerConfig(scrypt=FAST_SCRYPT, registrations=RegistrationConfig(2, 600))],
)
async def test_new_accounts_per_address_are_limited(connect: Connect) -> None:
    async with connect(ip="10.0.0.9") as client:
        await client.register("ann", "correct horse")
        await expect_error("name_taken", client.register("ann", "correct horse"))  # uses none
        await client.register("bob", "correct horse")
        refused = await expect_error("rate_limited", client.register("cat", "correct horse"))
        assert "try again in 300 s" in refused.message
        await login(client, "ann")  # what is there still works
    async with connect(ip="10.0.0.10") as other:
        await other.register("cat", "correct horse")  # another address is not affected


def test_every_login_limit_is_a_server_flag() -> None:
    from p2ppay.cli.main import build_parser, server_options

    flags = ["--login-failures", "--login-lockout", "--address-failures", "--address-window"]
    flags += ["--guard-failures", "--guard-window", "--guard-interval"]
    argv = ["server", *(x for i, flag in enumerate(flags) for x in (flag, str(i + 3)))]
    assert server_options(build_parser().parse_args(argv)).config.throttle == ThrottleConfig(
        3, 4, 5, 6, 7, 8, 9
    )
    defaults = server_options(build_parser().parse_args(["server"])).config.throttle
    assert defaults == ThrottleConfig()
