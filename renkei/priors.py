"""Prior studies for an admitted patient: who the person is across sites, what to fetch, reconciled copies.

Pure code (no Prefect). The flow `fetch_priors` calls, in order:
`resolve_person` (existing links first, else an exact demographic match on
kanji and kana name, birth date and sex, linked automatically when the policy
allows; anything ambiguous resolves to nothing and lists the candidates),
`find_priors` (the person's studies at other sites visible to the requesting
site, within the look-back and modalities), and `reconcile` (a copy whose
Patient ID and Issuer are the destination's, the originals kept in Other
Patient IDs Sequence; the archived bytes never change).
"""

from __future__ import annotations

import datetime as dt
import io
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from renkei.catalog.catalog import Catalog, PatientCandidate, StudyRow
from renkei.config import RegionConfig
from renkei.errors import UsageError


@dataclass(frozen=True)
class Demographics:
    """What identifies a person across sites when no link exists."""

    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""

    @property
    def key(self) -> tuple[str, str, str, str] | None:
        """(kanji, kana, birth date, sex), normalised; None when something is missing."""
        kanji, kana = name_groups(self.patient_name)
        if not (kanji and kana and self.birth_date and self.sex):
            return None
        return kanji, kana, self.birth_date.strip(), self.sex.strip().upper()


@dataclass(frozen=True)
class Resolution:
    """The site-local IDs of the person, how they were found, and the candidates when ambiguous."""

    site: str
    patient_id: str
    issuer: str
    ids: tuple[tuple[str, str, str], ...] = ()  # (site, patient_id, issuer), the requesting one included
    method: str = "none"  # 'linked' | 'auto-exact' | 'ambiguous' | 'no-match' | 'needs-confirmation'
    person_id: str | None = None
    candidates: tuple[PatientCandidate, ...] = field(default_factory=tuple)
    detail: str = ""

    @property
    def resolved(self) -> bool:
        return self.method in ("linked", "auto-exact")


def _kana(text: str) -> str:
    """Katakana folded to hiragana, width and spacing normalised, so that readings compare equal."""
    text = unicodedata.normalize("NFKC", text).replace(" ", "").replace("\u3000", "")
    return "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in text)


def name_groups(patient_name: str) -> tuple[str, str]:
    """(ideographic, phonetic) groups of a PN value, normalised; '' when absent."""
    groups = (patient_name or "").split("=")
    kanji = unicodedata.normalize("NFKC", groups[1]).replace(" ", "") if len(groups) > 1 else ""
    kana = _kana(groups[2]) if len(groups) > 2 else ""
    return kanji.strip("^"), kana.strip("^")


def demographics_of(catalog: Catalog, site: str, patient_id: str, issuer: str) -> Demographics | None:
    """The patient's demographics from the site's own studies in the catalog (latest study wins)."""
    rows = [r for r in catalog.visible_studies(site, [(patient_id, issuer or None)]) if r.origin_site == site]
    if not rows:
        return None
    latest = max(rows, key=lambda r: (r.study_date, r.study_time))
    return Demographics(latest.patient_name, latest.patient_birth_date, latest.patient_sex)


def resolve_person(
    config: RegionConfig,
    catalog: Catalog,
    site: str,
    patient_id: str,
    issuer: str,
    given: Demographics | None = None,
    operator: str = "fetch_priors",
) -> Resolution:
    """The person's IDs at every site: existing links, else an unambiguous exact demographic match."""
    issuer = issuer or config.site(site).issuer
    me = (site, patient_id, issuer)
    person = catalog.person_of(site, patient_id, issuer)
    if person:
        ids = tuple(catalog.patient_ids_of(person))
        return Resolution(site, patient_id, issuer, ids, "linked", person, detail=f"linked before as {person}")
    demo = demographics_of(catalog, site, patient_id, issuer) or given
    if demo is None or demo.key is None:
        return Resolution(
            site,
            patient_id,
            issuer,
            (me,),
            "no-match",
            detail="no kanji and kana name, birth date and sex known for this patient",
        )
    kanji, kana, birth_date, sex = demo.key
    found = [
        c for c in catalog.find_patients(birth_date=birth_date, sex=sex) if name_groups(c.patient_name) == (kanji, kana)
    ]
    others = [c for c in found if (c.site, c.patient_id, c.issuer) != me]
    if not others:
        return Resolution(
            site,
            patient_id,
            issuer,
            (me,),
            "no-match",
            detail="nobody at another site has the same name, birth date and sex",
        )
    by_site: dict[str, list[PatientCandidate]] = {}
    for c in found:
        by_site.setdefault(c.site, []).append(c)
    same_site_homonyms = [c for c in by_site.get(site, []) if (c.site, c.patient_id, c.issuer) != me]
    crowded = {s: cs for s, cs in by_site.items() if len(cs) > 1}
    if same_site_homonyms or crowded:
        where = sorted(set(crowded) | ({site} if same_site_homonyms else set()))
        return Resolution(
            site,
            patient_id,
            issuer,
            (me,),
            "ambiguous",
            candidates=tuple(found),
            detail=f"several patients share this name, birth date and sex at {', '.join(where)}; "
            "confirm who is who with `renkei link`",
        )
    if not config.policy.auto_link_exact_match:
        return Resolution(
            site,
            patient_id,
            issuer,
            (me,),
            "needs-confirmation",
            candidates=tuple(found),
            detail="exact match found; the policy asks an operator to confirm it (renkei link)",
        )
    entries = [me] + [(c.site, c.patient_id, c.issuer) for c in others]
    person = catalog.link_patients(
        entries, "auto-exact", operator, {"kanji": kanji, "kana": kana, "birth_date": birth_date, "sex": sex}
    )
    return Resolution(
        site,
        patient_id,
        issuer,
        tuple(catalog.patient_ids_of(person)),
        "auto-exact",
        person,
        candidates=tuple(found),
        detail="kanji and kana name, birth date and sex match exactly",
    )


def find_priors(
    catalog: Catalog,
    resolution: Resolution,
    lookback_years: float = 5.0,
    modalities: Sequence[str] | None = None,
    today: dt.date | None = None,
) -> list[StudyRow]:
    """The person's studies taken at other sites that the requesting site may see, newest first."""
    today = today or dt.date.today()
    since = (today - dt.timedelta(days=int(round(lookback_years * 365.25)))).strftime("%Y%m%d")
    others = [(pid, issuer) for s, pid, issuer in resolution.ids if s != resolution.site]
    if not others:
        return []
    rows = catalog.visible_studies(
        resolution.site, others, date_from=since, modalities=[m.upper() for m in modalities] if modalities else None
    )
    rows = [r for r in rows if r.origin_site != resolution.site]
    return sorted(rows, key=lambda r: (r.study_date, r.study_time), reverse=True)


def reconcile(part10: bytes, patient_id: str, issuer: str, to_utf8: bool = False) -> bytes:
    """A copy for the destination: its Patient ID and Issuer, the originals in Other Patient IDs Sequence.

    Names and UIDs stay; pixel data and every other element keep their bytes
    (compressed pixel data is not decoded). With `to_utf8` (a PACS that cannot
    read ISO 2022 IR 87, as Orthanc 1.10), every text value is re-encoded in
    UTF-8 (ISO_IR 192); the same characters, only the bytes of the copy change.
    """
    if not patient_id:
        raise UsageError("the destination Patient ID is empty")
    ds = pydicom.dcmread(io.BytesIO(part10))
    if to_utf8:
        convert_to_utf8(ds)
    original_id = str(ds.get("PatientID", "") or "")
    original_issuer = str(ds.get("IssuerOfPatientID", "") or "")
    if original_id != patient_id or original_issuer != issuer:
        others = list(ds.get("OtherPatientIDsSequence", []))
        if not any(
            str(i.get("PatientID", "")) == original_id and str(i.get("IssuerOfPatientID", "")) == original_issuer
            for i in others
        ):
            item = Dataset()
            item.PatientID = original_id
            item.IssuerOfPatientID = original_issuer
            item.TypeOfPatientID = "TEXT"
            others.append(item)
        ds.OtherPatientIDsSequence = DicomSequence(others)
        ds.PatientID = patient_id
        ds.IssuerOfPatientID = issuer
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def convert_to_utf8(ds: Dataset) -> None:
    """Every text value of `ds` (sequences too) decoded by its character set, then declared ISO_IR 192.

    pydicom writes decoded text in the dataset's declared character set, so the
    copy is UTF-8 throughout; items lose their own Specific Character Set (they
    inherit the dataset's). A value that cannot be decoded is an error, never
    a silent replacement character.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns, and replaces, on undecodable bytes: refuse instead
        try:
            ds.decode()
        except (UserWarning, UnicodeError, LookupError) as exc:
            raise UsageError(f"the copy cannot be converted to UTF-8: {exc}") from None
    ds.SpecificCharacterSet = "ISO_IR 192"
    for elem in ds.iterall():
        if elem.VR == "SQ":
            for item in elem.value:
                if "SpecificCharacterSet" in item:
                    del item.SpecificCharacterSet


def destination_id(resolution: Resolution) -> tuple[str, str]:
    """The requesting site's (patient_id, issuer) that imported copies carry."""
    return resolution.patient_id, resolution.issuer
