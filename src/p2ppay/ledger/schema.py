"""The SQLite ledger's tables, and the migrations that bring a file of any older version to
today's: :func:`connect_sqlite` opens a file at :data:`SCHEMA_VERSION`."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from p2ppay.ledger.interface import (
    LedgerUnavailable,
)
from p2ppay.wire.names import name_key

# Accounts are looked up by ``name_key``, the canonical form of the name (p2ppay.names), and
# shown by ``name``, as registered. Movements name accounts as registered.
SCHEMA_VERSION = 5

# The schema as version 1 made it. A new ledger is made at version 1 and then migrated step by
# step like any old one, so every open exercises the migrations the ledgers on disk need.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS accounts (
    name          TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('native', 'course')),
    password_hash TEXT,
    balance       INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created_ms    INTEGER NOT NULL,
    -- the public key certified for the account's current session (DER), and until when:
    -- acceptances are checked against it, so a replaced session's key stops counting
    peer_key      BLOB,
    peer_key_expires_ms INTEGER
);
-- names are unique regardless of case, so nobody can pose as "Alice" beside "alice"
CREATE UNIQUE INDEX IF NOT EXISTS accounts_name_nocase ON accounts(name COLLATE NOCASE);
-- Every movement of money is one row, in one sequence: a deposit brings money in from outside
-- (no payer), a transfer moves it between two accounts and is keyed by its payment id.
CREATE TABLE IF NOT EXISTS movements (
    seq                 INTEGER PRIMARY KEY,
    kind                TEXT NOT NULL CHECK (kind IN ('deposit', 'transfer')),
    payment_id          TEXT UNIQUE,
    payer               TEXT REFERENCES accounts(name),
    payee               TEXT NOT NULL REFERENCES accounts(name),
    amount              INTEGER NOT NULL CHECK (amount > 0),
    payer_balance_after INTEGER CHECK (payer_balance_after >= 0),
    payee_balance_after INTEGER NOT NULL CHECK (payee_balance_after >= 0),
    at_ms               INTEGER NOT NULL,
    CHECK ((kind = 'deposit' AND payer IS NULL AND payment_id IS NULL
            AND payer_balance_after IS NULL)
        OR (kind = 'transfer' AND payer IS NOT NULL AND payment_id IS NOT NULL
            AND payer_balance_after IS NOT NULL AND payer <> payee))
);
CREATE INDEX IF NOT EXISTS movements_payer ON movements(payer, seq);
CREATE INDEX IF NOT EXISTS movements_payee ON movements(payee, seq);
"""

# Version 2: one canonical form of a name, computed by p2ppay.names.name_key (registered as an
# SQL function for this), replaces SQLite's own NOCASE folding. Existing names keep their
# spelling; their keys cannot collide, as NOCASE kept them unique under the same folding.
_TO_V2 = (
    # (SQLite can add a NOT NULL column only with a default; create_account always sets it)
    "ALTER TABLE accounts ADD COLUMN name_key TEXT NOT NULL DEFAULT ''",
    "UPDATE accounts SET name_key = p2ppay_name_key(name)",
    "CREATE UNIQUE INDEX accounts_name_key ON accounts(name_key)",
    "DROP INDEX IF EXISTS accounts_name_nocase",
)

# Version 3: the operator. Money comes from (and goes back to) an issuance account, so every
# movement is double entry: a deposit or an operator's credit moves money from the issuance
# account (payer NULL) to an account, an operator's debit from an account back to it (payee
# NULL). The issuance account's balance is minus everything issued and not withdrawn, so all
# balances, its own included, add up to zero. Accounts can be frozen and remember the last
# login. movements is rebuilt (SQLite cannot change a CHECK in place), keeping every row.
_TO_V3 = (
    "ALTER TABLE accounts ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0 CHECK (frozen IN (0, 1))",
    "ALTER TABLE accounts ADD COLUMN last_login_ms INTEGER",
    """CREATE TABLE issuance (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        balance INTEGER NOT NULL CHECK (balance <= 0)
    )""",
    """INSERT INTO issuance(id, balance)
        SELECT 1, -COALESCE(SUM(amount), 0) FROM movements WHERE kind = 'deposit'""",
    """CREATE TABLE movements_v2 (
        seq                 INTEGER PRIMARY KEY,
        kind                TEXT NOT NULL
                            CHECK (kind IN ('deposit', 'credit', 'debit', 'transfer')),
        payment_id          TEXT UNIQUE,
        -- the operator's reference of a credit or debit: one reference moves money once
        reference           TEXT UNIQUE,
        payer               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        payee               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        amount              INTEGER NOT NULL CHECK (amount > 0),
        payer_balance_after INTEGER CHECK (payer_balance_after >= 0),
        payee_balance_after INTEGER CHECK (payee_balance_after >= 0),
        at_ms               INTEGER NOT NULL,
        CHECK ((payer IS NULL) = (payer_balance_after IS NULL)
            AND (payee IS NULL) = (payee_balance_after IS NULL)),
        CHECK ((kind = 'deposit' AND payer IS NULL AND payee IS NOT NULL
                AND payment_id IS NULL AND reference IS NULL)
            OR (kind = 'credit' AND payer IS NULL AND payee IS NOT NULL
                AND payment_id IS NULL AND reference IS NOT NULL)
            OR (kind = 'debit' AND payer IS NOT NULL AND payee IS NULL
                AND payment_id IS NULL AND reference IS NOT NULL)
            OR (kind = 'transfer' AND payer IS NOT NULL AND payee IS NOT NULL
                AND payment_id IS NOT NULL AND reference IS NULL AND payer <> payee))
    )""",
    """INSERT INTO movements_v2(seq, kind, payment_id, payer, payee, amount,
            payer_balance_after, payee_balance_after, at_ms)
        SELECT seq, kind, payment_id, payer, payee, amount,
            payer_balance_after, payee_balance_after, at_ms FROM movements""",
    "DROP TABLE movements",
    "ALTER TABLE movements_v2 RENAME TO movements",
    "CREATE INDEX movements_payer ON movements(payer, seq)",
    "CREATE INDEX movements_payee ON movements(payee, seq)",
)

# Version 4: payments people expect (issue 13). A transfer may carry a memo (1-140 printable
# characters, checked before it gets here; the CHECK bounds its length in case code did not);
# a deposit may carry the client's deposit id, so that a retried deposit moves money once; and
# payment requests: a request is its requester's (the payee's) consent given in advance, held
# here, so the payer can pay it while the requester is offline. Its id is the payment id of
# the transfer that pays it (movements.payment_id is UNIQUE: paid at most once). ``told`` is 0
# while the requester has not been told that the request was paid or declined (the next
# login tells). A request whose expires_ms has passed is expired, whatever its state says.
_TO_V4 = (
    "ALTER TABLE movements ADD COLUMN memo TEXT"
    " CHECK (memo IS NULL OR length(memo) BETWEEN 1 AND 140)",
    "ALTER TABLE movements ADD COLUMN deposit_id TEXT",
    "CREATE UNIQUE INDEX movements_deposit_id ON movements(deposit_id)",
    """CREATE TABLE payment_requests (
        id          TEXT PRIMARY KEY,
        requester   TEXT NOT NULL REFERENCES accounts(name),
        payer       TEXT NOT NULL REFERENCES accounts(name),
        amount      INTEGER NOT NULL CHECK (amount > 0),
        memo        TEXT CHECK (memo IS NULL OR length(memo) BETWEEN 1 AND 140),
        created_ms  INTEGER NOT NULL,
        expires_ms  INTEGER NOT NULL,
        state       TEXT NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'paid', 'declined', 'cancelled')),
        closed_ms   INTEGER,
        told        INTEGER NOT NULL DEFAULT 1 CHECK (told IN (0, 1)),
        CHECK (requester <> payer),
        CHECK ((state = 'open') = (closed_ms IS NULL))
    )""",
    "CREATE INDEX payment_requests_payer ON payment_requests(payer, state)",
    "CREATE INDEX payment_requests_requester ON payment_requests(requester, state)",
    # what a login asks (news not told yet): only the few such rows are indexed
    "CREATE INDEX payment_requests_news ON payment_requests(requester) WHERE told = 0",
)

# Version 5 (issue 22): ``requests`` lists the requests of accounts the payer has paid or been
# paid by first, which asks "any movement from A to B?" per request: movements_pair answers it
# with one probe (movements_payer would scan all of A's payments). Closed and expired requests
# are purged after a retention period; the two partial indexes find them without a scan.
_TO_V5 = (
    "CREATE INDEX movements_pair ON movements(payer, payee)",
    "CREATE INDEX payment_requests_closed ON payment_requests(closed_ms) WHERE state <> 'open'",
    "CREATE INDEX payment_requests_expires ON payment_requests(expires_ms) WHERE state = 'open'",
)

#: The statements that take a ledger from version N to N + 1, by N (0: a new file).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: tuple(stmt for stmt in SCHEMA_V1.split(";") if stmt.strip()),
    1: _TO_V2,
    2: _TO_V3,
    3: _TO_V4,
    4: _TO_V5,
}
assert sorted(_MIGRATIONS) == list(range(SCHEMA_VERSION))


def connect_sqlite(
    path: Path | str,
    busy_timeout_ms: int = 5000,
    *,
    factory: type[sqlite3.Connection] = sqlite3.Connection,
) -> sqlite3.Connection:
    """A connection to the ledger at ``path`` (created if need be) at :data:`SCHEMA_VERSION`:
    WAL, ``synchronous=FULL``, foreign keys on, autocommit (callers BEGIN themselves).

    Migrating runs in one write transaction, so the server and an admin command opening the
    same old file at once migrate it once. A file from a newer p2ppay is refused."""
    if str(path) != ":memory:" and not os.path.exists(path):
        # It holds password hashes and everyone's movements: readable by its owner only.
        # (SQLite gives the -wal and -shm files the same permissions.)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=factory)
    db.create_function("p2ppay_name_key", 1, name_key, deterministic=True)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA temp_store=MEMORY")  # the writer's record of balances (sqlite.py)
        if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return db  # nothing to migrate: no need to wait for the write lock
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerUnavailable(
                    f"{path} has schema version {version}; this p2ppay knows {SCHEMA_VERSION}"
                )
            for step in range(version, SCHEMA_VERSION):
                try:
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                except sqlite3.Error as exc:
                    raise LedgerUnavailable(
                        f"{path}: cannot upgrade the schema to version {step + 1}: {exc}"
                    ) from exc
            if version < SCHEMA_VERSION:
                if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise LedgerUnavailable(f"{path}: a movement names a missing account")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
    except BaseException:
        db.close()
        raise
    return db
