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
