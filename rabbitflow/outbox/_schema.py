"""The outbox table: its DDL and every statement the writer, the relay and the operations run.

One row per message, written in the caller's transaction::

    id           bigserial   commit order within a key (see the writer's advisory lock)
    key          text        ordering key; NULL: no order with any other row
    exchange     text        where the relay publishes it
    routing_key  text
    message_id   text        the AMQP message_id: a duplicate after a relay crash has the same
    body         bytea       the encoded body, as app.publish sends it
    properties   bytea       the AMQP basic properties, marshalled (headers and trace context)
    state        text        pending → sent, or pending → parked after max_attempts refusals
    attempts     integer     refusals so far (a lost connection is not one)
    available_at timestamptz not claimed before (the backoff after a refusal)
    locked_until timestamptz a relay's lease on the row; NULL or past: free
    created_at   timestamptz commit-to-publish lag is measured from it
    sent_at      timestamptz the broker's confirm; sent rows are deleted after the retention
    error        text        the last refusal
    job          boolean     written by app.outbox.enqueue: the relay records the job queued

Two partial indexes carry the relay: pending and parked rows by id (claims, the per-key head
check, metrics), and sent rows by sent_at (the retention sweep). A sent row leaves both the
claim index and the key index, so a backlog of sent rows costs the claims nothing.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,50}$")
DEFAULT_TABLE = "rabbitflow_outbox"

PENDING = "pending"
SENT = "sent"
PARKED = "parked"


def check_identifier(name: str, what: str = "table") -> str:
    """``name`` if it is a plain lower-case SQL identifier (it is put into SQL as is)."""
    if not IDENTIFIER.match(name):
        raise ValueError(
            f"{what} {name!r} is not a plain lower-case SQL identifier (a-z, 0-9, _; "
            "at most 51 characters)"
        )
    return name


def ddl(table: str, schema: str | None = None) -> str:
    """The statements that create the outbox table, its indexes and its NOTIFY trigger;
    each ``IF NOT EXISTS`` / ``OR REPLACE``, so running them again changes nothing."""
    t = qualified(table, schema)
    channel = notify_channel(table, schema)
    fn = qualified(f"{table}_notify", schema)
    return f"""CREATE TABLE IF NOT EXISTS {t} (
    id bigserial PRIMARY KEY,
    key text,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    message_id text NOT NULL,
    body bytea NOT NULL,
    properties bytea NOT NULL,
    state text NOT NULL DEFAULT '{PENDING}' CHECK (state IN ('{PENDING}', '{SENT}', '{PARKED}')),
    attempts integer NOT NULL DEFAULT 0,
    available_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    error text,
    job boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS {table}_open ON {t} (id) WHERE state <> '{SENT}';
CREATE INDEX IF NOT EXISTS {table}_key ON {t} (key, id) WHERE state <> '{SENT}' AND key IS NOT NULL;
CREATE INDEX IF NOT EXISTS {table}_sent ON {t} (sent_at) WHERE state = '{SENT}';
CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One notification per transaction: PostgreSQL folds identical ones, and sends them at commit.
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS {table}_notify ON {t};
CREATE TRIGGER {table}_notify AFTER INSERT ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {fn}();
"""


def qualified(table: str, schema: str | None) -> str:
    return table if schema is None else f"{schema}.{table}"


def notify_channel(table: str, schema: str | None) -> str:
    """The LISTEN/NOTIFY channel of a table's inserts: one per table, schema included, and
    short (a channel is an identifier, cut at 63 bytes by LISTEN but not by pg_notify)."""
    return f"rabbitflow_outbox_{zlib.crc32(qualified(table, schema).encode()):08x}"


def lock_class(table: str, schema: str | None) -> int:
    """The first key of the writer's per-key advisory lock: one space of locks per table, so
    that the user's own advisory locks and another outbox's never meet this one's."""
    name = qualified(table, schema).encode()
    return zlib.crc32(name) & 0x7FFFFFFF


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement on one outbox table, built once. ``%(name)s`` placeholders (psycopg);
    the writer's have a ``:name`` twin for SQLAlchemy."""

    table: str
    insert: str
    insert_keyed: str
    claim: str
    sent: str
    delete_sent: str
    refused: str
    release: str
    sweep: str
    stats: str
    listing: str
    retry: str
    purge: str

    @classmethod
    def build(cls, table: str, schema: str | None = None) -> Statements:
        t = qualified(table, schema)
        columns = "key, exchange, routing_key, message_id, body, properties, job"
        values = (
            "%(key)s, %(exchange)s, %(routing_key)s, %(message_id)s, %(body)s, %(properties)s, "
            "%(job)s"
        )
        return cls(
            table=t,
            insert=f"INSERT INTO {t} ({columns}) VALUES ({values})",
            # Rows of one key must take ids in commit order: the relay publishes a key's rows by
            # id, and a sequence hands out ids at insert, not at commit. Transactions writing
            # the same key take turns on a transaction-scoped advisory lock instead (released
            # at commit or rollback), so a later id is a later commit. One statement.
            insert_keyed=(
                f"WITH turn AS (SELECT pg_advisory_xact_lock({lock_class(table, schema)}, "
                f"hashtext(%(key)s))) INSERT INTO {t} ({columns}) SELECT {values} FROM turn"
            ),
            # One statement claims a batch: the first pending rows by id that are due and not
            # leased, skipping rows another relay's claim has locked (FOR UPDATE SKIP LOCKED), of
            # which a keyed row is kept only when every earlier open row of its key is in the
            # batch too (the key's oldest rows, in a run), then leased. The relay publishes a
            # key's run one row after the other's confirm. The claim commits at once
            # (autocommit): no lock outlives the statement, and the lease keeps other relays
            # off the rows while they are published.
            claim=f"""WITH due AS (
    SELECT id, key FROM {t}
    WHERE state = '{PENDING}' AND available_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY id LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), heads AS (
    SELECT due.id FROM due
    WHERE due.key IS NULL OR NOT EXISTS (
        SELECT 1 FROM {t} earlier
        WHERE earlier.key = due.key AND earlier.state <> '{SENT}' AND earlier.id < due.id
          AND earlier.id NOT IN (SELECT id FROM due))
)
UPDATE {t} SET locked_until = now() + make_interval(secs => %(lease)s)
FROM heads WHERE {t}.id = heads.id
RETURNING {t}.id, {t}.exchange, {t}.routing_key, {t}.body, {t}.properties, {t}.attempts,
    extract(epoch FROM now() - {t}.created_at), {t}.message_id, {t}.job, {t}.key""",
            sent=(
                f"UPDATE {t} SET state = '{SENT}', sent_at = now(), locked_until = NULL, "
                f"error = NULL WHERE id = ANY(%(ids)s) AND state = '{PENDING}'"
            ),
            # Retention 0: a confirmed row is deleted at once (no second write later).
            delete_sent=f"DELETE FROM {t} WHERE id = ANY(%(ids)s) AND state = '{PENDING}'",
            refused=f"""UPDATE {t} SET attempts = {t}.attempts + 1, error = r.error,
    locked_until = NULL,
    available_at = now() + make_interval(secs => r.delay),
    state = CASE WHEN {t}.attempts + 1 >= %(max_attempts)s THEN '{PARKED}' ELSE '{PENDING}' END
FROM unnest(%(ids)s::bigint[], %(errors)s::text[], %(delays)s::float8[]) AS r(id, error, delay)
WHERE {t}.id = r.id AND {t}.state = '{PENDING}'
RETURNING {t}.id, {t}.state""",
            release=(
                f"UPDATE {t} SET locked_until = NULL WHERE id = ANY(%(ids)s) "
                f"AND state = '{PENDING}'"
            ),
            sweep=(
                f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE state = '{SENT}' "
                f"AND sent_at < now() - make_interval(secs => %(retention)s) LIMIT %(limit)s)"
            ),
            stats=f"""SELECT count(*) FILTER (WHERE state = '{PENDING}'),
    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = '{PENDING}')), 0),
    count(*) FILTER (WHERE state = '{PARKED}')
FROM {t} WHERE state <> '{SENT}'""",
            listing=f"""SELECT id, key, exchange, routing_key, message_id, state, attempts,
    created_at, sent_at, available_at, error, length(body)
FROM {t} WHERE state = ANY(%(states)s) ORDER BY id LIMIT %(limit)s""",
            retry=(
                f"UPDATE {t} SET state = '{PENDING}', attempts = 0, available_at = now(), "
                f"locked_until = NULL WHERE state = '{PARKED}' "
                f"AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))"
            ),
            purge=(
                f"DELETE FROM {t} WHERE state = ANY(%(states)s) "
                f"AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))"
            ),
        )


def sqlalchemy_form(statement: str) -> str:
    """A writer statement with SQLAlchemy's ``:name`` placeholders instead of psycopg's."""
    return re.sub(r"%\((\w+)\)s", r":\1", statement)
