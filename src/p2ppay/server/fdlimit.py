"""Fitting ``--max-connections`` into the process's open-file limit (RLIMIT_NOFILE), at start.

Each connection is a descriptor, and the server needs more of its own (listeners, the ledger
and its journal, PostgreSQL connections, the log, the hashing threads' work): that much is
``--reserved-fds``. With the common soft limit of 1,024 and the default 20,000 connections,
accept failed with EMFILE long before the connection limit was reached, and new clients hung.
So: raise the soft limit as far as needed, up to the hard limit (any process may); if that is
still short, lower max-connections to what fits, and say so once. The connection limit then
refuses the surplus cleanly (one limit line a minute) instead of the kernel refusing descriptors.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("p2ppay.server")


def fit(max_connections: int, reserved: int) -> int:
    """The max-connections that fits the open-file limit, after raising its soft limit towards
    what ``max_connections + reserved`` needs (never past the hard limit). ValueError if the
    limit leaves no room for any connection."""
    needed = max_connections + reserved
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _enough(soft, needed):
        return max_connections
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError) as exc:  # (e.g. macOS refuses more than OPEN_MAX)
        log.debug("cannot raise the open-file limit to %d: %s", target, exc)
    if _enough(soft, needed):
        return max_connections
    room = soft - reserved
    if room < 1:
        raise ValueError(
            f"the open-file limit ({soft}) leaves no room for connections beside the "
            f"{reserved} descriptors kept for the server itself (--reserved-fds): raise it "
            "(ulimit -n, or LimitNOFILE= in the systemd unit)"
        )
    log.warning(
        "--max-connections lowered from %d to %d: the open-file limit is %d (hard limit %s) "
        "and %d are kept for the server itself (--reserved-fds); raise the limit (ulimit -n, "
        "or LimitNOFILE= in the systemd unit) to allow more",
        max_connections,
        room,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        reserved,
    )
    return room


def _enough(soft: int, needed: int) -> bool:
    return soft == resource.RLIM_INFINITY or soft >= needed
