"""The session's states and the one table of legal requests in each."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

from p2ppay.wire.vocabulary import (
    ErrorCode,
)

# --------------------------------------------------------------------------------------------
# Session states: the one table of legal requests
# --------------------------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    ANONYMOUS = "anonymous"
    AUTHENTICATED = "authenticated"


_A = State.AWAIT_HELLO
_N = State.ANONYMOUS
_U = State.AUTHENTICATED

#: (state, op) -> state after a successful reply. A pair missing here is illegal.
TRANSITIONS: Final[Mapping[tuple[State, str], State]] = {
    (_A, "hello"): _N,
    (_N, "register"): _N,
    (_N, "login"): _U,
    (_U, "deposit"): _U,
    (_U, "list"): _U,
    (_U, "lookup"): _U,
    (_U, "settle"): _U,
    (_U, "history"): _U,
    (_U, "payment_status"): _U,
    (_U, "logout"): _N,
    (_U, "request"): _U,
    (_U, "requests"): _U,
    (_U, "pay_request"): _U,
    (_U, "decline_request"): _U,
    (_U, "cancel_request"): _U,
    (_U, "receipt"): _U,
    (_U, "passwd"): _U,
}


def illegal(state: State, op: str) -> tuple[ErrorCode, str]:
    """Why ``op`` is not legal in ``state``: the code and message of the refusal."""
    if state is _A:
        return ErrorCode.HELLO_REQUIRED, "send hello first"
    if state is _N:
        if op == "hello":
            return ErrorCode.BAD_STATE, "hello was already done"
        return ErrorCode.NOT_LOGGED_IN, f"log in before {op}"
    if op in ("login", "register"):
        return ErrorCode.ALREADY_LOGGED_IN, "already logged in; log out first"
    return ErrorCode.BAD_STATE, f"{op} is not allowed now"
