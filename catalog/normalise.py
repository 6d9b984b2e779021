"""The catalog's input normalisers: what callers give, checked and shaped into the tables' columns.

Every UID is validated here, once per column (pyarrow.compute), before a
commit is planned: a bad UID or a missing column is a UsageError or InvalidUID
that names what to fix.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from renkei.catalog import keys, tables
from renkei.catalog.records import GrantRequest
from renkei.errors import InvalidUID, UsageError
from renkei.uids import validate_uid

_UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


def const_column(value: Any, n: int, type_: pa.DataType | None = None) -> pa.Array:
    """A column of `n` copies of `value` (without building a Python list)."""
    if value is None:
        return pa.nulls(n, type_ or pa.string())
    return pa.repeat(pa.scalar(value, type_ or (pa.string() if isinstance(value, str) else None)), n)


def origin_sites_text(values: Iterable[str]) -> str:
    sites = sorted(set(values))
    return sites[0] if len(sites) == 1 else ",".join(sites)


def validate_grant(r: GrantRequest) -> None:
    if r.action not in (tables.GRANT, tables.REVOKE):
        raise UsageError(f"grant action {r.action!r} must be 'grant' or 'revoke'")
    if r.by_kind not in tables.BY_KINDS:
        raise UsageError(f"grant by_kind {r.by_kind!r} must be one of {', '.join(tables.BY_KINDS)}")
    keys.validate_site(r.site)
    validate_uid(r.study_uid, "Study Instance UID")


def as_ts(value: dt.datetime | str) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.isoformat()
    return value


def check_uids(column: pa.ChunkedArray | pa.Array, what: str) -> None:
    ok = pc.and_(pc.match_substring_regex(column, _UID_PATTERN), pc.less_equal(pc.utf8_length(column), 64))
    ok = pc.fill_null(ok, False)
    if not pc.all(ok).as_py():
        bad = column.filter(pc.invert(ok))
        shown = bad[0].as_py() if len(bad) else None
        raise InvalidUID(
            f"{what} {str(shown)[:80]!r} is not a valid DICOM UID (digits and dots, at most 64 characters)"
        )


def column_or_default(table: pa.Table, name: str, type_: pa.DataType, default: Any) -> pa.Array | pa.ChunkedArray:
    if name in table.column_names:
        col = table.column(name)
        if col.type != type_:
            col = col.cast(type_)
        if default is not None:
            col = pc.fill_null(col, default)
        return col
    return const_column(default, table.num_rows, type_)


def normalise_studies(studies: pa.Table) -> pa.Table:
    for name in ("study_uid", "origin_site", "patient_id"):
        if name not in studies.column_names:
            raise UsageError(f"the studies table needs a {name!r} column")
    check_uids(studies.column("study_uid"), "Study Instance UID")
    cols = {name: column_or_default(studies, name, pa.string(), "") for name in tables.STUDY_INFO_FIELDS}
    if "modalities" in studies.column_names:
        cols["modalities"] = studies.column("modalities").cast(pa.list_(pa.string()))
    else:
        cols["modalities"] = pa.array([[] for _ in range(studies.num_rows)], pa.list_(pa.string()))
    out = pa.table(cols)
    if pc.count_distinct(out.column("study_uid")).as_py() != out.num_rows:
        raise UsageError("the studies table lists a Study Instance UID twice; give each study once")
    return out


_INSTANCE_COLUMNS = (
    ("study_uid", pa.string(), None),
    ("series_uid", pa.string(), None),
    ("sop_instance_uid", pa.string(), None),
    ("sop_class_uid", pa.string(), ""),
    ("transfer_syntax_uid", pa.string(), ""),
    ("size", pa.int64(), None),
    ("sha256", pa.string(), None),
    ("instance_number", pa.int64(), None),
    ("modality", pa.string(), ""),
    ("series_number", pa.int64(), None),
    ("series_description", pa.string(), ""),
)


def normalise_instances(instances: pa.Table | None, studies: pa.Table) -> pa.Table:
    """Instance rows with validated UIDs, origin_site and object_key columns."""
    if instances is None or instances.num_rows == 0:
        schema = pa.schema(
            [(n, t) for n, t, _ in _INSTANCE_COLUMNS] + [("origin_site", pa.string()), ("object_key", pa.string())]
        )
        return schema.empty_table()
    for name in ("study_uid", "series_uid", "sop_instance_uid", "size", "sha256"):
        if name not in instances.column_names:
            raise UsageError(f"the instances table needs a {name!r} column")
    cols = {name: column_or_default(instances, name, type_, default) for name, type_, default in _INSTANCE_COLUMNS}
    for name, what in (
        ("study_uid", "Study Instance UID"),
        ("series_uid", "Series Instance UID"),
        ("sop_instance_uid", "SOP Instance UID"),
    ):
        check_uids(cols[name], what)
    sha_ok = pc.fill_null(pc.match_substring_regex(cols["sha256"], r"^[0-9a-f]{64}$"), False)
    if not pc.all(sha_ok).as_py():
        raise UsageError("an instance's sha256 is not 64 lower-case hex digits")
    table = pa.table(cols)
    idx = pc.index_in(table.column("study_uid"), value_set=studies.column("study_uid"))
    if idx.null_count:
        raise UsageError("every instance's study_uid must be one of the studies registered with it")
    table = table.append_column("origin_site", studies.column("origin_site").take(idx))
    if "object_key" in instances.column_names:
        table = table.append_column("object_key", instances.column("object_key").cast(pa.string()))
    else:
        key = pc.binary_join_element_wise(
            const_column(keys.OBJECTS_PREFIX, table.num_rows),
            table.column("origin_site"),
            table.column("study_uid"),
            table.column("series_uid"),
            pc.binary_join_element_wise(table.column("sop_instance_uid"), const_column(".dcm", table.num_rows), ""),
            "/",
        )
        table = table.append_column("object_key", key)
    return table


_GRANT_COLUMNS = (
    ("study_uid", None),
    ("site", None),
    ("action", tables.GRANT),
    ("by_kind", None),
    ("by", None),
    ("reason", ""),
    ("rule", None),
    ("policy_version", None),
)


def normalise_grants(table: pa.Table) -> pa.Table:
    """Grant rows (study_uid, site, action, by_kind, by, reason, rule, policy_version), every value checked."""
    n = table.num_rows
    cols = {}
    for name, default in _GRANT_COLUMNS:
        if name in table.column_names:
            cols[name] = table.column(name).cast(pa.string())
        elif default is not None or name in ("rule", "policy_version"):
            cols[name] = const_column(default, n, pa.string())
        else:
            raise UsageError(f"grants need a {name!r} column")
    table = pa.table(cols)
    check_uids(table.column("study_uid"), "Study Instance UID")
    for value in pc.unique(table.column("site")).to_pylist():
        keys.validate_site(value)
    bad = set(pc.unique(table.column("action")).to_pylist()) - {tables.GRANT, tables.REVOKE}
    if bad:
        raise UsageError(f"grant action {sorted(bad)[0]!r} must be 'grant' or 'revoke'")
    bad = set(pc.unique(table.column("by_kind")).to_pylist()) - set(tables.BY_KINDS)
    if bad:
        raise UsageError(f"grant by_kind {sorted(bad)[0]!r} must be one of {', '.join(tables.BY_KINDS)}")
    return table


def stamped(table: pa.Table, time_column: str, now: dt.datetime, seq: int) -> pa.Table:
    """`table` with a column `time_column` of `now` and a `_seq` column of `seq`: rows as a commit writes them."""
    n = table.num_rows
    return table.append_column(time_column, const_column(now, n, tables.TS)).append_column(
        "_seq", const_column(seq, n, pa.int64())
    )


class Conditions:
    """SQL conditions joined by AND, with their `?` parameters in order: one WHERE or HAVING clause."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def since_until(self, column: str, since: dt.datetime | str | None, until: dt.datetime | str | None = None) -> None:
        """`column` at or after `since` and before `until` (either None: no bound)."""
        if since is not None:
            self.add(f"{column} >= ?::TIMESTAMPTZ", as_ts(since))
        if until is not None:
            self.add(f"{column} < ?::TIMESTAMPTZ", as_ts(until))

    def sql(self, keyword: str = "WHERE") -> str:
        """`keyword` and the conditions (with a space after), or '' when there are none."""
        return f"{keyword} {' AND '.join(self.clauses)} " if self.clauses else ""
