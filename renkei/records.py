"""Records shared by the edge, the catalog, the policy and the flows.

Plain frozen dataclasses of text and numbers (never a pydicom Dataset), so they
can cross process boundaries and Prefect task parameters. Person names are the
decoded DICOM PN text, component groups separated by '=' (alphabetic,
ideographic, phonetic), e.g. 'Yamada^Taro=山田^太郎=やまだ^たろう'.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Attribute:
    """One DICOM attribute renkei keeps: its keyword, the query/retrieve level it belongs to, and its
    field name, the same in these records, the catalog's columns and the edge journal's columns."""

    keyword: str
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    name: str


# The one table of the attributes the edge reads from a received instance, the journal and the catalog
# keep, and C-FIND answers with (edge.parsing, edge.journal, edge.center, catalog.tables, rebuild).
ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("PatientName", "PATIENT", "patient_name"),
    Attribute("PatientID", "PATIENT", "patient_id"),
    Attribute("IssuerOfPatientID", "PATIENT", "issuer_of_patient_id"),
    Attribute("PatientBirthDate", "PATIENT", "patient_birth_date"),
    Attribute("PatientSex", "PATIENT", "patient_sex"),
    Attribute("StudyInstanceUID", "STUDY", "study_uid"),
    Attribute("StudyDate", "STUDY", "study_date"),
    Attribute("StudyTime", "STUDY", "study_time"),
    Attribute("AccessionNumber", "STUDY", "accession_number"),
    Attribute("StudyID", "STUDY", "study_id"),
    Attribute("StudyDescription", "STUDY", "study_description"),
    Attribute("ReferringPhysicianName", "STUDY", "referring_physician"),
    Attribute("RequestingService", "STUDY", "requesting_service"),
    Attribute("InstitutionName", "STUDY", "institution_name"),
    Attribute("SeriesInstanceUID", "SERIES", "series_uid"),
    Attribute("Modality", "SERIES", "modality"),
    Attribute("SeriesNumber", "SERIES", "series_number"),
    Attribute("SeriesDescription", "SERIES", "series_description"),
    Attribute("SeriesDate", "SERIES", "series_date"),
    Attribute("SeriesTime", "SERIES", "series_time"),
    Attribute("BodyPartExamined", "SERIES", "body_part_examined"),
    Attribute("SOPInstanceUID", "IMAGE", "sop_instance_uid"),
    Attribute("SOPClassUID", "IMAGE", "sop_class_uid"),
    Attribute("InstanceNumber", "IMAGE", "instance_number"),
    Attribute("ContentDate", "IMAGE", "content_date"),
    Attribute("ContentTime", "IMAGE", "content_time"),
)


def keywords(*levels: str) -> tuple[str, ...]:
    """The keywords of the attributes of these levels, in the table's order."""
    return tuple(a.keyword for a in ATTRIBUTES if a.level in levels)


def names(*levels: str) -> dict[str, str]:
    """keyword -> field name, for the attributes of these levels, in the table's order."""
    return {a.keyword: a.name for a in ATTRIBUTES if a.level in levels}


@dataclass(frozen=True)
class StudyInfo:
    """What the catalog and the policy need to know about a study (patient/study level)."""

    study_uid: str
    origin_site: str
    patient_id: str
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""  # YYYYMMDD
    patient_sex: str = ""
    study_date: str = ""  # YYYYMMDD
    study_time: str = ""  # HHMMSS[.ffffff]
    accession_number: str = ""
    study_description: str = ""
    modalities: tuple[str, ...] = ()
    referring_physician: str = ""
    requesting_service: str = ""
    institution_name: str = ""
    study_id: str = ""
    specific_character_set: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyInfo:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        if "modalities" in known and known["modalities"] is not None:
            known["modalities"] = tuple(known["modalities"])
        return cls(**known)


@dataclass(frozen=True)
class InstanceInfo:
    """One stored instance: where its bytes are and how to check them."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    modality: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    series_description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StudyBatch:
    """A study and (some of) its instances, as handed from an edge to the center."""

    study: StudyInfo
    instances: tuple[InstanceInfo, ...] = field(default_factory=tuple)
