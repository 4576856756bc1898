"""Purging closed payment requests: a paid, declined, cancelled or expired request is kept for
``--request-retention-days``, then deleted, so the ledger does not grow with every request ever
made (each is ~340 bytes on disk). The server's runner starts :func:`keep_purging` in the
server's nursery; it runs once at start, then every ``--request-purge-interval``.

Deleted in chunks of ``--request-purge-chunk`` rows, one ledger transaction each: a backlog
(the first purge of an old ledger) never holds the writer for long, and settles queued
meanwhile go between the chunks. Each node of a cluster purges; the deletes are idempotent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from p2ppay import ledger as lg
from p2ppay.logs import LimitLog
from p2ppay.server.config import ServerConfig

log = logging.getLogger("p2ppay.server")


async def purge_once(
    ledger: lg.Ledger, config: ServerConfig, *, wall_clock: Callable[[], float] = time.time
) -> int:
    """Delete every request closed or expired more than the retention period ago, a chunk
    per transaction; how many were deleted."""
    cutoff_ms = int((wall_clock() - config.request_retention) * 1000)
    chunk = config.request_purge_chunk
    deleted = 0
    while True:
        done = await ledger.purge_requests(cutoff_ms, chunk)
        deleted += done
        if done < chunk:
            return deleted
        await trio.lowlevel.checkpoint()  # (the ledger's queue is fair: others go between)


async def keep_purging(
    ledger: lg.Ledger,
    config: ServerConfig,
    limit_log: LimitLog,
    *,
    wall_clock: Callable[[], float] = time.time,
) -> None:
    """Purge now and then every ``config.request_purge_interval`` seconds, until cancelled.
    A ledger failure is logged (at most once a minute) and tried again next time: purging
    is housekeeping, never a reason to stop serving."""
    while True:
        try:
            deleted = await purge_once(ledger, config, wall_clock=wall_clock)
        except lg.LedgerError as exc:
            limit_log.hit("request-purge", f"purging closed payment requests failed: {exc}")
        else:
            if deleted:
                log.info("purged %d closed payment request(s)", deleted)
        await trio.sleep(config.request_purge_interval)
