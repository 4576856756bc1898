"""Command line: ``p2ppay server`` and ``p2ppay client``. Parses arguments; nothing else."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sqlite3
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NoReturn

import platformdirs
import trio

from . import __version__, admin, logs
from .course import DIALECTS, REFERENCE
from .exitcodes import ExitCode
from .ledger import Limits
from .limits import ThrottleConfig
from .passwords import ScryptParams
from .server import DEFAULT_PORT, ServerConfig, ServerOptions, StartupError, run_server
from .shell import PASSWORD_ENV, ClientOptions, run_client

STATE_ENV = "P2PPAY_STATE_DIR"

DESCRIPTION = """Secure person-to-person micropayments over TLS.

  p2ppay server   run the payment server (accounts, ledger, who is online)
  p2ppay client   the terminal client: register, log in, deposit, list, pay
  p2ppay admin    the operator's commands: accounts, credit, freeze, audit, backup, ...

Exit status: 0 done; 1 a command failed (client, admin) or the server could not start;
2 usage error; 3 the client cannot reach the server; 130 interrupted."""

log = logging.getLogger("p2ppay")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once, and only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def default_state_dir() -> Path:
    """``$P2PPAY_STATE_DIR`` if set, else the platform's per-user data directory."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("p2ppay", appauthor=False))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not within 0..65535")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def _seconds_or_off(text: str) -> float:
    """Seconds, or 0 for no limit at all."""
    try:
        if float(text) == 0:
            return math.inf
    except ValueError:
        pass  # _seconds says what is wrong with it
    return _seconds(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2ppay", description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"p2ppay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = ServerConfig()
    lim = Limits()
    s = sub.add_parser(
        "server",
        help="run the payment server",
        description="Run the p2ppay server until Ctrl-C or SIGTERM. Every limit is a flag.",
        formatter_class=_HelpFormatter,
    )
    s.add_argument("--host", default=None, help="address to listen on (default: every interface)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TLS port (0: any free one)")
    s.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"ledger and certificates (default: ${STATE_ENV} or the user data dir)",
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="debug logs one line per request; info one per connection event",
    )
    s.add_argument(
        "--log-format",
        default="text",
        choices=logs.FORMATS,
        help="text, or json: one JSON object per line (time, level, logger, message, peer, ...)",
    )
    s.add_argument(
        "--deposits",
        default="open",
        choices=["open", "operator"],
        help="who brings money in: every user (deposit), or only the operator (admin credit)",
    )
    s.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics; off unless given",
    )
    s.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (the metrics are not secret, but not for everyone)",
    )
    s.add_argument("--cert", type=Path, help="your own server certificate chain (PEM)")
    s.add_argument("--key", type=Path, help="the private key for --cert (PEM)")
    s.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="extra host name or IP for the generated certificate (repeatable)",
    )
    s.add_argument(
        "--max-line", type=_positive_int, default=d.max_line, help="longest request line in bytes"
    )
    s.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=d.handshake_timeout,
        help="seconds a TLS handshake may take",
    )
    s.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=d.anonymous_idle_timeout,
        help="seconds a connection that has not logged in may stay silent",
    )
    s.add_argument(
        "--write-timeout",
        type=_seconds,
        default=d.write_timeout,
        help="seconds a peer that does not read what the server sends is given",
    )
    s.add_argument(
        "--shutdown-grace",
        type=_seconds,
        default=d.shutdown_grace,
        help="seconds in-flight requests may run after SIGTERM",
    )
    s.add_argument(
        "--max-list",
        type=_positive_int,
        default=d.max_list,
        help="most online users one list reply names",
    )
    s.add_argument(
        "--max-deposit", type=_positive_int, default=lim.max_deposit, help="largest single deposit"
    )
    s.add_argument(
        "--max-payment", type=_positive_int, default=lim.max_payment, help="largest single payment"
    )
    s.add_argument(
        "--max-balance",
        type=_positive_int,
        default=lim.max_balance,
        help="no balance may exceed this",
    )
    s.add_argument(
        "--max-batch", type=_positive_int, default=512, help="most operations in one ledger commit"
    )
    s.add_argument(
        "--hash-threads",
        type=_positive_int,
        default=d.hash_threads,
        help="threads for password hashing (default: cores - 1, at least 1)",
    )
    s.add_argument(
        "--scrypt-n",
        type=_positive_int,
        default=ScryptParams().n,
        help="scrypt cost for new password hashes (a power of 2)",
    )
    s.add_argument(
        "--peer-cert-hours",
        type=_seconds,
        default=d.peer_cert_lifetime / 3600,
        help="hours the peer certificate a login gets stays valid",
    )
    th = ThrottleConfig()
    s.add_argument(
        "--max-connections",
        type=_positive_int,
        default=d.max_connections,
        help="connections at once, in all",
    )
    s.add_argument(
        "--max-connections-per-ip",
        type=_positive_int,
        default=d.max_connections_per_ip,
        help="connections at once from one address",
    )
    s.add_argument(
        "--login-failures",
        type=_positive_int,
        default=th.max_account_failures,
        help="failed logins in a row that lock an account's logins",
    )
    s.add_argument(
        "--login-lockout",
        type=_seconds,
        default=th.account_lockout,
        help="seconds an account's logins stay locked",
    )
    s.add_argument(
        "--address-failures",
        type=_positive_int,
        default=th.max_address_failures,
        help="failed logins from one address that block it for --address-window",
    )
    s.add_argument(
        "--address-window",
        type=_seconds,
        default=th.address_window,
        help="seconds over which an address's failed logins are counted",
    )
    s.add_argument(
        "--course-port",
        type=_port,
        default=None,
        help="also serve the course dialect (REGISTER#name, name#port, List, Exit, "
        "payer#amount#payee) on this port; off unless given",
    )
    s.add_argument(
        "--course-tls", action="store_true", help="serve the course dialect over TLS, not plain TCP"
    )
    s.add_argument(
        "--course-initial-balance",
        type=int,
        default=d.course_initial_balance,
        help="what a new course account starts with (REGISTER#name; reference flavour)",
    )
    s.add_argument(
        "--course-dialect",
        choices=list(DIALECTS),
        default=REFERENCE.name,
        help="flavour of the course dialect: the course's reference one, or the one the seed "
        "program speaks (REGISTER#name#port, DEPOSIT#name#amount; the payer settles)",
    )
    s.add_argument(
        "--course-idle-timeout",
        type=_seconds_or_off,
        default=d.course_idle_timeout,
        help="seconds a course connection that has not logged in may stay silent (0: forever)",
    )
    admin.add_parser(
        sub,
        _HelpFormatter,
        f"the server's state directory (default: ${STATE_ENV} or the user data dir)",
    )
    c = sub.add_parser(
        "client",
        help="the terminal client (interactive, or scripted with -c)",
        description="The p2ppay terminal client: interactive, or scripted with -c.\n"
        "Exit status: 0 done; 1 a command failed; 2 usage error; 3 cannot reach the server.",
        formatter_class=_HelpFormatter,
    )
    c.add_argument("host", nargs="?", default="localhost", help="the server's host")
    c.add_argument("port", nargs="?", type=_port, default=DEFAULT_PORT, help="the server's port")
    c.add_argument(
        "--cafile",
        type=Path,
        default=None,
        help="CA certificate to verify the server (default: ca.pem in the state dir)",
    )
    c.add_argument(
        "--server-name",
        default=None,
        help="name to check in the server's certificate (default: HOST)",
    )
    c.add_argument("--user", default=None, help="account name (logs in when needed)")
    c.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help=f"read the password from this file's first line (or set ${PASSWORD_ENV})",
    )
    c.add_argument(
        "--listen-host", default=None, help="address for taking payments (default: every interface)"
    )
    c.add_argument(
        "--listen-port",
        type=_port,
        default=None,
        help="port for taking payments (0: any free port, told to the server); asked at an "
        "interactive login when not given",
    )
    c.add_argument(
        "--accept",
        choices=["ask", "all", "none"],
        default="ask",
        help="what to do with incoming offers",
    )
    c.add_argument(
        "--ask-timeout",
        type=_seconds,
        default=30.0,
        help="seconds to answer an offer before it is declined",
    )
    c.add_argument(
        "-c",
        "--command",
        dest="commands",
        default=None,
        metavar="COMMANDS",
        help='run these commands (separated by ";") and exit, e.g. "deposit 500; '
        'pay bob 30"; "serve" stays online until signalled',
    )
    c.add_argument("--json", action="store_true", help="machine-readable output (JSON lines)")
    c.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="how much the client logs to stderr",
    )
    return parser


def _client_options(args: argparse.Namespace) -> ClientOptions:
    cafile = args.cafile or (default_state_dir() / "ca.pem")
    return ClientOptions(
        host=args.host,
        port=args.port,
        cafile=cafile,
        server_name=args.server_name,
        user=args.user,
        password_file=args.password_file,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        accept=args.accept,
        ask_timeout=args.ask_timeout,
        commands=args.commands,
        json=args.json,
    )


def _server_options(args: argparse.Namespace) -> ServerOptions:
    n = args.scrypt_n
    if n < 2 or n & (n - 1):
        _usage("--scrypt-n must be a power of 2 (at least 2)")
    config = ServerConfig(
        max_line=args.max_line,
        handshake_timeout=args.handshake_timeout,
        anonymous_idle_timeout=args.idle_timeout,
        write_timeout=args.write_timeout,
        shutdown_grace=args.shutdown_grace,
        max_list=args.max_list,
        hash_threads=args.hash_threads,
        scrypt=ScryptParams(n=n),
        peer_cert_lifetime=args.peer_cert_hours * 3600,
        course_initial_balance=args.course_initial_balance,
        course_idle_timeout=args.course_idle_timeout,
        deposits=args.deposits,
        max_connections=args.max_connections,
        max_connections_per_ip=args.max_connections_per_ip,
        throttle=ThrottleConfig(
            max_account_failures=args.login_failures,
            account_lockout=args.login_lockout,
            max_address_failures=args.address_failures,
            address_window=args.address_window,
        ),
    )
    try:
        limits = Limits(args.max_deposit, args.max_payment, args.max_balance)
    except ValueError as exc:
        _usage(str(exc))
    if not 0 <= args.course_initial_balance <= limits.max_deposit:
        _usage("--course-initial-balance must be within 0..--max-deposit")
    return ServerOptions(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir or default_state_dir(),
        cert=args.cert,
        key=args.key,
        sans=tuple(args.san),
        limits=limits,
        config=config,
        max_batch=args.max_batch,
        course_port=args.course_port,
        course_tls=args.course_tls,
        course_dialect=DIALECTS[args.course_dialect],
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def _usage(message: str) -> NoReturn:
    print(f"p2ppay: {message}", file=sys.stderr)
    raise SystemExit(ExitCode.USAGE)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _explain_server_failure(exc: BaseException) -> str:
    """One line for why the server stopped; the traceback only at --log-level debug."""
    lines: list[str] = []
    for leaf in _leaves(exc):
        if isinstance(leaf, StartupError):
            line = str(leaf)
        elif isinstance(leaf, sqlite3.Error):
            line = f"the ledger cannot be used: {leaf}"
        elif isinstance(leaf, OSError):
            where = f" ({leaf.filename})" if leaf.filename else ""
            line = f"{leaf.strerror or leaf}{where}"
        else:
            log.debug("internal error", exc_info=leaf)
            line = f"internal error: {type(leaf).__name__}: {leaf} (--log-level debug shows more)"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _run_server(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    options = _server_options(args)
    log.info("state directory: %s", options.state_dir)
    try:
        trio.run(partial(run_server, options, handle_signals=True))
    except KeyboardInterrupt:
        logs.final_line("p2ppay server: interrupted", args.log_format)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        logs.final_line(f"p2ppay server: {_explain_server_failure(exc)}", args.log_format)
        return ExitCode.FAILED
    return ExitCode.OK


def _run_client(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, text_format="%(levelname)s %(name)s: %(message)s")
    try:
        return trio.run(run_client, _client_options(args))
    except KeyboardInterrupt:
        # Ctrl-C before the shell was ready to take it (e.g. while connecting).
        print("p2ppay client: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "server":
        return _run_server(args)
    if args.command == "client":
        return _run_client(args)
    if args.command == "admin":
        return admin.run_admin(args, args.state_dir or default_state_dir())
    raise AssertionError(args.command)
