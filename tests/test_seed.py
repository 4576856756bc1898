"""The seed flavour of the course dialect: the report's own program (../shared/seed/
part3-report.md, sections 五 and 六), replayed byte for byte over TLS, and what it may not do."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from p2ppay.cli.main import build_parser, server_options
from p2ppay.ledger import SqliteLedger
from p2ppay.pki import Issuer
from p2ppay.server import Server, ServerConfig
from p2ppay.wire import course as c

from .conftest import SERVER_NAME, Connect, registered
from .test_course import CourseClient

# --- the codec -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"REGISTER#ray", c.CourseSignUp("ray", None)),
        (b"REGISTER#ray#5566", c.CourseSignUp("ray", 5566)),  # a port, not a deposit
        (b"REGISTER#ray#80", c.CourseBadRegister("invalid port '80'")),
        (b"REGISTER#ray#99999", c.CourseBadRegister("invalid port '99999'")),
        (b"REGISTER#bad name", c.CourseBadRegister("invalid name 'bad name'")),
        (b"DEPOSIT#ray#500", c.CourseDeposit("ray", 500)),
        (b"DEPOSIT#ray#0", c.CourseDeposit("ray", 0)),  # refused by the ledger
        (b"DEPOSIT#ray#-5", c.CourseBadDeposit("invalid amount '-5'")),
        (b"DEPOSIT#ray#lots", c.CourseBadDeposit("invalid amount 'lots'")),
        (b"DEPOSIT#no one#5", c.CourseBadDeposit("invalid name 'no one'")),
        (b"may#3333", c.CourseLogin("may", 3333)),
        (b"rick#80", c.CourseBadInput(b"rick#80", "the port must be 1024-65535")),
        (b"List", c.CourseList()),
        (b"Exit", c.CourseExit()),
        (b"bill", c.CourseLookup("bill")),  # 五.2: "Payee account name: bill"
        (b"BILL", c.CourseLookup("BILL")),
        (b"no one", c.CourseBadInput(b"no one", "not a course message")),
        (b"nancy#300#bill", c.CoursePayment("nancy", 300, "bill")),
        (b"Paid#nancy#300#bill", c.CoursePayment("nancy", 300, "bill")),  # report, figure 5
        (b"Paid#300#bill", c.CoursePayment("Paid", 300, "bill")),  # an account called Paid
        (b"nancy#-3#bill", c.CoursePayment("nancy", -3, "bill")),  # refused by the ledger
        (b"nancy#1.5#bill", c.CoursePayment("nancy", None, "bill")),  # not a whole number
        (b"nancy#abc#bill", c.CoursePayment("nancy", None, "bill")),  # a word: refused the same
        (b"Paid#nancy##bill", c.CoursePayment("nancy", None, "bill")),
        (b"Sent#nancy#3#bill", c.CourseBadInput(b"Sent#nancy#3#bill", "not a course message")),
        (b"\xff", c.CourseBadInput(b"\xff", "not UTF-8")),
    ],
)
def test_parse(raw: bytes, message: c.CourseMessage) -> None:
    assert c.parse_seed_message(raw) == message


def test_the_flavours_read_the_same_bytes_differently() -> None:
    assert c.parse_message(b"REGISTER#ray#5566") == c.CourseRegister("ray", 5566)  # a deposit
    assert c.parse_message(b"nancy#300#bill") == c.CourseTransfer("nancy", 300, "bill")
    # a transfer's shape to the reference flavour, but no amount: 230 unless from the payee
    assert c.parse_message(b"DEPOSIT#ray#500") == c.CourseTransfer("DEPOSIT", None, "500")
    assert c.DIALECTS == {"reference": c.REFERENCE, "seed": c.SEED}
    assert c.parse_message(b"bill") == c.CourseBadInput(b"bill", "not a course message")
    assert c.SEED.roster(500, "KEY", [("ray", "127.0.0.1", 5566)]) == (
        b"Account Balance: 500\nOnline Clients: 1\nOnline Clients Info:\nray#127.0.0.1#5566\n"
    )
    online = [("tina", "::1", 3344), ("bill", "10.0.0.1", 1177)]
    assert c.SEED.roster(0, "KEY", online).endswith(b"tina#::1#3344\nbill#10.0.0.1#1177\n")
    assert c.REFERENCE.roster(0, "KEY", online) == b"0\nKEY\n2\nbill#10.0.0.1#1177\ntina#::1#3344\n"


@given(data=st.binary(max_size=600))
def test_the_seed_decoder_never_crashes(data: bytes) -> None:
    decoder = c.CourseDecoder(max_message=128, parse=c.SEED.parse)
    for message in decoder.receive_chunk(data):
        assert isinstance(message, c.CourseMessage)


def test_the_dialect_flag() -> None:
    default = server_options(build_parser().parse_args(["server", "--course-port", "8888"]))
    assert default.course_dialect is c.REFERENCE
    seed = server_options(
        build_parser().parse_args(["server", "--course-dialect", "seed", "--course-tls"])
    )
    assert seed.course_dialect is c.SEED and seed.course_tls
    with pytest.raises(SystemExit):
        build_parser().parse_args(["server", "--course-dialect", "klingon"])


# --- the report's transcripts, over TLS --------------------------------------------------------


def block(balance: int, *online: tuple[str, int]) -> bytes:
    """The report's List block, every client on 127.0.0.1 as in its screenshots."""
    return (
        f"Account Balance: {balance}\nOnline Clients: {len(online)}\nOnline Clients Info:\n"
        + "".join(f"{name}#127.0.0.1#{port}\n" for name, port in online)
    ).encode()


class SeedClient(CourseClient):
    """A course client over TLS that knows its source port and when the server let go of it."""

    def __init__(self, stream: trio.abc.Stream, ip: str, port: int, gone: trio.Event) -> None:
        super().__init__(stream, ip)
        self.port = port  # the source port the server sees (0 over an in-memory pipe)
        self.gone = gone  # set once the server is done with this connection

    async def abort(self) -> None:
        """Hang up without Exit (the report's Ctrl-C), and wait until the server noticed."""
        await trio.aclose_forcefully(self.stream)
        with trio.fail_after(5):
            await self.gone.wait()


SeedConnect = Callable[..., AbstractAsyncContextManager[SeedClient]]


@pytest.fixture
async def seed_server(
    ledger: SqliteLedger, server_ctx: ssl.SSLContext, issuer: Issuer, config: ServerConfig
) -> AsyncIterator[Server]:
    srv = Server(ledger, server_ctx, issuer, config, course_tls=True, course_dialect=c.SEED)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run_in_memory)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
async def seed_connect(
    seed_server: Server, client_ctx: ssl.SSLContext
) -> AsyncIterator[SeedConnect]:
    """``async with seed_connect() as ray``: a TLS client on a real loopback socket (the server
    sees 127.0.0.1 and the source port, as in the report); ``seed_connect("10.0.0.9")``: one
    over an in-memory pipe from that address."""
    server = seed_server
    gone: dict[int, trio.Event] = {}  # by source port
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def accept(stream: trio.SocketStream) -> None:
            ip, source_port = stream.socket.getpeername()[:2]
            done = gone.setdefault(source_port, trio.Event())
            try:
                await server.handle_course_connection(stream, ip, source_port)
            finally:
                done.set()

        await nursery.start(trio.serve_listeners, accept, listeners)

        @asynccontextmanager
        async def _connect(ip: str | None = None) -> AsyncIterator[SeedClient]:
            async with trio.open_nursery() as conns:
                transport: trio.abc.Stream
                if ip is None:
                    tcp = await trio.open_tcp_stream("127.0.0.1", port)
                    ip, source_port = "127.0.0.1", tcp.socket.getsockname()[1]
                    done = gone.setdefault(source_port, trio.Event())
                    transport = tcp
                else:
                    transport, server_side = trio.testing.memory_stream_pair()
                    source_port, done = 0, trio.Event()

                    async def run(ip: str = ip) -> None:
                        try:
                            await server.handle_course_connection(server_side, ip)
                        finally:
                            done.set()

                    conns.start_soon(run)
                stream = trio.SSLStream(transport, client_ctx, server_hostname=SERVER_NAME)
                yield SeedClient(stream, ip, source_port, done)
                await trio.aclose_forcefully(stream)

        yield _connect
        nursery.cancel_scope.cancel()


async def test_register_deposit_list_exit(seed_connect: SeedConnect) -> None:
    """五.1: ray registers with a port, deposits, lists, leaves."""
    async with seed_connect() as ray:
        await ray.exchange(b"REGISTER#ray#5566", b"100 OK\n")
        await ray.exchange(b"DEPOSIT#ray#500", b"DEPOSIT OK\n")
        await ray.exchange(b"List", block(500, ("ray", 5566)))
        await ray.exchange(b"Exit", b"Bye\n")
        assert await ray.closed()


async def test_duplicate_register_login_unknown_login(seed_connect: SeedConnect) -> None:
    """六.1: may registers without a port (her source port is listed), a second REGISTER of
    her name fails, she logs in again with her port, rick is unknown."""
    async with seed_connect() as may:
        await may.exchange(b"REGISTER#may", b"100 OK\n")
        await may.exchange(b"DEPOSIT#may#500", b"DEPOSIT OK\n")
        await may.exchange(b"List", block(500, ("may", may.port)))
        await may.exchange(b"Exit", b"Bye\n")
        assert await may.closed()
    async with seed_connect() as again:
        await again.exchange(b"REGISTER#may", b"210 FALL\n")
        await again.exchange(b"Exit", b"Bye\n")
    async with seed_connect() as may:
        await may.exchange(b"may#3333", block(500, ("may", 3333)))
        await may.exchange(b"Exit", b"Bye\n")
    async with seed_connect() as rick:
        await rick.exchange(b"rick#7777", b"220 AUTH_FALL\n")


async def test_two_clients_list_and_an_abrupt_disconnect(seed_connect: SeedConnect) -> None:
    """六.2: wako and tina list each other (in the order they came online); wako's Ctrl-C
    counts as Exit."""
    async with seed_connect() as wako, seed_connect() as tina:
        await wako.exchange(b"REGISTER#wako", b"100 OK\n")
        await wako.exchange(b"DEPOSIT#wako#10", b"DEPOSIT OK\n")
        await tina.exchange(b"REGISTER#tina", b"100 OK\n")
        await tina.exchange(b"DEPOSIT#tina#4500", b"DEPOSIT OK\n")
        both = (("wako", wako.port), ("tina", tina.port))
        await tina.exchange(b"List", block(4500, *both))
        await wako.exchange(b"List", block(10, *both))
        await wako.abort()
        await tina.exchange(b"List", block(4500, ("tina", tina.port)))


async def test_the_payer_settles(seed_connect: SeedConnect, ledger: SqliteLedger) -> None:
    """五.2: bill and nancy register; nancy pays bill 300 on a new connection from her address
    (after bill said OK on his own listener, which the server never sees)."""
    async with seed_connect() as bill, seed_connect() as nancy:
        await bill.exchange(b"REGISTER#bill#1177", b"100 OK\n")
        await bill.exchange(b"DEPOSIT#bill#50", b"DEPOSIT OK\n")
        await bill.exchange(b"List", block(50, ("bill", 1177)))
        await nancy.exchange(b"REGISTER#nancy#6688", b"100 OK\n")
        await nancy.exchange(b"DEPOSIT#nancy#1000", b"DEPOSIT OK\n")
        await nancy.exchange(b"List", block(1000, ("bill", 1177), ("nancy", 6688)))
        # "Payee account name: bill": where bill's client listens, before nancy connects to it
        await nancy.exchange(b"bill", b"On#127.0.0.1#1177\n")
        async with seed_connect() as settling:
            await settling.exchange(b"nancy#300#bill", b"Successful\n")
        # bill is told nothing: his next reply is his List
        await bill.exchange(b"List", block(350, ("bill", 1177), ("nancy", 6688)))
        await nancy.exchange(b"List", block(700, ("bill", 1177), ("nancy", 6688)))
        # the report's figure 5 prefix, on the payer's own connection
        await nancy.exchange(b"Paid#nancy#100#bill", b"Successful\n")
        await nancy.exchange(b"List", block(600, ("bill", 1177), ("nancy", 6688)))
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 1050 and audit.transfers == 2


async def test_the_payee_lookup(seed_connect: SeedConnect, connect: Connect) -> None:
    """The report's client asks for its payee by name and gets On#ip#port (五.2); the other
    answers are inferred (see the README): Off, the payment's unknown-payee words, and the
    flavour's Please login first."""
    async with seed_connect() as bill, seed_connect() as nancy, connect() as native:
        await registered(native, "nina")
        await nancy.exchange(b"bill", b"Please login first\n")
        await bill.exchange(b"REGISTER#bill#1177", b"100 OK\n")
        await nancy.exchange(b"bill\n", b"Please login first\n")  # bill is online: still
        await nancy.exchange(b"REGISTER#nancy#6688", b"100 OK\n")
        await nancy.exchange(b"bill", b"On#127.0.0.1#1177\n")
        await nancy.exchange(b"BILL\r\n", b"On#127.0.0.1#1177\n")  # names have no case
        await nancy.exchange(b"nancy", b"On#127.0.0.1#6688\n")  # (paying her is refused)
        await nancy.exchange(b"ghost", b"Failed: unknown payee\n")
        await nancy.exchange(b"nina", b"Failed: unknown payee\n")  # a native account: never
        await bill.exchange(b"Exit", b"Bye\n")
        assert await bill.closed()  # (the server has forgotten him by then)
        await nancy.exchange(b"bill", b"Off\n")
        async with seed_connect() as again:  # back, at another port: the lookup follows him
            await again.exchange(b"bill#2277", block(0, ("nancy", 6688), ("bill", 2277)))
            await nancy.exchange(b"bill", b"On#127.0.0.1#2277\n")
        async with seed_connect("10.0.0.9") as far:  # the address the server sees
            await far.exchange(
                b"bill#3377",
                b"Account Balance: 0\nOnline Clients: 2\nOnline Clients Info:\n"
                b"nancy#127.0.0.1#6688\nbill#10.0.0.9#3377\n",
            )
            await far.exchange(b"bill", b"On#10.0.0.9#3377\n")


async def test_refused_payments_move_nothing(
    seed_connect: SeedConnect, connect: Connect, ledger: SqliteLedger
) -> None:
    async with seed_connect() as bill, seed_connect() as nancy, connect() as native:
        await registered(native, "nina", deposit=5)
        await bill.exchange(b"REGISTER#bill#1177", b"100 OK\n")
        await bill.exchange(b"DEPOSIT#bill#50", b"DEPOSIT OK\n")
        await nancy.exchange(b"REGISTER#nancy#6688", b"100 OK\n")
        await nancy.exchange(b"DEPOSIT#nancy#1000", b"DEPOSIT OK\n")
        # over the balance, zero, negative, over --max-payment (bill has 50, nancy 1000)
        await bill.exchange(b"bill#51#nancy", b"Failed: insufficient balance\n")
        await bill.exchange(b"bill#0#nancy", b"Failed: invalid amount\n")
        await bill.exchange(b"bill#-5#nancy", b"Failed: invalid amount\n")
        await nancy.exchange(b"nancy#1000001#bill", b"Failed: invalid amount\n")
        # an amount with no digit at all (a word the person typed), or none: the same answer
        await nancy.exchange(b"nancy#abc#bill", b"Failed: invalid amount\n")
        await nancy.exchange(b"Paid#nancy##bill", b"Failed: invalid amount\n")
        # a payer naming someone else's account: logged in as bill, although from nancy's
        # address; from another address; for an account nobody is online as
        await bill.exchange(b"nancy#100#bill", b"Failed: not your account\n")
        async with seed_connect("10.0.0.9") as stranger:
            await stranger.exchange(b"nancy#100#stranger", b"Failed: not your account\n")
            await stranger.exchange(b"Paid#nancy#100#bill", b"Failed: not your account\n")
            # with no amount it is no payment the stranger could make: no course message
            await stranger.exchange(b"nancy#abc#bill", b"230 Input format error\n")
        async with seed_connect() as anonymous:
            await anonymous.exchange(b"nina#1#bill", b"Failed: not your account\n")
            await anonymous.exchange(b"ghost#1#bill", b"Failed: not your account\n")
        # a native payee, nobody, oneself
        await nancy.exchange(b"nancy#1#nina", b"Failed: unknown payee\n")
        await nancy.exchange(b"nancy#1#ghost", b"Failed: unknown payee\n")
        await nancy.exchange(b"nancy#1#nancy", b"Failed: cannot pay yourself\n")
        # not one of those moved anything, and nobody was told anything else
        both = (("bill", 1177), ("nancy", 6688))
        await bill.exchange(b"List", block(50, *both))
        await nancy.exchange(b"List", block(1000, *both))
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 1055 and audit.transfers == 0


async def test_deposits_and_registers_that_fail(
    seed_connect: SeedConnect, connect: Connect, ledger: SqliteLedger
) -> None:
    async with seed_connect() as ray, seed_connect() as may, connect() as native:
        await registered(native, "nina")
        await ray.exchange(b"List", b"Please login first\n")
        await ray.exchange(b"DEPOSIT#ray#5", b"DEPOSIT FAIL\n")  # not logged in
        await ray.exchange(b"REGISTER#ray#80", b"210 FALL\n")  # not a port to listen on
        await ray.exchange(b"REGISTER#no one", b"210 FALL\n")
        await ray.exchange(b"REGISTER#nina", b"210 FALL\n")  # names are shared with native
        await ray.exchange(b"nina#5000", b"220 AUTH_FALL\n")  # a native account: never
        await ray.exchange(b"REGISTER#ray#5566", b"100 OK\n")
        await may.exchange(b"REGISTER#may#3333", b"100 OK\n")
        await ray.exchange(b"DEPOSIT#may#5", b"DEPOSIT FAIL\n")  # someone else's account
        await ray.exchange(b"DEPOSIT#ray#0", b"DEPOSIT FAIL\n")
        await ray.exchange(b"DEPOSIT#ray#-1", b"DEPOSIT FAIL\n")
        await ray.exchange(b"DEPOSIT#ray#1000001", b"DEPOSIT FAIL\n")  # over --max-deposit
        await ray.exchange(b"DEPOSIT#nina#5", b"DEPOSIT FAIL\n")
        await ray.exchange(b"what is this", b"230 Input format error\n")
        # blank lines are no messages: no reply, the connection goes on
        await ray.send(b"\n")
        await ray.send(b"\r\n\r\n")
        await ray.exchange(b"List", block(0, ("ray", 5566), ("may", 3333)))
    audit = await ledger.audit()
    assert audit.conserved and audit.total_deposits == 0


async def test_a_second_login_takes_over_and_goes_last(seed_connect: SeedConnect) -> None:
    async with seed_connect() as first, seed_connect() as may:
        await first.exchange(b"REGISTER#ray#5566", b"100 OK\n")
        await may.exchange(b"REGISTER#may#3333", b"100 OK\n")
        async with seed_connect() as second:
            await second.exchange(b"ray#6000", block(0, ("may", 3333), ("ray", 6000)))
            await first.exchange(b"List", b"Please login first\n")
            await first.exchange(b"ray#5000#may", b"Failed: not your account\n")
        await may.exchange(b"List", block(0, ("may", 3333)))  # second hung up: ray is gone


async def test_the_real_listener_sees_the_source_port(
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    config: ServerConfig,
) -> None:
    server = Server(ledger, server_ctx, issuer, config, course_tls=True, course_dialect=c.SEED)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            course_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, [], course_listeners)
            port = course_listeners[0].socket.getsockname()[1]
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            source_port = tcp.socket.getsockname()[1]
            stream = trio.SSLStream(tcp, client_ctx, server_hostname=SERVER_NAME)
            may = CourseClient(stream, "127.0.0.1")
            await may.exchange(b"REGISTER#may", b"100 OK\n")
            await may.exchange(b"List", block(0, ("may", source_port)))
            await may.exchange(b"Exit", b"Bye\n")
            assert await may.closed()
            await trio.aclose_forcefully(stream)
            server.shutdown()


@pytest.mark.parametrize("greeting", [None, "Connection accepted."], ids=["off", "greeting"])
async def test_the_greeting_comes_after_the_tls_handshake(
    greeting: str | None,
    ledger: SqliteLedger,
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    issuer: Issuer,
    config: ServerConfig,
) -> None:
    """With --course-tls the greeting is the first thing inside TLS (a greeting before the
    handshake would break it), once; without --course-greeting nothing comes first."""
    config = dataclasses.replace(config, course_greeting=greeting)
    server = Server(ledger, server_ctx, issuer, config, course_tls=True, course_dialect=c.SEED)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            course_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(server.serve, [], course_listeners)
            port = course_listeners[0].socket.getsockname()[1]
            for name in (b"ray", b"may"):  # each new connection is greeted
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                stream = trio.SSLStream(tcp, client_ctx, server_hostname=SERVER_NAME)
                await stream.do_handshake()
                client = CourseClient(stream, "127.0.0.1")
                if greeting is not None:  # the client waits for it before it sends anything
                    await client.expect(b"Connection accepted.\n")
                await client.exchange(b"REGISTER#" + name + b"#5566", b"100 OK\n")
                await client.exchange(b"DEPOSIT#" + name + b"#5", b"DEPOSIT OK\n")
                await client.exchange(b"Exit", b"Bye\n")
                assert await client.closed()
                await trio.aclose_forcefully(stream)
            server.shutdown()
