"""A lost reply to a catalog commit never breaks the catalog (issue 12, point 1).

A TCP proxy in front of the real S3 endpoint (moto's server) forwards the PUT
of a commit's log entry, lets the server store it, and then closes the
connection without the answer. botocore retries the conditional PUT and gets
412 for the writer's own entry (or the client raises): the writer must read
the entry back, see its own commit id, and keep its files. Done once for each
kind of commit — registration, grant, consent, patient link, compaction — and
after each: no data file is missing, a fresh reader (straight to S3, not
through the proxy) opens the catalog with exact counts, the full check passes
and the audit chain verifies.
"""

from __future__ import annotations

import pytest
from helpers_catalog import make_batch
from helpers_faults import ReplyDroppingProxy

from renkei.catalog import Catalog, GrantRequest
from renkei.catalog.backup import check


def _log_put(method: str, path: str) -> bool:
    return method == "PUT" and "/_log/" in path


@pytest.fixture
def proxied(s3_bucket, s3_env):
    proxy = ReplyDroppingProxy(s3_env.port)
    url = s3_bucket + "/catalog"
    cat = Catalog(url, {"endpoint_url": proxy.url}, auto_compact=None, vacuum_grace_s=0)
    try:
        yield proxy, cat, url
    finally:
        cat.close()
        proxy.close()


def _fresh_reader_agrees(url: str, studies: int, instances: int, events: int) -> None:
    with Catalog(url, auto_compact=None) as reader:  # straight to the S3 server
        result = check(reader)
        assert result.ok, result.problems
        totals = {t.site: t for t in reader.totals()}
        assert totals["clinic-a"].studies == studies
        assert totals["clinic-a"].instances == instances
        assert reader.instance_count() == instances
        verified = reader.verify_audit()
        assert verified.ok, verified.problems
        assert verified.events_checked == events == reader.state.audit_count


def test_each_kind_of_commit_survives_one_lost_reply(proxied) -> None:
    proxy, cat, url = proxied
    cat.register_many([make_batch(1, 5), make_batch(2, 5)])
    events = cat.state.audit_count

    # registration
    proxy.drop_next(_log_put)
    result = cat.register(make_batch(3, 7))
    assert proxy.dropped and not proxy.armed, "the proxy never lost the reply"
    assert result.new_instances == 7
    events = cat.state.audit_count
    _fresh_reader_agrees(url, 3, 17, events)

    # grant (a person's)
    proxy.drop_next(_log_put)
    cat.grant_many(
        [GrantRequest(f"{make_batch(3, 1).study.study_uid}", "hospital", "person", "dr-sato", "second opinion")]
    )
    assert len(proxy.dropped) == 2
    assert cat.may_see("hospital", make_batch(3, 1).study.study_uid)
    events = cat.state.audit_count
    _fresh_reader_agrees(url, 3, 17, events)
    with Catalog(url) as reader:
        assert [g.site for g in reader.active_grants_for_site("hospital")] == ["hospital"]

    # consent
    proxy.drop_next(_log_put)
    cat.set_consent("clinic-a", "P1", "CLA", "withdrawn", "clerk", "patient asked")
    assert len(proxy.dropped) == 3
    events = cat.state.audit_count
    _fresh_reader_agrees(url, 3, 17, events)
    with Catalog(url) as reader:
        assert reader.consent_of("clinic-a", "P1", "CLA").state == "withdrawn"

    # patient link
    proxy.drop_next(_log_put)
    person = cat.link_patients([("clinic-a", "P1", "CLA"), ("hospital", "H1", "HUB")], "operator", "op")
    assert len(proxy.dropped) == 4
    events = cat.state.audit_count
    _fresh_reader_agrees(url, 3, 17, events)
    with Catalog(url) as reader:
        assert reader.person_of("hospital", "H1", "HUB") == person

    # compaction: the commit that swaps the merged file in loses its reply
    before = cat.file_counts()
    proxy.drop_next(_log_put)
    cat.compact(force=True)
    assert len(proxy.dropped) == 5
    after = cat.file_counts()
    assert sum(after.values()) < sum(before.values())
    _fresh_reader_agrees(url, 3, 17, events)

    # and the writer goes on committing after all that
    cat.register(make_batch(4, 2))
    _fresh_reader_agrees(url, 4, 19, cat.state.audit_count)
    assert all(status == 200 for _m, _p, status in proxy.dropped), proxy.dropped


def test_a_lost_reply_to_a_losing_commit_still_lets_the_other_writer_win(proxied, s3_env) -> None:
    """The entry the retry finds is another writer's: this writer lost, deletes only its own files, retries."""
    proxy, cat, url = proxied
    cat.register(make_batch(1, 3))
    other = Catalog(url, auto_compact=None)
    try:
        # the other writer takes the next number first; this writer's PUT of that number is refused (412)
        other.register(make_batch(2, 4))
        result = cat.register(make_batch(3, 2))  # builds on a stale state, loses once, retries
        assert result.new_instances == 2
    finally:
        other.close()
    _fresh_reader_agrees(url, 3, 9, cat.state.audit_count)


def test_on_s3_a_deleted_catalog_is_detected_and_restored_from_its_backup(s3_bucket, s3_env) -> None:
    """The same witness, backup and restore on S3: the catalog and its backup both in buckets."""
    from renkei.catalog import fs as cfs
    from renkei.catalog.backup import BackupLocation, backup, restore

    url, backup_url = s3_bucket + "/catalog", s3_bucket + "-backup-prefix/b"
    with Catalog(url, auto_compact=None, backup_url=backup_url) as cat:
        cat.register_many([make_batch(1, 4), make_batch(2, 3)])
        cat.set_consent("clinic-a", "P1", "CLA", "withdrawn", "clerk")
        cat.compact(force=True)
        cat.append_audit("hub", "dr", "view", make_batch(1, 1).study.study_uid)
        backup(cat, cat.backup)
        events, head = cat.state.audit_count, cat.state.audit_head
    fs, root = cfs.open_filesystem(url)
    fs.rm(root, recursive=True)
    with Catalog(url, auto_compact=None, backup_url=backup_url) as cat:
        verified = cat.verify_audit()
        assert not verified.ok and any("witness" in p for p in verified.problems)
        assert not check(cat, cat.backup).ok
    restore(fs, root, url, BackupLocation(backup_url))
    with Catalog(url, auto_compact=None, backup_url=backup_url) as cat:
        assert check(cat, cat.backup).ok
        assert (cat.state.audit_count, cat.state.audit_head) == (events, head)
        assert cat.verify_audit().ok
        assert cat.instance_count() == 7
        assert cat.consent_of("clinic-a", "P1", "CLA").state == "withdrawn"
