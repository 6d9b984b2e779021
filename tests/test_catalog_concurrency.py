"""Several writer processes registering at once: nothing lost, nothing doubled, no lock errors.

Four real processes (spawned) register 20,000 instances each while this
process reads: every read must be a consistent state (a study's counts always
equal its instance rows, so no half-registered batch is ever seen) and the
end state must hold exactly 80,000 instances with every study's counts right.
Auto-compaction runs inside the writers meanwhile.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
from helpers_catalog import ROOT, backend_url, concurrent_writer

from renkei.catalog import Catalog

WRITERS = 4
PER_STUDY = 250
STUDIES = 80  # x 250 = 20,000 instances per writer
BATCH_STUDIES = 2


def _run(url: str, studies: int = STUDIES, batch_studies: int = BATCH_STUDIES) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Event()
    procs = [
        ctx.Process(target=concurrent_writer, args=(url, w, studies, PER_STUDY, batch_studies, start, queue))
        for w in range(WRITERS)
    ]
    for p in procs:
        p.start()
    reader = Catalog(url, writer="reader")
    seen_totals = []
    try:
        start.set()
        while any(p.is_alive() for p in procs):
            rows = reader.engine.rows(
                "SELECT s.study_uid, s.n, coalesce(i.n, 0) AS rows FROM "
                "(SELECT study_uid, sum(instances_added) AS n FROM studies GROUP BY study_uid) s "
                "LEFT JOIN (SELECT study_uid, count(*) AS n FROM instances GROUP BY study_uid) i USING (study_uid)"
            )
            assert all(r["n"] == r["rows"] for r in rows), "a reader saw a half-registered batch"
            assert all(r["n"] == PER_STUDY for r in rows), "a batch was seen partly"
            seen_totals.append(sum(r["rows"] for r in rows))
            time.sleep(0.2)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, f"writer {p.name} failed with exit code {p.exitcode}"
        results = sorted(queue.get(timeout=10) for _ in procs)
        assert [r[1] for r in results] == [studies * PER_STUDY] * WRITERS
        assert all(r[2] == 0 for r in results)  # re-registering never added anything
        assert seen_totals == sorted(seen_totals)  # readers never went back in time

        assert reader.instance_count() == WRITERS * studies * PER_STUDY
        counts = reader.engine.rows(f"SELECT study_uid, {', '.join(['1'])} AS one FROM studies GROUP BY study_uid")
        assert len(counts) == WRITERS * studies
        for w in range(WRITERS):
            for s in (1, studies // 2, studies):
                study = reader.study(f"{ROOT}.{w + 1}.{s}")
                assert study is not None
                assert (study.instance_count, study.series_count) == (PER_STUDY, 3)
        wrong = reader.engine.rows(
            "SELECT study_uid FROM (SELECT study_uid, sum(instances_added) AS n, sum(series_added) AS s "
            "FROM studies GROUP BY study_uid) WHERE n <> ? OR s <> 3",
            [PER_STUDY],
        )
        assert wrong == []
        totals = reader.totals()
        assert sum(t.instances for t in totals) == WRITERS * studies * PER_STUDY
        audit = reader.verify_audit()
        assert audit.ok, audit.problems
        register_events = [e for e in reader.audit(action="register")]
        assert len(register_events) == WRITERS * studies  # one per study, in one chain
        reader.compact(force=True)
        assert reader.instance_count() == WRITERS * studies * PER_STUDY
    finally:
        reader.close()
        for p in procs:
            if p.is_alive():
                p.kill()


@pytest.mark.slow
def test_four_writers_local(tmp_path: Path) -> None:
    _run(str(tmp_path / "catalog"))


@pytest.mark.slow
def test_four_writers_s3(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _run(backend_url(request, "s3", tmp_path, "catalog"), batch_studies=4)


def test_writers_committing_while_a_catalog_opens_are_not_taken_for_damage(tmp_path: Path) -> None:
    """A catalog opening checks its log against the witness while others keep committing.

    Another writer commits (and writes the witness) right after the opening one has listed the log,
    and again right after it has caught up: neither commit may be taken for lost entries (both once
    made a fresh writer on S3 fail with "log ends at entry N, but entry N+1 had been committed").
    """
    url, witness = str(tmp_path / "catalog"), str(tmp_path / "witness")
    other = Catalog(url, backup_url=witness, background_compaction=False)
    n = {"commits": 0}

    def commit() -> None:
        n["commits"] += 1
        other.set_location(f"{ROOT}.9.{n['commits']}", "edge:clinic-a", "present", by="other")

    commit()
    opening = Catalog(url, backup_url=witness, background_compaction=False)
    listed, caught_up = opening.log.latest_listed, opening.log.catch_up
    hooked = {"catch_up": 0}

    def latest_listed() -> int:  # the opening writer has read the log: another commit lands
        result = listed()
        commit()
        return result

    def catch_up(state):  # and again once it has caught up (after load's own catch-ups)
        result = caught_up(state)
        hooked["catch_up"] += 1
        if hooked["catch_up"] == 2:
            commit()
        return result

    opening.log.latest_listed = latest_listed  # type: ignore[method-assign]
    opening.log.catch_up = catch_up  # type: ignore[method-assign]
    try:
        state = opening.state  # raised CatalogDamaged before the witness was read ahead of the log
        assert state.seq >= 2
        opening.log.latest_listed, opening.log.catch_up = listed, caught_up  # type: ignore[method-assign]
        opening.set_location(f"{ROOT}.8.1", "edge:clinic-b", "present", by="opening")
        assert opening.state.seq == n["commits"] + 1
    finally:
        opening.close()
        other.close()
