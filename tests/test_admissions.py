"""HL7 admissions over MLLP, sent by the hl7 library's own client, acknowledged by the listener."""

from __future__ import annotations

import asyncio

import hl7
import hl7.mllp
import pytest
from helpers_parts import EXAMPLE_CONFIG

from renkei.admissions import Admission, AdmissionListener
from renkei.config import load_config


def adt(event: str, control: str, pid3: str = "H0001234^^^NAGASAKI-HUB", pv1: str = "PV1|1|I|W3^301^1") -> str:
    return "\r".join(
        [
            f"MSH|^~\\&|HIS|NAGASAKI|RENKEI|HUB|20261129120000||ADT^{event}|{control}|P|2.5",
            f"EVN|{event}|20261129120000",
            f"PID|1||{pid3}||Yamada^Taro||19500101|M",
            pv1,
        ]
    )


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
    acks = asyncio.run(
        _send_all(
            lst.port,
            [
                adt("A01", "M1"),
                adt("A04", "M2", pid3="X77^^^OTHER~H0005678^^^NAGASAKI-HUB"),
                adt("A08", "M3", pv1="PV1|1|I|W3^301^1|||W3^301^1"),  # same location: nothing to do
                adt("A08", "M4", pv1="PV1|1|I|W5^501^2|||W3^301^1"),  # moved: an admission
                adt("A03", "M5"),  # discharge: rejected
                adt("A01", "M6", pid3=""),  # no identifier: rejected
                adt("A01", "M7", pid3="BOOM^^^NAGASAKI-HUB"),  # flow could not start: AE
            ],
        )
    )
    codes = [_msa(a)[:2] for a in acks]
    assert codes == [("AA", "M1"), ("AA", "M2"), ("AA", "M3"), ("AA", "M4"), ("AR", "M5"), ("AR", "M6"), ("AE", "M7")]
    assert "not ADT^A01" in _msa(acks[4])[2]
    assert "Prefect API unreachable" in _msa(acks[6])[2]
    assert [(a.patient_id, a.issuer, a.event) for a in received] == [
        ("H0001234", "NAGASAKI-HUB", "A01"),
        ("H0005678", "NAGASAKI-HUB", "A04"),
        ("H0001234", "NAGASAKI-HUB", "A08"),
    ]
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


@pytest.mark.parametrize(
    "pid5, expected",
    [
        ("Yamada^Taro^^^^^L^A~山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P", "Yamada^Taro=山田^太郎=やまだ^たろう"),
        ("山田^太郎~ヤマダ^タロウ", "=山田^太郎=ヤマダ^タロウ"),
        ("Yamada^Taro", "Yamada^Taro"),
    ],
)
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


# -- framing, character sets and limits, without a network ------------------------

from hypothesis import given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from renkei.admissions import AdmissionRejected, MLLPFramer, charset_for, raw_header  # noqa: E402
from renkei.config import HL7Config  # noqa: E402
from renkei.errors import ConfigError  # noqa: E402


def _blocks(framer: MLLPFramer, chunks: list[bytes]) -> list[tuple[str, bytes]]:
    return [(f.kind, f.data) for chunk in chunks for f in framer.feed(chunk)]


@hypothesis_settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\x1c", b"")), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
)
def test_framer_finds_the_same_blocks_however_the_bytes_are_cut(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(b"\x0b" + p + b"\x1c\x0d\r\n" for p in payloads)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:])]
    framer = MLLPFramer(max_bytes=1024, discard_limit=4096)
    assert _blocks(framer, chunks) == [("block", p) for p in payloads]
    assert not framer.in_block and not framer.stopped


def test_framer_limits() -> None:
    framer = MLLPFramer(max_bytes=1024, discard_limit=4096)
    big = b"MSH|^~\\&|HIS||||||ADT^A01|C9|P|2.5\r" + b"x" * 2000
    frames = framer.feed(b"\x0b" + big[:1500]) + framer.feed(big[1500:] + b"\x1c") + framer.feed(b"\x0d\x0bok\x1c\x0d")
    assert [(f.kind, f.size) for f in frames] == [("too_large", len(big)), ("block", 2)]
    assert frames[0].data.startswith(b"MSH|") and raw_header(frames[0].data)[9] == "C9"
    assert MLLPFramer(1024, 1024).feed(b"\x0b" + b"x" * 1024 + b"\x1c\x0d")[0].kind == "block"  # exactly the limit
    endless = MLLPFramer(max_bytes=1024, discard_limit=4096)
    assert [f.kind for f in endless.feed(b"\x0b" + b"y" * 5000)] == ["overflow"] and endless.stopped
    junk = MLLPFramer(1024, 4096)
    assert [f.kind for f in junk.feed(b"\r\n  GET / HTTP/1.1\r\n")] == ["junk"] and junk.stopped


@pytest.mark.parametrize(
    "msh18, codec",
    [
        ("", "utf-8"),
        ("ASCII", "ascii"),
        ("8859/1", "iso8859_1"),
        ("UNICODE UTF-8", "utf-8"),
        ("SJIS", "cp932"),
        ("Shift_JIS", "cp932"),
        ("ISO IR87", "iso2022_jp_2"),
        ("~ISO IR87", "iso2022_jp_2"),
        ("ISO IR6~ISO IR87", "iso2022_jp_2"),
        ("ISO 2022-1994", "iso2022_jp_2"),
        ("JIS X 0208", "iso2022_jp_2"),
        ("ISO IR13", "shift_jis"),
    ],
)
def test_msh18_names_map_to_codecs(msh18: str, codec: str) -> None:
    assert charset_for(msh18, "utf-8").codecs[0] == codec


def test_unknown_msh18_is_refused_by_name() -> None:
    with pytest.raises(AdmissionRejected, match="'KOI8-R'"):
        charset_for("KOI8-R", "utf-8")


_CONFIG = load_config(EXAMPLE_CONFIG)


def _in_process(**overrides) -> tuple[AdmissionListener, list[Admission]]:
    received: list[Admission] = []
    lst = AdmissionListener(_CONFIG, "hub", lambda a: received.append(a) or "ok", settings=HL7Config(**overrides))
    return lst, received


_ANY_BYTES_LISTENER = _in_process()[0]


def test_iso_2022_jp_is_decoded_before_the_fields_are_split() -> None:
    # in ISO-2022-JP, やまだ^たろう holds the bytes of ^ and & inside its kanji: split first, and it breaks
    lst, received = _in_process()
    text = adt("A01", "J1").replace("Yamada^Taro", "山田^太郎^^^^^L^I~やまだ^たろう^^^^^L^P")
    header, rest = text.split("\r", 1)
    block = (header + "||||||~ISO IR87\r" + rest).encode("iso2022_jp")
    ack = hl7.parse(lst.respond(block).decode("iso2022_jp"))
    assert _msa(ack)[:2] == ("AA", "J1") and str(ack.segment("MSH")(18)) == "~ISO IR87"
    assert received[0].patient_name == "=山田^太郎=やまだ^たろう"


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=300).map(lambda b: b"MSH|^~\\&|HIS|N|R|H|2026||ADT^A01|X|P|2.5|" + b),
    )
)
def test_any_bytes_get_an_ack(block: bytes) -> None:
    reply = _ANY_BYTES_LISTENER.respond(block).decode("latin-1")
    msa = [s for s in reply.split("\r") if s.startswith("MSA|")]
    assert msa and msa[0].split("|")[1] in ("AA", "AR", "AE")


def test_allowed_senders() -> None:
    lst, _ = _in_process(allowed_senders=("127.0.0.1/32", "10.1.0.0/16"))
    assert [lst._allowed(a) for a in ("127.0.0.1", "::ffff:127.0.0.1", "10.1.200.3", "127.0.0.2", "::1", "junk")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_a_missing_tls_certificate_is_a_configuration_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="hl7.tls"):
        _in_process(tls={"cert": str(tmp_path / "none.pem"), "key": str(tmp_path / "none.key")})
