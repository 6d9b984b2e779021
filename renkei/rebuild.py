"""Rebuild the catalog after its loss: the backup's facts, plus every object the center holds.

`renkei catalog rebuild`:

1. The catalog is repaired from its backup (`catalog.backup.restore`) when one
   exists — that brings back what the DICOM objects do not hold: grants,
   consents, patient links, locations, the audit chain. Without a backup, a
   damaged catalog's log is set aside (`_damaged/<time>/`) and the catalog
   starts empty; the witness records the loss.
2. Every object under `objects/` that the catalog does not list is read (its
   header, and its bytes for the SHA-256) and registered as held by the
   center, under its origin site (from its key). A key naming a SHA-256 (a
   corrected version kept beside the first) is registered after the first.
3. The sharing rules are applied again to every study it registered, so a
   clinic study is visible at the hub as before; person grants and consents
   come only from the backup.

Safe to run twice: registration is idempotent, and so is applying the rules.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pydicom

from renkei.catalog import backup as cbackup
from renkei.catalog import fs as cfs
from renkei.catalog import keys
from renkei.catalog.catalog import Catalog
from renkei.catalog.log import CommitLog
from renkei.catalog.store import ObjectStore
from renkei.config import Layout
from renkei.edge.parsing import describe_dataset
from renkei.errors import CatalogDamaged, CatalogError, RenkeiError
from renkei.records import InstanceInfo, StudyBatch, StudyInfo, names
from renkei.sharing import Sharing

log = logging.getLogger(__name__)

_STUDY_FIELDS = {name: keyword for keyword, name in names("PATIENT", "STUDY").items() if name != "study_uid"}
_BATCH = 2000  # instances per registration commit


@dataclass
class RebuildResult:
    restored_from_backup: bool
    backup_seq: int = 0
    set_aside: bool = False
    objects_seen: int = 0
    instances_registered: int = 0
    studies_registered: int = 0
    unreadable: list[str] = field(default_factory=list)  # keys (no patient data)
    rule_grants: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def catalog_state(layout: Layout) -> tuple[bool, str]:
    """(usable, why not): can the catalog be opened and its live files read?"""
    try:
        with Catalog.from_layout(layout, auto_compact=None) as cat:
            cat.totals()
        return True, ""
    except CatalogDamaged as exc:
        return False, str(exc)


def restore(layout: Layout) -> cbackup.RestoreResult:
    fs, root = cfs.open_filesystem(layout.catalog_url, layout.config.center.s3)
    location = cbackup.BackupLocation(layout.catalog_backup_url, layout.config.center.s3)
    return cbackup.restore(fs, root, layout.catalog_url, location)


def _set_aside(layout: Layout) -> None:
    """Move a damaged catalog's log, checkpoints and anchor aside (its data files become orphans)."""
    fs, root = cfs.open_filesystem(layout.catalog_url, layout.config.center.s3)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for folder in ("_log", "_checkpoints", "_audit"):
        base = cfs.join(root, folder)
        try:
            paths = [p for p in fs.find(base)] if not cfs.is_local(fs) else _walk_local(base)
        except FileNotFoundError:
            continue
        for path in paths:
            rel = path[len(root) :].lstrip("/")
            cfs.copy_file(fs, path, fs, cfs.join(root, f"_damaged/{stamp}/{rel}"))
            cbackup._remove(fs, path)


def _walk_local(base: str) -> list[str]:
    found: list[str] = []
    for folder, _dirs, files in os.walk(base):
        found.extend(os.path.join(folder, n) for n in files)
    return found


def rebuild(layout: Layout, reapply_rules: bool = True) -> RebuildResult:
    started = time.monotonic()
    location = cbackup.BackupLocation(layout.catalog_backup_url, layout.config.center.s3)
    usable, _why = catalog_state(layout)
    result = RebuildResult(restored_from_backup=False)
    if not usable:
        if location.manifest() is not None:
            restored = restore(layout)
            result.restored_from_backup, result.backup_seq = True, restored.backup_seq
            usable, why = catalog_state(layout)
            if not usable:
                raise CatalogError(f"the catalog is still damaged after the restore: {why}")
        else:
            _set_aside(layout)
            result.set_aside = True
            fs, root = cfs.open_filesystem(layout.catalog_url, layout.config.center.s3)
            empty = CommitLog(fs, root).load()
            location.write_witness(
                empty, layout.catalog_url, restored={"at": time.time(), "to_seq": 0, "rebuilt_without_backup": True}
            )
    store = ObjectStore(layout.center_url, layout.config.center.s3)
    with Catalog.from_layout(layout, writer="rebuild") as cat:
        known = {(r["study_uid"], r["sop_instance_uid"], r["sha256"]) for part in cat.iter_instances() for r in part}
        known_keys = {(s, i) for s, i, _ in known}
        conflict_shas = {(c.study_uid, c.sop_instance_uid, c.new_sha256) for c in cat.conflicts()}
        firsts, versions = [], []
        for key in store.list(keys.OBJECTS_PREFIX):
            result.objects_seen += 1
            try:
                site, study, series, sop = keys.parse_object_key(key)
            except RenkeiError:
                result.unreadable.append(key)
                continue
            versioned = key[: -len(".dcm")].rsplit(".", 1)[-1]
            is_version = len(versioned) == 64 and not versioned.isdigit()
            if is_version:
                if (study, sop, versioned) in conflict_shas or (study, sop, versioned) in known:
                    continue
                versions.append((key, site))
            elif (study, sop) not in known_keys:
                firsts.append((key, site))
        new_studies: list[str] = []
        for group in (firsts, versions):  # first versions before the corrected ones
            pending: dict[tuple[str, str], tuple[StudyInfo, list[InstanceInfo]]] = {}
            count = 0
            for key, site in group:
                try:
                    info, inst = _describe(store, key, site)
                except Exception as exc:  # a damaged object: named, the rest goes on
                    log.warning("rebuild: object %s cannot be read: %s", key, type(exc).__name__)
                    result.unreadable.append(key)
                    continue
                slot = pending.setdefault((site, info.study_uid), (info, []))
                slot[1].append(inst)
                count += 1
                if count >= _BATCH:
                    new_studies += _register(cat, pending, result)
                    pending, count = {}, 0
            new_studies += _register(cat, pending, result)
        if reapply_rules and new_studies:
            applied = Sharing(layout.config, cat).apply_rules(list(dict.fromkeys(new_studies)))
            result.rule_grants = len(applied.granted)
        if result.instances_registered or result.rule_grants:
            cat.append_audit(
                "center",
                "rebuild",
                "catalog-rebuild",
                detail={
                    "instances": result.instances_registered,
                    "studies": result.studies_registered,
                    "rule_grants": result.rule_grants,
                    "from_backup": result.restored_from_backup,
                },
            )
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _register(
    cat: Catalog, pending: dict[tuple[str, str], tuple[StudyInfo, list[InstanceInfo]]], result: RebuildResult
) -> list[str]:
    if not pending:
        return []
    batches = [StudyBatch(info, tuple(insts)) for info, insts in pending.values()]
    registered = cat.register_many(batches, holder="center")
    result.instances_registered += registered.new_instances + len(registered.conflicts)
    result.studies_registered += len(batches)
    return [b.study.study_uid for b in batches]


def _describe(store: ObjectStore, key: str, site: str) -> tuple[StudyInfo, InstanceInfo]:
    path = cfs.join(store.root, key)
    handle = open(path, "rb") if store.local else store.fs.open(path, "rb")
    with handle:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
        handle.seek(0)
        digest = hashlib.sha256()
        size = 0
        while True:
            block = handle.read(8 << 20)
            if not block:
                break
            digest.update(block)
            size += len(block)
    parsed = describe_dataset(ds)
    attrs = parsed.attributes
    info = StudyInfo(
        study_uid=parsed.study_uid,
        origin_site=site,
        modalities=(attrs.get("Modality", ""),) if attrs.get("Modality") else (),
        specific_character_set=parsed.specific_character_set,
        **{f: attrs.get(k, "") for f, k in _STUDY_FIELDS.items()},
    )
    transfer = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    inst = InstanceInfo(
        parsed.study_uid,
        parsed.series_uid,
        parsed.sop_instance_uid,
        parsed.sop_class_uid,
        transfer,
        size,
        digest.hexdigest(),
        modality=attrs.get("Modality", ""),
        series_number=_int(attrs.get("SeriesNumber")),
        instance_number=_int(attrs.get("InstanceNumber")),
        series_description=attrs.get("SeriesDescription", ""),
    )
    return info, inst


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


__all__ = ["RebuildResult", "catalog_state", "rebuild", "restore"]
