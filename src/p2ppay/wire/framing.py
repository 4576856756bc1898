"""Framing: a byte stream split into lines of bounded length, and the JSON nesting check
that runs before any decoder sees a line."""

from __future__ import annotations

import re
from typing import Final

from p2ppay.wire.vocabulary import (
    DEFAULT_MAX_LINE,
    MAX_DEPTH_CAP,
    ErrorCode,
    RemoteProtocolError,
)

# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


class LineBuffer:
    """Splits a byte stream into ``\\n``-terminated lines of at most ``max_line`` bytes.

    The buffer never holds more than ``max_line`` bytes plus one received chunk: as soon as a
    line is known to be too long, :class:`RemoteProtocolError` is raised instead of buffering on.
    """

    __slots__ = ("_buf", "_scan", "max_line")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 2:
            raise ValueError("max_line must be at least 2 bytes")
        self.max_line = max_line
        self._buf = bytearray()
        self._scan = 0  # everything before this offset is known to hold no newline

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a complete line."""
        return len(self._buf)

    def next_line(self) -> bytes | None:
        """The next complete line without its terminator, or None if more bytes are needed."""
        idx = self._buf.find(b"\n", self._scan)
        if idx < 0:
            self._scan = len(self._buf)
            if len(self._buf) > self.max_line:
                raise RemoteProtocolError(
                    ErrorCode.LINE_TOO_LONG, f"line longer than {self.max_line} bytes"
                )
            return None
        if idx + 1 > self.max_line:
            raise RemoteProtocolError(
                ErrorCode.LINE_TOO_LONG, f"line longer than {self.max_line} bytes"
            )
        line = bytes(self._buf[:idx])
        del self._buf[: idx + 1]
        self._scan = 0
        return line


#: A JSON string, its closing quote optional so that an unterminated one is consumed once (no
#: backtracking, linear time).
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_SQUARE: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(line: bytes, max_depth: int) -> bool:
    """Whether ``line`` nests JSON arrays and objects deeper than ``max_depth``.

    Brackets inside strings do not count. Every step is a C-speed pass over the line, never a
    recursion: an ordinary line costs two byte counts; one with more brackets than the limit
    has its strings cut out and its innermost bracket pairs removed, one level per pass. For a
    line that is not JSON (brackets never closed) the answer counts the open ones as nesting,
    so the decoder never recurses deeper than the limit before it finds the line bad."""
    if line.count(b"[") + line.count(b"{") <= max_depth:
        return False
    if b'"' in line and b"\\" in line:
        line = _JSON_STRING.sub(b"", line)
    elif b'"' in line:  # no escapes: the strings are exactly what lies between pairs of quotes
        line = b"".join(line.split(b'"')[::2])
    brackets = line.translate(_SQUARE, _NOT_BRACKETS)
    depth = 0
    while b"[]" in brackets:
        depth += 1
        if depth > max_depth:
            return True
        brackets = brackets.replace(b"[]", b"")
    # What is left has no pair: closing brackets (not JSON) and brackets never closed.
    return depth + brackets.count(b"[") > max_depth


def check_max_depth(max_depth: int) -> None:
    if not 1 <= max_depth <= MAX_DEPTH_CAP:
        raise ValueError(f"max_depth must be within 1..{MAX_DEPTH_CAP}")


def too_deep_message(max_depth: int) -> str:
    return f"JSON nested deeper than {max_depth} levels"
