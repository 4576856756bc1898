"""Account names: the one rule for what a name may be, and the one canonical form.

A name is shown as it was registered ("Alice") but compared, looked up and keyed everywhere by
its canonical form (:func:`name_key`, "alice"): in the wire protocol, the course dialect, the
ledger, the server's presence and the signed acceptances. Nothing else may fold case or judge a
name; import from here. No I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, MutableMapping
from typing import Final, TypeVar

V = TypeVar("V")

NAME_MAX: Final = 32
#: 1-32 characters from ``A-Z a-z 0-9 _ . -``, starting with a letter or a digit (so ``.``,
#: ``..``, ``-`` and names of punctuation only are refused).
NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
NAME_RE: Final = re.compile(NAME_PATTERN)


def is_valid_name(text: str) -> bool:
    return NAME_RE.fullmatch(text) is not None


def name_key(name: str) -> str:
    """The canonical form of ``name``: what two names must share to be the same account.

    Valid names are ASCII, where lower case is also the Unicode case fold."""
    return name.lower()


class NameMap(MutableMapping[str, V]):
    """A dict keyed by account name regardless of letter case: ``m["Bob"] is m["bob"]``.

    Keys compare by :func:`name_key`; each is remembered as it was last set (so iterating shows
    names as the caller spelled them, e.g. as registered)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, V]] = {}

    def __getitem__(self, name: str) -> V:
        return self._data[name_key(name)][1]

    def __setitem__(self, name: str, value: V) -> None:
        self._data[name_key(name)] = (name, value)

    def __delitem__(self, name: str) -> None:
        del self._data[name_key(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name_key(name) in self._data

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"NameMap({dict(self.items())!r})"
