"""How a payment can end, declared once: the codes ``Wallet.pay`` (and so the client's ``pay``
command and its ``--json``) reports. The README's table of outcomes is checked against this.
No I/O."""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    OK = "ok"
    # Refused before anyone is asked.
    NOT_LOGGED_IN = "not_logged_in"
    BAD_AMOUNT = "bad_amount"
    BAD_MEMO = "bad_memo"
    SELF_PAYMENT = "self_payment"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    UNKNOWN_USER = "unknown_user"
    PAYEE_OFFLINE = "payee_offline"
    # The payee's side.
    UNREACHABLE = "unreachable"
    WRONG_PEER = "wrong_peer"
    TIMED_OUT = "timed_out"
    BAD_ANSWER = "bad_answer"
    DECLINED = "declined"
    # The server's settlement.
    UNKNOWN_PAYEE = "unknown_payee"
    BALANCE_LIMIT = "balance_limit"
    PAYMENT_ID_CONFLICT = "payment_id_conflict"
    BAD_ACCEPTANCE = "bad_acceptance"
    ACCOUNT_FROZEN = "account_frozen"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
    SERVER_UNREACHABLE = "server_unreachable"
    # Paying a payment request.
    UNKNOWN_REQUEST = "unknown_request"
    REQUEST_EXPIRED = "request_expired"
    REQUEST_DECLINED = "request_declined"
    REQUEST_CANCELLED = "request_cancelled"
    #: any other refusal by the server (its message says what)
    SERVER_ERROR = "server_error"

    @classmethod
    def from_server(cls, code: str) -> Outcome:
        """The outcome for a server's error code (one this list does not name: SERVER_ERROR)."""
        try:
            return cls(code)
        except ValueError:
            return cls.SERVER_ERROR
