"""A PostgreSQL database of its own for each test that needs one.

The server to use comes from ``P2PPAY_TEST_POSTGRES`` (a DSN, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``); without it, PostgreSQL tests are skipped with
that reason. Each test gets a fresh database (``p2ppay_test_<random>``), dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ENV = "P2PPAY_TEST_POSTGRES"
SKIP_REASON = f"PostgreSQL tests need {ENV}=postgresql://... (.ci/run sets it)"


def admin_dsn() -> str | None:
    """The DSN the tests were given, if any."""
    return os.environ.get(ENV) or None


def _url(dsn: str, dbname: str) -> str:
    """``dsn`` pointed at ``dbname``, as a postgresql:// URL (what ``--ledger`` takes)."""
    params = conninfo_to_dict(make_conninfo(dsn))
    user = params.get("user", "")
    password = params.get("password")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return f"postgresql://{auth}{host}:{port}/{dbname}"


@contextmanager
def fresh_database(dsn: str, *, sql_ascii: bool = False) -> Iterator[str]:
    """Create an empty database on the server ``dsn`` names (in the server's default encoding,
    or SQL_ASCII: text there may be any bytes); yield its URL; drop it after."""
    name = f"p2ppay_test_{uuid.uuid4().hex[:12]}"
    create = "CREATE DATABASE {}"
    if sql_ascii:
        create += " ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL(create).format(sql.Identifier(name)))
    try:
        yield _url(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
