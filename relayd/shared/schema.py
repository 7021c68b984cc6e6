"""relayd's tables in PostgreSQL and their versions: ``migrate`` creates or upgrades them,
``check`` refuses a database whose schema this relayd does not know.

Each migration is a list of statements applied in one transaction under an advisory lock, so
two nodes running ``relayd shared-state migrate`` at once cannot both apply it. The version is
one row in ``relayd_schema``. A schema *newer* than ``SCHEMA_VERSION`` means a newer relayd
migrated the database: an older one refuses to run against it rather than guess.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, LiteralString

from relayd.errors import StateUnavailable

if TYPE_CHECKING:
    import psycopg

# pg_advisory_xact_lock keys (any two constants; they only need to differ from each other).
MIGRATE_LOCK = 0x72656C6179640001
CAP_LOCK = 0x72656C6179640002
# The OAuth refresh lock uses the two-int form (this class, hashtext(record name)): one lock per
# smarthost, in a key space PostgreSQL keeps apart from the one-bigint locks above.
OAUTH_LOCK_CLASS = 0x72640003

_V1: tuple[LiteralString, ...] = (
    "CREATE TABLE relayd_schema (one boolean PRIMARY KEY DEFAULT true CHECK (one), "
    "version integer NOT NULL)",
    # The do-not-email list: lower-cased addresses, why, when and by which node.
    "CREATE TABLE relayd_suppressions (address text PRIMARY KEY, reason text NOT NULL, "
    "added timestamptz NOT NULL DEFAULT now(), node text NOT NULL)",
    # Bumped by every statement that changes the list (also an operator's own SQL), so that
    # each node notices a change by reading one number.
    "CREATE TABLE relayd_suppressions_version (one boolean PRIMARY KEY DEFAULT true "
    "CHECK (one), version bigint NOT NULL)",
    "INSERT INTO relayd_suppressions_version (version) VALUES (0)",
    """CREATE FUNCTION relayd_suppressions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE relayd_suppressions_version SET version = version + 1;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER relayd_suppressions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
    "ON relayd_suppressions FOR EACH STATEMENT EXECUTE FUNCTION relayd_suppressions_changed()",
    # The daily cap: recipients delivered (epoch seconds of the delivering node's clock) ...
    "CREATE TABLE relayd_cap_deliveries (id bigserial PRIMARY KEY, at double precision NOT NULL, "
    "n integer NOT NULL CHECK (n > 0), node text NOT NULL)",
    "CREATE INDEX relayd_cap_deliveries_at ON relayd_cap_deliveries (at)",
    # ... and those reserved for deliveries under way, per node.
    "CREATE TABLE relayd_cap_in_flight (node text PRIMARY KEY, n integer NOT NULL "
    "CHECK (n >= 0), since double precision NOT NULL)",
    # Which nodes' embedded state was imported (relayd shared-state import), so counters are
    # never imported twice.
    "CREATE TABLE relayd_imports (node text PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), "
    "addresses integer NOT NULL, deliveries integer NOT NULL)",
)

# Version 2: the fleet's rate (one row per one-second window: the slots the nodes took) and
# its alerts (per active (event, key): the nodes that see it now, those that saw it, and the
# node that sent the notice).
_V2: tuple[LiteralString, ...] = (
    "CREATE TABLE relayd_rate_windows (second bigint PRIMARY KEY, used integer NOT NULL, "
    "last_grant integer NOT NULL)",
    "CREATE TABLE relayd_alerts (event text NOT NULL, key text NOT NULL, "
    "since double precision NOT NULL, nodes text[] NOT NULL, seen text[] NOT NULL, "
    "notifier text, PRIMARY KEY (event, key))",
)

# The fleet's OAuth token cache (relayd/shared/oauth.py): each record of relayd/oauth/store.py
# (access token, rotated refresh token, MSAL cache) as the same Fernet-encrypted bytes the
# node would write to state_dir/oauth/, so the database never holds a token in clear.
# Self-contained (it only creates its own table), so that it can be renumbered at a merge.
_V3_OAUTH: tuple[LiteralString, ...] = (
    "CREATE TABLE relayd_oauth (name text PRIMARY KEY, blob bytea NOT NULL, "
    "node text NOT NULL, updated timestamptz NOT NULL DEFAULT now())",
)

# Version 4: the daily cap counts delivered recipients per (minute, node) instead of one row
# per delivery, so that a reservation sums at most 1440 rows per node whatever the volume. A
# delivery at epoch time t counts in minute floor(t / 60) and is taken to happen at the END of
# that minute: it leaves the rolling window up to 60 s late, never early (the safe side of "at
# most daily_cap"). The old rows are added up into their minutes and the old table dropped
# (nothing reads it any more; keeping it would only invite SQL that counts the wrong table).
# Each node's in-flight row gets ``seen`` (the database's clock when the node last wrote), so
# that a node not seen for a long time can have its held units counted for it
# (relayd/shared/cap.py).
_V4_CAP_MINUTES: tuple[LiteralString, ...] = (
    "CREATE TABLE relayd_cap_minutes (minute bigint NOT NULL, node text NOT NULL, "
    "n bigint NOT NULL CHECK (n > 0), PRIMARY KEY (minute, node))",
    "INSERT INTO relayd_cap_minutes (minute, node, n) "
    "SELECT floor(at / 60)::bigint, node, sum(n) FROM relayd_cap_deliveries GROUP BY 1, 2",
    "DROP TABLE relayd_cap_deliveries",
    "ALTER TABLE relayd_cap_in_flight ADD COLUMN seen double precision NOT NULL "
    "DEFAULT extract(epoch FROM now())",
)

# Each entry applies on its own in version order: a new one is appended with the next number.
MIGRATIONS: tuple[tuple[int, tuple[LiteralString, ...]], ...] = (
    (1, _V1), (2, _V2), (3, _V3_OAUTH), (4, _V4_CAP_MINUTES))
SCHEMA_VERSION = MIGRATIONS[-1][0]
assert [v for v, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


class SchemaMismatch(StateUnavailable):
    """The database has no relayd tables, or tables of a newer relayd."""


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The database's schema version; 0 when relayd never migrated it."""
    row = conn.execute("SELECT to_regclass('relayd_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT version FROM relayd_schema").fetchone()
    return 0 if row is None else int(str(row[0]))


def _newer(version: int) -> SchemaMismatch:
    return SchemaMismatch(
        f"the database's relayd schema is version {version}, newer than this relayd knows "
        f"({SCHEMA_VERSION}): a newer relayd migrated it; upgrade relayd on this node")


def check(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Raise SchemaMismatch unless the schema is exactly the one this relayd knows."""
    version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise _newer(version)
    if version < SCHEMA_VERSION:
        raise SchemaMismatch(
            ("the database has no relayd tables yet" if version == 0 else
             f"the database's relayd schema is version {version}, older than this relayd's "
             f"({SCHEMA_VERSION})") + ": run 'relayd shared-state migrate'")


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int]:
    """Create or upgrade the tables (one transaction); (version before, version after)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        before = current_version(conn)
        if before > SCHEMA_VERSION:
            raise _newer(before)
        for version, statements in MIGRATIONS:
            if version <= before:
                continue
            for statement in statements:
                conn.execute(statement)
        if before == 0:
            conn.execute("INSERT INTO relayd_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE relayd_schema SET version = %s", (SCHEMA_VERSION,))
    return before, SCHEMA_VERSION
