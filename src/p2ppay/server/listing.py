"""Who-is-online replies from cache: the encoded block of a ``list`` reply (and of a course
``List``) is built once per change of presence, not once per request.

:class:`~.presence.Presence` counts its changes (``generation``: every login that takes over a
name, every logout or disconnect); an entry is good while that count has not moved. Entries
are per presence object (tests run several servers in one process) and go with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Final

from p2ppay.presence.local import Presence

_caches: Final[weakref.WeakKeyDictionary[Presence, dict[Hashable, tuple[int, bytes]]]] = (
    weakref.WeakKeyDictionary()
)


def get(presence: Presence, key: Hashable) -> bytes | None:
    """The bytes cached for ``key`` if presence has not changed since (no await, no build)."""
    entries = _caches.get(presence)
    if entries is None:
        return None
    hit = entries.get(key)
    return hit[1] if hit is not None and hit[0] == presence.generation else None


async def cached(presence: Presence, key: Hashable, build: Callable[[], Awaitable[bytes]]) -> bytes:
    """``build()``'s bytes for ``key``, built again only when presence has changed since
    (callers on a hot path try :func:`get` first: a hit then costs no coroutine)."""
    hit = get(presence, key)
    if hit is not None:
        return hit
    generation = presence.generation
    value = await build()
    if presence.generation == generation:  # nothing changed while it was built
        _caches.setdefault(presence, {})[key] = (generation, value)
    return value
