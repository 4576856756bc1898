"""How a refused request is answered: :class:`RequestFailed`, and the protocol's code for each
way the ledger can refuse."""

from __future__ import annotations

from typing import Final

from p2ppay import ledger as lg
from p2ppay import wire as p
from p2ppay.wire.errors import CodedError


class RequestFailed(CodedError):
    """A request is answered with an error; the session goes on."""

    code: p.ErrorCode

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(code, message)


LEDGER_CODES: Final[dict[type[lg.LedgerError], p.ErrorCode]] = {
    lg.NameTaken: p.ErrorCode.NAME_TAKEN,
    lg.UnknownAccount: p.ErrorCode.UNKNOWN_USER,
    lg.UnknownPayee: p.ErrorCode.UNKNOWN_PAYEE,
    lg.AmountOutOfRange: p.ErrorCode.BAD_AMOUNT,
    lg.BalanceLimit: p.ErrorCode.BALANCE_LIMIT,
    lg.InsufficientFunds: p.ErrorCode.INSUFFICIENT_FUNDS,
    lg.SelfPayment: p.ErrorCode.SELF_PAYMENT,
    lg.PaymentIdConflict: p.ErrorCode.PAYMENT_ID_CONFLICT,
    lg.Unauthorized: p.ErrorCode.BAD_ACCEPTANCE,
    lg.AccountFrozen: p.ErrorCode.ACCOUNT_FROZEN,
    lg.LedgerUnavailable: p.ErrorCode.INTERNAL,
    lg.DepositIdConflict: p.ErrorCode.DEPOSIT_ID_CONFLICT,
    lg.UnknownRequest: p.ErrorCode.UNKNOWN_REQUEST,
    lg.RequestExpired: p.ErrorCode.REQUEST_EXPIRED,
    lg.RequestPaid: p.ErrorCode.REQUEST_PAID,
    lg.RequestDeclined: p.ErrorCode.REQUEST_DECLINED,
    lg.RequestCancelled: p.ErrorCode.REQUEST_CANCELLED,
    lg.TooManyRequests: p.ErrorCode.TOO_MANY_REQUESTS,
}
