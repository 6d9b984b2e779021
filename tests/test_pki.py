"""The region CA and its certificates: naming convention, files, real TLS handshakes, the CLI."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from renkei import peers, pki
from renkei.config import TLSConfig
from renkei.edge.tls import client_context, server_context
from renkei.errors import UsageError
from tests.conftest import EXAMPLE_CONFIG, REPO, require_part

RENKEI = Path(sys.executable).parent / "renkei"
DCMTK_ECHOSCU = Path("/usr/bin/echoscu")
DCMTK_STORESCP = Path("/usr/bin/storescp")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.create_ca(directory, "nagasaki")
    return directory


# ------------------------------------------------------------------ CA
def test_create_ca_writes_a_p256_ca_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cert_path, key_path = pki.create_ca(tmp_path / "pki", "nagasaki", days=30)
    assert (cert_path.name, key_path.name) == ("ca.pem", "ca.key")
    assert _mode(key_path) == 0o600
    cert = _cert(cert_path)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)
    assert "nagasaki" in cert.subject.rfc4514_string()
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(days=30)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()

    before = cert_path.read_bytes(), key_path.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        pki.create_ca(tmp_path / "pki", "nagasaki")
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "ca.key").write_text("left over")
    with pytest.raises(UsageError, match="already exists"):
        pki.create_ca(tmp_path / "half", "nagasaki")

    pki.create_ca(tmp_path / "pki", "nagasaki", force=True)
    assert _cert(cert_path).public_key() != cert.public_key()
    assert _mode(key_path) == 0o600


# ------------------------------------------------------------------ issuing
def test_issue_an_ae_certificate(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(ca_dir, tmp_path / "out", site_id="hub", ae_title="HUB_WS1", hosts=["127.0.0.1"])
    assert (cert_path, key_path) == (tmp_path / "out" / "HUB_WS1.pem", tmp_path / "out" / "HUB_WS1.key")
    assert _mode(key_path) == 0o600
    cert, ca = _cert(cert_path), _cert(ca_dir / "ca.pem")
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "HUB_WS1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:renkei:ae:HUB_WS1", "urn:renkei:site:hub"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key().curve.name == "secp256r1"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc

    identity = pki.identities_of(cert)
    # an AE certificate speaks for its AE title only: its site URI is where the AE belongs
    assert identity == pki.Identity(frozenset({"HUB_WS1"}), frozenset(), frozenset({"hub"}))
    assert not identity.is_site_certificate and "hub" not in identity.sites
    assert identity.allows("HUB_WS1", "hub")
    assert not identity.allows("HUB_PACS", "hub")  # one AE title, not the whole site
    assert not identity.allows("HUB_WS1", "clinic-a")


def test_issue_a_site_certificate_with_its_hosts(ca_dir: Path, tmp_path: Path) -> None:
    cert_path, key_path = pki.issue(
        ca_dir,
        tmp_path / "out",
        site_id="clinic-c",
        hosts=["10.3.0.5", "edge.goto.example", "::1", "0.0.0.0", "10.3.0.5"],
        name="edge",
    )
    assert cert_path.name == "edge.pem" and _mode(key_path) == 0o600
    cert = _cert(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site:clinic-c"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:renkei:site:clinic-c"]
    assert san.get_values_for_type(x509.DNSName) == ["edge.goto.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.3.0.5"), ipaddress.ip_address("::1")]
    identity = pki.identities_of(cert)
    assert identity == pki.Identity(frozenset(), frozenset({"clinic-c"}))
    assert identity.is_site_certificate
    assert identity.allows("CLC_SVR", "clinic-c") and not identity.allows("HUB_SVR", "hub")
    # the default file name of a site certificate
    assert pki.issue(ca_dir, tmp_path / "out", site_id="clinic-c")[0].name == "site.pem"


def test_issue_refuses_what_cannot_work(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no region CA"):
        pki.issue(tmp_path / "nothing", tmp_path / "out", site_id="hub")
    with pytest.raises(UsageError, match="AE title"):
        pki.issue(ca_dir, tmp_path / "out", site_id="hub", ae_title="BACK\\SLASH")
    with pytest.raises(UsageError, match="AE title"):
        pki.issue(ca_dir, tmp_path / "out", site_id="hub", ae_title="SEVENTEEN_CHARS_X")
    with pytest.raises(UsageError, match="site id"):
        pki.issue(ca_dir, tmp_path / "out", site_id="Hub Site")
    other = tmp_path / "other"
    pki.create_ca(other, "elsewhere")
    (ca_dir / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(UsageError, match="not the key of"):
        pki.issue(ca_dir, tmp_path / "out", site_id="hub")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "ae_title, uri",
    [
        ("READ ROOM 1", "urn:renkei:ae:READ%20ROOM%201"),
        ("A/B#%?C", "urn:renkei:ae:A/B%23%25%3FC"),
        ("X:Y@Z+1", "urn:renkei:ae:X:Y@Z+1"),
    ],
)
def test_identities_round_trip(ca_dir: Path, tmp_path: Path, ae_title: str, uri: str) -> None:
    assert pki.ae_uri(ae_title) == uri
    cert_path, _key = pki.issue(ca_dir, tmp_path / "out", site_id="clinic-a", ae_title=ae_title)
    assert cert_path.parent == tmp_path / "out" and cert_path.suffix == ".pem"
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri in san.get_values_for_type(x509.UniformResourceIdentifier)
    expected = pki.Identity(frozenset({ae_title}), frozenset(), frozenset({"clinic-a"}))
    assert pki.identities_of(cert) == expected
    assert pki.identities_of(cert.public_bytes(serialization.Encoding.DER)) == expected
    assert pki.identities_of(cert_path.read_bytes()) == expected


def _self_signed(common_name: str, uris: tuple[str, ...] = ()) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def test_identities_fall_back_to_the_common_name() -> None:
    assert pki.identities_of(_self_signed("site:hub")) == pki.Identity(frozenset(), frozenset({"hub"}))
    assert pki.identities_of(_self_signed("OLD_PACS")) == pki.Identity(frozenset({"OLD_PACS"}), frozenset())
    # other URIs are no renkei identity: the CN decides
    assert pki.identities_of(_self_signed("WS9", ("https://example.org/",))).ae_titles == {"WS9"}
    # renkei URIs win over the CN; the URN's scheme and namespace are case-insensitive
    got = pki.identities_of(_self_signed("whatever", ("URN:renkei:AE:CT%201", "urn:renkei:site:clinic-b")))
    assert got == pki.Identity(frozenset({"CT 1"}), frozenset(), frozenset({"clinic-b"}))
    assert not got.allows("CT 2", "clinic-b") and not got.allows("CT 1", "hub")


# ------------------------------------------------------------------ real TLS handshakes
def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One TLS connection on 127.0.0.1; what each side saw (identity of the other, data or error)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    server_side: dict[str, Any] = {}
    client_side: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn, _addr = listener.accept()
            conn.settimeout(10)
            with server.wrap_socket(conn, server_side=True) as tls:
                server_side["identity"] = pki.peer_identity(tls)
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            server_side["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                client_side["identity"] = pki.peer_identity(tls)
                client_side["data"] = tls.recv(2)
    except (OSError, ssl.SSLError) as exc:
        client_side["error"] = exc
    finally:
        thread.join(10)
        listener.close()
    assert not thread.is_alive()
    return server_side, client_side


@pytest.fixture
def issued(ca_dir: Path, tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    out = tmp_path / "pki" / "hub"
    return {
        "edge": pki.issue(ca_dir, out, site_id="hub", hosts=["127.0.0.1"], name="edge"),
        "ws": pki.issue(ca_dir, out, site_id="hub", ae_title="HUB WS 1", hosts=["127.0.0.1"]),
    }


def test_mutual_tls_handshake_and_the_peer_identity(ca_dir: Path, issued: dict[str, tuple[Path, Path]]) -> None:
    edge_cert, edge_key = issued["edge"]
    ws_cert, ws_key = issued["ws"]
    server = server_context(TLSConfig(cert=edge_cert, key=edge_key, ca=ca_dir / "ca.pem"))
    client = client_context(str(ca_dir / "ca.pem"), str(ws_cert), str(ws_key))
    server_side, client_side = _handshake(server, client)
    assert "error" not in server_side and "error" not in client_side, (server_side, client_side)
    assert server_side["identity"] == pki.Identity(frozenset({"HUB WS 1"}), frozenset(), frozenset({"hub"}))
    assert client_side["identity"] == pki.Identity(frozenset(), frozenset({"hub"}))
    assert client_side["data"] == b"ok"

    # the edge's IP address SAN satisfies a client that checks the host name too
    strict = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_dir / "ca.pem"))
    strict.load_cert_chain(str(ws_cert), str(ws_key))
    assert strict.check_hostname
    server_side, client_side = _handshake(server, strict, server_hostname="127.0.0.1")
    assert client_side.get("data") == b"ok", client_side
    _server_side, client_side = _handshake(server, strict, server_hostname="elsewhere.example")
    assert isinstance(client_side.get("error"), ssl.SSLCertVerificationError)


def test_a_certificate_of_another_ca_is_refused(
    ca_dir: Path, issued: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    stranger_ca = tmp_path / "stranger-ca"
    pki.create_ca(stranger_ca, "nagasaki")  # same region name, different key: still a stranger
    stranger_cert, stranger_key = pki.issue(stranger_ca, tmp_path / "stranger", site_id="hub", ae_title="HUB WS 1")
    edge_cert, edge_key = issued["edge"]
    server = server_context(TLSConfig(cert=edge_cert, key=edge_key, ca=ca_dir / "ca.pem"))
    client = client_context(str(ca_dir / "ca.pem"), str(stranger_cert), str(stranger_key))
    server_side, client_side = _handshake(server, client)
    assert isinstance(server_side.get("error"), ssl.SSLError), server_side
    assert "identity" not in server_side
    assert client_side.get("data") != b"ok"

    # no client certificate at all: refused too
    server_side, client_side = _handshake(server, client_context(str(ca_dir / "ca.pem")))
    assert isinstance(server_side.get("error"), ssl.SSLError)

    # and the client refuses an edge whose certificate another CA signed
    stranger_edge = pki.issue(stranger_ca, tmp_path / "stranger", site_id="hub", name="edge")
    server = server_context(TLSConfig(cert=stranger_edge[0], key=stranger_edge[1], ca=ca_dir / "ca.pem"))
    ws_cert, ws_key = issued["ws"]
    _server_side, client_side = _handshake(server, client_context(str(ca_dir / "ca.pem"), str(ws_cert), str(ws_key)))
    assert isinstance(client_side.get("error"), ssl.SSLCertVerificationError)


def test_peer_identity_without_a_certificate(issued: dict[str, tuple[Path, Path]]) -> None:
    edge_cert, edge_key = issued["edge"]
    server = server_context(TLSConfig(cert=edge_cert, key=edge_key))  # no CA: no client certificate asked
    server_side, client_side = _handshake(server, client_context())
    assert server_side == {"identity": None} and client_side["data"] == b"ok"
    with socket.socket() as plain:
        assert pki.peer_identity(plain) is None  # type: ignore[arg-type]


# ------------------------------------------------------------------ the CLI
def _renkei(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RENKEI), "--config", str(EXAMPLE_CONFIG), "--data-dir", str(data_dir), "tls", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("renkei: error: ") and words in lines[0], proc.stderr


def test_cli_init_issue_show(data_dir: Path) -> None:
    pki_dir = data_dir / "pki"
    proc = _renkei(data_dir, "init-ca")
    assert proc.returncode == 0, proc.stderr
    assert (pki_dir / "ca.pem").exists() and _mode(pki_dir / "ca.key") == 0o600
    assert "issue-all" in proc.stdout
    _assert_one_line_error(_renkei(data_dir, "init-ca"), "already exists")

    proc = _renkei(data_dir, "issue", "--site", "clinic-a")
    assert proc.returncode == 0, proc.stderr
    edge_cert = pki_dir / "clinic-a" / "edge.pem"
    assert pki.identities_of(_cert(edge_cert)) == pki.Identity(frozenset(), frozenset({"clinic-a"}))
    assert (
        f"tls: {{cert: {edge_cert}, key: {pki_dir / 'clinic-a' / 'edge.key'}, ca: {pki_dir / 'ca.pem'}}}" in proc.stdout
    )

    out = data_dir / "elsewhere"
    proc = _renkei(data_dir, "issue", "--site", "clinic-a", "--ae", "CLA_WS", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"--enable-tls {out / 'CLA_WS.key'} {out / 'CLA_WS.pem'} --add-cert-file {pki_dir / 'ca.pem'}" in proc.stdout
    assert _mode(out / "CLA_WS.key") == 0o600
    assert pki.identities_of(_cert(out / "CLA_WS.pem")).ae_titles == {"CLA_WS"}

    proc = _renkei(data_dir, "show", str(out / "CLA_WS.pem"))
    assert proc.returncode == 0, proc.stderr
    assert "AE certificate" in proc.stdout and "AE titles: CLA_WS  (of site clinic-a)" in proc.stdout
    assert "issuer:    CN=renkei nagasaki region CA" in proc.stdout and "days left" in proc.stdout
    proc = _renkei(data_dir, "show", "--json", str(edge_cert))
    assert '"kind": "site certificate"' in proc.stdout and '"127.0.0.1"' in proc.stdout


def test_cli_refuses_unknown_sites_and_ae_titles_in_one_line(data_dir: Path) -> None:
    _assert_one_line_error(_renkei(data_dir, "issue", "--site", "hub"), "no region CA")
    assert _renkei(data_dir, "init-ca").returncode == 0
    _assert_one_line_error(_renkei(data_dir, "issue", "--site", "nowhere"), "unknown site 'nowhere'")
    _assert_one_line_error(_renkei(data_dir, "issue", "--site", "hub", "--ae", "NOBODY"), "unknown AE title 'NOBODY'")
    _assert_one_line_error(
        _renkei(data_dir, "issue", "--site", "hub", "--ae", "CLB_PACS"), "belongs to site 'clinic-b'"
    )
    not_a_cert = data_dir / "junk.pem"
    not_a_cert.write_text("hello")
    _assert_one_line_error(_renkei(data_dir, "show", str(not_a_cert)), "not a PEM or DER certificate")
    assert not (data_dir / "pki" / "hub").exists()


def test_cli_issue_all_lays_out_every_node(data_dir: Path) -> None:
    assert _renkei(data_dir, "init-ca").returncode == 0
    proc = _renkei(data_dir, "issue-all")
    assert proc.returncode == 0, proc.stderr
    from renkei.config import load_config

    config = load_config(EXAMPLE_CONFIG)
    for site in config.sites:
        folder = data_dir / "pki" / site.id
        expected = {"edge"} | {p.ae_title for p in ([site.pacs] if site.pacs else []) + list(site.workstations)}
        assert {p.stem for p in folder.glob("*.pem")} == expected
        assert {p.stem for p in folder.glob("*.key")} == expected
        assert all(_mode(k) == 0o600 for k in folder.glob("*.key"))
        edge = _cert(folder / "edge.pem")
        assert pki.identities_of(edge) == pki.Identity(frozenset(), frozenset({site.id}))
        san = edge.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(site.edge.host)]
        for ae_title in expected - {"edge"}:
            identity = pki.identities_of(_cert(folder / f"{ae_title}.pem"))
            assert identity == pki.Identity(frozenset({ae_title}), frozenset(), frozenset({site.id}))
        assert f"- id: {site.id}" in proc.stdout


# ------------------------------------------------------------------ dcmtk (optional)
def _dcmtk_available() -> bool:
    if not (DCMTK_ECHOSCU.exists() and DCMTK_STORESCP.exists()):
        return False
    proc = subprocess.run([str(DCMTK_ECHOSCU), "--version"], capture_output=True, text=True, timeout=10)
    return "dcmtk" in proc.stdout.lower()


def test_dcmtk_echoscu_over_tls_to_storescp_with_issued_certificates(ca_dir: Path, tmp_path: Path) -> None:
    require_part(_dcmtk_available(), "dcmtk (/usr/bin/echoscu, /usr/bin/storescp)", "apt-get install -y dcmtk")
    out = tmp_path / "pki" / "hub"
    pacs_cert, pacs_key = pki.issue(ca_dir, out, site_id="hub", ae_title="HUB_PACS", hosts=["127.0.0.1"])
    ws_cert, ws_key = pki.issue(ca_dir, out, site_id="hub", ae_title="HUB_WS1")
    stranger_ca = tmp_path / "stranger-ca"
    pki.create_ca(stranger_ca, "nagasaki")
    stranger_cert, stranger_key = pki.issue(stranger_ca, tmp_path / "stranger", site_id="hub", ae_title="HUB_WS1")
    ca = ca_dir / "ca.pem"
    port = peers.free_port()
    workdir = tmp_path / "storescp"
    workdir.mkdir()
    with open(workdir / "storescp.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(DCMTK_STORESCP),
                "--aetitle",
                "HUB_PACS",
                "--output-directory",
                str(workdir),
                "+tls",
                str(pacs_key),
                str(pacs_cert),
                "+cf",
                str(ca),
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=peers.dcmtk_env(),
            start_new_session=True,
        )
    storescp = peers.Peer("storescp", process, "127.0.0.1", port, workdir, workdir / "storescp.log")
    try:
        peers.wait_for_port("127.0.0.1", port, 15, process, "storescp")

        def echo(key: Path, cert: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [
                    str(DCMTK_ECHOSCU),
                    "+tls",
                    str(key),
                    str(cert),
                    "+cf",
                    str(ca),
                    "-aet",
                    "HUB_WS1",
                    "-aec",
                    "HUB_PACS",
                    "127.0.0.1",
                    str(port),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
                env=peers.dcmtk_env(),
            )

        good = echo(ws_key, ws_cert)
        assert good.returncode == 0, good.stderr + storescp.log()
        assert echo(stranger_key, stranger_cert).returncode != 0
        assert echo(ws_key, ws_cert).returncode == 0  # storescp still serves
    finally:
        storescp.stop()
