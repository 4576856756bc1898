"""``p2ppay admin``: the operator's commands, run beside a running server (or without one).

They work through the ledger file in the state directory (no network port, no extra secret:
whoever can write the ledger file is the operator), or through the PostgreSQL database that
``--ledger postgresql://...`` names (whoever may write that database is the operator). See
:mod:`p2ppay.ledger.admin` for why a running server honours each change at once. Output goes
to stdout; one line on stderr and the exit status say what went wrong (see
:mod:`p2ppay.exitcodes`), never a traceback.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import getpass
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

import psycopg

from p2ppay import logs
from p2ppay.cli.exitcodes import ExitCode
from p2ppay.cli.shell import PASSWORD_ENV, UsageError, read_password_file
from p2ppay.ledger import LedgerError, ReferenceConflict, UnknownAccount, is_postgres_url
from p2ppay.ledger.admin import (
    AccountRow,
    Adjustment,
    LedgerAdmin,
    Movement,
    NotNative,
    SqliteAdmin,
    new_reference,
)
from p2ppay.ledger.pgadmin import PgAdmin
from p2ppay.passwords import hash_password
from p2ppay.server import LEDGER_FILE
from p2ppay.wire import NEW_PASSWORD_LENGTH
from p2ppay.wire.constraints import MAX_AMOUNT

log = logging.getLogger("p2ppay.cli.admin")

DESCRIPTION = """The operator's commands. They work on the ledger in the state directory (or
the one --ledger names, e.g. the nodes' postgresql://... URL), also while the server runs (a
running server honours a freeze, a password reset or a credit at once).

  accounts [--json]            every account: name, kind, balance, frozen, created, last login
  credit NAME AMOUNT           bring money in (idempotent by --reference)
  debit NAME AMOUNT            take money out (idempotent by --reference)
  freeze NAME / unfreeze NAME  a frozen account can neither pay nor be paid
  reset-password NAME          set a new password; the account's session keys stop counting
  audit                        check the books; exit 0 only if everything holds
  backup DEST                  a consistent copy of the live ledger (SQLite; PostgreSQL: pg_dump)
  export [--csv]               every movement (JSON lines, or CSV)

Exit status: 0 done; 1 refused or the audit failed; 2 usage error."""


class _Usage(Exception):
    """The command line cannot be used (exit 2)."""


def _amount(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"the amount must be within 1..{MAX_AMOUNT}")
    return value


def add_parser(
    sub: argparse._SubParsersAction[Any],
    formatter: type[argparse.HelpFormatter],
    state_help: str,
) -> None:
    """The ``admin`` command and its subcommands, on ``sub``."""
    a = sub.add_parser(
        "admin",
        help="the operator's commands (accounts, credit, freeze, audit, backup, ...)",
        description=DESCRIPTION,
        formatter_class=formatter,
    )

    def common(parser: argparse.ArgumentParser, default: object) -> None:
        # Before or after the subcommand: "admin --state-dir D audit" and "admin audit
        # --state-dir D" both work (the subcommand's copies do not override with defaults).
        parser.add_argument("--state-dir", type=Path, default=default, help=state_help)
        parser.add_argument(
            "--ledger",
            default=default,
            metavar="PATH_OR_URL",
            help="the ledger, if not the state directory's ledger.sqlite3: another SQLite "
            "file, or the postgresql://... URL the server was given",
        )
        parser.add_argument(
            "--log-level",
            default=default if default is argparse.SUPPRESS else "warning",
            choices=logs.LEVELS,
            help="how much to log to stderr",
        )
        parser.add_argument(
            "--log-format",
            default=default if default is argparse.SUPPRESS else "text",
            choices=logs.FORMATS,
            help="log lines as text or as JSON objects",
        )

    common(a, None)
    cmds = a.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    c = cmds.add_parser("accounts", help="list every account", formatter_class=formatter)
    c.add_argument("--json", action="store_true", help="one JSON object per account and line")
    for name, what in (("credit", "bring money into"), ("debit", "take money out of")):
        c = cmds.add_parser(name, help=f"{what} an account", formatter_class=formatter)
        c.add_argument("name", help="the account (in any letter case)")
        c.add_argument("amount", type=_amount, help="a positive whole number")
        c.add_argument(
            "--reference",
            default=None,
            help="your reference for it: the same reference again moves nothing and reports "
            "the first outcome (default: a new one, printed)",
        )
    for name, what in (("freeze", "stop"), ("unfreeze", "allow again")):
        c = cmds.add_parser(
            name, help=f"{what} payments from and to an account", formatter_class=formatter
        )
        c.add_argument("name", help="the account (in any letter case)")
    c = cmds.add_parser(
        "reset-password",
        help="set an account's password; revoke its keys",
        formatter_class=formatter,
    )
    c.add_argument("name", help="the account (a native one: course accounts have no password)")
    c.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help=f"read the new password from this file's first line (or set ${PASSWORD_ENV}; "
        "else it is asked for)",
    )
    cmds.add_parser(
        "audit", help="check the books; exit 0 only if everything holds", formatter_class=formatter
    )
    c = cmds.add_parser(
        "backup",
        help="a consistent copy of the ledger, while it is in use",
        formatter_class=formatter,
    )
    c.add_argument("dest", type=Path, help="the copy's file name (must not exist)")
    c = cmds.add_parser("export", help="every movement, oldest first", formatter_class=formatter)
    c.add_argument("--csv", action="store_true", help="CSV with a header instead of JSON lines")
    for parser in cmds.choices.values():
        common(parser, argparse.SUPPRESS)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


# --- the commands ----------------------------------------------------------------------------


def _accounts(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    rows = admin.accounts()
    if args.json:
        for row in rows:
            print(json.dumps(_account_json(row)), file=out)
        return ExitCode.OK
    if not rows:
        print("No accounts yet.", file=out)
        return ExitCode.OK
    width = max(4, *(len(r.name) for r in rows))
    print(
        f"{'NAME':<{width}}  {'KIND':<6}  {'BALANCE':>16}  FROZEN  {'CREATED':<20}  LAST LOGIN",
        file=out,
    )
    for r in rows:
        print(
            f"{r.name:<{width}}  {r.kind:<6}  {r.balance:>16}  {'yes' if r.frozen else 'no':<6}"
            f"  {_iso(r.created_ms):<20}  {_iso(r.last_login_ms) or '-'}",
            file=out,
        )
    return ExitCode.OK


def _account_json(row: AccountRow) -> dict[str, object]:
    return {
        "name": row.name,
        "kind": row.kind,
        "balance": row.balance,
        "frozen": row.frozen,
        "created": _iso(row.created_ms),
        "last_login": _iso(row.last_login_ms),
    }


def _adjust(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    reference = args.reference or new_reference()
    done: Adjustment = admin.adjust(args.admin_command, args.name, args.amount, reference)
    verb = "Credited" if done.kind == "credit" else "Debited"
    where = "to" if done.kind == "credit" else "from"
    what = f"{verb.lower()} {done.amount} {where} {done.name} (reference {done.reference})"
    if done.replayed:
        print(
            f"Already done at {_iso(done.at_ms)}: {what}; nothing moved now."
            f" The balance was {done.balance} after it.",
            file=out,
        )
    else:
        log.info("%s", what, extra={"user": done.name, "reference": done.reference})
        print(f"{what[0].upper()}{what[1:]}. Balance: {done.balance}", file=out)
    return ExitCode.OK


def _freeze(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    frozen = args.admin_command == "freeze"
    row = admin.set_frozen(args.name, frozen)
    log.info("%s %s", args.admin_command, row.name, extra={"user": row.name})
    state = "frozen: it can neither pay nor be paid" if frozen else "not frozen"
    print(f"{row.name} is {state}.", file=out)
    return ExitCode.OK


def _new_password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        try:
            password = read_password_file(args.password_file)
        except UsageError as exc:
            raise _Usage(str(exc)) from None
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    elif sys.stdin.isatty():
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            raise _Usage("the two passwords differ")
    else:
        raise _Usage(f"no password: give --password-file or set ${PASSWORD_ENV}")
    least, most = NEW_PASSWORD_LENGTH  # the rule register applies
    if not least <= len(password) <= most:
        raise _Usage(f"the new password must be {least} to {most} characters long")
    return password


def _reset_password(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    digest = hash_password(_new_password(args))
    admin.reset_password(args.name, digest)
    log.info("reset the password of %s", args.name, extra={"user": args.name})
    print(
        f"New password set for {args.name}. Its sessions' keys are revoked: payments to it "
        "need a new login.",
        file=out,
    )
    return ExitCode.OK


def _audit(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    report = admin.audit()
    for check in report.checks:
        print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}", file=out)
    if report.ok:
        print("The ledger is sound.", file=out)
        return ExitCode.OK
    failed = ", ".join(c.name for c in report.checks if not c.ok)
    print(f"p2ppay admin: the audit failed: {failed}", file=sys.stderr)
    return ExitCode.FAILED


def _backup(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    admin.backup(args.dest)
    log.info("backed up the ledger to %s", args.dest)
    print(f"Backed up to {args.dest} (a consistent copy; its integrity check passed).", file=out)
    return ExitCode.OK


_FIELDS: Final = (
    "seq", "at", "kind", "payer", "payee", "amount",
    "payer_balance_after", "payee_balance_after", "payment_id", "reference",
)  # fmt: skip


def _movement_row(m: Movement) -> dict[str, object]:
    return {
        "seq": m.seq,
        "at": _iso(m.at_ms),
        "kind": m.kind,
        "payer": m.payer,
        "payee": m.payee,
        "amount": m.amount,
        "payer_balance_after": m.payer_balance_after,
        "payee_balance_after": m.payee_balance_after,
        "payment_id": m.payment_id,
        "reference": m.reference,
    }


def _export(admin: LedgerAdmin, args: argparse.Namespace, out: TextIO) -> int:
    if args.csv:
        writer = csv.DictWriter(out, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        for m in admin.movements():
            writer.writerow(_movement_row(m))
    else:
        for m in admin.movements():
            print(json.dumps(_movement_row(m)), file=out)
    return ExitCode.OK


_COMMANDS: Final[dict[str, Callable[[LedgerAdmin, argparse.Namespace, TextIO], int]]] = {
    "accounts": _accounts,
    "credit": _adjust,
    "debit": _adjust,
    "freeze": _freeze,
    "unfreeze": _freeze,
    "reset-password": _reset_password,
    "audit": _audit,
    "backup": _backup,
    "export": _export,
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_backend(state_dir: Path, ledger: str | None = None) -> LedgerAdmin:
    """The ledger ``ledger`` names (as the server's --ledger does), by default the one in
    ``state_dir``."""
    if ledger is not None and is_postgres_url(ledger):
        return PgAdmin(ledger)
    return SqliteAdmin(Path(ledger) if ledger else state_dir / LEDGER_FILE)


def run_admin(args: argparse.Namespace, state_dir: Path, out: TextIO | None = None) -> int:
    logs.configure(args.log_level, args.log_format)
    out = out or sys.stdout
    try:
        admin = open_backend(state_dir, getattr(args, "ledger", None))
        try:
            return _COMMANDS[args.admin_command](admin, args, out)
        finally:
            admin.close()
    except _Usage as exc:
        print(f"p2ppay admin: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (UnknownAccount, NotNative, ReferenceConflict, LedgerError) as exc:
        print(f"p2ppay admin: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except (sqlite3.Error, psycopg.Error) as exc:
        print(f"p2ppay admin: the ledger cannot be used: {_first_line(exc)}", file=sys.stderr)
        return ExitCode.FAILED
    except BrokenPipeError:
        raise  # (not "Broken pipe": cli.main knows whether our reader went away)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"p2ppay admin: {exc.strerror or exc}{where}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print("p2ppay admin: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
