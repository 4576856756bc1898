"""The PostgreSQL ledger's tables, its settle function and their migrations:
:func:`connect_postgres` opens a connection to a database at :data:`PG_SCHEMA_VERSION`.

The tables are SQLite's version 3 (:mod:`.schema`) in PostgreSQL's types: money is ``BIGINT``
with the same ``CHECK``s, payment ids are ``UUID``, keys ``BYTEA``. The version lives in the
``p2ppay_schema`` table; migrating runs in one transaction under an advisory lock, so several
nodes starting at once on one database migrate it once. A database from a newer p2ppay is
refused.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from p2ppay.ledger.interface import LedgerUnavailable
from p2ppay.ledger.pgtimeouts import PgTimeouts

PgConnection = psycopg.Connection[TupleRow]

PG_SCHEMA_VERSION = 4

#: The advisory lock key migrations hold (any constant; "p2ppay" in ASCII).
_MIGRATION_LOCK = 0x703270706179

_TABLES = (
    """CREATE TABLE accounts (
        name                TEXT PRIMARY KEY,  -- as registered
        name_key            TEXT NOT NULL UNIQUE,  -- p2ppay.names.name_key(name)
        kind                TEXT NOT NULL CHECK (kind IN ('native', 'course')),
        password_hash       TEXT,
        balance             BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
        created_ms          BIGINT NOT NULL,
        peer_key            BYTEA,
        peer_key_expires_ms BIGINT,
        frozen              BOOLEAN NOT NULL DEFAULT FALSE,
        last_login_ms       BIGINT
    )""",
    """CREATE TABLE issuance (
        id      INTEGER PRIMARY KEY CHECK (id = 1),
        balance BIGINT NOT NULL CHECK (balance <= 0)
    )""",
    "INSERT INTO issuance(id, balance) VALUES (1, 0)",
    """CREATE TABLE movements (
        seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind                TEXT NOT NULL
                            CHECK (kind IN ('deposit', 'credit', 'debit', 'transfer')),
        payment_id          UUID UNIQUE,
        reference           TEXT UNIQUE,
        payer               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        payee               TEXT REFERENCES accounts(name),  -- NULL: the issuance account
        amount              BIGINT NOT NULL CHECK (amount > 0),
        payer_balance_after BIGINT CHECK (payer_balance_after >= 0),
        payee_balance_after BIGINT CHECK (payee_balance_after >= 0),
        at_ms               BIGINT NOT NULL,
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
    "CREATE INDEX movements_payer ON movements(payer, seq)",
    "CREATE INDEX movements_payee ON movements(payee, seq)",
)

# One call settles a whole batch (a JSON array of {pid, payer_key, payee_key, amount, key},
# ``key`` the hex of the acceptance's key or null), so a batch costs one round trip, not a few
# per settle. It returns one row per settle, in order: o_code 'ok', 'replayed', or a refusal
# (the Python side names the LedgerError), with what the message or the Transfer needs.
#
# It first locks every account the batch names in name_key order: batches on other nodes that
# want some of the same accounts queue behind it instead of deadlocking. Only then does it look
# for an earlier settle of each payment id: a node settling the same id at the same moment
# holds the same locks, so this one sees its committed row and replays it. (A same id with other
# accounts, which is a conflict, is caught by the INSERT's ON CONFLICT, which waits for the
# other transaction; the loop then looks again.) Refusals write nothing. A new transfer sends
# its NOTIFY, which PostgreSQL delivers only when (and if) the transaction commits.
_SETTLE_FUNCTION = r"""
CREATE FUNCTION p2ppay_settle_batch(batch jsonb, max_payment bigint, max_balance bigint,
                                    now_ms bigint)
RETURNS TABLE(o_code text, o_payer text, o_payee text, o_amount bigint,
              o_payer_balance bigint, o_payee_balance bigint, o_at_ms bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    item jsonb;
    v_pid uuid;
    v_payer_key text;
    v_payee_key text;
    v_amount bigint;
    v_key bytea;
    v_check boolean;
    prior record;
    src record;
    dst record;
    payer_after bigint;
    payee_after bigint;
    inserted bigint;
BEGIN
    -- FOR NO KEY UPDATE: the strongest lock short of key changes, which lets the movements'
    -- foreign key checks by others through.
    PERFORM 1 FROM accounts a
        WHERE a.name_key IN (SELECT e->>'payer_key' FROM jsonb_array_elements(batch) e
                             UNION SELECT e->>'payee_key' FROM jsonb_array_elements(batch) e)
        ORDER BY a.name_key
        FOR NO KEY UPDATE;
    FOR item IN SELECT e.value FROM jsonb_array_elements(batch) WITH ORDINALITY e
                ORDER BY e.ordinality LOOP
        v_pid := (item->>'pid')::uuid;
        v_payer_key := item->>'payer_key';
        v_payee_key := item->>'payee_key';
        v_amount := (item->>'amount')::bigint;
        v_check := jsonb_typeof(item->'key') = 'string';
        v_key := CASE WHEN v_check THEN decode(item->>'key', 'hex') END;
        -- At most twice round: again only if another node inserted this id meanwhile.
        LOOP
            SELECT m.payer, m.payee, m.amount, m.payer_balance_after, m.payee_balance_after,
                   m.at_ms, pa.name_key AS payer_key, pe.name_key AS payee_key
                INTO prior
                FROM movements m
                JOIN accounts pa ON pa.name = m.payer
                JOIN accounts pe ON pe.name = m.payee
                WHERE m.payment_id = v_pid;
            IF FOUND THEN
                IF prior.payer_key = v_payer_key AND prior.payee_key = v_payee_key
                        AND prior.amount = v_amount THEN
                    o_code := 'replayed';
                    o_payer := prior.payer;
                    o_payee := prior.payee;
                    o_amount := prior.amount;
                    o_payer_balance := prior.payer_balance_after;
                    o_payee_balance := prior.payee_balance_after;
                    o_at_ms := prior.at_ms;
                ELSE
                    o_code := 'PaymentIdConflict';
                END IF;
                RETURN NEXT;
                EXIT;
            END IF;
            o_payer := NULL; o_payee := NULL; o_amount := NULL;
            o_payer_balance := NULL; o_payee_balance := NULL; o_at_ms := NULL;
            IF v_payer_key = v_payee_key THEN
                o_code := 'SelfPayment'; RETURN NEXT; EXIT;
            END IF;
            IF v_amount < 1 OR v_amount > max_payment THEN
                o_code := 'AmountOutOfRange'; RETURN NEXT; EXIT;
            END IF;
            SELECT a.name, a.balance, a.kind, a.frozen, a.peer_key INTO src
                FROM accounts a WHERE a.name_key = v_payer_key;
            IF NOT FOUND THEN
                o_code := 'UnknownAccount'; RETURN NEXT; EXIT;
            END IF;
            SELECT a.name, a.balance, a.kind, a.frozen, a.peer_key INTO dst
                FROM accounts a WHERE a.name_key = v_payee_key;
            IF NOT FOUND OR dst.kind <> src.kind THEN
                -- course accounts (no password) and native ones never pay each other
                o_code := 'UnknownPayee'; RETURN NEXT; EXIT;
            END IF;
            IF src.frozen OR dst.frozen THEN
                o_code := 'AccountFrozen';
                o_payer := CASE WHEN src.frozen THEN src.name ELSE dst.name END;
                RETURN NEXT; EXIT;
            END IF;
            IF v_check AND dst.peer_key IS DISTINCT FROM v_key THEN
                o_code := CASE WHEN dst.peer_key IS NULL THEN 'NoPeerKey' ELSE 'KeyChanged' END;
                o_payee := dst.name;
                RETURN NEXT; EXIT;
            END IF;
            IF src.balance < v_amount THEN
                o_code := 'InsufficientFunds';
                o_payer_balance := src.balance;
                RETURN NEXT; EXIT;
            END IF;
            payer_after := src.balance - v_amount;
            payee_after := dst.balance + v_amount;
            IF payee_after > max_balance THEN
                o_code := 'BalanceLimit'; o_payee := dst.name; RETURN NEXT; EXIT;
            END IF;
            INSERT INTO movements(kind, payment_id, payer, payee, amount,
                                  payer_balance_after, payee_balance_after, at_ms)
                VALUES ('transfer', v_pid, src.name, dst.name, v_amount,
                        payer_after, payee_after, now_ms)
                ON CONFLICT (payment_id) DO NOTHING;
            GET DIAGNOSTICS inserted = ROW_COUNT;
            CONTINUE WHEN inserted = 0;
            UPDATE accounts a
                SET balance = CASE WHEN a.name = src.name THEN payer_after ELSE payee_after END
                WHERE a.name IN (src.name, dst.name);
            PERFORM pg_notify('p2ppay_settled', json_build_object(
                'payment_id', v_pid::text, 'payer', src.name, 'payee', dst.name,
                'amount', v_amount, 'payer_balance', payer_after,
                'payee_balance', payee_after, 'at_ms', now_ms)::text);
            o_code := 'ok';
            o_payer := src.name;
            o_payee := dst.name;
            o_amount := v_amount;
            o_payer_balance := payer_after;
            o_payee_balance := payee_after;
            o_at_ms := now_ms;
            RETURN NEXT;
            EXIT;
        END LOOP;
    END LOOP;
END
$fn$
"""

# Version 2 (the SQLite ledger's version 4, issue 13): the settle function also takes, compares,
# stores, returns and announces a transfer's memo (its result gains a column, so it is
# replaced, not altered).
_SETTLE_FUNCTION_V2 = r"""
CREATE FUNCTION p2ppay_settle_batch(batch jsonb, max_payment bigint, max_balance bigint,
                                    now_ms bigint)
RETURNS TABLE(o_code text, o_payer text, o_payee text, o_amount bigint,
              o_payer_balance bigint, o_payee_balance bigint, o_at_ms bigint, o_memo text)
LANGUAGE plpgsql AS $fn$
DECLARE
    item jsonb;
    v_pid uuid;
    v_payer_key text;
    v_payee_key text;
    v_amount bigint;
    v_memo text;
    v_key bytea;
    v_check boolean;
    prior record;
    src record;
    dst record;
    payer_after bigint;
    payee_after bigint;
    inserted bigint;
BEGIN
    -- FOR NO KEY UPDATE: the strongest lock short of key changes, which lets the movements'
    -- foreign key checks by others through.
    PERFORM 1 FROM accounts a
        WHERE a.name_key IN (SELECT e->>'payer_key' FROM jsonb_array_elements(batch) e
                             UNION SELECT e->>'payee_key' FROM jsonb_array_elements(batch) e)
        ORDER BY a.name_key
        FOR NO KEY UPDATE;
    FOR item IN SELECT e.value FROM jsonb_array_elements(batch) WITH ORDINALITY e
                ORDER BY e.ordinality LOOP
        v_pid := (item->>'pid')::uuid;
        v_payer_key := item->>'payer_key';
        v_payee_key := item->>'payee_key';
        v_amount := (item->>'amount')::bigint;
        v_memo := item->>'memo';
        v_check := jsonb_typeof(item->'key') = 'string';
        v_key := CASE WHEN v_check THEN decode(item->>'key', 'hex') END;
        -- At most twice round: again only if another node inserted this id meanwhile.
        LOOP
            SELECT m.payer, m.payee, m.amount, m.payer_balance_after, m.payee_balance_after,
                   m.at_ms, m.memo, pa.name_key AS payer_key, pe.name_key AS payee_key
                INTO prior
                FROM movements m
                JOIN accounts pa ON pa.name = m.payer
                JOIN accounts pe ON pe.name = m.payee
                WHERE m.payment_id = v_pid;
            IF FOUND THEN
                IF prior.payer_key = v_payer_key AND prior.payee_key = v_payee_key
                        AND prior.amount = v_amount
                        AND prior.memo IS NOT DISTINCT FROM v_memo THEN
                    o_code := 'replayed';
                    o_payer := prior.payer;
                    o_payee := prior.payee;
                    o_amount := prior.amount;
                    o_payer_balance := prior.payer_balance_after;
                    o_payee_balance := prior.payee_balance_after;
                    o_at_ms := prior.at_ms;
                    o_memo := prior.memo;
                ELSE
                    o_code := 'PaymentIdConflict';
                END IF;
                RETURN NEXT;
                EXIT;
            END IF;
            o_payer := NULL; o_payee := NULL; o_amount := NULL;
            o_payer_balance := NULL; o_payee_balance := NULL; o_at_ms := NULL; o_memo := NULL;
            IF v_payer_key = v_payee_key THEN
                o_code := 'SelfPayment'; RETURN NEXT; EXIT;
            END IF;
            IF v_amount < 1 OR v_amount > max_payment THEN
                o_code := 'AmountOutOfRange'; RETURN NEXT; EXIT;
            END IF;
            SELECT a.name, a.balance, a.kind, a.frozen, a.peer_key INTO src
                FROM accounts a WHERE a.name_key = v_payer_key;
            IF NOT FOUND THEN
                o_code := 'UnknownAccount'; RETURN NEXT; EXIT;
            END IF;
            SELECT a.name, a.balance, a.kind, a.frozen, a.peer_key INTO dst
                FROM accounts a WHERE a.name_key = v_payee_key;
            IF NOT FOUND OR dst.kind <> src.kind THEN
                -- course accounts (no password) and native ones never pay each other
                o_code := 'UnknownPayee'; RETURN NEXT; EXIT;
            END IF;
            IF src.frozen OR dst.frozen THEN
                o_code := 'AccountFrozen';
                o_payer := CASE WHEN src.frozen THEN src.name ELSE dst.name END;
                RETURN NEXT; EXIT;
            END IF;
            IF v_check AND dst.peer_key IS DISTINCT FROM v_key THEN
                o_code := CASE WHEN dst.peer_key IS NULL THEN 'NoPeerKey' ELSE 'KeyChanged' END;
                o_payee := dst.name;
                RETURN NEXT; EXIT;
            END IF;
            IF src.balance < v_amount THEN
                o_code := 'InsufficientFunds';
                o_payer_balance := src.balance;
                RETURN NEXT; EXIT;
            END IF;
            payer_after := src.balance - v_amount;
            payee_after := dst.balance + v_amount;
            IF payee_after > max_balance THEN
                o_code := 'BalanceLimit'; o_payee := dst.name; RETURN NEXT; EXIT;
            END IF;
            INSERT INTO movements(kind, payment_id, payer, payee, amount,
                                  payer_balance_after, payee_balance_after, at_ms, memo)
                VALUES ('transfer', v_pid, src.name, dst.name, v_amount,
                        payer_after, payee_after, now_ms, v_memo)
                ON CONFLICT (payment_id) DO NOTHING;
            GET DIAGNOSTICS inserted = ROW_COUNT;
            CONTINUE WHEN inserted = 0;
            UPDATE accounts a
                SET balance = CASE WHEN a.name = src.name THEN payer_after ELSE payee_after END
                WHERE a.name IN (src.name, dst.name);
            PERFORM pg_notify('p2ppay_settled', json_strip_nulls(json_build_object(
                'payment_id', v_pid::text, 'payer', src.name, 'payee', dst.name,
                'amount', v_amount, 'payer_balance', payer_after,
                'payee_balance', payee_after, 'at_ms', now_ms, 'memo', v_memo))::text);
            o_code := 'ok';
            o_payer := src.name;
            o_payee := dst.name;
            o_amount := v_amount;
            o_payer_balance := payer_after;
            o_payee_balance := payee_after;
            o_at_ms := now_ms;
            o_memo := v_memo;
            RETURN NEXT;
            EXIT;
        END LOOP;
    END LOOP;
END
$fn$
"""

# Version 2's tables: memos on transfers, deposit ids (a retried deposit moves money once),
# payment requests (see the SQLite schema's version 4 for what each column is for).
_TO_V2 = (
    "ALTER TABLE movements ADD COLUMN memo TEXT"
    " CHECK (memo IS NULL OR char_length(memo) BETWEEN 1 AND 140)",
    "ALTER TABLE movements ADD COLUMN deposit_id UUID UNIQUE",
    """CREATE TABLE payment_requests (
        id          UUID PRIMARY KEY,  -- also the payment id of the transfer that pays it
        requester   TEXT NOT NULL REFERENCES accounts(name),
        payer       TEXT NOT NULL REFERENCES accounts(name),
        amount      BIGINT NOT NULL CHECK (amount > 0),
        memo        TEXT CHECK (memo IS NULL OR char_length(memo) BETWEEN 1 AND 140),
        created_ms  BIGINT NOT NULL,
        expires_ms  BIGINT NOT NULL,
        state       TEXT NOT NULL DEFAULT 'open'
                    CHECK (state IN ('open', 'paid', 'declined', 'cancelled')),
        closed_ms   BIGINT,
        told        BOOLEAN NOT NULL DEFAULT TRUE,
        CHECK (requester <> payer),
        CHECK ((state = 'open') = (closed_ms IS NULL))
    )""",
    "CREATE INDEX payment_requests_payer ON payment_requests(payer, state)",
    "CREATE INDEX payment_requests_requester ON payment_requests(requester, state)",
    "CREATE INDEX payment_requests_news ON payment_requests(requester) WHERE NOT told",
    "DROP FUNCTION p2ppay_settle_batch(jsonb, bigint, bigint, bigint)",
    _SETTLE_FUNCTION_V2,
)

#: The advisory lock every creator of the presence tables holds (server/pg_presence.py at each
#: node's start, and the migration to version 3): CREATE ... IF NOT EXISTS can still race.
PRESENCE_SCHEMA_LOCK = 0x7032_7070

#: Who is online on which node: the server nodes' shared presence (server/pg_presence.py owns
#: what is in it). Defined here since version 3, because the settle function reads it.
PRESENCE_TABLES = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS presence_login_seq;
CREATE TABLE IF NOT EXISTS presence (
    name_key TEXT NOT NULL,
    course BOOLEAN NOT NULL,
    name TEXT NOT NULL,
    node_id TEXT NOT NULL REFERENCES nodes ON DELETE CASCADE,
    ip TEXT NOT NULL,
    port INTEGER,
    since_ms BIGINT NOT NULL,
    login_seq BIGINT NOT NULL,
    PRIMARY KEY (name_key, course)
);
CREATE INDEX IF NOT EXISTS presence_node ON presence (node_id);
"""


def node_channel(node_id: str) -> str:
    """The channel a node LISTENs on for the transfers to its users (as the settle function's
    ``p2ppay_node_channel`` names it: a valid identifier whatever the node id; both hash its
    UTF-8 bytes, whatever the database's encoding)."""
    return "p2ppay_node_" + hashlib.md5(node_id.encode(), usedforsecurity=False).hexdigest()[:16]


_NODE_CHANNEL_FUNCTION = r"""
CREATE OR REPLACE FUNCTION p2ppay_node_channel(node_id text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT 'p2ppay_node_' || left(md5(convert_to(node_id, 'UTF8')), 16)
$fn$
"""


def _routed(function: str) -> str:
    """Version 3's settle function: version 2's, announcing each transfer to the payee's node
    alone (every node parsed every transfer's notification, which grows with the nodes), or to
    every node when the payee has no presence row (offline, or a login whose row is not written
    yet: whichever node holds its session then tells it)."""
    edits = (
        ("CREATE FUNCTION p2ppay_settle_batch", "CREATE OR REPLACE FUNCTION p2ppay_settle_batch"),
        ("    inserted bigint;\nBEGIN", "    inserted bigint;\n    payee_node text;\nBEGIN"),
        (
            "            PERFORM pg_notify('p2ppay_settled', json_strip_nulls(json_build_object(",
            "            SELECT p.node_id INTO payee_node FROM presence p\n"
            "                WHERE p.name_key = v_payee_key AND p.course = (dst.kind = 'course');\n"
            "            PERFORM pg_notify(CASE WHEN payee_node IS NULL THEN 'p2ppay_settled'\n"
            "                                   ELSE p2ppay_node_channel(payee_node) END,\n"
            "                              json_strip_nulls(json_build_object(",
        ),
    )
    for old, new in edits:
        assert function.count(old) == 1, old
        function = function.replace(old, new)
    return function


# Version 3 (issue 11): a settled transfer is announced on its payee's node's channel.
_TO_V3 = (
    f"SELECT pg_advisory_xact_lock({PRESENCE_SCHEMA_LOCK})",
    PRESENCE_TABLES,
    _NODE_CHANNEL_FUNCTION,
    _routed(_SETTLE_FUNCTION_V2),
)

# Version 4 (issue 22): the SQLite schema's version 5 (movements_pair for listing known
# counterparties' requests first; partial indexes for purging closed and expired requests).
_TO_V4 = (
    "CREATE INDEX movements_pair ON movements(payer, payee)",
    "CREATE INDEX payment_requests_closed ON payment_requests(closed_ms) WHERE state <> 'open'",
    "CREATE INDEX payment_requests_expires ON payment_requests(expires_ms) WHERE state = 'open'",
)

#: The statements that take a database from version N to N + 1, by N (0: a new database).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: (*_TABLES, _SETTLE_FUNCTION),
    1: _TO_V2,
    2: _TO_V3,
    3: _TO_V4,
}
assert sorted(_MIGRATIONS) == list(range(PG_SCHEMA_VERSION))


def describe(url: str) -> str:
    """``url`` without its password, for messages: ``host:port/dbname``."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL server given"
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"{host}:{port}/{params.get('dbname') or params.get('user') or ''}"


#: a URL's ``user:password@`` and a conninfo's ``password=...``, wherever they are in a text
_SECRETS = (
    (re.compile(r"(\w+://[^\s:/@\"']*):[^\s@\"']*@"), r"\1:***@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|[^\s\"']+)", re.IGNORECASE), r"\1***"),
)


def redact(text: str) -> str:
    """``text`` with any password a URL or conninfo in it carries replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _one_line(exc: BaseException, url: str) -> str:
    text = " ".join(str(exc).split())
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None  # (not parsed: the patterns below still find it)
    if password:
        for form in {str(password), quote(str(password), safe="")}:
            text = text.replace(form, "***")
    return redact(text)


def open_connection(
    url: str, timeouts: PgTimeouts | None = None, *, sessions: bool = False, **kwargs: Any
) -> PgConnection:
    """A connection to ``url``, with ``timeouts``' TCP keepalives (the defaults if None) and,
    if ``sessions``, its statement and lock timeouts; an unreachable or refusing server is
    :class:`LedgerUnavailable` with one line that names the server (never the password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise LedgerUnavailable(f"not a usable PostgreSQL URL: {_one_line(exc, url)}") from None
    if "connect_timeout" not in params:
        kwargs.setdefault("connect_timeout", 10)
    for key, value in (timeouts or PgTimeouts()).connect_params(params, sessions=sessions).items():
        kwargs.setdefault(key, value)
    kwargs.setdefault("application_name", "p2ppay")
    if "application_name" in params:
        del kwargs["application_name"]  # (the URL's own wins, as its other parameters do)
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        raise LedgerUnavailable(
            f"cannot connect to PostgreSQL at {describe(url)}: {_one_line(exc, url)}"
        ) from None


def migrate(db: PgConnection, url: str) -> None:
    """Bring the database ``db`` is connected to to :data:`PG_SCHEMA_VERSION`, in one
    transaction, under an advisory lock (``db`` must not be in autocommit mode)."""
    try:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS p2ppay_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM p2ppay_schema").fetchone()
            version = 0 if row is None or row[0] is None else int(row[0])
            if version > PG_SCHEMA_VERSION:
                raise LedgerUnavailable(
                    f"the PostgreSQL ledger at {describe(url)} has schema version {version};"
                    f" this p2ppay knows {PG_SCHEMA_VERSION}"
                )
            for step in range(version, PG_SCHEMA_VERSION):
                try:
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                except psycopg.Error as exc:
                    raise LedgerUnavailable(
                        f"{describe(url)}: cannot upgrade the schema to version {step + 1}:"
                        f" {_one_line(exc, url)}"
                    ) from exc
            if version < PG_SCHEMA_VERSION:
                db.execute("DELETE FROM p2ppay_schema")
                db.execute("INSERT INTO p2ppay_schema(version) VALUES (%s)", (PG_SCHEMA_VERSION,))
    except psycopg.Error as exc:
        raise LedgerUnavailable(
            f"cannot prepare the PostgreSQL ledger at {describe(url)}: {_one_line(exc, url)}"
        ) from exc


def _check_encoding(db: PgConnection, url: str) -> None:
    """Refuse a database that does not keep text as UTF-8: in an SQL_ASCII one PostgreSQL
    checks no text and psycopg hands back bytes, so names and passwords would not match."""
    row = db.execute("SHOW server_encoding").fetchone()
    db.rollback()
    value = row[0] if row else "?"
    # (in SQL_ASCII psycopg returns even this as bytes)
    encoding = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    if encoding.upper() not in ("UTF8", "UTF-8"):
        raise LedgerUnavailable(
            f"the PostgreSQL database at {describe(url)} keeps text as {encoding}; p2ppay needs "
            "UTF8 (createdb -E UTF8 -T template0 ...)"
        )


def connect_postgres(url: str, timeouts: PgTimeouts | None = None) -> PgConnection:
    """A connection to the ledger at ``url`` (created and migrated if need be), at READ
    COMMITTED, not in autocommit mode, with ``timeouts``' keepalives but no statement timeout
    (a migration may take long; the ledger's writer opens a connection of its own)."""
    db = open_connection(url, timeouts, autocommit=False)
    try:
        _check_encoding(db, url)
        migrate(db, url)
    except BaseException:
        db.close()
        raise
    return db
