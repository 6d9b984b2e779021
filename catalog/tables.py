"""Arrow schemas of the catalog's Parquet tables, their natural keys and sort orders.

Every table is append-only: a row is an event or a fact, never edited in place.
`_seq` is the number of the catalog commit that added the row; the effective
state of a key (a grant, a consent, a location) is its row with the highest
`_seq`. Compaction sorts files by `sort_keys` so that DuckDB can skip row
groups by their min/max statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from renkei.records import StudyInfo

TS = pa.timestamp("us", tz="UTC")
STR = pa.string()
I64 = pa.int64()

# the StudyInfo record as columns (its modalities are a list column of their own)
STUDY_INFO_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StudyInfo) if f.name != "modalities")

STUDIES = pa.schema(
    [pa.field(name, STR) for name in STUDY_INFO_FIELDS]
    + [
        pa.field("modalities", pa.list_(STR)),
        pa.field("registered_at", TS),
        pa.field("series_added", I64),
        pa.field("instances_added", I64),
        pa.field("bytes_added", I64),
        pa.field("_seq", I64),
    ]
)

SERIES = pa.schema(
    [
        ("study_uid", STR),
        ("series_uid", STR),
        ("modality", STR),
        ("series_number", I64),
        ("series_description", STR),
        ("origin_site", STR),
        ("registered_at", TS),
        ("_seq", I64),
    ]
)

INSTANCES = pa.schema(
    [
        ("study_uid", STR),
        ("series_uid", STR),
        ("sop_instance_uid", STR),
        ("sop_class_uid", STR),
        ("transfer_syntax_uid", STR),
        ("size", I64),
        ("sha256", STR),
        ("instance_number", I64),
        ("object_key", STR),
        ("origin_site", STR),
        ("registered_at", TS),
        ("_seq", I64),
    ]
)

LOCATIONS = pa.schema(
    [
        ("study_uid", STR),
        ("sop_instance_uid", STR),  # '' = the whole study
        ("holder", STR),
        ("state", STR),
        ("verified_at", TS),
        ("detail", STR),
        ("by", STR),
        ("at", TS),
        ("_seq", I64),
    ]
)

GRANTS = pa.schema(
    [
        ("study_uid", STR),
        ("site", STR),
        ("action", STR),
        ("by_kind", STR),
        ("by", STR),
        ("reason", STR),
        ("rule", STR),
        ("policy_version", STR),
        ("at", TS),
        ("_seq", I64),
    ]
)

CONSENTS = pa.schema(
    [
        ("site", STR),
        ("patient_id", STR),
        ("issuer", STR),
        ("state", STR),
        ("by", STR),
        ("reason", STR),
        ("at", TS),
        ("_seq", I64),
    ]
)

PATIENT_LINKS = pa.schema(
    [
        ("person_id", STR),
        ("site", STR),
        ("patient_id", STR),
        ("issuer", STR),
        ("method", STR),
        ("by", STR),
        ("evidence", STR),
        ("at", TS),
        ("_seq", I64),
    ]
)

AUDIT = pa.schema(
    [
        ("event_no", I64),
        ("at", TS),
        ("actor_site", STR),
        ("actor", STR),
        ("action", STR),
        ("study_uid", STR),
        ("target_site", STR),
        ("outcome", STR),
        ("detail", STR),
        ("prev_hash", STR),
        ("hash", STR),
        ("_seq", I64),
    ]
)

CONFLICTS = pa.schema(
    [
        ("study_uid", STR),
        ("sop_instance_uid", STR),
        ("object_key", STR),
        ("existing_sha256", STR),
        ("new_sha256", STR),
        ("conflict_key", STR),
        ("origin_site", STR),
        ("holder", STR),
        ("at", TS),
        ("_seq", I64),
        ("new_size", I64),  # added later: files written before it lack the column (read by name)
    ]
)


# Columns with (nearly) one value per row: dictionary encoding only costs time there.
HIGH_CARDINALITY = frozenset(
    {
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "sha256",
        "object_key",
        "existing_sha256",
        "new_sha256",
        "conflict_key",
        "hash",
        "prev_hash",
        "detail",
        "patient_id",
        "patient_name",
        "accession_number",
        "study_id",
        "person_id",
        "evidence",
        "reason",
    }
)


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    sort_keys: tuple[str, ...]
    row_group_size: int
    # Compaction may fold rows into the latest per key (the history is not needed).
    latest_by: tuple[str, ...] = ()

    @property
    def dictionary_columns(self) -> list[str]:
        """Columns worth dictionary-encoding in Parquet (few distinct values)."""
        return [
            f.name
            for f in self.schema
            if f.name not in HIGH_CARDINALITY and (pa.types.is_string(f.type) or pa.types.is_list(f.type))
        ]

    def parquet_options(self) -> dict[str, Any]:
        return {"compression": "zstd", "use_dictionary": self.dictionary_columns, "write_statistics": True}


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (
        TableSpec("studies", STUDIES, ("patient_id", "issuer_of_patient_id", "study_uid"), 8192),
        TableSpec("series", SERIES, ("study_uid", "series_uid"), 16384),
        TableSpec("instances", INSTANCES, ("study_uid", "sop_instance_uid"), 32768),
        TableSpec(
            "locations",
            LOCATIONS,
            ("study_uid", "holder", "sop_instance_uid"),
            8192,
            latest_by=("study_uid", "sop_instance_uid", "holder"),
        ),
        TableSpec("grants", GRANTS, ("study_uid", "site", "_seq"), 8192),
        TableSpec("consents", CONSENTS, ("patient_id", "issuer", "site", "_seq"), 8192),
        TableSpec("patient_links", PATIENT_LINKS, ("patient_id", "issuer", "site", "_seq"), 8192),
        TableSpec("audit", AUDIT, ("event_no",), 16384),
        TableSpec("conflicts", CONFLICTS, ("study_uid", "sop_instance_uid"), 8192),
    )
}

# Location states and grant actions, as stored.
LOCATION_STATES = ("present", "verified", "missing", "corrupt", "removed")
GRANT = "grant"
REVOKE = "revoke"
BY_KINDS = ("rule", "person", "consent", "system")
CONSENT_STATES = ("given", "withdrawn")
LINK_METHODS = ("auto-exact", "operator", "unlink")
CENTER = "center"


def conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """`data` with `schema`'s columns in its order; a column older files lack is filled with nulls."""
    columns = [
        data.column(f.name).cast(f.type) if f.name in data.column_names else pa.nulls(data.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
