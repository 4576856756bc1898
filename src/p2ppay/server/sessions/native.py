"""A native-protocol connection: requests read through the sans-I/O
:class:`~p2ppay.protocol.ServerConnection`, answered one at a time, one handler per op.

The session never parses bytes and never writes SQL: it asks :class:`~.accounts.Accounts` who
someone is, :class:`~.presence.Presence` who is online, and the ledger to move money. Whether
it may act for its user (logged in, replaced by a newer login) is its own state.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, final

import trio

from p2ppay import __version__
from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.receipts import ReceiptFacts
from p2ppay.server import listing
from p2ppay.server.errors import LEDGER_CODES, RequestFailed
from p2ppay.server.sessions.base import Host, SessionBase
from p2ppay.wire.constraints import memo_problem
from p2ppay.wire.names import name_key

log = logging.getLogger("p2ppay.server")


@final
class _Encoded:
    """A handler's result already encoded as JSON (built from cached pieces)."""

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json


@final
class Session(SessionBase):
    """One client connection: reads requests, answers them in order, and takes pushed events."""

    course: ClassVar[bool] = False

    def __init__(self, host: Host, stream: trio.SSLStream[trio.abc.Stream], ip: str) -> None:
        super().__init__(host, stream, ip)
        self.conn = p.ServerConnection(host.config.max_line, host.config.max_depth)
        #: when this connection became anonymous (connected, or logged out)
        self.anonymous_since = trio.current_time()
        #: when the first bytes of the request line now arriving were seen
        self.line_started: float | None = None
        self.p2p_port: int | None = None
        #: a newer login of the same account took over: nothing more is done for the user
        self.replaced_by: str | None = None

    @property
    def listed_port(self) -> int | None:
        return self.p2p_port

    def replaced(self, by_ip: str) -> None:
        log.info(
            "%s: %s logged in again from %s; closing the old session", self.ip, self.user, by_ip
        )
        self.replaced_by = by_ip
        self.send_soon(
            p.encode_event(p.SessionReplaced(f"{self.user} logged in from {by_ip}")),
            then_close=True,
        )

    def paid(self, transfer: lg.Transfer) -> None:
        t = transfer
        self.push(p.PaymentReceived(t.payment_id, t.payer, t.amount, t.payee_balance, t.memo))

    def push(self, event: p.Event) -> None:
        """Deliver an event without making the caller wait for this peer."""
        if self.conn.state is p.State.AUTHENTICATED:
            self.send_soon(self.conn.send_event(event))

    async def close_stream(self) -> None:
        # A polite close (TLS close_notify) only if nobody is writing and the peer takes it
        # promptly; otherwise drop the transport.
        cut = self.cancel_scope.cancel_called and not self._woken_in_idle_read
        if cut or self._write_timed_out or self._out.busy:
            await trio.aclose_forcefully(self.stream)
            return
        with trio.move_on_after(1) as scope:
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)

    # -- reading requests --

    async def serve(self) -> None:
        cfg = self.host.config
        while True:
            if self.host.closing:
                # Woken in the idle read, the session's scope is cancelled (the read may have
                # completed anyway): run() says goodbye, outside it.
                if not self._woken_in_idle_read:
                    await self.goodbye()
                return
            try:
                event = self.conn.next_event()
            except p.RemoteProtocolError as exc:
                log.info("%s: protocol error: %s", self.ip, exc)
                await self.send(self.conn.send_error(None, exc.code, exc.message))
                return
            if event is p.NEED_DATA:
                data: bytes | bytearray | None = None
                # A fresh scope per read: shutdown cancels it to stop reading. Its deadline
                # is a total, not per read, so bytes that trickle in do not push it back: the
                # end of the request line now arriving, and the login of an anonymous
                # connection.
                if self.conn.partial and self.line_started is None:
                    self.line_started = trio.current_time()
                deadline = math.inf
                if self.user is None:
                    deadline = self.anonymous_since + cfg.anonymous_idle_timeout
                if self.line_started is not None:
                    deadline = min(deadline, self.line_started + cfg.line_timeout)
                if deadline == math.inf:
                    # A logged-in client between requests, the common case: no scope of its
                    # own (a scope per request was ~5 % of a `list`'s CPU). Shutdown cancels
                    # the whole session while it waits here; run() then says goodbye.
                    self.idle_read = True
                    try:
                        data = await self.stream.receive_some(cfg.receive_size)
                    finally:
                        self.idle_read = False
                else:
                    scope = self.receive_scope = trio.CancelScope(deadline=deadline)
                    with scope:
                        data = await self.stream.receive_some(cfg.receive_size)
                if data is None:
                    if self.host.closing:
                        continue  # woken for shutdown; the loop's first check ends the session
                    await self._timed_out()
                    return
                self.conn.receive_data(data)
            elif event is p.CLOSED:
                return
            elif isinstance(event, p.Rejected):
                self.line_started = None
                log.debug("%s: rejected request: %s", self.ip, event.message)
                await self.send(self.conn.send_error(event.id, event.code, event.message))
            else:
                assert not isinstance(event, p.Sentinel)
                self.line_started = None
                self.answering = True  # events queued meanwhile go out with the reply
                self.answering_a_write = p.op_of(event) not in _READS
                try:
                    await self.send(await self._answer(event))
                finally:
                    self.answering = False

    async def goodbye(self) -> None:
        await self._refuse_buffered_requests()
        await self.send(self.conn.send_event(p.ServerClosing("the server is shutting down")))

    async def _timed_out(self) -> None:
        cfg = self.host.config
        if self.line_started is not None and (
            self.user is not None
            or self.line_started + cfg.line_timeout
            <= self.anonymous_since + cfg.anonymous_idle_timeout
        ):
            self.host.limit_log.hit(
                "line-timeout", f"{self.ip}: a request line took over {cfg.line_timeout:g} s"
            )
            message = f"a request line took longer than {cfg.line_timeout:g} s; closing"
            await self.send(self.conn.send_error(None, p.ErrorCode.TIMEOUT, message))
        else:
            # Silently, as ever: a client at a person's prompt simply reconnects later.
            self.host.limit_log.hit(
                "idle-timeout",
                f"{self.ip}: not logged in within {cfg.anonymous_idle_timeout:g} s",
            )

    async def _refuse_buffered_requests(self) -> None:
        """At shutdown, tell the client which of its already-sent requests were not done."""
        out = bytearray()
        while True:
            try:
                event = self.conn.next_event()
            except p.RemoteProtocolError:
                break
            if isinstance(event, p.Sentinel):
                break
            out += self.conn.send_error(
                event.id, p.ErrorCode.SHUTTING_DOWN, "the server is shutting down; not done"
            )
        if out:
            await self.send(bytes(out))

    async def _answer(self, request: p.Request) -> bytes:
        op = p.op_of(request)
        log.debug("%s: %s %s", self.ip, self.user or "-", op)
        if self.conn.state is p.State.AUTHENTICATED and self.replaced_by is not None:
            return self.conn.send_error(
                request.id, p.ErrorCode.NOT_LOGGED_IN, "this session was replaced by a newer login"
            )
        try:
            result = await _HANDLERS[op](self, request)
        except RequestFailed as exc:
            self.host.metrics.request_failed(op, exc.code)
            return self.conn.send_error(request.id, exc.code, exc.message)
        except lg.LedgerError as exc:
            code = LEDGER_CODES.get(type(exc), p.ErrorCode.INTERNAL)
            self.host.metrics.request_failed(op, code)
            if code is p.ErrorCode.INTERNAL:
                # Once a minute per op, with a count: on a full disk every request fails,
                # and a line each would fill what is left of it (and bury the cause).
                self.host.limit_log.failed(
                    f"ledger {op}", f"{self.ip}: ledger failure on {op}: {exc}"
                )
                return self.conn.send_error(request.id, code, "the ledger is unavailable")
            return self.conn.send_error(request.id, code, str(exc))
        if isinstance(result, _Encoded):
            return self.conn.send_ok_raw(request, result.json)
        return self.conn.send_ok(request, result)

    # -- one handler per op --

    async def _hello(self, req: p.Hello) -> p.HelloResult:
        if req.version != p.PROTOCOL_VERSION:
            raise RequestFailed(
                p.ErrorCode.UNSUPPORTED_VERSION, f"this server speaks version {p.PROTOCOL_VERSION}"
            )
        return p.HelloResult(p.PROTOCOL_VERSION, f"p2ppay/{__version__}")

    async def _register(self, req: p.Register) -> p.RegisterResult:
        ledger = self.host.ledger
        if await ledger.account(req.name) is not None:  # cheap check before the slow hash
            raise RequestFailed(p.ErrorCode.NAME_TAKEN, f"the name {req.name!r} is taken")
        with self.host.accounts.registering(self.ip):  # (a taken name used none of it)
            digest = await self.host.accounts.hash_password(req.password, self.ip)
            await ledger.create_account(req.name, digest)
        log.info("%s: registered %s", self.ip, req.name)
        return p.RegisterResult(req.name)

    async def _login(self, req: p.Login) -> p.LoginResult:
        accounts = self.host.accounts
        account = await accounts.check_login(req.name, req.password, self.ip)
        name = account.name  # as registered, whatever the letter case of the login
        cert = await accounts.certify(account, req.csr)
        # Bookkeeping, not a condition of logging in: a ledger that cannot write (a full
        # disk) still lets people in to see their balance.
        await accounts.best_effort("login record", self.host.ledger.record_login(name), None)
        # What happened to this account's payment requests while it was away (from now on
        # they count as told: the reply below tells them). If it cannot be marked as told,
        # it is news again at the next login.
        news = await accounts.best_effort("login news", self.host.ledger.request_news(name), [])
        self.user = name
        self.p2p_port = req.p2p_port
        self.replaced_by = None
        self.host.presence.take_over(self)
        await self.host.presence.published(self)  # (from now on every node finds this login)
        log.info("%s: %s logged in (p2p port %s)", self.ip, name, req.p2p_port)
        return p.LoginResult(
            name,
            account.balance,
            self.ip,
            req.p2p_port,
            cert.pem if cert else None,
            accounts.issuer.ca_pem if cert else None,
            [_request_info(r) for r in news],
        )

    def _me(self) -> str:
        assert self.user is not None
        return self.user

    async def _deposit(self, req: p.Deposit) -> p.BalanceResult:
        if self.host.config.deposits == "operator":
            raise RequestFailed(
                p.ErrorCode.DEPOSITS_CLOSED, "on this server only the operator brings money in"
            )
        return p.BalanceResult(
            await self.host.ledger.deposit(self._me(), req.amount, req.deposit_id)
        )

    async def _list(self, req: p.ListOnline) -> _Encoded:
        balance = await self.host.ledger.balance(self._me()) or 0
        presence, limit = self.host.presence, self.host.config.max_list
        # Who is online is encoded once per change of presence; the balance is this user's.
        key = ("list", limit)
        online = listing.get(presence, key)
        if online is None:

            async def build() -> bytes:
                return p.encode_json(await presence.listing(limit))

            online = await listing.cached(presence, key, build)
        return _Encoded(p.list_result_json(balance, online))

    async def _lookup(self, req: p.Lookup) -> p.Presence:
        where = await self.host.presence.lookup(req.name)
        if where is not None:
            return where
        account = await self.host.ledger.account(req.name)
        if account is None:
            raise RequestFailed(p.ErrorCode.UNKNOWN_USER, f"no account named {req.name!r}")
        raise RequestFailed(p.ErrorCode.PAYEE_OFFLINE, f"{account.name} is not online")

    async def _settle(self, req: p.Settle) -> p.SettleResult:
        # The payer is always this session's own account: nobody moves money out of another's.
        payer = self._me()
        if name_key(req.payee) == name_key(payer):
            raise RequestFailed(p.ErrorCode.SELF_PAYMENT, "you cannot pay yourself")
        _check_memo(req.memo)
        # The payee's acceptance is checked before the ledger sees the payment. Only a new
        # payment needs it: a retry of one settled before (perhaps before the payee's key
        # changed, so that the check now fails) gets its stored outcome; that is looked up
        # only when the check fails, which keeps it off the common path.
        key: bytes | None
        try:
            key = await self.host.accounts.check_acceptance(
                req.payment_id, payer, req.payee, req.amount, req.acceptance, req.memo
            )
        except RequestFailed:
            if await self.host.ledger.transfer(req.payment_id) is None:
                raise
            key = None  # settled before: the ledger answers with what it stored
        t = await self.host.ledger.settle(
            req.payment_id, payer, req.payee, req.amount, accepted_with=key, memo=req.memo
        )
        if not t.replayed:
            self._settled(t)
        return p.SettleResult(t.payment_id, t.payer, t.payee, t.amount, t.payer_balance, t.memo)

    def _settled(self, t: lg.Transfer) -> None:
        """Log a new settlement and tell its payee, on whichever node it is online."""
        log.debug(
            "%s: settled %s: %s -> %s %d",
            self.ip,
            t.payment_id,
            t.payer,
            t.payee,
            t.amount,
            extra={"payment_id": str(t.payment_id)},
        )
        self.host.presence.settled(t)  # (presence knows how to reach the payee's node)

    async def _history(self, req: p.History) -> p.HistoryResult:
        # One row more than asked says whether there is a next page.
        entries = await self.host.ledger.history(
            self._me(),
            req.limit + 1,
            before=req.before,
            counterparty=req.counterparty,
            since_ms=req.since_ms,
            until_ms=req.until_ms,
        )
        more = len(entries) > req.limit
        entries = entries[: req.limit]
        return p.HistoryResult(
            [
                p.HistoryEntry(
                    e.kind, e.amount, e.balance, e.at_ms, e.counterparty, e.payment_id, e.memo
                )
                for e in entries
            ],
            entries[-1].seq if more else None,
        )

    async def _payment_status(self, req: p.PaymentStatus) -> p.PaymentStatusResult:
        # Only the payer and the payee learn anything: to anyone else a settled payment gets
        # the very answer an unknown id gets.
        me = name_key(self._me())
        t = await self.host.ledger.transfer(req.payment_id)
        if t is None or me not in (name_key(t.payer), name_key(t.payee)):
            return p.PaymentStatusResult(req.payment_id, settled=False)
        balance = t.payer_balance if name_key(t.payer) == me else t.payee_balance
        return p.PaymentStatusResult(
            req.payment_id, True, t.payer, t.payee, t.amount, t.at_ms, balance, t.memo
        )

    async def _logout(self, req: p.Logout) -> p.LogoutResult:
        # Acceptances signed with this session's key stop counting: the owner has left.
        await self.host.accounts.revoke_peer_key(self._me())
        log.info("%s: %s logged out", self.ip, self.user)
        self.host.presence.forget(self)
        self.user = None
        self.p2p_port = None
        self.anonymous_since = trio.current_time()
        return p.LogoutResult()

    # -- payment requests, receipts, passwords --

    async def _request(self, req: p.MakeRequest) -> p.RequestInfo:
        cfg = self.host.config
        _check_memo(req.memo)
        lifetime = cfg.request_expiry if req.expires_in is None else req.expires_in
        if lifetime > cfg.max_request_expiry:
            raise RequestFailed(
                p.ErrorCode.BAD_REQUEST,
                f"a request may stay open at most {cfg.max_request_expiry:.0f} s",
            )
        me = self._me()
        wait = self.host.request_limit.admit(me, req.payer)
        if wait is not None:
            self.host.limit_log.hit("requests", f"{me} made payment requests too fast")
            raise RequestFailed(
                p.ErrorCode.RATE_LIMITED,
                f"too many payment requests made recently; try again in {math.ceil(wait)} s",
            )
        expires_ms = int((time.time() + lifetime) * 1000)
        # (no such payer: UnknownAccount, answered unknown_user)
        made = await self.host.ledger.create_request(
            uuid.uuid4(),
            me,
            req.payer,
            req.amount,
            req.memo,
            expires_ms,
            cfg.max_open_requests,
            cfg.max_requests_per_payer,
        )
        info = _request_info(made)
        self.host.presence.tell(made.payer, p.PaymentRequested(info))
        log.info("%s: %s asks %s for %d", self.ip, made.requester, made.payer, made.amount)
        return info

    async def _requests(self, req: p.ListRequests) -> p.RequestsResult:
        found = await self.host.ledger.open_requests(self._me(), self.host.config.max_open_requests)
        return p.RequestsResult(
            [_request_info(r) for r in found.incoming],
            [_request_info(r) for r in found.outgoing],
            found.incoming_total,
            found.outgoing_total,
        )

    async def _pay_request(self, req: p.PayRequest) -> p.SettleResult:
        # The requester's consent is the request it made over its own authenticated session:
        # no signature to check (and the requester may be offline meanwhile).
        t, paid = await self.host.ledger.pay_request(req.request_id, self._me())
        if not t.replayed:
            self._settled(t)
            # The requester hears now if online here (on another node, that node tells it and
            # marks it told); if offline, at its next login.
            if self.host.presence.tell(t.payee, p.RequestClosed(_request_info(paid))):
                await self.host.ledger.told(req.request_id)
        return p.SettleResult(t.payment_id, t.payer, t.payee, t.amount, t.payer_balance, t.memo)

    async def _decline_request(self, req: p.DeclineRequest) -> p.RequestInfo:
        closed = await self.host.ledger.close_request(req.request_id, self._me(), "declined")
        info = _request_info(closed)
        if self.host.presence.tell(closed.requester, p.RequestClosed(info)):
            await self.host.ledger.told(req.request_id)
        return info

    async def _cancel_request(self, req: p.CancelRequest) -> p.RequestInfo:
        closed = await self.host.ledger.close_request(req.request_id, self._me(), "cancelled")
        info = _request_info(closed)
        self.host.presence.tell(closed.payer, p.RequestClosed(info))
        return info

    async def _receipt(self, req: p.GetReceipt) -> p.Receipt:
        me = name_key(self._me())
        t = await self.host.ledger.transfer(req.payment_id)
        if t is None or me not in (name_key(t.payer), name_key(t.payee)):
            # The same answer for "no such payment" and "not yours": ids tell nobody anything.
            raise RequestFailed(
                p.ErrorCode.UNKNOWN_PAYMENT, f"no settled payment {req.payment_id} of yours"
            )
        facts = ReceiptFacts(str(t.payment_id), t.payer, t.payee, t.amount, t.memo, t.at_ms)
        signed = await trio.to_thread.run_sync(self.host.receipts.sign, facts)
        return p.Receipt(**signed)

    async def _passwd(self, req: p.Passwd) -> p.PasswdResult:
        me = self._me()
        accounts = self.host.accounts
        try:
            # Throttled and counted like a login: a session left open is no licence to guess.
            await accounts.check_login(me, req.old_password, self.ip)
        except RequestFailed as exc:
            if exc.code is p.ErrorCode.AUTH_FAILED:
                raise RequestFailed(exc.code, "the current password is wrong") from None
            raise
        digest = await accounts.hash_password(req.new_password, self.ip)
        await self.host.ledger.change_password(me, digest)
        # One session per account: any other (on another node, say) is ended, and with it
        # its key; this session's key stays current.
        other = self.host.presence.local(me)
        if other is not None and other is not self:
            other.replaced(self.ip)
        log.info("%s: %s changed its password", self.ip, me)
        return p.PasswdResult()


def _check_memo(memo: str | None) -> None:
    if memo is not None:
        problem = memo_problem(memo)
        if problem is not None:
            raise RequestFailed(p.ErrorCode.BAD_REQUEST, problem)


def _request_info(r: lg.PaymentRequest) -> p.RequestInfo:
    return p.RequestInfo(
        r.request_id,
        r.requester,
        r.payer,
        r.amount,
        r.memo,
        r.created_ms,
        r.expires_ms,
        r.state,
        r.closed_ms,
    )


# One handler per op, named after it (_hello, _register, ...): a missing one fails here. Kept
# once for the class, not per session (a dict of bound methods was ~1 KiB per idle session).
_HANDLERS: dict[str, Callable[[Session, Any], Awaitable[p.Result | _Encoded]]] = {
    op: getattr(Session, f"_{op}") for op in p.OPS
}
#: ops that change nothing: their replies are not held for events from the same commit
_READS: frozenset[str] = frozenset(
    {"hello", "list", "lookup", "history", "requests", "receipt", "payment_status"}
)
assert _READS <= p.OPS
