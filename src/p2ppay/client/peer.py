"""The peer-to-peer leg: the payee's TLS listener that answers offers, and the payer's links.

Both ends use mutual TLS with the short-lived certificates the server issued at login, trust
only the server's peer CA, and learn who the other end is from its verified certificate, never
from a message. The payee signs its acceptance; the payer carries that signature to the server.
"""

from __future__ import annotations

import base64
import logging
import select
import ssl
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from p2ppay import wire as p
from p2ppay.accepting import PatientListener
from p2ppay.client.outcomes import Outcome
from p2ppay.logs import LimitLog
from p2ppay.pki import make_csr, new_peer_key, sign_acceptance
from p2ppay.tls import explain_connect_failure, peer_contexts, peer_name
from p2ppay.wire.constraints import is_memo
from p2ppay.wire.errors import CodedError
from p2ppay.wire.names import NameMap, name_key

log = logging.getLogger("p2ppay.client.peer")

#: Decides an offer: True accepts, False declines. It may take as long as it likes; the
#: listener bounds it with :attr:`PeerConfig.decide_timeout` (no answer declines).
Policy = Callable[[p.Offer], Awaitable[bool]]


async def accept_all(offer: p.Offer) -> bool:
    return True


async def decline_all(offer: p.Offer) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class PeerConfig:
    handshake_timeout: float = 10.0
    #: a payer's connection with no offer for this long is closed by the payee
    idle_timeout: float = 120.0
    #: how long the payee's policy (a person at a prompt) may think; silence declines
    decide_timeout: float = 30.0
    #: how long the payer waits for the payee's answer (longer than decide_timeout)
    answer_timeout: float = 45.0
    connect_timeout: float = 10.0
    max_line: int = 4096
    #: the deepest nesting of JSON arrays and objects a peer's line may have
    max_depth: int = p.DEFAULT_MAX_DEPTH
    #: offers one payer may have waiting for a decision at once (the rest are declined)
    max_offers_per_payer: int = 4
    #: payer connections at once (those in the TLS handshake count); more are closed
    max_connections: int = 64
    #: ...and from one payer (by its certificate): a payer needs one link to a payee
    max_connections_per_payer: int = 4
    #: connections still in the TLS handshake at once; past this the oldest is dropped, so
    #: that sockets which never finish one (from however many addresses) cannot fill the
    #: payee's connections: a payer's handshake takes milliseconds
    max_handshaking: int = 16
    #: offers accepted lately that a payer may still report as not settled (the oldest go)
    remembered_offers: int = 1024


class PeerError(CodedError):
    """The payer could not get an answer from the payee; ``code`` says why."""

    code: Outcome

    def __init__(self, code: Outcome, message: str) -> None:
        super().__init__(code, message)


class LinkBroke(PeerError):
    """The open link an offer went out on broke before the payee answered."""


def _same_place(a: p.Presence, b: p.Presence) -> bool:
    return (a.ip, a.port) == (b.ip, b.port)


@final
class PeerKey:
    """This session's private key, made before login; the server certifies it."""

    def __init__(self) -> None:
        self.key = new_peer_key()

    def csr(self, name: str) -> str:
        return make_csr(self.key, name)

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass(slots=True)
class PeerIdentity:
    """Who we are to other peers: account name, key, the certificate the server issued."""

    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: str
    peer_ca: str
    listener_context: ssl.SSLContext = field(repr=False)
    dialer_context: ssl.SSLContext = field(repr=False)

    @classmethod
    def build(cls, name: str, key: PeerKey, certificate: str, peer_ca: str) -> PeerIdentity:
        """Blocking (writes the key to a private temporary file for the ssl module)."""
        listener, dialer = peer_contexts(certificate, key.private_pem(), peer_ca)
        return cls(name, key.key, certificate, peer_ca, listener, dialer)

    def accept(self, offer: p.Offer) -> p.Accept:
        signature = sign_acceptance(
            self.key, str(offer.payment_id), offer.payer, offer.payee, offer.amount, offer.memo
        )
        return p.Accept(offer.payment_id, base64.b64encode(signature).decode("ascii"))


class _Lines:
    """Read whole lines from a stream, with the peer line limit."""

    def __init__(self, stream: trio.abc.Stream, max_line: int) -> None:
        self.stream = stream
        self.buffer = p.LineBuffer(max_line)

    async def next(self) -> bytes | None:
        """The next non-blank line, or None at EOF."""
        while True:
            line = self.buffer.next_line()
            if line is not None:
                if line.strip():
                    return line
                continue
            data = await self.stream.receive_some()
            if not data:
                return None
            self.buffer.feed(data)


# --------------------------------------------------------------------------------------------
# Payee side
# --------------------------------------------------------------------------------------------


@final
class OfferListener:
    """Answers offers that payers send to this session's advertised port."""

    def __init__(
        self,
        identity: PeerIdentity,
        policy: Policy,
        config: PeerConfig | None = None,
        *,
        on_not_settled: Callable[[str, p.NotSettled], None] | None = None,
    ) -> None:
        self.identity = identity
        self.policy = policy
        self.config = config or PeerConfig()
        self.connections_accepted = 0
        self.connections_open = 0
        self._waiting: dict[str, int] = {}  # payer -> offers awaiting a decision
        self._per_payer: dict[str, int] = {}  # payer's name key -> its connections open
        self._handshaking: OrderedDict[object, trio.CancelScope] = OrderedDict()
        self._payers: set[trio.CancelScope] = set()  # one per payer connection past handshake
        #: our client has lost the server: no payer is taken until it is logged in again (the
        #: server calls us offline and could not tell us of a payment)
        self.offline = False
        # Offers we accepted (payment id -> the payer's name key): only those may be reported
        # as not settled, by that payer, once each.
        self._accepted: OrderedDict[uuid.UUID, str] = OrderedDict()
        #: told when a payer reports that an offer we accepted was not settled
        self.on_not_settled = on_not_settled
        self.limit_log = LimitLog(log)

    def _make_room(self) -> bool:
        """Drop the connection whose TLS handshake has taken longest (a payer's takes
        milliseconds; one that lingers is most likely not a payer). False if none is."""
        if not self._handshaking:
            return False
        _, oldest = self._handshaking.popitem(last=False)
        oldest.cancel()
        self.limit_log.hit("payer-handshakes", "made way for a new connection")
        return True

    def go_offline(self) -> None:
        """Close every payer's connection, those still in their handshake too, and take none
        until :meth:`go_online` (payers look us up again and hear that we are offline)."""
        self.offline = True
        for scope in (*self._payers, *self._handshaking.values()):
            scope.cancel()

    def go_online(self) -> None:
        self.offline = False

    def settled(self, payment_id: uuid.UUID) -> None:
        """The server says this payment reached us: no payer may call it unsettled now."""
        self._accepted.pop(payment_id, None)

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[list[trio.abc.Listener[Any]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # (Out of descriptors, trio's own loop would log a traceback ten times a second.)
        advice = "raise the open-file limit, ulimit -n"
        patient: list[trio.abc.Listener[Any]] = [
            PatientListener(one, self.limit_log, advice) for one in listeners
        ]
        await trio.serve_listeners(self._on_accept, patient, task_status=task_status)

    async def _on_accept(self, transport: trio.abc.Stream) -> None:
        await self.handle(transport)

    async def handle(self, transport: trio.abc.Stream) -> None:
        """Own one payer connection: handshake, then offers answered one at a time."""
        if self.offline:
            log.info("payer connection refused: we are offline (no server connection)")
            await trio.aclose_forcefully(transport)
            return
        if self.connections_open >= self.config.max_connections and not self._make_room():
            self.limit_log.hit("payer-connections", f"{self.connections_open} open")
            await trio.aclose_forcefully(transport)
            return
        self.connections_open += 1
        try:
            await self._handle(transport)
        finally:
            self.connections_open -= 1

    async def _handle(self, transport: trio.abc.Stream) -> None:
        self.connections_accepted += 1
        cfg = self.config
        stream = trio.SSLStream(transport, self.identity.listener_context, server_side=True)
        try:
            token = object()
            with trio.CancelScope() as evictable:
                if len(self._handshaking) >= cfg.max_handshaking:
                    self._make_room()
                self._handshaking[token] = evictable
                try:
                    with trio.move_on_after(cfg.handshake_timeout) as handshake:
                        await stream.do_handshake()
                finally:
                    self._handshaking.pop(token, None)
            # (cancel_called, not cancelled_caught: a handshake that had just completed when we
            # went offline, or made way, is not served either)
            if handshake.cancelled_caught or evictable.cancel_called or self.offline:
                log.info("payer connection: TLS handshake timed out, made way, or we went offline")
                return
            payer = peer_name(stream)
            if payer is None:  # cannot happen with CERT_REQUIRED, but never assume a name
                return
            # Many people may pay from one address (a classroom, a NAT): the per-source
            # limit is per payer, whose certificate says who it is.
            key = name_key(payer)
            if self._per_payer.get(key, 0) >= cfg.max_connections_per_payer:
                self.limit_log.hit("payer-connections-per-payer", f"{payer} has enough open")
                return
            self._per_payer[key] = self._per_payer.get(key, 0) + 1
            try:
                with trio.CancelScope() as closable:
                    self._payers.add(closable)
                    await self._serve_payer(stream, payer)
            finally:
                self._payers.discard(closable)
                left = self._per_payer[key] - 1
                if left:
                    self._per_payer[key] = left
                else:
                    del self._per_payer[key]
        except trio.BrokenResourceError as exc:
            log.info("payer connection failed: %s", exc.__cause__ or exc)
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_payer(self, stream: trio.SSLStream[Any], payer: str) -> None:
        """Offers from ``payer``, answered one at a time, until it leaves or falls silent."""
        cfg = self.config
        try:
            lines = _Lines(stream, cfg.max_line)
            while True:
                line = None
                with trio.move_on_after(cfg.idle_timeout):
                    line = await lines.next()
                if line is None:
                    return  # the payer left, or stayed silent too long
                message = p.decode_peer_message(line, cfg.max_depth)
                if isinstance(message, p.NotSettled):
                    # News only (no answer), and only of an offer this payer made and we
                    # accepted: nobody else can put words about payments on our screen.
                    if self._accepted.get(message.payment_id) == name_key(payer):
                        del self._accepted[message.payment_id]
                        if self.on_not_settled is not None:
                            self.on_not_settled(payer, message)
                    continue
                answer = await self._answer(payer, message)
                with trio.move_on_after(cfg.handshake_timeout) as write:
                    await stream.send_all(p.encode_peer_message(answer))
                if write.cancelled_caught:
                    return
        except trio.BrokenResourceError as exc:
            log.info("payer connection failed: %s", exc.__cause__ or exc)
        except p.RemoteProtocolError as exc:
            log.info("payer broke the protocol: %s", exc)
            try:
                await stream.send_all(p.encode_peer_message(p.Decline(None, exc.message[:200])))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _answer(self, payer: str, message: p.PeerMessage) -> p.Accept | p.Decline:
        if not isinstance(message, p.Offer):
            return p.Decline(None, "expected an offer")
        offer = message
        me = self.identity.name
        if name_key(offer.payee) != name_key(me):
            return p.Decline(offer.payment_id, f"this is {me}, not {offer.payee}")
        if name_key(offer.payer) != name_key(payer):
            # The certificate says who is paying; a message cannot claim otherwise.
            return p.Decline(offer.payment_id, f"your certificate names {payer}, not {offer.payer}")
        if offer.memo is not None and not is_memo(offer.memo):
            return p.Decline(offer.payment_id, "the memo has control characters")
        waiting = self._waiting.get(payer, 0)
        if waiting >= self.config.max_offers_per_payer:
            self.limit_log.hit("offers-per-payer", f"{payer} has {waiting} offers waiting")
            return p.Decline(offer.payment_id, "too many of your offers are waiting already")
        self._waiting[payer] = waiting + 1
        decision = False
        try:
            with trio.move_on_after(self.config.decide_timeout) as waited:
                decision = await self.policy(offer)
        finally:
            left = self._waiting[payer] - 1
            if left:
                self._waiting[payer] = left
            else:
                del self._waiting[payer]
        if waited.cancelled_caught:
            return p.Decline(offer.payment_id, "no answer in time")
        if not decision:
            return p.Decline(offer.payment_id, "declined")
        self._accepted[offer.payment_id] = name_key(payer)
        if len(self._accepted) > self.config.remembered_offers:
            self._accepted.popitem(last=False)
        return self.identity.accept(offer)


# --------------------------------------------------------------------------------------------
# Payer side
# --------------------------------------------------------------------------------------------


@final
class PeerLink:
    """One TLS connection to one payee, reused for every offer to them (one at a time)."""

    def __init__(
        self,
        payee: str,
        stream: trio.SSLStream[Any],
        max_line: int,
        max_depth: int = p.DEFAULT_MAX_DEPTH,
        where: p.Presence | None = None,
    ) -> None:
        self.payee = payee
        self.stream = stream
        self.lines = _Lines(stream, max_line)
        self.max_depth = max_depth
        #: where the payee was when we connected (a newer login listens elsewhere)
        self.where = where
        self.lock = trio.Lock()
        self.offers_sent = 0

    async def ask(self, offer: p.Offer) -> p.Accept | p.Decline:
        """Send the offer and wait for its answer (the caller bounds the wait)."""
        await self.stream.send_all(p.encode_peer_message(offer))
        self.offers_sent += 1
        while True:
            line = await self.lines.next()
            if line is None:
                raise trio.BrokenResourceError("the payee closed the connection")
            answer = p.decode_peer_message(line, self.max_depth)
            if isinstance(answer, p.Accept | p.Decline) and answer.payment_id == offer.payment_id:
                return answer
            if isinstance(answer, p.Decline) and answer.payment_id is None:
                return answer
            # An answer to an offer we gave up on earlier: skip it.

    def closed_by_payee(self) -> bool:
        """Whether the payee has closed this link, as far as can be told without reading:
        with no offer out, a payee sends nothing, so a socket with anything to read holds
        its close (or junk; the link is done either way)."""
        sock = getattr(self.stream.transport_stream, "socket", None)
        if sock is None:
            return False
        fd = sock.fileno()
        if fd < 0:  # closed here (dropped)
            return True
        if not hasattr(select, "poll"):  # (Windows: select, for the descriptors it can watch)
            try:
                return bool(select.select([fd], [], [], 0)[0])
            except (ValueError, OSError):
                return False
        poller = select.poll()  # (no limit on descriptor numbers, unlike select)
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@final
class Dialer:
    """The payer's links to payees, by name."""

    def __init__(self, identity: PeerIdentity, config: PeerConfig | None = None) -> None:
        self.identity = identity
        self.config = config or PeerConfig()
        self.links: NameMap[PeerLink] = NameMap()
        self._connecting: NameMap[trio.Lock] = NameMap()
        self.closed = False  # (the login these links were made for has ended)

    async def _link(self, where: p.Presence) -> PeerLink:
        lock = self._connecting.setdefault(where.name, trio.Lock())
        async with lock:
            if self.closed:
                raise PeerError(Outcome.NOT_LOGGED_IN, "logged out before the offer went out")
            link = self.links.get(where.name)
            if link is not None and link.where is not None and _same_place(link.where, where):
                return link
            if link is not None:  # the payee logged in again elsewhere: that link is stale
                await self.drop(where.name, link)
            link = await self._connect(where)
            if self.closed:  # logged out during the handshake
                await link.aclose()
                raise PeerError(Outcome.NOT_LOGGED_IN, "logged out before the offer went out")
            self.links[where.name] = link
            return link

    async def linked(self, name: str) -> PeerLink | None:
        """Our open link to ``name``, if we hold one that has not visibly closed.

        Their listener answering on it is as good as the server's word on where they are
        (the link is mutual TLS with their certificate for that login, and a payee's client
        closes its payers' links when it logs out or loses the server), so a payer may offer
        on it without asking the server first (:meth:`ask` with ``via``). A link the payee
        has closed is dropped here, before any offer goes out on it."""
        if self.closed:
            return None
        link = self.links.get(name)
        if link is None or link.lock.locked() or not link.closed_by_payee():
            return link  # (a link with an offer out is judged by that offer)
        await self.drop(name, link)
        return None

    @staticmethod
    def _explain(where: p.Presence, exc: BaseException) -> str:
        return explain_connect_failure(
            exc,
            untrusted="whoever answered is not a client of this server",
            closed=f"{where.name}'s client may be busy; try again",
        )

    async def _connect(self, where: p.Presence) -> PeerLink:
        cfg = self.config
        if where.port is None:
            raise PeerError(Outcome.UNREACHABLE, f"{where.name} is online but takes no payments")
        try:
            with trio.fail_after(cfg.connect_timeout):
                tcp = await trio.open_tcp_stream(where.ip, where.port)
        except (OSError, trio.TooSlowError) as exc:
            raise PeerError(
                Outcome.UNREACHABLE,
                f"cannot reach {where.name} at {where.ip} port {where.port}: "
                + self._explain(where, exc),
            ) from None
        stream = trio.SSLStream(tcp, self.identity.dialer_context)
        try:
            with trio.fail_after(cfg.handshake_timeout):
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            await trio.aclose_forcefully(stream)
            raise PeerError(
                Outcome.UNREACHABLE,
                f"no secure connection to {where.name}: " + self._explain(where, exc),
            ) from None
        presented = peer_name(stream)
        if presented is None or name_key(presented) != name_key(where.name):
            await trio.aclose_forcefully(stream)
            raise PeerError(
                Outcome.WRONG_PEER,
                f"the peer at {where.ip} port {where.port} is {presented!r}, not {where.name}",
            )
        return PeerLink(where.name, stream, cfg.max_line, cfg.max_depth, where)

    async def offer(
        self,
        where: p.Presence,
        offer: p.Offer,
        on_sent: Callable[[p.Offer], None] | None = None,
    ) -> p.Accept | p.Decline:
        """Ask the payee at ``where``: see :meth:`ask`."""
        answer, _ = await self.ask(where, offer, on_sent)
        return answer

    async def ask(
        self,
        where: p.Presence,
        offer: p.Offer,
        on_sent: Callable[[p.Offer], None] | None = None,
        *,
        via: PeerLink | None = None,
    ) -> tuple[p.Accept | p.Decline, PeerLink]:
        """Ask the payee at ``where``: their answer, and the link it came on. A broken
        reused link is replaced once; ``via`` (a link from :meth:`linked`, ``where`` its
        own) is the only link tried, and if it broke, :class:`LinkBroke` says so (the payee
        may be elsewhere now). ``on_sent`` is called once a secure connection to the payee
        is there and the offer goes out."""
        for attempt in (1, 2):
            link = via if via is not None else await self._link(where)
            try:
                async with link.lock:
                    if via is not None and link.closed_by_payee():
                        # (closed while another offer had it: nothing goes out on it)
                        raise trio.ClosedResourceError
                    if on_sent is not None and attempt == 1:
                        on_sent(offer)
                    with trio.fail_after(self.config.answer_timeout):
                        return await link.ask(offer), link
            except trio.TooSlowError:
                await self.drop(where.name, link)
                raise PeerError(Outcome.TIMED_OUT, f"{where.name} did not answer in time") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.drop(where.name, link)
                if via is not None:
                    raise LinkBroke(
                        Outcome.UNREACHABLE, f"the connection to {where.name} broke"
                    ) from None
                if attempt == 2:
                    raise PeerError(
                        Outcome.UNREACHABLE, f"the connection to {where.name} broke"
                    ) from None
            except p.RemoteProtocolError as exc:
                await self.drop(where.name, link)
                raise PeerError(
                    Outcome.BAD_ANSWER, f"{where.name} answered garbage: {exc}"
                ) from None
        raise AssertionError("unreachable")

    async def tell(self, name: str, news: p.NotSettled, link: PeerLink | None = None) -> None:
        """Best effort: send ``news`` on ``link`` (the one the offer went out on), else on the
        open link to ``name``, if there is one."""
        link = link or self.links.get(name)
        if link is None:
            return
        try:
            async with link.lock:
                with trio.move_on_after(self.config.handshake_timeout):
                    await link.stream.send_all(p.encode_peer_message(news))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.drop(name, link)

    async def drop(self, name: str, link: PeerLink | None = None) -> None:
        current = self.links.get(name)
        if current is not None and (link is None or current is link):
            del self.links[name]
            await current.aclose()
        elif link is not None:
            await link.aclose()

    async def aclose(self) -> None:
        self.closed = True
        for name in list(self.links):
            await self.drop(name)


async def open_offer_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Listen for payers on ``port`` (0: any free one), IPv4 and, on the same port, IPv6.

    The server tells payers the address it observed for us, which may be of either family.
    """
    if host is not None:
        return await trio.open_tcp_listeners(port, host=host)
    listeners = await trio.open_tcp_listeners(port, host="0.0.0.0")
    chosen = listeners[0].socket.getsockname()[1]
    try:
        listeners += await trio.open_tcp_listeners(chosen, host="::")
    except OSError:
        pass  # no IPv6 here, or the port is taken there: IPv4 alone will do
    return listeners
