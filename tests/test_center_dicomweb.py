"""The center's DICOMweb service (issue 15), as a real process, through clients no one here wrote.

`renkei center serve` runs on a free port over the region's center folder. Each site stores its own
studies with STOW-RS through the `dicomweb-client` library, holding only its own credential; then
every site identity searches (QIDO-RS, each level) and retrieves (WADO-RS) every study, through
publish, unpublish and consent withdrawal, and each answer is compared with the one sharing decision.
Retrieved bytes equal the stored bytes. Requests without a credential, with a revoked one, or with
another site's study are refused.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers_parts import require_part, require_program
from helpers_region import REPO, layout_of, region_config

from renkei import peers, synth
from renkei.center.identity import Credentials
from renkei.runtime import open_catalog
from renkei.sharing import Sharing

pytestmark = pytest.mark.slow

SITES = ("hub", "clinic-a", "clinic-b")


def _start_service(config: Path, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = peers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "renkei.cli.main", "--config", str(config), "--data-dir", str(data_dir)]
        + ["center", "serve", "--port", str(port)],
        cwd=REPO,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "RENKEI_CENTER_SPOOL": str(data_dir / "spool")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url + "/dicomweb"
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"renkei center serve exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("renkei center serve did not answer within 60 s")


def _client(url: str, token: str):  # type: ignore[no-untyped-def]
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=url, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("center-dicomweb")
    data_dir = tmp / "data"
    config = region_config(tmp, pacs_at=())
    lay = layout_of(config, data_dir)
    written = {
        site: synth.generate_site(
            lay.config, site, 2, seed, tmp / "synth" / site, ct_slices=3, size=32, modalities=("CT",)
        )
        for seed, site in enumerate(SITES, start=3)
    }
    creds = Credentials(lay.center_url, lay.config.center.s3, cache_s=0.5)
    tokens = {site: creds.issue(site, "edge")[1] for site in SITES}
    proc, url = _start_service(config, data_dir, tmp / "center.log")
    try:
        yield {
            "config": config,
            "layout": lay,
            "written": written,
            "tokens": tokens,
            "creds": creds,
            "url": url,
            "log": tmp / "center.log",
        }
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _stow_all(region: dict) -> None:
    import pydicom

    for site in SITES:
        client = _client(region["url"], region["tokens"][site])
        for study in region["written"][site].studies:
            datasets = [pydicom.dcmread(f) for f in study.files]
            answer = client.store_instances(datasets)
            assert "FailedSOPSequence" not in answer, answer
            assert len(answer.ReferencedSOPSequence) == len(datasets)


def test_sites_store_their_studies_and_nothing_else(region: dict) -> None:
    import pydicom
    from requests import HTTPError

    _stow_all(region)
    # again: idempotent (same bytes, nothing duplicated)
    _stow_all(region)
    with open_catalog(region["layout"]) as cat:
        for site in SITES:
            for study in region["written"][site].studies:
                row = cat.study(study.info.study_uid)
                assert row is not None and row.origin_site == site
                assert row.instance_count == len(study.files)
    # clinic-b cannot store into clinic-a's study (nor make it its own)
    victim = region["written"]["clinic-a"].studies[0]
    ds = pydicom.dcmread(victim.files[0])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    client = _client(region["url"], region["tokens"]["clinic-b"])
    with pytest.raises(HTTPError) as refused:
        client.store_instances([ds])
    assert refused.value.response.status_code == 409
    with open_catalog(region["layout"]) as cat:
        assert cat.study(victim.info.study_uid).origin_site == "clinic-a"
        assert cat.study(victim.info.study_uid).instance_count == len(victim.files)


def _decisions(region: dict) -> dict[tuple[str, str], bool]:
    with open_catalog(region["layout"]) as cat:
        sharing = Sharing(region["layout"].config, cat)
        return {
            (site, study.info.study_uid): sharing.decide(site, study.info.study_uid).allowed
            for site in SITES
            for origin in SITES
            for study in region["written"][origin].studies
        }


def _check_matrix(region: dict, phase: str) -> None:
    from requests import HTTPError

    expected = _decisions(region)
    all_uids = {uid for _site, uid in expected}
    for site in SITES:
        client = _client(region["url"], region["tokens"][site])
        listed = {s["0020000D"]["Value"][0] for s in client.search_for_studies()}
        visible = {uid for (s, uid), ok in expected.items() if s == site and ok}
        assert listed & all_uids == visible, (phase, site)
        for uid in sorted(all_uids):
            if expected[(site, uid)]:
                series = client.search_for_series(uid)
                assert series, (phase, site, uid)
                instances = client.search_for_instances(uid)
                assert instances
                assert client.search_for_studies(search_filters={"StudyInstanceUID": uid})
            else:
                # another site's study: not listed, not searchable within, not retrievable — as if absent
                assert client.search_for_studies(search_filters={"StudyInstanceUID": uid}) == []
                for call in (
                    client.search_for_series,
                    client.search_for_instances,
                    client.retrieve_study,
                    client.retrieve_study_metadata,
                ):
                    with pytest.raises(HTTPError) as refused:
                        call(uid)
                    assert refused.value.response.status_code == 404, (phase, site, uid)


def test_every_site_sees_exactly_what_the_decision_allows_through_every_phase(region: dict) -> None:
    lay = region["layout"]
    _check_matrix(region, "automatic grants")
    clinic_a = region["written"]["clinic-a"].studies[0]
    with open_catalog(lay) as cat:
        Sharing(lay.config, cat).publish(clinic_a.info.study_uid, ["clinic-b"], "dr-test", "second opinion")
    _check_matrix(region, "published to clinic-b")
    with open_catalog(lay) as cat:
        Sharing(lay.config, cat).unpublish(clinic_a.info.study_uid, ["clinic-b"], "dr-test")
    _check_matrix(region, "unpublished")
    patient = clinic_a.info
    with open_catalog(lay) as cat:
        Sharing(lay.config, cat).withdraw_consent("clinic-a", patient.patient_id, patient.issuer_of_patient_id, "clerk")
    _check_matrix(region, "consent withdrawn")
    with open_catalog(lay) as cat:
        decision = Sharing(lay.config, cat).decide("hub", clinic_a.info.study_uid)
    assert not decision.allowed  # the phase did change what the hub may see


def test_retrieved_bytes_equal_stored_bytes_and_metadata_is_utf8(region: dict) -> None:
    import pydicom

    client = _client(region["url"], region["tokens"]["hub"])
    study = region["written"]["clinic-b"].studies[0]
    stored = {hashlib.sha256(f.read_bytes()).hexdigest() for f in study.files}
    # the raw multipart answer, parsed by dicomweb-client: each part is the stored file's bytes
    response = client._http_get(  # noqa: SLF001 (the library's own GET, with its headers)
        f"{region['url']}/studies/{study.info.study_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    parts = list(client._decode_multipart_message(response, stream=False))  # noqa: SLF001
    assert {hashlib.sha256(p).hexdigest() for p in parts} == stored
    # the hub's retrieval of clinic-b's study is audited with the credential as the actor
    deadline = time.monotonic() + 10
    while True:
        with open_catalog(region["layout"]) as cat:
            events = cat.audit(study_uid=study.info.study_uid, action="wado", actor="site:hub/edge")
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert events and events[0].actor_site == "hub" and events[0].target_site == "clinic-b"
    assert events[0].outcome == "ok"
    datasets = client.retrieve_study(study.info.study_uid)
    assert {d.SOPInstanceUID for d in datasets} == {pydicom.dcmread(f).SOPInstanceUID for f in study.files}
    metadata = client.retrieve_study_metadata(study.info.study_uid)
    assert len(metadata) == len(study.files)
    first = metadata[0]
    assert first["7FE00010"].get("BulkDataURI")
    assert first["00080005"]["Value"] == ["ISO_IR 192"]
    name = first["00100010"]["Value"][0]
    assert name["Alphabetic"]
    one = metadata[0]
    frames = client.retrieve_instance_frames(
        study.info.study_uid, one["0020000E"]["Value"][0], one["00080018"]["Value"][0], frame_numbers=[1]
    )
    assert len(frames) == 1 and len(frames[0]) == 32 * 32 * 2


def test_search_matching_wildcards_dates_and_names(region: dict) -> None:
    client = _client(region["url"], region["tokens"]["hub"])
    study = region["written"]["clinic-a"].studies[-1].info
    by_id = client.search_for_studies(search_filters={"PatientID": study.patient_id})
    assert study.study_uid in {s["0020000D"]["Value"][0] for s in by_id}
    assert all(s["00100020"]["Value"][0] == study.patient_id for s in by_id)
    by_wild = client.search_for_studies(search_filters={"PatientID": study.patient_id[:-1] + "?"})
    assert study.study_uid in {s["0020000D"]["Value"][0] for s in by_wild}
    by_date = client.search_for_studies(search_filters={"StudyDate": f"{study.study_date}-{study.study_date}"})
    assert study.study_uid in {s["0020000D"]["Value"][0] for s in by_date}
    assert all(s["00080020"]["Value"][0] == study.study_date for s in by_date)
    groups = study.patient_name.split("=")
    family = groups[0].split("^")[0]
    by_name = client.search_for_studies(search_filters={"PatientName": family.lower() + "*"})
    assert study.study_uid in {s["0020000D"]["Value"][0] for s in by_name}
    if len(groups) > 1 and groups[1]:
        kanji_family = groups[1].split("^")[0]
        by_kanji = client.search_for_studies(search_filters={"PatientName": kanji_family + "*"})
        assert study.study_uid in {s["0020000D"]["Value"][0] for s in by_kanji}
        fuzzy = client.search_for_studies(fuzzymatching=True, search_filters={"PatientName": kanji_family})
        assert study.study_uid in {s["0020000D"]["Value"][0] for s in fuzzy}
    none = client.search_for_studies(search_filters={"PatientName": "NOBODY-HERE*"})
    assert none == []
    page = client.search_for_studies(limit=1)
    assert len(page) == 1


def test_requests_without_a_valid_credential_are_refused(region: dict) -> None:
    url = region["url"]
    uid = region["written"]["hub"].studies[0].info.study_uid
    for headers in ({}, {"Authorization": "Bearer rk1_not-a-token"}, {"Authorization": "Basic aHViOmh1Yg=="}):
        for path in ("/studies", f"/studies/{uid}", f"/studies/{uid}/metadata", f"/studies/{uid}/series"):
            assert requests.get(url + path, headers=headers, timeout=10).status_code == 401
        assert requests.post(url + "/studies", headers=headers, data=b"x" * 10, timeout=10).status_code == 401
    # a revoked credential stops working on the service within its cache time
    creds: Credentials = region["creds"]
    cred, token = creds.issue("clinic-a", "worker")
    good = {"Authorization": f"Bearer {token}"}
    # a new credential works at once (within 0.2 s when unknown tokens were just tried)
    deadline = time.monotonic() + 3
    while requests.get(url + "/studies", headers=good, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "a new credential was not accepted within 3 s"
        time.sleep(0.2)
    creds.revoke(credential_id=cred.id)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if requests.get(url + "/studies", headers=good, timeout=10).status_code == 401:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("a revoked credential was still accepted after 15 s")


def test_bad_requests_get_clear_errors_and_the_service_stays_up(region: dict) -> None:
    url = region["url"]
    auth = {"Authorization": f"Bearer {region['tokens']['hub']}"}
    cases = [
        ("/studies?PatientName=" + "?*" * 40, 400),
        ("/studies?NoSuchKeyword=1", 400),
        ("/studies?limit=-1", 400),
        ("/studies/not-a-uid/series", 400),
        ("/studies/1.2.3.4.5/series", 404),
        ("/series", 400),
    ]
    for path, status in cases:
        got = requests.get(url + path, headers=auth, timeout=10)
        assert got.status_code == status, (path, got.status_code, got.text[:200])
    bad_posts = [
        ({"Content-Type": "application/json"}, b"{}", 415),
        (
            {"Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz'},
            b"--xyz\r\n\r\nnot dicom\r\n--xyz--",
            409,
        ),
        (
            {"Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz'},
            b"--xyz\r\n\r\nunfinished",
            400,
        ),
    ]
    for headers, body, status in bad_posts:
        got = requests.post(url + "/studies", headers={**auth, **headers}, data=body, timeout=10)
        assert got.status_code == status, (headers, got.status_code, got.text[:200])
    assert requests.get(url + "/studies", headers=auth, timeout=10).status_code == 200


def test_orthanc_as_a_dicomweb_client_lists_and_retrieves_a_granted_study(region: dict, tmp_path: Path) -> None:
    """Orthanc with Debian's DICOMweb plugin, configured with the hub's credential, finds a clinic's study
    granted to the hub (and none the hub may not see) and retrieves it; Orthanc keeps the stored bytes."""
    require_part(
        Path(peers.DICOMWEB_PLUGIN).exists(), "Orthanc's DICOMweb plugin", "apt-get install -y orthanc-dicomweb"
    )
    require_program("Orthanc", "orthanc")
    server = {"Url": region["url"] + "/", "HttpHeaders": {"Authorization": f"Bearer {region['tokens']['hub']}"}}
    orthanc = peers.start_orthanc(tmp_path / "orthanc", dicomweb={"renkei": server})
    try:
        decisions = _decisions(region)
        study = next(s for s in region["written"]["clinic-a"].studies if decisions[("hub", s.info.study_uid)])
        listed = orthanc.rest("POST", "/dicom-web/servers/renkei/qido", {"Uri": "/studies"})
        assert isinstance(listed, list)
        uids = {s["0020000D"]["Value"] for s in listed}  # Orthanc's answer: values as plain strings
        assert study.info.study_uid in uids
        hidden = [uid for (site, uid), ok in decisions.items() if site == "hub" and not ok]
        assert hidden and not uids & set(hidden)  # consent withdrawn: the hub may not see them
        orthanc.rest("POST", "/dicom-web/servers/renkei/retrieve", {"Resources": [{"Study": study.info.study_uid}]})
        stored = {hashlib.sha256(f.read_bytes()).hexdigest() for f in study.files}
        kept = {hashlib.sha256(orthanc.rest("GET", f"/instances/{i}/file")).hexdigest() for i in orthanc.instances()}  # type: ignore[arg-type]
        assert kept == stored
    finally:
        orthanc.stop()


def test_a_part_whose_bytes_are_not_the_sent_digest_is_refused(region: dict) -> None:
    """A sender names each part's SHA-256 (Content-Digest, RFC 9530); bytes damaged on the way are refused,
    so the sender never reads back what it stored."""
    import base64

    files = region["written"]["hub"].studies[0].files
    good, bad = files[0].read_bytes(), files[1].read_bytes()

    def part(data: bytes, digest_of: bytes) -> bytes:
        digest = base64.b64encode(hashlib.sha256(digest_of).digest()).decode()
        return (
            b"--xyz\r\nContent-Type: application/dicom\r\nContent-Digest: sha-256=:"
            + digest.encode()
            + b":\r\n\r\n"
            + data
            + b"\r\n"
        )

    body = part(good, good) + part(bad, bad[:-1]) + b"--xyz--\r\n"
    got = requests.post(
        region["url"] + "/studies",
        data=body,
        headers={
            "Authorization": f"Bearer {region['tokens']['hub']}",
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=xyz',
        },
        timeout=30,
    )
    assert got.status_code == 202, got.text[:300]
    answer = got.json()
    assert len(answer["00081199"]["Value"]) == 1 and len(answer["00081198"]["Value"]) == 1
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]  # damaged on the way: resend


def test_an_edge_pushes_its_studies_to_the_service_holding_no_s3_key_and_no_catalog(
    region: dict, tmp_path: Path
) -> None:
    """`renkei edge push`: a site whose configuration names the service and whose center storage is
    nowhere it can reach; its environment has no AWS keys and only its own token."""
    import yaml

    from renkei.testing import LONG_AGO, put_into_edge

    lay = region["layout"]
    written = synth.generate_site(
        lay.config, "clinic-c", 2, 11, tmp_path / "synth", ct_slices=3, size=32, modalities=("CT",)
    )
    put_into_edge(lay, "clinic-c", [f for s in written.studies for f in s.files], received_ago=LONG_AGO)
    raw = yaml.safe_load(region["config"].read_text(encoding="utf-8"))
    nowhere = tmp_path / "no-center-here"
    raw["center"]["storage_url"] = str(nowhere)
    raw["center"]["service_url"] = region["url"]
    site_config = tmp_path / "clinic-c.yaml"
    site_config.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    token = Credentials(lay.center_url, None).issue("clinic-c", "edge")[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RENKEI_S3"))}
    env["RENKEI_CENTER_TOKEN"] = token

    def push() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "renkei.cli.main", "--config", str(site_config), "--data-dir", str(lay.data_dir)]
            + ["edge", "push", "--site", "clinic-c"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = push()
    assert first.returncode == 0, first.stdout + first.stderr
    n = sum(len(s.files) for s in written.studies)
    assert f"{len(written.studies)} studies, {n} instances stored" in first.stdout
    assert not nowhere.exists()  # the site never touched center storage
    with open_catalog(lay) as cat:
        for study in written.studies:
            row = cat.study(study.info.study_uid)
            assert row is not None and row.origin_site == "clinic-c" and row.instance_count == len(study.files)
            assert Sharing(lay.config, cat).decide("hub", study.info.study_uid).allowed  # the rules ran
    from renkei.edge.journal import Journal

    journal = Journal.open(lay.edge_store("clinic-c"))
    try:
        assert all(e.upload_state == "verified" for s in written.studies for e in journal.instances(s.info.study_uid))
    finally:
        journal.close()
    again = push()
    assert again.returncode == 0 and "0 studies, 0 instances" in again.stdout, again.stdout
    env["RENKEI_CENTER_TOKEN"] = "rk1_wrong"
    refused = push()
    assert refused.returncode != 0 and "credential" in refused.stderr and "Traceback" not in refused.stderr
    env["RENKEI_CENTER_TOKEN"] = region["tokens"]["clinic-a"]  # another site's credential
    wrong_site = push()
    assert wrong_site.returncode != 0 and "not of clinic-c" in wrong_site.stderr, wrong_site.stderr


def test_two_replicas_on_one_center_answer_alike(region: dict, tmp_path: Path) -> None:
    """A second `renkei center serve` on the same storage and catalog: what one stores the other serves,
    both store at the same time, and a revocation holds on both."""
    import pydicom

    lay = region["layout"]
    proc, second = _start_service(region["config"], lay.data_dir, tmp_path / "replica.log")
    try:
        urls = (region["url"], second)
        written = synth.generate_site(
            lay.config, "clinic-b", 2, 23, tmp_path / "synth", ct_slices=4, size=32, modalities=("CT",)
        )
        studies = list(written.studies)
        token = region["tokens"]["clinic-b"]
        from concurrent.futures import ThreadPoolExecutor

        def store(i: int) -> None:
            answer = _client(urls[i % 2], token).store_instances([pydicom.dcmread(f) for f in studies[i].files])
            assert "FailedSOPSequence" not in answer

        with ThreadPoolExecutor(len(studies)) as pool:
            list(pool.map(store, range(len(studies))))  # both replicas commit to the catalog at once
        for i, study in enumerate(studies):
            other = _client(urls[(i + 1) % 2], region["tokens"]["hub"])  # the replica that did not store it
            got = other.retrieve_study(study.info.study_uid)
            assert len(got) == len(study.files)
            assert other.search_for_studies(search_filters={"StudyInstanceUID": study.info.study_uid})
        creds: Credentials = region["creds"]
        cred, fresh = creds.issue("clinic-b", "replica-test")
        for url in urls:
            assert requests.get(url + "/studies", headers={"Authorization": f"Bearer {fresh}"}, timeout=10).ok
        creds.revoke(credential_id=cred.id)
        deadline = time.monotonic() + 15
        for url in urls:
            while requests.get(url + "/studies", headers={"Authorization": f"Bearer {fresh}"}, timeout=10).ok:
                assert time.monotonic() < deadline, f"{url} still accepts a revoked credential"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(20)
