"""The PostgreSQL test fixture: a fresh, empty database per test, dropped afterwards."""

from __future__ import annotations

import psycopg
import pytest

from .pgdb import SKIP_REASON, admin_dsn, fresh_database


def test_fresh_database_is_empty_and_dropped_after() -> None:
    dsn = admin_dsn()
    if dsn is None:
        pytest.skip(SKIP_REASON)
    with fresh_database(dsn) as url, psycopg.connect(url) as db:
        row = db.execute(
            "SELECT current_database(), (SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = 'public')"
        ).fetchone()
        assert row is not None
        name, tables = row
        assert name.startswith("p2ppay_test_") and tables == 0
    with psycopg.connect(dsn) as admin:
        gone = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert gone is None
