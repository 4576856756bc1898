"""Command line: ``p2ppay server`` and ``p2ppay client``. Parses arguments; nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NoReturn

import platformdirs
import trio

from p2ppay import __version__, logs
from p2ppay.cli import admin
from p2ppay.cli.exitcodes import ExitCode, quiet_stdout, stdout_reader_gone
from p2ppay.cli.profiles import (
    CAFILE_ENV,
    SERVER_ENV,
    USER_ENV,
    ProfileError,
    load_profile,
    profile_path,
    resolve,
)
from p2ppay.cli.shell import PASSWORD_ENV, ClientOptions, run_client
from p2ppay.cli.terminal import OutputClosed
from p2ppay.ledger import LedgerFileUnusable, LedgerUnavailable
from p2ppay.server import DEFAULT_PORT, ServerOptions, StartupError, run_server, workers
from p2ppay.settings import add_flags, from_flags, port, seconds

STATE_ENV = "P2PPAY_STATE_DIR"

DESCRIPTION = """Secure person-to-person micropayments over TLS.

  p2ppay server   run the payment server (accounts, ledger, who is online)
  p2ppay client   the terminal client: register, log in, deposit, list, pay
  p2ppay admin    the operator's commands: accounts, credit, freeze, audit, backup, ...
  p2ppay verify-receipt FILE   check a payment receipt's signature, offline

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


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage error is one line: the server's whole usage is some 60
    lines, and the line that says what was wrong came last, under them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="p2ppay", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"p2ppay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser(
        "server",
        help="run the payment server",
        description="Run the p2ppay server until Ctrl-C or SIGTERM. Every limit is a flag.",
        formatter_class=_HelpFormatter,
    )
    s.add_argument("--version", action="version", version=f"p2ppay {__version__}")
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
    # Every other flag is a field of ServerOptions or of the config it holds (settings.py).
    add_flags(s, ServerOptions)
    # What the --workers supervisor tells each worker process (server/workers.py).
    s.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    admin.add_parser(
        sub,
        _HelpFormatter,
        f"the server's state directory (default: ${STATE_ENV} or the user data dir)",
    )
    c = sub.add_parser(
        "client",
        help="the terminal client (interactive, or scripted with -c)",
        description="The p2ppay terminal client: interactive, or scripted with -c.\n"
        "Exit status: 0 done; 1 a command failed; 2 usage error; 3 cannot reach the server.\n"
        f"Settings come from the flags, else ${SERVER_ENV} (HOST:PORT), ${CAFILE_ENV} and "
        f"${USER_ENV},\nelse the profile {profile_path()} (TOML: server, cafile,\n"
        "server_name, user, password_file, accept), else the defaults.",
        formatter_class=_HelpFormatter,
    )
    c.add_argument("--version", action="version", version=f"p2ppay {__version__}")
    c.add_argument("host", nargs="?", default=None, help="the server's host (default: localhost)")
    c.add_argument(
        "port",
        nargs="?",
        type=port,
        default=None,
        help=f"the server's port (default: {DEFAULT_PORT})",
    )
    c.add_argument(
        "--cafile",
        type=Path,
        default=None,
        help=f"CA certificate to verify the server (default: ${CAFILE_ENV}, else ca.pem in "
        "the state dir)",
    )
    c.add_argument(
        "--server-name",
        default=None,
        help="name to check in the server's certificate (default: HOST)",
    )
    c.add_argument(
        "--user", default=None, help=f"account name, logs in when needed (default: ${USER_ENV})"
    )
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
        type=port,
        default=None,
        help="port for taking payments (0: any free port, told to the server); asked at an "
        "interactive login when not given",
    )
    c.add_argument(
        "--accept",
        choices=["ask", "all", "none"],
        default=None,
        help="what to do with incoming offers (default: ask)",
    )
    c.add_argument(
        "--ask-timeout",
        type=seconds,
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
    v = sub.add_parser(
        "verify-receipt",
        help="check a payment receipt offline",
        description="Check a receipt (from the client's receipt command) against the server's "
        "CA, offline.\nExit status: 0 it is valid (a one-line summary is printed); 1 it is not "
        "(altered, forged, or signed under another CA: the reason is printed); 2 the file or "
        "the CA cannot be read.",
        formatter_class=_HelpFormatter,
    )
    v.add_argument("file", type=Path, help="the receipt (JSON)")
    v.add_argument(
        "--cafile",
        type=Path,
        default=None,
        help="the server's CA certificate (default: ca.pem in the state dir)",
    )
    return parser


def client_options(args: argparse.Namespace) -> ClientOptions:
    """The client's options: flags, else the environment, else the profile, else defaults.
    Raises ProfileError for a profile or an environment variable that cannot be used."""
    where = resolve(
        host=args.host,
        port=args.port,
        cafile=args.cafile,
        server_name=args.server_name,
        user=args.user,
        password_file=args.password_file,
        accept=args.accept,
        env=os.environ,
        profile=load_profile(profile_path(), DEFAULT_PORT),
        default_port=DEFAULT_PORT,
        default_cafile=default_state_dir() / "ca.pem",
    )
    return ClientOptions(
        host=where.host,
        port=where.port,
        cafile=where.cafile,
        server_name=where.server_name,
        user=where.user,
        password_file=where.password_file,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        accept=where.accept,
        ask_timeout=args.ask_timeout,
        commands=args.commands,
        json=args.json,
    )


def server_options(args: argparse.Namespace) -> ServerOptions:
    try:
        options: ServerOptions = from_flags(
            ServerOptions, args, state_dir=args.state_dir or default_state_dir()
        )
    except ValueError as exc:
        _usage(str(exc))
    return options


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
        elif isinstance(leaf, sqlite3.Error | LedgerUnavailable):
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


def _run_server(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.worker_index is not None:
        return _run_worker(args)
    logs.configure(args.log_level, args.log_format)
    options = server_options(args)
    log.info("state directory: %s", options.state_dir)
    try:
        if options.workers > 1:
            trio.run(workers.supervise, options, argv)
        else:
            trio.run(partial(run_server, options, handle_signals=True))
    except KeyboardInterrupt:
        logs.final_line("p2ppay server: interrupted", args.log_format)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        logs.final_line(f"p2ppay server: {_explain_server_failure(exc)}", args.log_format)
        if any(isinstance(leaf, LedgerFileUnusable) for leaf in _leaves(exc)):
            return ExitCode.LEDGER  # (a restart cannot help: contrib's unit does not)
        return ExitCode.FAILED
    return ExitCode.OK


def _run_worker(args: argparse.Namespace) -> int:
    """One of the processes ``--workers`` starts: its failure line goes to the supervisor,
    which says it once for all of them."""
    index = args.worker_index
    logs.configure(args.log_level, args.log_format, worker=index)
    if args.worker_fd is None:
        _usage("--worker-index goes with --worker-fd (both are the supervisor's business)")
    link = workers.SupervisorLink(args.worker_fd)
    options = server_options(args)
    try:
        trio.run(workers.run_worker, options, link)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception as exc:
        line = _explain_server_failure(exc)
        if not link.failed(line):
            logs.final_line(f"p2ppay server: worker {index}: {line}", args.log_format)
        return ExitCode.FAILED
    return ExitCode.OK


def _run_client(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, text_format="%(levelname)s %(name)s: %(message)s")
    try:
        options = client_options(args)
    except ProfileError as exc:
        print(f"p2ppay client: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        return trio.run(run_client, options)
    except KeyboardInterrupt:
        # Ctrl-C before the shell was ready to take it (e.g. while connecting).
        print("p2ppay client: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


#: a receipt is a few hundred bytes; a file past this is refused unread
MAX_RECEIPT_BYTES = 64 * 1024


def _verify_receipt(args: argparse.Namespace) -> int:
    from cryptography import x509

    from p2ppay.receipts import ReceiptInvalid, verify_receipt

    cafile: Path = args.cafile or (default_state_dir() / "ca.pem")
    try:
        ca = x509.load_pem_x509_certificate(cafile.read_bytes())
    except (OSError, ValueError) as exc:
        print(
            f"p2ppay verify-receipt: cannot read the CA {cafile}: {_reason(exc)}", file=sys.stderr
        )
        return ExitCode.USAGE
    try:
        with args.file.open("rb") as f:
            data = f.read(MAX_RECEIPT_BYTES + 1)
        if len(data) > MAX_RECEIPT_BYTES:
            raise ValueError(f"larger than {MAX_RECEIPT_BYTES} bytes: not a receipt")
        receipt = json.loads(data.decode("utf-8"))
    except RecursionError:
        print(f"p2ppay verify-receipt: cannot read {args.file}: nested too deeply to be a "
              "receipt", file=sys.stderr)  # fmt: skip
        return ExitCode.USAGE
    except (OSError, ValueError) as exc:
        print(f"p2ppay verify-receipt: cannot read {args.file}: {_reason(exc)}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        facts = verify_receipt(receipt, ca)
    except ReceiptInvalid as exc:
        print(f"p2ppay verify-receipt: {args.file}: NOT valid: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    print(facts.summary())
    return ExitCode.OK


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc).splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # Whoever reads our output may go away at any moment (``... | head``): then we stop
    # quietly with OUTPUT_CLOSED (a command that had already failed keeps its status), never
    # a traceback, and nothing more is written there.
    code: int = ExitCode.OUTPUT_CLOSED
    try:
        code = _dispatch(args, argv)
        sys.stdout.flush()
    except* OutputClosed:
        quiet_stdout()
    except* BrokenPipeError:
        if not stdout_reader_gone():
            raise  # (another pipe: not ours to explain here)
        quiet_stdout()
    return code


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "server":
        return _run_server(args, argv)
    if args.command == "client":
        return _run_client(args)
    if args.command == "admin":
        return admin.run_admin(args, args.state_dir or default_state_dir())
    if args.command == "verify-receipt":
        return _verify_receipt(args)
    raise AssertionError(args.command)
