"""Running a real server process: the state directory, certificates, listeners, the ledger
(a file, or a PostgreSQL database shared with other nodes), and SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from functools import partial
from pathlib import Path

import psycopg
import trio

from p2ppay import ledger as lg
from p2ppay.ledger.pgschema import describe, open_connection
from p2ppay.pki import (
    CA_CERT,
    CA_KEY,
    PEER_CA_CERT,
    PEER_CA_KEY,
    IdentityError,
    Issuer,
    ensure_server_credentials,
    public_key_line,
    state_lock,
)
from p2ppay.presence.postgres import PgPresence, one_line, open_pg_presence
from p2ppay.receipts import ReceiptSigner
from p2ppay.server import fdlimit
from p2ppay.server.app import Server
from p2ppay.server.config import LEDGER_FILE, ServerOptions
from p2ppay.server.metrics import serve_metrics
from p2ppay.server.ports import bind_error, reuseport_listeners
from p2ppay.server.purge import keep_purging
from p2ppay.tls import server_context

log = logging.getLogger("p2ppay.server")

#: opens the ledger at a path or URL, with the server's limits and batch size
OpenLedger = Callable[..., AbstractAsyncContextManager[lg.AnyLedger]]


class StartupError(Exception):
    """The server cannot start; the message says why, in one line."""


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state directory if needed and check that we can write there and to the
    ledger: a clear error now rather than a traceback from deep inside SQLite or the CA code."""
    if state_dir.exists() and not state_dir.is_dir():
        raise StartupError(f"the state directory {state_dir} is not a directory")
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(
            f"cannot create the state directory {state_dir}: {exc.strerror or exc}"
        ) from None
    probe = state_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"cannot write in the state directory {state_dir}: {exc.strerror}"
        ) from None
    for name in (LEDGER_FILE, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm"):
        path = state_dir / name
        if path.exists():
            try:
                with path.open("r+b"):
                    pass
            except OSError as exc:
                raise StartupError(f"cannot write the ledger file {path}: {exc.strerror}") from None


def cas_in(state_dir: Path) -> list[str]:
    """The CA files a server made (or was given) in ``state_dir``."""
    return [
        name for name in (CA_CERT, CA_KEY, PEER_CA_CERT, PEER_CA_KEY) if (state_dir / name).exists()
    ]


def check_ledger_is_there(ledger: Path, state_dir: Path, cas: list[str]) -> None:
    """Refuse to make a new SQLite ledger where one was kept: a state directory that held a
    CA (``cas``, before this start made any) has run a server, and its ledger being gone means
    it was lost (deleted, moved, a volume not mounted), not that one is to be made."""
    if cas and not ledger.exists():
        raise lg.LedgerFileUnusable(
            f"there is no ledger at {ledger}, but {state_dir} holds a CA ({', '.join(cas)}): "
            "a server ran here, so its ledger is missing. Put it back from a backup "
            "(README: Backups), or start with --new-ledger to begin an empty one"
        )


def check_postgres(url: str, timeouts: lg.PgTimeouts) -> None:
    """Connect once to the PostgreSQL ledger: an unreachable server is one clear line at start
    (naming the server, never the password)."""
    try:
        open_connection(url, timeouts).close()
    except lg.LedgerUnavailable as exc:
        raise StartupError(f"the ledger cannot be used: {exc}") from None


def _generated_context(state_dir: Path, sans: tuple[str, ...]) -> tuple[ssl.SSLContext, Path]:
    """The TLS context on the state directory's generated certificate, loaded under its lock:
    another process sharing the directory may be renewing the files (see pki.state_lock)."""
    with state_lock(state_dir):
        creds = ensure_server_credentials(state_dir, sans)
        return server_context(creds.cert_chain, creds.key), creds.cert_chain


async def _bind(
    port: int, host: str | None, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    try:
        if reuse_port:  # one of several workers on this port (see ports.py)
            return await reuseport_listeners(port, host)
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError(str(bind_error(exc, port, host))) from None


async def run_server(
    options: ServerOptions,
    *,
    handle_signals: bool = False,
    reuse_port: bool = False,
    open_ledger: OpenLedger = lg.open_ledger,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until shut down (by SIGINT/SIGTERM if ``handle_signals``); started() gets addresses
    (the native listeners' first, then the course dialect's). ``open_ledger`` opens the
    ledger (a seam: the crash tests run a server whose ledger misbehaves on purpose).
    ``reuse_port``: the native and course ports are shared with other workers (SO_REUSEPORT)."""
    state_dir = options.state_dir
    try:
        max_connections = fdlimit.fit(options.config.max_connections, options.reserved_fds)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    config = dataclasses.replace(options.config, max_connections=max_connections)
    await trio.to_thread.run_sync(prepare_state_dir, state_dir)
    target: Path | str = options.ledger or state_dir / LEDGER_FILE
    postgres = isinstance(target, str) and lg.is_postgres_url(target)
    if postgres:
        await trio.to_thread.run_sync(check_postgres, str(target), options.pg_timeouts)
    # (before the CAs are made: on a first start there are none; checked once they load, so
    # that CA files that cannot be used are what is said first)
    had_cas = (
        [] if postgres or options.new_ledger else await trio.to_thread.run_sync(cas_in, state_dir)
    )
    if options.cert and options.key:
        cert_path: Path = options.cert
        try:
            ctx = server_context(options.cert, options.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = (
                "they are not a PEM certificate chain and its private key"
                if isinstance(exc, ssl.SSLError)
                else getattr(exc, "strerror", None) or exc
            )
            raise StartupError(
                f"cannot use --cert {options.cert} with --key {options.key}: {reason}"
            ) from None
    elif options.cert or options.key:
        raise StartupError("--cert and --key go together")
    try:
        if not (options.cert and options.key):
            ctx, cert_path = await trio.to_thread.run_sync(
                _generated_context, state_dir, options.sans
            )
        issuer = await trio.to_thread.run_sync(Issuer.ensure, state_dir)
        receipts = await trio.to_thread.run_sync(ReceiptSigner.ensure, state_dir)
    except (ValueError, TypeError, IdentityError, ssl.SSLError) as exc:
        reason = str(exc).split(". ")[0]
        raise StartupError(
            f"the certificate files in {state_dir} cannot be used ({reason}); restore them from a "
            "backup (moving them away makes new ones, and every client then needs the new "
            "ca.pem)"
        ) from None
    key_line = public_key_line(await trio.Path(cert_path).read_bytes())
    if not postgres:
        await trio.to_thread.run_sync(check_ledger_is_there, Path(target), state_dir, had_cas)

    # Bind first: a port in use is reported before anything is created or opened.
    listeners = await _bind(options.port, options.host, reuse_port=reuse_port)
    course_listeners: list[trio.SocketListener] = []
    metrics_listeners: list[trio.SocketListener] = []
    try:
        if options.course_port is not None:
            course_listeners = await _bind(options.course_port, options.host, reuse_port=reuse_port)
        if options.metrics_port is not None:
            metrics_listeners = await _bind(options.metrics_port, options.metrics_host)
        async with AsyncExitStack() as opened:
            # (PostgreSQL's timeouts only for PostgreSQL: an SQLite opener takes none.)
            pg = {"pg_timeouts": options.pg_timeouts} if postgres else {}
            ledger = await opened.enter_async_context(
                open_ledger(
                    target,
                    options.limits,
                    max_batch=options.max_batch,
                    balance_ttl=options.balance_cache_ttl,
                    **pg,
                    check_interval=options.ledger_check_interval,
                )
            )
            presence: PgPresence | None = None
            if postgres:  # who is online is shared by the nodes of that database too
                url = str(target)
                try:
                    presence = await opened.enter_async_context(
                        open_pg_presence(
                            url,
                            heartbeat=options.node_heartbeat,
                            expiry=options.node_expiry,
                            listen_timeout=options.node_listen_timeout,
                            timeouts=options.pg_timeouts,
                        )
                    )
                except psycopg.Error as exc:
                    raise StartupError(
                        f"cannot keep who is online in PostgreSQL at {describe(url)}: "
                        + one_line(exc)
                    ) from None
            server = Server(
                ledger,
                ctx,
                issuer,
                config,
                server_public_key=key_line,
                course_tls=options.course_tls,
                course_dialect=options.course_dialect,
                presence=presence,
                receipts=receipts,
            )
            ledger.observer = server.metrics
            stranded = await ledger.invalid_names()
            if stranded:
                log.warning(
                    "%d account(s) have names that the name rule now refuses, so they cannot "
                    "log in: %s (an operator can move their money: p2ppay admin debit/credit)",
                    len(stranded),
                    ", ".join(repr(n) for n in stranded[:20]),
                )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, listeners, course_listeners)
                # (in the server's nursery too: housekeeping stops when serving does)
                server.spawn(partial(keep_purging, ledger, options.config, server.limit_log))
                if metrics_listeners:  # in the server's nursery: it stops when serving does
                    server.spawn(
                        partial(
                            serve_metrics,
                            server.metrics.render,
                            metrics_listeners,
                            server.limit_log,
                        )
                    )
                addresses: list[tuple[str, int]] = []
                for group, what in ((listeners, "TLS"), (course_listeners, "course dialect")):
                    if what != "TLS":
                        what = f"course dialect, {options.course_dialect.name} flavour"
                        if options.course_tls:
                            what += ", over TLS"
                    for listener in group:
                        host, port = listener.socket.getsockname()[:2]
                        addresses.append((str(host), int(port)))
                        log.info("listening on %s port %d (%s)", host, port, what)
                for listener in metrics_listeners:
                    host, port = listener.socket.getsockname()[:2]
                    log.info("listening on %s port %d (metrics, HTTP: /metrics)", host, port)
                task_status.started(addresses)
                if handle_signals:
                    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            log.info("received %s", signal.Signals(signum).name)
                            server.shutdown()
                            break
        log.info(
            "ledger: %d commits, %d operations (%.1f per commit)",
            ledger.commits,
            ledger.ops_committed,
            ledger.ops_committed / max(ledger.commits, 1),
        )
    finally:
        # serve() and serve_metrics() closed those they started
        for listener in [*listeners, *course_listeners, *metrics_listeners]:
            with trio.CancelScope(shield=True):
                await listener.aclose()
    log.info("stopped")
