"""Command line: ``p2ppay server`` and ``p2ppay client``. Parses arguments; nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import platformdirs
import trio

from . import __version__
from .ledger import Limits
from .limits import ThrottleConfig
from .passwords import ScryptParams
from .protocol import MAX_DEPTH_CAP
from .server import DEFAULT_PORT, ServerConfig, ServerOptions, run_server
from .shell import PASSWORD_ENV, ClientOptions, run_client

STATE_ENV = "P2PPAY_STATE_DIR"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2ppay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"p2ppay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = ServerConfig()
    lim = Limits()
    s = sub.add_parser(
        "server",
        help="run the payment server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("--host", default=None, help="address to listen on (default: every interface)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TLS port (0: any free one)")
    s.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"ledger and certificates (default: ${STATE_ENV} or the user data dir)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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
    s.add_argument("--handshake-timeout", type=_seconds, default=d.handshake_timeout)
    s.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=d.anonymous_idle_timeout,
        help="seconds after connecting (or logging out) within which a connection must log in",
    )
    s.add_argument(
        "--line-timeout",
        type=_seconds,
        default=d.line_timeout,
        help="seconds within which a request line, once begun, must arrive whole",
    )
    s.add_argument(
        "--max-depth",
        type=_positive_int,
        default=d.max_depth,
        help=f"deepest nesting of JSON arrays and objects in a request (at most {MAX_DEPTH_CAP})",
    )
    s.add_argument("--write-timeout", type=_seconds, default=d.write_timeout)
    s.add_argument("--shutdown-grace", type=_seconds, default=d.shutdown_grace)
    s.add_argument(
        "--max-list",
        type=_positive_int,
        default=d.max_list,
        help="most online users one list reply names",
    )
    s.add_argument("--max-deposit", type=_positive_int, default=lim.max_deposit)
    s.add_argument("--max-payment", type=_positive_int, default=lim.max_payment)
    s.add_argument("--max-balance", type=_positive_int, default=lim.max_balance)
    s.add_argument(
        "--max-batch", type=_positive_int, default=512, help="most operations in one ledger commit"
    )
    s.add_argument(
        "--hash-threads",
        type=_positive_int,
        default=d.hash_threads,
        help="threads for password hashing",
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
        help="lifetime of the peer certificate a login gets",
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
        help="what a new course account starts with (REGISTER#name)",
    )
    c = sub.add_parser(
        "client",
        help="the terminal client (interactive, or scripted with -c)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    c.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
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
        raise SystemExit("p2ppay: --scrypt-n must be a power of 2 (at least 2)")
    if args.max_depth > MAX_DEPTH_CAP:
        raise SystemExit(f"p2ppay: --max-depth must be at most {MAX_DEPTH_CAP}")
    config = ServerConfig(
        max_line=args.max_line,
        handshake_timeout=args.handshake_timeout,
        anonymous_idle_timeout=args.idle_timeout,
        line_timeout=args.line_timeout,
        max_depth=args.max_depth,
        write_timeout=args.write_timeout,
        shutdown_grace=args.shutdown_grace,
        max_list=args.max_list,
        hash_threads=args.hash_threads,
        scrypt=ScryptParams(n=n),
        peer_cert_lifetime=args.peer_cert_hours * 3600,
        course_initial_balance=args.course_initial_balance,
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
        raise SystemExit(f"p2ppay: {exc}") from None
    if not 0 <= args.course_initial_balance <= limits.max_deposit:
        raise SystemExit("p2ppay: --course-initial-balance must be within 0..--max-deposit")
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
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "server":
        logging.basicConfig(
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        options = _server_options(args)
        logging.getLogger("p2ppay").info("state directory: %s", options.state_dir)
        try:
            trio.run(partial(run_server, options, handle_signals=True))
        except OSError as exc:
            print(f"p2ppay server: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "client":
        logging.basicConfig(
            level=args.log_level.upper(),
            stream=sys.stderr,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return trio.run(run_client, _client_options(args))
    raise AssertionError(args.command)
