"""The one shape of every error p2ppay reports: a stable ``code`` that programs branch on, and
a ``message`` for people. No I/O; every layer's coded errors derive from :class:`CodedError`."""

from __future__ import annotations


class CodedError(Exception):
    """An error with a stable ``code`` (e.g. ``insufficient_funds``) and a ``message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
