"""The SQL of the SQLite audit store's indexed reads: searches by query field and time, open
intents, erasure records (:class:`~coworker.audit.store_sqlite.SQLiteStore`'s read half),
for a file of either schema version (:func:`~coworker.audit.sqlite_schema.column_sql`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from coworker.audit.record import QUERY_FILTERS
from coworker.audit.sqlite_schema import _ERASURE_KINDS, column_sql
from coworker.exceptions import ConfigError

__all__ = ["ERASURES", "open_intents_query", "search_query"]

ERASURES: Final = (
    "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM audit_records AS r "
    "INDEXED BY audit_records_erasures LEFT JOIN audit_payloads p ON p.seq = r.seq "
    f"WHERE {_ERASURE_KINDS} AND r.seq >= 1 ORDER BY r.seq"
)
"""The erasure and purge records of a version 2 file, through their partial index."""


def search_query(
    version: int,
    filters: Mapping[str, str | None],
    since: str | None,
    until: str | None,
    limit: int | None,
    after: int,
) -> tuple[str, tuple[Any, ...]]:
    """The query and parameters of :meth:`SQLiteStore.search` on a ``version`` file.

    Raises:
        ConfigError: an unknown filter.
    """
    where: list[str] = ["r.seq > ?"]
    params: list[Any] = [max(after, 0)]
    for key, value in filters.items():
        if value is None:
            continue
        column = QUERY_FILTERS.get(key)
        if column is None:
            raise ConfigError(f"unknown audit filter {key!r}")
        where.append(f"{column_sql(column, version)} = ?")
        params.append(value)
    if since is not None:
        where.append("r.time >= ?")
        params.append(since)
    if until is not None:
        where.append("r.time < ?")
        params.append(until)
    query = (
        "SELECT r.seq, r.prev_hash, r.hash, r.body, p.payload FROM audit_records r "
        "LEFT JOIN audit_payloads p ON p.seq = r.seq"
    )
    query += " WHERE " + " AND ".join(where)
    query += " ORDER BY r.seq"
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    return query, tuple(params)


def open_intents_query(version: int) -> str:
    """The query of :meth:`SQLiteStore.open_intents` on a ``version`` file."""
    o_trace, i_trace = (column_sql("trace_id", version, alias) for alias in "oi")
    return (
        "SELECT i.seq FROM audit_records i WHERE i.kind = 'intent' AND i.seq >= 1 AND "
        "NOT EXISTS ("
        "SELECT 1 FROM audit_records o WHERE o.span_id = i.span_id "
        f"AND {o_trace} IS {i_trace} AND o.kind = 'outcome' AND o.seq > i.seq) "
        "ORDER BY i.seq"
    )
