"""HL7 admissions over MLLP, sent by the hl7 library's own client, acknowledged by the listener."""

from __future__ import annotations

import asyncio

import hl7
import hl7.mllp
import pytest

from renkei.admissions import Admission, AdmissionListener
from renkei.config import load_config

from conftest import EXAMPLE_CONFIG


def adt(event: str, control: str, pid3: str = "H0001234^^^NAGASAKI-HUB", pv1: str = "PV1|1|I|W3^301^1") -> str:
    return "\r".join([
        f"MSH|^~\\&|HIS|NAGASAKI|RENKEI|HUB|20261129120000||ADT^{event}|{control}|P|2.5",
        f"EVN|{event}|20261129120000",
        f"PID|1||{pid3}||Yamada^Taro||19500101|M",
        pv1,
    ])


async def _send_all(port: int, messages: list[str]) -> list[hl7.Message]:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    acks = []
    try:
        for text in messages:
            writer.writemessage(hl7.parse(text))
            await writer.drain()
            acks.append(await asyncio.wait_for(reader.readmessage(), 10))
    finally:
        writer.close()
    return acks


@pytest.fixture
def listener():
    received: list[Admission] = []

    def on_admission(admission: Admission) -> str:
        if admission.patient_id == "BOOM":
            raise RuntimeError("Prefect API unreachable")
        received.append(admission)
        return "fetch_priors started"

    lst = AdmissionListener(load_config(EXAMPLE_CONFIG), "hub", on_admission, port=0).start()
    try:
        yield lst, received
    finally:
        lst.stop()


def _msa(ack: hl7.Message) -> tuple[str, str, str]:
    msa = ack.segment("MSA")
    return str(msa(1)), str(msa(2)), ack.unescape(str(msa(3))) if len(msa) > 3 else ""


def test_admissions_are_acknowledged_and_handed_over(listener) -> None:
    lst, received = listener
    acks = asyncio.run(_send_all(lst.port, [
        adt("A01", "M1"),
        adt("A04", "M2", pid3="X77^^^OTHER~H0005678^^^NAGASAKI-HUB"),
        adt("A08", "M3", pv1="PV1|1|I|W3^301^1|||W3^301^1"),        # same location: nothing to do
        adt("A08", "M4", pv1="PV1|1|I|W5^501^2|||W3^301^1"),        # moved: an admission
        adt("A03", "M5"),                                            # discharge: rejected
        adt("A01", "M6", pid3=""),                                   # no identifier: rejected
        adt("A01", "M7", pid3="BOOM^^^NAGASAKI-HUB"),                # flow could not start: AE
    ]))
    codes = [_msa(a)[:2] for a in acks]
    assert codes == [("AA", "M1"), ("AA", "M2"), ("AA", "M3"), ("AA", "M4"), ("AR", "M5"), ("AR", "M6"), ("AE", "M7")]
    assert "not ADT^A01" in _msa(acks[4])[2]
    assert "Prefect API unreachable" in _msa(acks[6])[2]
    assert [(a.patient_id, a.issuer, a.event) for a in received] == [
        ("H0001234", "NAGASAKI-HUB", "A01"), ("H0005678", "NAGASAKI-HUB", "A04"), ("H0001234", "NAGASAKI-HUB", "A08")]
    assert received[0].location.startswith("W3") and received[2].location.startswith("W5")


def test_garbage_gets_a_rejection_and_the_listener_keeps_serving(listener) -> None:
    lst, received = listener

    async def raw() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"\x0bnot an hl7 message\x1c\x0d")
        await w.drain()
        data = await asyncio.wait_for(r.readuntil(b"\x1c\x0d"), 10)
        w.close()
        return data

    assert b"MSA|AR|" in asyncio.run(raw())
    acks = asyncio.run(_send_all(lst.port, [adt("A01", "OK1")]))
    assert _msa(acks[0])[:2] == ("AA", "OK1") and len(received) == 1


@pytest.mark.parametrize("pid5, expected", [
    ("Yamada^Taro^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P", "Yamada^Taro=山田^太郎=やまだ^たろう"),
    ("山田^太郎~ヤマダ^タロウ", "=山田^太郎=ヤマダ^タロウ"),
    ("Yamada^Taro", "Yamada^Taro"),
])
def test_japanese_names_become_dicom_person_names(pid5: str, expected: str) -> None:
    from renkei.admissions import dicom_person_name

    message = hl7.parse(adt("A01", "N1").replace("Yamada^Taro", pid5))
    assert dicom_person_name(message.segment("PID")(5)) == expected


def test_a_short_header_still_gets_an_ack(listener) -> None:
    lst, received = listener

    async def raw() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", lst.port)
        w.write(b"\x0bMSH|^~\\&|HIS\rPID|1||X\x1c\x0d")
        await w.drain()
        data = await asyncio.wait_for(r.readuntil(b"\x1c\x0d"), 10)
        w.close()
        return data

    assert b"MSA|AR|" in asyncio.run(raw())
    assert received == []
