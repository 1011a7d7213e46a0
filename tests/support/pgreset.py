"""Put a used copy of the PostgreSQL template back into the template's state.

A copy (CREATE DATABASE ... TEMPLATE) costs PostgreSQL ~0.25 s of WAL and disk, and its
DROP more; a migrated database holds a few seed rows, so deleting every row and putting
the seeds and sequence positions back takes a few milliseconds. A copy is only reused
when nothing can tell it from a fresh one: no session of the test is still connected
(one that is might write into the next test's database), and its schema is the
template's (a test that downgraded it gets a fresh copy instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controlplane.store.pgconnect import PgConnector

# Every relation, column, constraint, index, sequence, trigger and function of the
# public schema, in one string: equal strings, equal schemas.
_SCHEMA = """
SELECT md5(coalesce(string_agg(item, E'\\n' ORDER BY item), '')) FROM (
  SELECT format('rel %s %s', c.relname, c.relkind) AS item
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'
  UNION ALL
  SELECT format('col %s.%s %s %s %s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('con %s %s', c.conname, pg_get_constraintdef(c.oid))
    FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = 'public'
  UNION ALL
  SELECT format('idx %s', indexdef) FROM pg_indexes WHERE schemaname = 'public'
  UNION ALL
  SELECT format('trg %s %s', tgname, pg_get_triggerdef(t.oid))
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND NOT t.tgisinternal
  UNION ALL
  SELECT format('fn %s %s', p.proname, md5(p.prosrc))
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'
) items
"""

_TABLES = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
_SEQUENCES = (
    "SELECT sequencename, coalesce(last_value, start_value), last_value IS NOT NULL "
    "FROM pg_sequences WHERE schemaname = 'public' ORDER BY sequencename"
)
_OTHERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@dataclass(frozen=True)
class TemplateState:
    schema: str
    tables: tuple[str, ...]
    # Each table's rows in the template, for the tables that have any.
    rows: dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]]
    # Each sequence's position: (name, value, whether nextval was called).
    sequences: tuple[tuple[str, int, bool], ...]


async def read_state(url: str) -> TemplateState:
    conn = await PgConnector(url).connect()
    try:
        schema = str(await conn.fetchval(_SCHEMA))
        tables = tuple(str(r[0]) for r in await conn.fetch(_TABLES))
        rows: dict[str, tuple[tuple[str, ...], list[tuple[Any, ...]]]] = {}
        for table in tables:
            records = await conn.fetch(f'SELECT * FROM "{table}"')
            if records:
                rows[table] = (
                    tuple(records[0].keys()),
                    sorted((tuple(r.values()) for r in records), key=repr),
                )
        sequences = tuple((str(r[0]), int(r[1]), bool(r[2])) for r in await conn.fetch(_SEQUENCES))
        return TemplateState(schema, tables, rows, sequences)
    finally:
        await conn.close()


async def reset(url: str, state: TemplateState) -> bool:
    """Put `url` back into `state`; False (and nothing changed) when it cannot be
    reused: a session is still connected to it, or its schema differs."""
    conn = await PgConnector(url).connect()
    try:
        if await conn.fetchval(_OTHERS) or await conn.fetchval(_SCHEMA) != state.schema:
            return False
        async with conn.transaction():
            # Rows go in any order: no foreign key is checked for this transaction.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("; ".join(f'DELETE FROM "{table}"' for table in state.tables))
            for table, (columns, records) in state.rows.items():
                await conn.copy_records_to_table(table, records=records, columns=columns)
            for name, value, called in state.sequences:
                await conn.execute("SELECT setval($1, $2, $3)", f'"{name}"', value, called)
        # Checked again: a session that connected meanwhile could hold what it read.
        return not await conn.fetchval(_OTHERS)
    finally:
        await conn.close()
