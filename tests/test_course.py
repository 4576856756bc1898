"""The course dialect: the codec with bytes, then byte-exact transcripts against the server."""

from __future__ import annotations

import math
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

from p2ppay.cli.main import build_parser, server_options
from p2ppay.ledger import SqliteLedger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig
from p2ppay.server.throttle import RegistrationConfig
from p2ppay.wire import course as c

from .conftest import FAST_SCRYPT, SERVER_NAME, Connect, closed_by_peer, registered

KEY = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEserverkey=="

# --- the codec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"REGISTER#alice", c.CourseRegister("alice", None)),
        (b"REGISTER#alice#500", c.CourseRegister("alice", 500)),
        (b"alice#5001", c.CourseLogin("alice", 5001)),
        (b"List", c.CourseList()),
        (b"Exit", c.CourseExit()),
        (b"alice#300#bob", c.CourseTransfer("alice", 300, "bob")),
        (b"REGISTER#bad name", c.CourseBadRegister("invalid name 'bad name'")),
        (b"REGISTER#alice#lots", c.CourseBadRegister("invalid deposit 'lots'")),
        (b"alice#80", c.CourseBadInput(b"alice#80", "the port must be 1024-65535")),
        (b"alice#-5#bob", c.CourseTransfer("alice", -5, "bob")),  # refused by the ledger
        (b"alice#5#bob#x", c.CourseBadInput(b"alice#5#bob#x", "not a course message")),
        (b"alice#1.5#bob", c.CourseTransfer("alice", None, "bob")),  # not whole: payer hears
        (b"alice#abc#bob", c.CourseTransfer("alice", None, "bob")),  # no digit at all: the same
        (b"alice##bob", c.CourseTransfer("alice", None, "bob")),
        (b"list", c.CourseBadInput(b"list", "not a course message")),
        (b"hello there", c.CourseBadInput(b"hello there", "not a course message")),
        (b"\xff\xfe", c.CourseBadInput(b"\xff\xfe", "not UTF-8")),
    ],
)
def test_parse(raw: bytes, message: c.CourseMessage) -> None:
    assert c.parse_message(raw) == message


def test_framing_rules() -> None:
    d = c.CourseDecoder()
    assert d.receive_chunk(b"List") == [c.CourseList()]  # no line ending: the chunk is one
    assert d.receive_chunk(b"List\r\n") == [c.CourseList()]
    assert d.receive_chunk(b"List\n") == [c.CourseList()]
    assert d.receive_chunk(b"List" + b"\x00" * 1020) == [c.CourseList()]  # NUL padding
    assert d.receive_chunk(b"List\n" + b"\x00" * 100) == [c.CourseList()]
    assert d.receive_chunk(b"REGISTER#a\nalice#5000\r\nList\n") == [
        c.CourseRegister("a", None),
        c.CourseLogin("alice", 5000),
        c.CourseList(),
    ]
    assert d.receive_chunk(b"List\nExit") == [c.CourseList(), c.CourseExit()]
    assert d.receive_chunk(b"\n\r\n") == []


def test_an_over_long_message_is_fatal() -> None:
    d = c.CourseDecoder(max_message=16)
    (bad,) = d.receive_chunk(b"x" * 100 + b"\nList\n")
    assert isinstance(bad, c.CourseBadInput) and bad.fatal


def test_roster() -> None:
    assert c.encode_roster(9700, "KEY", [("alice", "10.0.0.1", 5001), ("bob", "::1", 5002)]) == (
        b"9700\nKEY\n2\nalice#10.0.0.1#5001\nbob#::1#5002\n"
    )


# --- transcripts against the server ----------------------------------------------------------


class CourseClient:
    """A course client: raw bytes on a stream, one reply read per exchange."""

    def __init__(self, stream: trio.abc.Stream, ip: str) -> None:
        self.stream = stream
        self.ip = ip  # the address the server sees for this client

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def expect(self, reply: bytes) -> None:
        got = b""
        with trio.fail_after(5):
            while len(got) < len(reply):
                chunk = await self.stream.receive_some()
                assert chunk, f"connection closed after {got!r}; expected {reply!r}"
                got += chunk
        assert got == reply

    async def exchange(self, data: bytes, reply: bytes) -> None:
        await self.send(data)
        await self.expect(reply)

    async def closed(self) -> bool:
        with trio.fail_after(5):
            try:
                return await self.stream.receive_some() == b""
            except trio.BrokenResourceError:
                return True


CourseConnect = Callable[..., AbstractAsyncContextManager[CourseClient]]


@pytest.fixture(params=["memory", "loopback"])
async def course_connect(
    request: pytest.FixtureRequest, server: Server
) -> AsyncIterator[CourseConnect]:
    """Course clients over in-memory streams (with the address they claim), or over real
    loopback sockets (the address is then the observed 127.0.0.1): every transcript runs both."""
    server.server_public_key = KEY
    async with trio.open_nursery() as nursery:
        port = 0
        if request.param == "loopback":
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]

            async def accept(stream: trio.SocketStream) -> None:
                await server.handle_course_connection(stream, stream.socket.getpeername()[0])

            await nursery.start(trio.serve_listeners, accept, listeners)

        @asynccontextmanager
        async def _connect(ip: str = "10.0.0.1") -> AsyncIterator[CourseClient]:
            async with trio.open_nursery() as conns:
                stream: trio.abc.Stream
                if port:
                    stream, ip = await trio.open_tcp_stream("127.0.0.1", port), "127.0.0.1"
                else:
                    stream, server_side = trio.testing.memory_stream_pair()
                    conns.start_soon(server.handle_course_connection, server_side, ip)
                yield CourseClient(stream, ip)
                await trio.aclose_forcefully(stream)

        yield _connect
        nursery.cancel_scope.cancel()


def roster(balance: int, *users: tuple[str, str, int]) -> bytes:
    return c.encode_roster(balance, KEY, users)


async def test_register_login_list_exit(course_connect: CourseConnect) -> None:
    async with course_connect("10.0.0.1") as a:
        await a.exchange(b"List", b"Please login first\n")
        await a.exchange(b"REGISTER#alice", b"100 OK\n")
        await a.exchange(b"REGISTER#alice\n", b"210 FAIL\n")  # taken
        await a.exchange(b"REGISTER#ALICE\r\n", b"210 FAIL\n")  # taken, in any case
        await a.exchange(b"REGISTER#no way", b"210 FAIL\n")  # invalid name
        await a.exchange(b"REGISTER#rich#500\x00\x00\x00\x00", b"100 OK\n")
        await a.exchange(b"REGISTER#greedy#9999999", b"210 FAIL\n")  # over the deposit limit
        await a.exchange(b"nobody#5000", b"220 AUTH_FAIL\n")
        await a.exchange(b"alice#80", b"230 Input format error\n")
        await a.exchange(b"alice#5001", roster(10000, ("alice", a.ip, 5001)))
        await a.exchange(b"List\r\n", roster(10000, ("alice", a.ip, 5001)))
        await a.exchange(b"what is this", b"230 Input format error\n")
        await a.exchange(b"alice", b"230 Input format error\n")  # (a lookup in the seed flavour)
        await a.exchange(b"Exit", b"Bye\n")
        assert await a.closed()
    async with course_connect("10.0.0.2") as r:
        await r.exchange(b"rich#5002\n", roster(500, ("rich", r.ip, 5002)))


async def test_two_messages_in_one_chunk(course_connect: CourseConnect) -> None:
    async with course_connect() as a:
        await a.exchange(b"REGISTER#carol\nREGISTER#dave\r\n", b"100 OK\n100 OK\n")


async def test_transfer_between_course_clients(
    course_connect: CourseConnect, ledger: SqliteLedger
) -> None:
    async with (
        course_connect("10.0.0.1") as alice,
        course_connect("10.0.0.2") as bob,
        course_connect("10.0.0.3") as mallory,
    ):
        for who, name in ((alice, b"alice"), (bob, b"bob"), (mallory, b"mallory")):
            await who.exchange(b"REGISTER#" + name, b"100 OK\n")
        await alice.exchange(b"alice#5001", roster(10000, ("alice", alice.ip, 5001)))
        await bob.exchange(
            b"bob#5002", roster(10000, ("alice", alice.ip, 5001), ("bob", bob.ip, 5002))
        )
        # bob (the payee) forwards alice's message; the OK goes to alice, nothing to bob
        await bob.send(b"alice#300#bob")
        await alice.expect(b"Transfer OK!\n")
        await bob.exchange(b"List", roster(10300, ("alice", alice.ip, 5001), ("bob", bob.ip, 5002)))
        await alice.exchange(
            b"List", roster(9700, ("alice", alice.ip, 5001), ("bob", bob.ip, 5002))
        )
        # forwarded by someone who is not the payee (mallory is not even logged in, then is):
        # she gets Transfer Fail! herself and alice hears nothing (a stranger must not put
        # lines into the payer's connection; alice's next read below is her Transfer OK!)
        await mallory.exchange(b"alice#100#bob", b"Transfer Fail!\n")
        await mallory.exchange(
            b"mallory#5003",
            roster(
                10000,
                ("alice", alice.ip, 5001),
                ("bob", bob.ip, 5002),
                ("mallory", mallory.ip, 5003),
            ),
        )
        await mallory.exchange(b"alice#100#bob", b"Transfer Fail!\n")
        # The dialect trusts the payee's word (the README says so): logged in as the payee,
        # mallory's claim that alice paid her is settled; the OK goes to alice, nothing to her.
        await mallory.send(b"alice#100#mallory")
        await alice.expect(b"Transfer OK!\n")
        # A failing transfer forwarded by the payee is answered like a success: to the payer,
        # who waits for the outcome, and nothing to the payee. Insufficient funds, zero,
        # negative:
        for amount in (b"9601", b"0", b"-5", b"1.5", b"+5", b" 5", b"1" * 20, b"1e3", "٣".encode()):
            await bob.send(b"alice#" + amount + b"#bob")
            await alice.expect(b"Transfer Fail!\n")
        # a payer that does not exist: nobody to tell. (Newline-terminated: the next message
        # follows without waiting for a reply, and an unterminated chunk is one message.)
        await bob.send(b"ghost#5#bob\n")
        await bob.exchange(b"bob#5#bob", b"Transfer Fail!\n")  # paying oneself: the payer hears
        # bob heard nothing else: his next reply is the roster, and his balance is untouched
        await bob.exchange(
            b"List",
            roster(
                10300,
                ("alice", alice.ip, 5001),
                ("bob", bob.ip, 5002),
                ("mallory", mallory.ip, 5003),
            ),
        )
        await alice.exchange(
            b"List",
            roster(
                9600,
                ("alice", alice.ip, 5001),
                ("bob", bob.ip, 5002),
                ("mallory", mallory.ip, 5003),
            ),
        )
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 30000 and audit.transfers == 2


async def test_a_word_as_the_amount_fails_to_the_payer(
    course_connect: CourseConnect, ledger: SqliteLedger
) -> None:
    """Real clients forward the word their person typed as the amount. The payer waits for
    the outcome of that transfer like any other: it hears Transfer Fail!, and the payee hears
    nothing (a 230 to the payee would leave the payer waiting for ever and put the payee's
    replies one behind)."""
    async with course_connect("10.0.0.1") as ann, course_connect("10.0.0.2") as bob:
        await ann.exchange(b"REGISTER#ann", b"100 OK\n")
        await bob.exchange(b"REGISTER#bob", b"100 OK\n")
        await ann.exchange(b"ann#5001", roster(10000, ("ann", ann.ip, 5001)))
        both = (("ann", ann.ip, 5001), ("bob", bob.ip, 5002))
        await bob.exchange(b"bob#5002", roster(10000, *both))
        for amount in (b"abc", b"", b"ten", b"-"):
            await bob.send(b"ann#" + amount + b"#bob")
            await ann.expect(b"Transfer Fail!\n")
        # bob's next reply is the one to his List, in line: he was told nothing
        await bob.exchange(b"List", roster(10000, *both))
        await ann.exchange(b"List", roster(10000, *both))
        # from a sender that is not the payee such a line is no transfer of its own: no
        # course message (a seed client's DEPOSIT has that shape), and the payer hears nothing
        await ann.exchange(b"ann#abc#bob", b"230 Input format error\n")
        await ann.exchange(b"DEPOSIT#ann#500", b"230 Input format error\n")
        await bob.exchange(b"List", roster(10000, *both))
    audit = await ledger.audit()
    assert audit.conserved and audit.transfers == 0


async def test_login_takeover_and_disconnect(course_connect: CourseConnect) -> None:
    async with course_connect("10.0.0.1") as first:
        await first.exchange(b"REGISTER#alice", b"100 OK\n")
        await first.exchange(b"alice#5001", roster(10000, ("alice", first.ip, 5001)))
        async with course_connect("10.0.0.9") as second:
            await second.exchange(b"alice#6001", roster(10000, ("alice", second.ip, 6001)))
            await first.exchange(b"List", b"Please login first\n")  # taken over
        # the second connection dropped without Exit: alice is offline now
        async with course_connect("10.0.0.5") as third:
            await third.exchange(b"REGISTER#bob", b"100 OK\n")
            await third.exchange(b"bob#5005", roster(10000, ("bob", third.ip, 5005)))


async def test_course_and_native_accounts_never_mix(
    course_connect: CourseConnect, connect: Connect, ledger: SqliteLedger
) -> None:
    async with connect() as native, course_connect() as course_client:
        await registered(native, "nina", deposit=50)
        await course_client.exchange(b"REGISTER#nina", b"210 FAIL\n")  # names are shared
        await course_client.exchange(b"nina#5000", b"220 AUTH_FAIL\n")  # not a course account
        await course_client.exchange(b"REGISTER#cody", b"100 OK\n")
        await course_client.exchange(b"cody#5000", roster(10000, ("cody", course_client.ip, 5000)))
        # a course payee cannot pull money from a native account (nina has no course
        # connection to tell, and cody is told nothing)...
        await course_client.send(b"nina#10#cody\n")
        await course_client.exchange(b"List", roster(10000, ("cody", course_client.ip, 5000)))
        # ...nor can a native account log in as, or pay, a course account
        async with connect() as other:
            from p2ppay.client.connection import ServerError

            with pytest.raises(ServerError) as info:
                await other.login("cody", "anything at all")
            assert info.value.code == "auth_failed"
            with pytest.raises(ServerError) as info:
                await native.settle(uuid.uuid4(), "cody", 5, "AAAA")
            assert info.value.code == "unknown_payee"
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 10050 and audit.transfers == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_course_dialect_over_loopback(
    tls: bool,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
) -> None:
    server = Server(
        ledger,
        server_ctx,
        issuer,
        ServerConfig(scrypt=FAST_SCRYPT),
        server_public_key=KEY,
        course_tls=tls,
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            course_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, [], course_listeners)
            port = course_listeners[0].socket.getsockname()[1]
            stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
            if tls:
                stream = trio.SSLStream(stream, client_ctx, server_hostname=SERVER_NAME)
                await stream.do_handshake()
            a = CourseClient(stream, "127.0.0.1")
            await a.exchange(b"REGISTER#alice#100", b"100 OK\n")
            await a.exchange(b"alice#5000", roster(100, ("alice", "127.0.0.1", 5000)))
            await a.exchange(b"Exit", b"Bye\n")
            assert await a.closed()
            await trio.aclose_forcefully(stream)
            server.shutdown()


async def test_blank_lines_get_no_reply(course_connect: CourseConnect) -> None:
    """A blank line is no message: answering it would put a line in front of the reply to
    the client's next message. The connection goes on."""
    async with course_connect() as a:
        await a.send(b"\n")
        await a.send(b"\r\n\r\n")
        await a.send(b"\x00\x00\x00\n")
        await a.exchange(b"REGISTER#alice\n\n", b"100 OK\n")
        await a.exchange(b"\n\nalice#5001\r\n", roster(10000, ("alice", a.ip, 5001)))


async def test_course_clients_may_wait_for_their_person(
    autojump_clock: trio.testing.MockClock, server: Server
) -> None:
    """Not the native idle timeout (a menu-driven course client connects at start-up and
    waits for its person): course connections have their own, of hours."""
    cfg = server.config
    assert cfg.course_idle_timeout >= 3600 > 10 * cfg.anonymous_idle_timeout
    client_side, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_course_connection, server_side, "10.0.0.1")
        a = CourseClient(client_side, "10.0.0.1")
        await trio.sleep(cfg.course_idle_timeout - 1)
        await a.exchange(b"List", b"Please login first\n")
        silent_since = trio.current_time()
        assert await closed_by_peer(client_side, within=cfg.course_idle_timeout + 5)
        assert trio.current_time() - silent_since >= cfg.course_idle_timeout


def test_the_course_idle_timeout_flag() -> None:
    def options(*flags: str) -> float:
        args = build_parser().parse_args(["server", *flags])
        return server_options(args).config.course_idle_timeout

    assert options() == 4 * 3600
    assert options("--course-idle-timeout", "90") == 90
    assert options("--course-idle-timeout", "0") == math.inf  # off
    with pytest.raises(SystemExit):
        options("--course-idle-timeout", "-1")


GREETING = ServerConfig(scrypt=FAST_SCRYPT, course_greeting="Connection accepted.")


@pytest.mark.parametrize("config", [GREETING])
async def test_the_greeting_comes_once_on_each_connection(
    course_connect: CourseConnect,
) -> None:
    """Clients of the 2020-2021 editions wait for their server's greeting before they show
    a menu (--course-greeting): it comes first, once, and the replies after it are in line."""
    async with course_connect("10.0.0.1") as a:
        await a.expect(b"Connection accepted.\n")
        await a.exchange(b"REGISTER#alice", b"100 OK\n")
        await a.exchange(b"alice#5001", roster(10000, ("alice", a.ip, 5001)))
        async with course_connect("10.0.0.2") as b:
            await b.expect(b"Connection accepted.\n")
            await b.exchange(b"List", b"Please login first\n")
        await a.exchange(b"List", roster(10000, ("alice", a.ip, 5001)))
        await a.exchange(b"Exit", b"Bye\n")
        assert await a.closed()


def test_the_course_greeting_flag(capsys: pytest.CaptureFixture[str]) -> None:
    def greeting(*flags: str) -> str | None:
        args = build_parser().parse_args(["server", *flags])
        return server_options(args).config.course_greeting

    assert greeting() is None  # off: the first bytes a client gets answer its first message
    assert greeting("--course-greeting", "Connection accepted.") == "Connection accepted."
    for bad in ("two\nlines", "Connection accepted.\r\n", "a\rb", "a\u2028b", ""):
        with pytest.raises(SystemExit) as exited:
            greeting("--course-greeting", bad)
        assert exited.value.code == 2  # a usage error
        assert capsys.readouterr().err == (
            "p2ppay: --course-greeting must be one line of text, not empty and without a line "
            "break (leave the flag out for no greeting)\n"
        )
    with pytest.raises(ValueError, match="--course-greeting"):
        ServerConfig(course_greeting="a\nb")


@pytest.mark.parametrize(
    "config",
    [ServerConfig(scrypt=FAST_SCRYPT, registrations=RegistrationConfig(2, 600))],
)
async def test_new_accounts_per_address_are_limited(course_connect: CourseConnect) -> None:
    """REGISTER#name makes an account with money in it, at no cost to the caller: without a
    limit anyone could fill the ledger. Two per address here (--max-registrations-per-ip)."""
    async with course_connect("10.0.0.9") as a:
        await a.exchange(b"REGISTER#ann", b"100 OK\n")
        await a.exchange(b"REGISTER#ann", b"210 FAIL\n")  # taken: uses none of the allowance
        await a.exchange(b"REGISTER#bob", b"100 OK\n")
        await a.exchange(b"REGISTER#cat", b"210 FAIL\n")  # the address's allowance is used up
        await a.exchange(b"ann#5000", roster(10_000, ("ann", a.ip, 5000)))  # the others work
