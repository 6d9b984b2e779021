"""The one table of attributes (renkei.records.ATTRIBUTES) and what is derived from it."""

from __future__ import annotations

import dataclasses

from pydicom.datadict import dictionary_VR, tag_for_keyword

from renkei.catalog import tables
from renkei.catalog.catalog import StudyRow
from renkei.edge import journal, parsing
from renkei.edge.center import _study_record
from renkei.records import ATTRIBUTES, StudyInfo, keywords, names


def test_every_keyword_is_dicom_and_every_name_is_unique() -> None:
    for a in ATTRIBUTES:
        assert tag_for_keyword(a.keyword) is not None, a.keyword
        assert dictionary_VR(a.keyword), a.keyword
        assert a.level in ("PATIENT", "STUDY", "SERIES", "IMAGE"), a
    assert len({a.keyword for a in ATTRIBUTES}) == len({a.name for a in ATTRIBUTES}) == len(ATTRIBUTES)


def test_the_records_the_journal_and_the_catalog_use_the_table() -> None:
    info_fields = {f.name for f in dataclasses.fields(StudyInfo)}
    assert set(names("PATIENT", "STUDY").values()) <= info_fields
    assert set(names("PATIENT", "STUDY").values()) <= set(tables.STUDIES.names)
    assert parsing.ALL_KEYS == keywords("PATIENT") + keywords("STUDY") + keywords("SERIES") + keywords("IMAGE")
    assert journal.STUDY_COLUMNS == names("PATIENT", "STUDY")
    assert journal.SERIES_COLUMNS == names("SERIES") and journal.INSTANCE_COLUMNS == names("IMAGE")


def test_a_center_held_study_answers_c_find_with_every_study_attribute() -> None:
    values = {f.name: "" for f in dataclasses.fields(StudyRow)}
    values.update({name: f"v-{name}" for name in names("PATIENT", "STUDY").values()}, modalities=("CT",))
    values.update(series_count=1, instance_count=2)
    record = _study_record(StudyRow(**values))
    for keyword, name in names("PATIENT", "STUDY").items():
        assert record[keyword] == f"v-{name}"
