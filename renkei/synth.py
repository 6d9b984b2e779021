"""Synthetic DICOM studies for a region's sites: every test, benchmark and the demo use them.

Three layers, each usable alone:

1. People. `population(seed)` is a deterministic pool of Japanese people (kanji,
   kana and romaji names, birth date, sex); `person_at(seed, i)` is its i-th.
   `site_patients(config, site_id, n, seed)` registers n of them at a site under
   that site's own Patient ID format and Issuer of Patient ID. The first
   `SHARED_PERSONS` people of the pool are registered at *every* site (under
   different IDs), so any two sites share at least one person; the hub also
   registers some of each clinic's own patients (people a clinic sends to the
   hub for exams). `homonym_pair(seed)` gives two *different* people with the
   same kanji and kana name, birth date and sex; they are registered nowhere
   unless `site_patients(..., include_homonyms=True)` (hub: both, first
   clinic: the first of them).
2. Plans. `plan_site(...)` / `plan_study(...)` decide every attribute of every
   study (UIDs, dates, accession numbers, referring physician, requesting
   service...) without making pixels: cheap, pure and deterministic.
3. Files. `write_study(plan, out_dir)` writes one study,
   `study_datasets(plan)` yields its datasets without writing (for sending
   directly), `generate_site(...)` does a whole site, and `write_single_study`
   makes one study of any size with no configuration (benchmarks).

Same seed, same bytes: dates derive from `REFERENCE_DATE` and the seed, UIDs
from renkei.uids.derive_uid, pixels from seeded numpy generators. Nothing
reads the clock.

Japanese text, as real sites write it. Under ISO 2022 IR 87 a 2-byte JIS X 0208
character may contain bytes equal to '\\', '^' or '=' (本 is 0x4B5C, ま 0x245E,
修 0x3D24); PS3.5 6.1.2.3 says only single-byte delimiters count, and pydicom
decodes such names exactly. Debian's dcmtk 3.6.7 and dciodvfy count such a
'\\' as a value delimiter (dcmdump shows VM 2, without a warning), and
Orthanc 1.10 does not decode ISO 2022 IR 87 at all (its REST API shows the
bytes with the escapes stripped; the stored file is intact). Compare names
through pydicom, or use ISO_IR 192 patients where a tool in between matters.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from renkei import synth_pixels as px
from renkei.config import RegionConfig, SiteConfig
from renkei.errors import UsageError
from renkei.records import StudyInfo
from renkei.uids import derive_uid

log = logging.getLogger(__name__)

# -- constants -----------------------------------------------------------------

CHARSET_JIS = "ISO 2022 IR 6\\ISO 2022 IR 87"  # ASCII + JIS X 0208 by ISO 2022 escapes
CHARSET_UTF8 = "ISO_IR 192"
MANUFACTURER = "renkei-synth"
IMPLEMENTATION_CLASS_UID = derive_uid("renkei", "synth", "implementation-class")
IMPLEMENTATION_VERSION_NAME = "RENKEI_SYNTH_1"
# The day synthetic studies are "made" by default: the most recent study is
# within 90 days before it; priors go back years.
REFERENCE_DATE = dt.date(2026, 11, 1)

SHARED_PERSONS = 2  # pool people 0..1: registered at every site
HOMONYM_INDICES = (2, 3)  # pool people 2 and 3: the homonym pair
FIRST_OWN_PERSON = 4  # from here on, people belong to one site (and maybe the hub)

MODALITIES = ("CT", "MR", "CR", "DX")
SOP_CLASS_OF_MODALITY = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}

# -- names ---------------------------------------------------------------------
# (kanji, hiragana reading, romaji): common surnames, with some of Nagasaki's.
SURNAMES: tuple[tuple[str, str, str], ...] = (
    ("佐藤", "さとう", "Sato"),
    ("鈴木", "すずき", "Suzuki"),
    ("高橋", "たかはし", "Takahashi"),
    ("田中", "たなか", "Tanaka"),
    ("伊藤", "いとう", "Ito"),
    ("渡辺", "わたなべ", "Watanabe"),
    ("山本", "やまもと", "Yamamoto"),
    ("中村", "なかむら", "Nakamura"),
    ("小林", "こばやし", "Kobayashi"),
    ("加藤", "かとう", "Kato"),
    ("吉田", "よしだ", "Yoshida"),
    ("山田", "やまだ", "Yamada"),
    ("佐々木", "ささき", "Sasaki"),
    ("山口", "やまぐち", "Yamaguchi"),
    ("松本", "まつもと", "Matsumoto"),
    ("井上", "いのうえ", "Inoue"),
    ("木村", "きむら", "Kimura"),
    ("林", "はやし", "Hayashi"),
    ("斎藤", "さいとう", "Saito"),
    ("清水", "しみず", "Shimizu"),
    ("山崎", "やまざき", "Yamazaki"),
    ("森", "もり", "Mori"),
    ("池田", "いけだ", "Ikeda"),
    ("橋本", "はしもと", "Hashimoto"),
    ("阿部", "あべ", "Abe"),
    ("石川", "いしかわ", "Ishikawa"),
    ("前田", "まえだ", "Maeda"),
    ("藤田", "ふじた", "Fujita"),
    ("小川", "おがわ", "Ogawa"),
    ("岡田", "おかだ", "Okada"),
    ("後藤", "ごとう", "Goto"),
    ("長谷川", "はせがわ", "Hasegawa"),
    ("村上", "むらかみ", "Murakami"),
    ("近藤", "こんどう", "Kondo"),
    ("坂本", "さかもと", "Sakamoto"),
    ("遠藤", "えんどう", "Endo"),
    ("青木", "あおき", "Aoki"),
    ("西村", "にしむら", "Nishimura"),
    ("福田", "ふくだ", "Fukuda"),
    ("太田", "おおた", "Ota"),
    ("松尾", "まつお", "Matsuo"),
    ("中島", "なかしま", "Nakashima"),
    ("浦川", "うらかわ", "Urakawa"),
    ("川口", "かわぐち", "Kawaguchi"),
    ("野口", "のぐち", "Noguchi"),
    ("荒木", "あらき", "Araki"),
    ("永田", "ながた", "Nagata"),
    ("平山", "ひらやま", "Hirayama"),
    ("山下", "やました", "Yamashita"),
    ("森田", "もりた", "Morita"),
)
# (kanji, hiragana, romaji, era): era = the birth years in which the name is usual
GIVEN_NAMES_MALE: tuple[tuple[str, str, str, str], ...] = (
    ("茂", "しげる", "Shigeru", "old"),
    ("清", "きよし", "Kiyoshi", "old"),
    ("正男", "まさお", "Masao", "old"),
    ("和夫", "かずお", "Kazuo", "old"),
    ("勇", "いさむ", "Isamu", "old"),
    ("修", "おさむ", "Osamu", "old"),
    ("浩", "ひろし", "Hiroshi", "old"),
    ("隆", "たかし", "Takashi", "old"),
    ("誠", "まこと", "Makoto", "mid"),
    ("健一", "けんいち", "Kenichi", "mid"),
    ("直樹", "なおき", "Naoki", "mid"),
    ("大輔", "だいすけ", "Daisuke", "mid"),
    ("達也", "たつや", "Tatsuya", "mid"),
    ("拓也", "たくや", "Takuya", "mid"),
    ("一郎", "いちろう", "Ichiro", "mid"),
    ("太郎", "たろう", "Taro", "mid"),
    ("翔太", "しょうた", "Shota", "young"),
    ("健太", "けんた", "Kenta", "young"),
    ("蓮", "れん", "Ren", "young"),
    ("大翔", "ひろと", "Hiroto", "young"),
)
GIVEN_NAMES_FEMALE: tuple[tuple[str, str, str, str], ...] = (
    ("幸子", "さちこ", "Sachiko", "old"),
    ("節子", "せつこ", "Setsuko", "old"),
    ("和子", "かずこ", "Kazuko", "old"),
    ("千代", "ちよ", "Chiyo", "old"),
    ("恵子", "けいこ", "Keiko", "old"),
    ("京子", "きょうこ", "Kyoko", "old"),
    ("久美子", "くみこ", "Kumiko", "old"),
    ("陽子", "ようこ", "Yoko", "mid"),
    ("由美", "ゆみ", "Yumi", "mid"),
    ("直美", "なおみ", "Naomi", "mid"),
    ("明美", "あけみ", "Akemi", "mid"),
    ("真由美", "まゆみ", "Mayumi", "mid"),
    ("美穂", "みほ", "Miho", "mid"),
    ("花子", "はなこ", "Hanako", "mid"),
    ("美咲", "みさき", "Misaki", "young"),
    ("愛", "あい", "Ai", "young"),
    ("結衣", "ゆい", "Yui", "young"),
    ("桜", "さくら", "Sakura", "young"),
    ("葵", "あおい", "Aoi", "young"),
    ("陽菜", "ひな", "Hina", "young"),
)

# Hub departments that order each kind of exam (Requesting Service of local orders)
HUB_DEPARTMENTS: dict[str, tuple[str, ...]] = {
    "ct-chest": ("Respiratory Medicine", "Internal Medicine", "Emergency"),
    "ct-abdomen": ("Gastroenterology", "Surgery", "Internal Medicine"),
    "ct-chest-abdomen-pelvis": ("Surgery", "Oncology"),
    "mr-head": ("Neurology", "Neurosurgery"),
    "xr-chest": ("Internal Medicine", "Respiratory Medicine", "Orthopedics"),
}


def katakana(hiragana: str) -> str:
    """The katakana spelling of a hiragana reading (same sounds, other script)."""
    return "".join(chr(ord(c) + 0x60) if "\u3041" <= c <= "\u3096" else c for c in hiragana)


def jis_encodable(text: str) -> bool:
    """True when `text` can be written under ISO 2022 IR 6 + IR 87 (ASCII and JIS X 0208)."""
    try:
        encoded = text.encode("iso2022_jp")
    except UnicodeEncodeError:
        return False
    # Python's codec may fall back to JIS X 0201 Roman (ESC ( J) or JIS C 6226-1978 (ESC $ @),
    # which the two DICOM terms do not cover.
    return b"\x1b(J" not in encoded and b"\x1b$@" not in encoded


# -- people ----------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """One synthetic human being. `person_id` is the ground truth of identity (never written to DICOM)."""

    person_id: str
    family_kanji: str
    given_kanji: str
    family_kana: str
    given_kana: str
    family_romaji: str
    given_romaji: str
    birth_date: str  # YYYYMMDD
    sex: str  # M or F

    @property
    def patient_name(self) -> str:
        """DICOM PN text: alphabetic=ideographic=phonetic, e.g. 'Yamada^Taro=山田^太郎=ヤマダ^タロウ'."""
        return (
            f"{self.family_romaji}^{self.given_romaji}="
            f"{self.family_kanji}^{self.given_kanji}="
            f"{self.family_kana}^{self.given_kana}"
        )

    @property
    def kanji_name(self) -> str:
        return f"{self.family_kanji}^{self.given_kanji}"

    @property
    def kana_name(self) -> str:
        return f"{self.family_kana}^{self.given_kana}"

    @property
    def demographics(self) -> tuple[str, str, str, str]:
        """What cross-site matching compares: kanji name, kana name, birth date, sex."""
        return (self.kanji_name, self.kana_name, self.birth_date, self.sex)


def _rng(*parts: object) -> np.random.Generator:
    return px.rng_for("renkei-synth", *parts)


def _draw_person(seed: int, index: int, attempt: int) -> Person:
    rng = _rng(seed, "person", index, attempt)
    sex = "F" if rng.random() < 0.52 else "M"
    # an ageing region: many elderly patients, some children
    age_years = float(np.clip(rng.normal(62, 20), 0.5, 99))
    birth = REFERENCE_DATE - dt.timedelta(days=int(age_years * 365.25))
    era = "old" if birth.year < 1960 else "mid" if birth.year < 1995 else "young"
    names = GIVEN_NAMES_FEMALE if sex == "F" else GIVEN_NAMES_MALE
    fitting = [n for n in names if n[3] == era]
    given = fitting[int(rng.integers(len(fitting)))] if rng.random() < 0.85 else names[int(rng.integers(len(names)))]
    family = SURNAMES[int(rng.integers(len(SURNAMES)))]
    # most systems keep the reading in katakana, some in hiragana
    kana = katakana if rng.random() < 0.75 else (lambda s: s)
    return Person(
        person_id=f"P{index:06d}",
        family_kanji=family[0],
        given_kanji=given[0],
        family_kana=kana(family[1]),
        given_kana=kana(given[1]),
        family_romaji=family[2],
        given_romaji=given[2],
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
    )


_POOLS: dict[int, list[Person]] = {}
_POOLS_LOCK = threading.Lock()


def population(seed: int, size: int = 100) -> list[Person]:
    """The first `size` people of the seed's pool (a longer pool starts with the shorter one).

    No two people share kanji and kana name, birth date and sex, except the
    deliberate homonym pair at HOMONYM_INDICES (see `homonym_pair`).
    """
    if size < 0:
        raise UsageError(f"population size must be >= 0 (got {size})")
    with _POOLS_LOCK:
        pool = _POOLS.setdefault(seed, [])
        while len(pool) < size:
            index = len(pool)
            if index == HOMONYM_INDICES[1]:
                pool.append(replace(pool[HOMONYM_INDICES[0]], person_id=f"P{index:06d}"))
                continue
            seen = {p.demographics for p in pool}
            attempt = 0
            person = _draw_person(seed, index, attempt)
            while person.demographics in seen:
                attempt += 1
                person = _draw_person(seed, index, attempt)
            pool.append(person)
        return list(pool[:size])


def person_at(seed: int, index: int) -> Person:
    """The pool's `index`-th person for this seed."""
    return population(seed, index + 1)[index]


def homonym_pair(seed: int) -> tuple[Person, Person]:
    """Two different people with the same kanji and kana name, birth date and sex.

    For testing ambiguous patient matches. They are registered at no site by
    default; `site_patients(..., include_homonyms=True)` registers both at the
    hub and the first of them at the first clinic.
    """
    pool = population(seed, max(HOMONYM_INDICES) + 1)
    return pool[HOMONYM_INDICES[0]], pool[HOMONYM_INDICES[1]]


@dataclass(frozen=True)
class SitePatient:
    """A person registered at one site: that site's Patient ID and issuer, and how its files encode text."""

    person: Person
    site_id: str
    patient_id: str
    issuer_of_patient_id: str
    specific_character_set: str = CHARSET_JIS
    referring_site: str | None = None  # at the hub: the clinic that also treats this person and orders exams

    @property
    def patient_name(self) -> str:
        return self.person.patient_name

    @property
    def birth_date(self) -> str:
        return self.person.birth_date

    @property
    def sex(self) -> str:
        return self.person.sex


def _site_letter(site: SiteConfig) -> str:
    if site.role == "hub":
        return "H"
    last = site.id.split("-")[-1]
    return (last[:1] if last[:1].isalpha() else site.id[:1]).upper()


def _clinics(config: RegionConfig) -> list[SiteConfig]:
    return [s for s in config.sites if s.role == "clinic"]


def format_patient_id(config: RegionConfig, site_id: str, position: int, seed: int) -> str:
    """The Patient ID a site gives its `position`-th synthetic patient, in that site's own format.

    Hub: 'H0001234'; clinics rotate among 'A-00012', 'B000345' and '00012345'.
    Numbers increase with gaps, so IDs are unique within the site.
    """
    site = config.site(site_id)
    rng = _rng(seed, "numbering", site_id)
    base = int(rng.integers(1000, 9000)) if site.role == "hub" else int(rng.integers(10, 400))
    number = base + position * 7 + int(_rng(seed, "number", site_id, position).integers(0, 7))
    letter = _site_letter(site)
    if site.role == "hub":
        return f"{letter}{number:07d}"
    style = [c.id for c in _clinics(config)].index(site_id) % 3
    if style == 0:
        return f"{letter}-{number:05d}"
    if style == 1:
        return f"{letter}{number:06d}"
    return f"{number:08d}"


def site_patients(
    config: RegionConfig,
    site_id: str,
    n: int,
    seed: int,
    *,
    include_homonyms: bool = False,
    utf8_every: int = 4,
) -> list[SitePatient]:
    """The first `n` patients of a site, each with the site's own Patient ID.

    Positions 0..SHARED_PERSONS-1 are the same people at every site. After
    them, a clinic registers its own people; the hub alternates between its
    own people and people of each clinic in turn (their `referring_site`).
    The list for n is the start of the list for n+1. One patient in
    `utf8_every` (at a per-site offset) gets ISO_IR 192, the others
    ISO 2022 IR 6\\ISO 2022 IR 87.
    """
    if n < 1:
        raise UsageError(f"--patients must be at least 1 (got {n})")
    site = config.site(site_id)
    site_pos = config.site_ids.index(site_id)
    n_sites = len(config.sites)
    clinics = _clinics(config)

    def own(j: int, s: int = site_pos) -> int:
        return FIRST_OWN_PERSON + j * n_sites + s

    people: list[tuple[int, str | None]] = []  # (pool index, referring clinic)
    for k in range(SHARED_PERSONS):
        people.append((k, clinics[k % len(clinics)].id if site.role == "hub" and clinics else None))
    if include_homonyms and clinics:
        if site.role == "hub":
            people[SHARED_PERSONS:SHARED_PERSONS] = [(HOMONYM_INDICES[0], clinics[0].id), (HOMONYM_INDICES[1], None)]
        elif site.id == clinics[0].id:
            people.insert(SHARED_PERSONS, (HOMONYM_INDICES[0], None))
    j_own = 0
    j_referred = 0
    while len(people) < n:
        if site.role == "hub" and clinics and len(people) % 2 == 1:
            clinic = clinics[j_referred % len(clinics)]
            round_ = j_referred // len(clinics)
            # that clinic's list has its own people from position SHARED_PERSONS on
            people.append((own(round_, config.site_ids.index(clinic.id)), clinic.id))
            j_referred += 1
        else:
            people.append((own(j_own), None))
            j_own += 1
    people = people[:n]
    pool = population(seed, max(i for i, _ in people) + 1)
    result = []
    for position, (index, referring) in enumerate(people):
        utf8 = (position + site_pos) % utf8_every == utf8_every - 1 if utf8_every > 0 else False
        result.append(
            SitePatient(
                person=pool[index],
                site_id=site_id,
                patient_id=format_patient_id(config, site_id, position, seed),
                issuer_of_patient_id=site.issuer,
                specific_character_set=CHARSET_UTF8 if utf8 else CHARSET_JIS,
                referring_site=referring,
            )
        )
    return result


def site_doctors(config: RegionConfig, site_id: str, seed: int, count: int = 3) -> list[str]:
    """Physicians of a site as DICOM PN text (alphabetic=ideographic=phonetic)."""
    rng = _rng(seed, "doctors", site_id)
    doctors: list[str] = []
    while len(doctors) < count:
        family = SURNAMES[int(rng.integers(len(SURNAMES)))]
        names = GIVEN_NAMES_MALE if rng.random() < 0.6 else GIVEN_NAMES_FEMALE
        given = names[int(rng.integers(len(names)))]
        name = f"{family[2]}^{given[2]}={family[0]}^{given[0]}={katakana(family[1])}^{katakana(given[1])}"
        if name not in doctors:
            doctors.append(name)
    return doctors


# -- plans -----------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesPlan:
    """One series to write: what it shows and how many images of what size."""

    series_uid: str
    series_number: int
    modality: str
    sop_class_uid: str
    description: str
    kind: str  # ct-chest, ct-abdomen, ct-chest-abdomen-pelvis, mr-t1, mr-t2, xr-pa, xr-ll
    instances: int
    rows: int
    columns: int
    body_part: str
    frame_of_reference_uid: str = ""
    contrast: bool = False
    series_time: str = ""

    def sop_instance_uid(self, index: int) -> str:
        """The SOP Instance UID of the series' `index`-th instance (0-based)."""
        return derive_uid(self.series_uid, "instance", index)


@dataclass(frozen=True)
class StudyPlan:
    """Everything about one study before any pixel is made; `write_study` turns it into files."""

    info: StudyInfo
    patient: SitePatient
    series: tuple[SeriesPlan, ...]
    station_name: str
    pixel_seed: tuple[int, ...]
    patient_age: str = ""

    @property
    def instance_count(self) -> int:
        return sum(s.instances for s in self.series)


_DESCRIPTIONS = {
    # kind: (English, Japanese, body part)
    "ct-chest": ("CT Chest", "胸部CT", "CHEST"),
    "ct-abdomen": ("CT Abdomen", "腹部CT", "ABDOMEN"),
    "ct-chest-abdomen-pelvis": ("CT Chest Abdomen Pelvis", "胸腹部骨盤CT", "CHEST"),
    "mr-head": ("MR Brain", "頭部MRI", "HEAD"),
    "xr-chest": ("Chest X-ray", "胸部単純X線", "CHEST"),
}


def _age(birth_date: str, on: dt.date) -> str:
    born = dt.datetime.strptime(birth_date, "%Y%m%d").date()
    days = (on - born).days
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    if years >= 2:
        return f"{years:03d}Y"
    if days >= 60:
        return f"{days // 30:03d}M"
    return f"{max(days, 0):03d}D"


def _station(site: SiteConfig, modality: str) -> str:
    prefix = site.edge.ae_title.split("_")[0][:8] or _site_letter(site)
    return f"{prefix}_{modality}1"[:16]


def plan_study(
    site: SiteConfig,
    patient: SitePatient,
    *,
    study_uid: str,
    modality: str,
    study_date: dt.date,
    study_time: str,
    accession_number: str,
    study_id: str,
    referring_physician: str,
    requesting_service: str = "",
    kind: str | None = None,
    japanese_description: bool = False,
    contrast: bool = False,
    ct_slices: int = 100,
    mr_slices: int | None = None,
    size: int = 512,
    lateral: bool = False,
) -> StudyPlan:
    """The plan of one study of `modality` for `patient` at `site` (series, sizes, UIDs)."""
    modality = modality.upper()
    if modality not in SOP_CLASS_OF_MODALITY:
        raise UsageError(f"unknown modality {modality!r}; synthetic studies can be {', '.join(MODALITIES)}")
    if ct_slices < 1 or size < 16:
        raise UsageError(f"need ct_slices >= 1 and size >= 16 (got {ct_slices}, {size})")
    sop_class = SOP_CLASS_OF_MODALITY[modality]
    if kind is None:
        kind = {"CT": "ct-chest", "MR": "mr-head"}.get(modality, "xr-chest")
    english, japanese, body_part = _DESCRIPTIONS[kind]
    description = japanese if japanese_description else english
    if contrast and modality == "CT":
        description += " 造影" if japanese_description else " with contrast"
    for_uid = derive_uid(study_uid, "frame-of-reference")
    hh, mm = int(study_time[:2]), int(study_time[2:4])
    series: list[SeriesPlan] = []

    def series_time(minutes: int) -> str:
        total = hh * 60 + mm + minutes
        return f"{min(total // 60, 23):02d}{total % 60:02d}{study_time[4:6]}"

    if modality == "CT":
        series.append(
            SeriesPlan(
                series_uid=derive_uid(study_uid, "series", 1),
                series_number=2,
                modality="CT",
                sop_class_uid=sop_class,
                description=f"{english.removeprefix('CT ')} {'C+' if contrast else 'plain'} axial",
                kind=kind,
                instances=ct_slices,
                rows=size,
                columns=size,
                body_part=body_part,
                frame_of_reference_uid=for_uid,
                contrast=contrast,
                series_time=series_time(3),
            )
        )
    elif modality == "MR":
        n = mr_slices if mr_slices is not None else max(3, ct_slices // 4)
        mr_size = max(16, size // 2)
        for number, weighting in ((3, "T1"), (4, "T2")):
            series.append(
                SeriesPlan(
                    series_uid=derive_uid(study_uid, "series", number),
                    series_number=number,
                    modality="MR",
                    sop_class_uid=sop_class,
                    description=f"AX {weighting} SE" if weighting == "T1" else "AX T2 TSE",
                    kind=f"mr-{weighting.lower()}",
                    instances=n,
                    rows=mr_size,
                    columns=mr_size,
                    body_part=body_part,
                    frame_of_reference_uid=for_uid,
                    series_time=series_time(2 + 6 * (number - 3)),
                )
            )
    else:
        rows = min(2048, size * 4)
        columns = (rows * 7 // 8) & ~1
        views = ("PA", "LL") if lateral else ("PA",)
        for number, view in enumerate(views, start=1):
            series.append(
                SeriesPlan(
                    series_uid=derive_uid(study_uid, "series", number),
                    series_number=number,
                    modality=modality,
                    sop_class_uid=sop_class,
                    description=f"Chest {view}",
                    kind=f"xr-{view.lower()}",
                    instances=1,
                    rows=rows,
                    columns=columns,
                    body_part=body_part,
                    series_time=series_time(number),
                )
            )
    info = StudyInfo(
        study_uid=study_uid,
        origin_site=site.id,
        patient_id=patient.patient_id,
        issuer_of_patient_id=patient.issuer_of_patient_id,
        patient_name=patient.patient_name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        study_date=study_date.strftime("%Y%m%d"),
        study_time=study_time,
        accession_number=accession_number,
        study_description=description,
        modalities=(modality,),
        referring_physician=referring_physician,
        requesting_service=requesting_service,
        institution_name=site.institution_name or site.name,
        study_id=study_id,
        specific_character_set=patient.specific_character_set,
    )
    if patient.specific_character_set == CHARSET_JIS:
        texts = [
            info.patient_name,
            info.study_description,
            info.referring_physician,
            info.requesting_service,
            info.institution_name,
        ] + [s.description for s in series]
        if not all(jis_encodable(t) for t in texts):
            # a configuration's institution name may hold characters outside JIS X 0208
            info = replace(info, specific_character_set=CHARSET_UTF8)
            patient = replace(patient, specific_character_set=CHARSET_UTF8)
    return StudyPlan(
        info=info,
        patient=patient,
        series=tuple(series),
        station_name=_station(site, modality),
        pixel_seed=tuple(px.seed_ints("pixels", study_uid)),
        patient_age=_age(patient.birth_date, study_date),
    )


def plan_site(
    config: RegionConfig,
    site_id: str,
    patients: Sequence[SitePatient],
    seed: int,
    *,
    ct_slices: int = 100,
    mr_slices: int | None = None,
    size: int = 512,
    modalities: Sequence[str] = ("CT", "MR", "CR"),
    reference_date: dt.date = REFERENCE_DATE,
) -> list[StudyPlan]:
    """Every study of a site's patients: one to three each, the latest within 90 days, priors years back.

    Patient at position j has mostly modality modalities[j % len(modalities)].
    At the hub, the latest study of a patient with a `referring_site` is an
    exam ordered by that clinic: Requesting Service is the clinic's
    institution name and the referring physician one of its doctors.
    """
    site = config.site(site_id)
    modalities = tuple(m.upper() for m in modalities)
    if not modalities:
        raise UsageError("give at least one modality (CT, MR, CR or DX)")
    for m in modalities:
        if m not in SOP_CLASS_OF_MODALITY:
            raise UsageError(f"unknown modality {m!r}; synthetic studies can be {', '.join(MODALITIES)}")
    local_doctors = site_doctors(config, site_id, seed)
    letter = _site_letter(site)
    plans: list[StudyPlan] = []
    sequence = int(_rng(seed, "accession", site_id).integers(100, 900))
    for position, patient in enumerate(patients):
        if patient.site_id != site_id:
            raise UsageError(f"patient {patient.patient_id} is registered at {patient.site_id}, not {site_id}")
        rng = _rng(seed, "studies", site_id, patient.patient_id)
        count = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
        born = dt.datetime.strptime(patient.birth_date, "%Y%m%d").date()
        day = reference_date - dt.timedelta(days=int(rng.integers(1, 90)))
        dates = [day]
        for _ in range(count - 1):
            day = day - dt.timedelta(days=int(rng.integers(150, 1100)))
            if day <= born + dt.timedelta(days=30):
                break
            dates.append(day)
        main = modalities[position % len(modalities)]
        for k, study_date in enumerate(dates):
            modality = main if k == 0 or rng.random() < 0.5 else modalities[int(rng.integers(len(modalities)))]
            sequence += int(rng.integers(1, 4))
            minutes = int(rng.integers(8 * 60 + 30, 17 * 60 + 30))
            study_time = f"{minutes // 60:02d}{minutes % 60:02d}{int(rng.integers(0, 60)):02d}"
            kind = {"CT": "ct-chest", "MR": "mr-head"}.get(modality, "xr-chest")
            if modality == "CT":
                kind = ("ct-chest", "ct-abdomen", "ct-chest-abdomen-pelvis")[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
            ordered_by = patient.referring_site if (site.role == "hub" and k == 0) else None
            if ordered_by:
                clinic = config.site(ordered_by)
                referring = site_doctors(config, ordered_by, seed)[int(rng.integers(3))]
                requesting = clinic.institution_name or clinic.name
            else:
                referring = local_doctors[int(rng.integers(len(local_doctors)))]
                departments = HUB_DEPARTMENTS[kind]
                requesting = departments[int(rng.integers(len(departments)))] if site.role == "hub" else ""
            if site.role == "hub":
                accession = f"{study_date:%Y%m%d}{sequence:05d}"
            else:
                accession = f"{letter}{study_date:%y}{sequence:05d}"
            plans.append(
                plan_study(
                    site,
                    patient,
                    study_uid=derive_uid("renkei-synth", seed, site_id, patient.patient_id, "study", k),
                    modality=modality,
                    study_date=study_date,
                    study_time=study_time,
                    accession_number=accession,
                    study_id=str(sequence),
                    referring_physician=referring,
                    requesting_service=requesting,
                    kind=kind,
                    japanese_description=bool(rng.random() < 0.4),
                    contrast=bool(modality == "CT" and rng.random() < 0.4),
                    ct_slices=ct_slices,
                    mr_slices=mr_slices,
                    size=size,
                    lateral=bool(modality in ("CR", "DX") and rng.random() < 0.5),
                )
            )
    return plans


# -- datasets and files ------------------------------------------------------------


def _ds_number(value: float) -> str:
    """A DS value of at most 16 characters."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _add_seconds(hhmmss: str, seconds: int) -> str:
    total = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds
    total = min(total, 23 * 3600 + 59 * 60 + 59)
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _series_dataset(plan: StudyPlan, series: SeriesPlan) -> Dataset:
    """The attributes every instance of the series shares."""
    info, patient = plan.info, plan.patient
    ds = Dataset()
    ds.SpecificCharacterSet = info.specific_character_set.split("\\")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if series.modality in ("CT", "MR") else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = series.sop_class_uid
    ds.StudyDate = info.study_date
    ds.SeriesDate = info.study_date
    ds.AcquisitionDate = info.study_date
    ds.ContentDate = info.study_date
    ds.StudyTime = info.study_time
    ds.SeriesTime = series.series_time
    ds.AccessionNumber = info.accession_number
    ds.Modality = series.modality
    if series.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = info.institution_name
    ds.ReferringPhysicianName = info.referring_physician
    ds.StationName = plan.station_name
    ds.StudyDescription = info.study_description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = {"CT": "Synth CT 64", "MR": "Synth MR 1.5T", "CR": "Synth CR", "DX": "Synth DR"}[
        series.modality
    ]
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer_of_patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = plan.patient_age
    ds.BodyPartExamined = series.body_part
    ds.DeviceSerialNumber = str(int(derive_uid(info.origin_site, series.modality).split(".")[-1]) % 100000)
    ds.SoftwareVersions = "renkei-synth 1"
    ds.StudyInstanceUID = info.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.StudyID = info.study_id
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if info.requesting_service:
        ds.RequestingService = info.requesting_service
    if series.modality in ("CT", "MR"):
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = series.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    if series.modality == "CT":
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = "400"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = 200
        ds.ConvolutionKernel = "STANDARD"
        ds.RescaleIntercept = str(px.CT_RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        if series.body_part == "CHEST":
            ds.WindowCenter = ["40", "-600"]
            ds.WindowWidth = ["400", "1500"]
            ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        else:
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
            ds.WindowCenterWidthExplanation = "ABDOMEN"
    elif series.modality == "MR":
        t1 = series.kind == "mr-t1"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE" if t1 else "SK"
        ds.ScanOptions = "" if t1 else "FS"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500" if t1 else "4000"
        ds.EchoTime = "12" if t1 else "100"
        ds.EchoTrainLength = 1 if t1 else 16
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.NumberOfAverages = "1"
        ds.WindowCenter = "900" if t1 else "1100"
        ds.WindowWidth = "1800" if t1 else "2400"
    else:
        view = series.kind.split("-")[1].upper()
        ds.ViewPosition = view
        ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
        ds.KVP = "125"
        ds.ExposureTime = "10"
        ds.DistanceSourceToDetector = "1800"
        spacing = _ds_number(430.0 / series.columns)
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.WindowCenter = "1900"
        ds.WindowWidth = "3600"
        if series.modality == "DX":
            ds.DetectorType = "SCINTILLATOR"
            ds.PixelIntensityRelationship = "LOG"
            ds.PixelIntensityRelationshipSign = 1
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "US"
            ds.ImageLaterality = "U"
            ds.PresentationLUTShape = "IDENTITY"
            ds.PositionerType = "NONE"
            ds.AcquisitionContextSequence = []
            ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Chest")]
            ds.ViewCodeSequence = [
                _code("399348003", "SCT", "postero-anterior")
                if view == "PA"
                else _code("399173006", "SCT", "left lateral")
            ]
        else:
            ds.PlateType = "STANDARD"
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _series_pixels(plan: StudyPlan, series: SeriesPlan) -> Iterator[tuple[np.ndarray, dict[str, object]]]:
    """Each instance's pixels and its position attributes, one at a time."""
    seed = list(plan.pixel_seed) + [series.series_number]
    phantom: px.CTPhantom | px.MRHeadPhantom
    if series.modality == "CT":
        region = series.kind.removeprefix("ct-")
        z0, z1 = px.CT_REGION_EXTENT_MM[region]
        phantom = px.CTPhantom(seed, series.rows, contrast=series.contrast)
        fov = 400.0
    elif series.modality == "MR":
        z0, z1 = px.MR_HEAD_EXTENT_MM
        phantom = px.MRHeadPhantom(seed, series.rows, "T1" if series.kind == "mr-t1" else "T2")
        fov = 230.0
    else:
        view: px.RadiographView = "PA" if series.kind == "xr-pa" else "LL"
        yield px.chest_radiograph(seed, series.rows, series.columns, view), {}
        return
    n = series.instances
    thickness = (z1 - z0) / n
    spacing = fov / series.rows
    corner = -fov / 2 + spacing / 2
    for i in range(n):
        z_body = z0 + (i + 0.5) * thickness
        z_patient = -z_body  # slices run from the head toward the feet
        yield (
            phantom.slice(z_body, i),
            {
                "ImagePositionPatient": [_ds_number(corner), _ds_number(corner), _ds_number(z_patient)],
                "SliceLocation": _ds_number(z_patient),
                "SliceThickness": _ds_number(thickness),
                "SpacingBetweenSlices": _ds_number(thickness),
                "PixelSpacing": [_ds_number(spacing), _ds_number(spacing)],
            },
        )


def study_datasets(plan: StudyPlan) -> Iterator[Dataset]:
    """The study's instances as datasets with file meta, one at a time (the same object is reused:
    write or send each before asking for the next, or copy it)."""
    info = plan.info
    for series in plan.series:
        ds = _series_dataset(plan, series)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(series.sop_class_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
        for i, (pixels, position) in enumerate(_series_pixels(plan, series)):
            sop_uid = series.sop_instance_uid(i)
            meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = i + 1
            content_time = _add_seconds(series.series_time, 30 + i // 4)
            ds.ContentTime = content_time
            ds.AcquisitionTime = content_time
            ds.InstanceCreationDate = info.study_date
            ds.InstanceCreationTime = content_time
            for keyword, value in position.items():
                setattr(ds, keyword, value)
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OW"
            yield ds


@dataclass(frozen=True)
class SynthStudy:
    """One written study: its record, the patient, and where its files are."""

    info: StudyInfo
    patient: SitePatient
    directory: Path
    files: tuple[Path, ...]
    series_count: int
    bytes_written: int

    @property
    def instance_count(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class SynthResult:
    """What `generate_site` wrote for one site."""

    site_id: str
    out_dir: Path
    patients: tuple[SitePatient, ...]
    studies: tuple[SynthStudy, ...] = field(default_factory=tuple)

    @property
    def study_infos(self) -> list[StudyInfo]:
        return [s.info for s in self.studies]

    @property
    def series_count(self) -> int:
        return sum(s.series_count for s in self.studies)

    @property
    def instance_count(self) -> int:
        return sum(s.instance_count for s in self.studies)

    @property
    def bytes_written(self) -> int:
        return sum(s.bytes_written for s in self.studies)

    @property
    def files(self) -> list[Path]:
        return [f for s in self.studies for f in s.files]


def write_study(plan: StudyPlan, out_dir: str | os.PathLike[str]) -> SynthStudy:
    """Write a planned study as out_dir/<study_uid>/<series_uid>/<sop_instance_uid>.dcm."""
    root = Path(out_dir) / plan.info.study_uid
    files: list[Path] = []
    written = 0
    try:
        for ds in study_datasets(plan):
            folder = root / ds.SeriesInstanceUID
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            files.append(path)
            written += path.stat().st_size
    except OSError as exc:
        raise UsageError(
            f"cannot write synthetic files under {out_dir}: {exc}; choose a folder you can write to"
        ) from None
    log.debug("wrote study %s (%d instances) for patient %s", plan.info.study_uid, len(files), plan.info.patient_id)
    return SynthStudy(
        info=plan.info,
        patient=plan.patient,
        directory=root,
        files=tuple(files),
        series_count=len(plan.series),
        bytes_written=written,
    )


def generate_site(
    config: RegionConfig,
    site_id: str,
    patients: Sequence[SitePatient] | int,
    seed: int,
    out_dir: str | os.PathLike[str],
    *,
    ct_slices: int = 100,
    mr_slices: int | None = None,
    size: int = 512,
    modalities: Sequence[str] = ("CT", "MR", "CR"),
    reference_date: dt.date = REFERENCE_DATE,
) -> SynthResult:
    """Plan and write every study of a site's patients (a number means `site_patients(config, site_id, n, seed)`)."""
    if isinstance(patients, int):
        patients = site_patients(config, site_id, patients, seed)
    plans = plan_site(
        config,
        site_id,
        patients,
        seed,
        ct_slices=ct_slices,
        mr_slices=mr_slices,
        size=size,
        modalities=modalities,
        reference_date=reference_date,
    )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc}; choose a folder you can write to") from None
    studies = tuple(write_study(plan, out) for plan in plans)
    result = SynthResult(site_id=site_id, out_dir=out, patients=tuple(patients), studies=studies)
    log.info(
        "site %s: wrote %d studies, %d series, %d instances (%.1f MB) to %s",
        site_id,
        len(studies),
        result.series_count,
        result.instance_count,
        result.bytes_written / 1e6,
        out,
    )
    return result


def default_patient(seed: int = 0, site_id: str = "synthetic", index: int = 0) -> SitePatient:
    """A patient needing no configuration: pool person `index`, Patient ID 'SYN<index>'."""
    return SitePatient(
        person=person_at(seed, index),
        site_id=site_id,
        patient_id=f"SYN{index:05d}",
        issuer_of_patient_id=site_id.upper(),
    )


def write_single_study(
    out_dir: str | os.PathLike[str],
    modality: str = "CT",
    *,
    slices: int = 100,
    size: int = 512,
    seed: int = 0,
    site: SiteConfig | None = None,
    patient: SitePatient | None = None,
    kind: str | None = None,
    study_date: dt.date = REFERENCE_DATE,
) -> SynthStudy:
    """One study with no configuration needed, e.g. a 300-slice 512x512 CT for a benchmark.

    `slices` is the CT slice count (MR: slices per series; CR/DX: ignored).
    The study UID depends on seed, site, patient, modality and slices, so
    different calls make different studies and the same call the same bytes.
    """
    if site is None:
        site = SiteConfig.model_validate(
            {
                "id": "synthetic",
                "name": "Synthetic site",
                "role": "hub",
                "institution_name": "renkei synthetic",
                "edge": {"ae_title": "SYNTH", "port": 11112},
            }
        )
    patient = patient or default_patient(seed, site.id)
    study_uid = derive_uid("renkei-synth", seed, site.id, patient.patient_id, "single", modality, slices, size, kind)
    plan = plan_study(
        site,
        patient,
        study_uid=study_uid,
        modality=modality,
        study_date=study_date,
        study_time="101500",
        accession_number=f"S{int(study_uid.rsplit('.', 1)[1]) % 10**9:09d}",
        study_id="1",
        referring_physician="Tanaka^Ichiro=田中^一郎=タナカ^イチロウ",
        kind=kind,
        ct_slices=slices,
        mr_slices=slices,
        size=size,
    )
    return write_study(plan, out_dir)
