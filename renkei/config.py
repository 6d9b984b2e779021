"""The network configuration: one YAML file, validated into typed, frozen models.

`load_config(path)` returns a `RegionConfig` or raises `ConfigError` whose message
names the file, the field and what is wrong. `Layout` resolves where a running
region keeps its state under one data folder.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from renkei.errors import ConfigError, UsageError

DEFAULT_DATA_DIR = "renkei-data"
DATA_DIR_ENV = "RENKEI_DATA_DIR"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_SITE_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(value: str) -> str:
    if not _AE_RE.fullmatch(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters, no backslash")
    if value != value.strip():
        raise ValueError(f"AE title {value!r} must not start or end with spaces")
    return value


AETitle = Annotated[str, AfterValidator(_check_ae), Field(description="DICOM Application Entity title")]
Port = Annotated[int, Field(ge=1, le=65535, description="TCP port")]


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.1.2.0/24)") from None
    return value


Network = Annotated[str, AfterValidator(_check_network), Field(description="an IP address or network in CIDR notation")]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_in(address: str, networks: Iterable[IPNetwork]) -> bool:
    """True when the peer `address` (as a socket reports it) lies in one of `networks`.

    A scope (`fe80::1%eth0`) is ignored and an IPv4-mapped IPv6 address counts
    as its IPv4 address; anything that is not an IP address is in none.
    """
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


class DicomPeer(_Model):
    """A DICOM node the edge talks to: the site PACS or a workstation.

    Its AE title is accepted only from `host` (resolved to its addresses) and
    from the `networks` listed; with `tls`, the edge calls it over TLS.
    """

    ae_title: AETitle
    host: str = "127.0.0.1"
    port: Port
    description: str = ""
    networks: tuple[Network, ...] = Field(
        (), description="other addresses or networks this AE may connect from (e.g. a DHCP range)"
    )
    tls: bool = Field(False, description="the edge calls this node over TLS (its own certificate, the region CA)")
    convert_to_utf8: bool = Field(
        False,
        description="copies renkei imports into this PACS are re-encoded in UTF-8 (ISO_IR 192), for a PACS "
        "that garbles ISO 2022 IR 87 (e.g. Orthanc 1.10); the archived bytes stay as received",
    )


class TLSConfig(_Model):
    """TLS for a DICOM or HL7 port. With `ca`, peers must present a certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None = None


class HL7Config(_Model):
    """The site's HL7 v2 admission listener (MLLP): who may send, limits, optional TLS."""

    allowed_senders: tuple[Network, ...] = Field(
        ("127.0.0.1/32", "::1/128"),
        description="addresses or networks of the hospital information systems allowed to send",
    )
    max_message_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    idle_timeout: float = Field(60.0, gt=0, description="seconds a connection may stay silent")
    max_connections: int = Field(32, ge=1, le=1024)
    tls: TLSConfig | None = None


class RetentionConfig(_Model):
    """When an edge may drop its local copy (only ever after the center's copy is verified)."""

    min_age_days: float = Field(30.0, ge=0)
    disk_usage_threshold: float = Field(
        0.8, gt=0, le=1, description="drop verified studies while the disk is fuller than this"
    )


class EdgeLimits(_Model):
    """What one peer may cost the edge before and after it is known (bounded memory and time)."""

    max_pdu: int = Field(
        1024 * 1024,
        ge=4096,
        le=64 * 1024 * 1024,
        description="maximum PDU length the edge advertises and accepts (bytes)",
    )
    max_associate_rq: int = Field(
        64 * 1024, ge=1024, le=1024 * 1024, description="largest A-ASSOCIATE-RQ accepted (bytes)"
    )
    setup_timeout: float = Field(
        10.0, gt=0, description="seconds from connect (TLS handshake included) to a complete A-ASSOCIATE-RQ"
    )
    pdu_timeout: float = Field(30.0, gt=0, description="seconds one PDU may take to arrive once its first byte has")
    idle_timeout: float = Field(120.0, gt=0, description="seconds an association may stay silent")
    max_associations: int = Field(64, ge=1, le=1024)
    max_per_address: int = Field(16, ge=1, le=1024, description="associations and pending connections from one address")
    idle_evict_after: float = Field(
        2.0,
        gt=0,
        description="when the limits are reached, the longest-idle association silent for this long "
        "is closed to let a new peer in",
    )
    query_time_budget: float = Field(10.0, gt=0, description="seconds one C-FIND may run")


_SIZE_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
MIB = 2**20


def _parse_size(value: object) -> object:
    """A size in bytes: an integer, or a number with a unit ("64 MiB", "1 GiB", "500 MB")."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != int(value):
            raise ValueError(f"{value!r} is not a whole number of bytes")
        number = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{value!r} is not a size: write bytes (67108864) or a number and one of "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '64 MiB')"
            )
        number = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        return value  # pydantic says what is wrong with it
    if number < 0:
        raise ValueError(f"a size cannot be negative ({value!r})")
    return number


ByteSize = Annotated[
    int, BeforeValidator(_parse_size), Field(description="bytes, or a number with a unit: '64 MiB', '1 GiB', '500 MB'")
]


class EdgeDiskConfig(_Model):
    """Space the edge keeps on its store's filesystem, so that a full disk never stops it.

    `journal_reserve` is a preallocated file in the store folder that the edge
    deletes when the filesystem is nearly full (so that the journal can still
    open, migrate and write its bookkeeping: the edge starts, stops cleanly and
    serves queries and retrievals) and makes again when space is back.
    `min_free` is what a C-STORE may not eat into: below it the edge answers
    0xA700 (Out of Resources) before the disk is full. Left unset, they are
    64 MiB and 256 MiB, at most 1/16 of a smaller filesystem each.
    """

    journal_reserve: ByteSize | None = Field(
        None, description="space held for the journal (0: none; default 64 MiB, at most 1/16 of the filesystem)"
    )
    min_free: ByteSize | None = Field(
        None,
        description="C-STORE is refused when less than this is free (default 256 MiB, at most 1/16 of the filesystem)",
    )

    DEFAULT_JOURNAL_RESERVE: ClassVar[int] = 64 * MIB
    DEFAULT_MIN_FREE: ClassVar[int] = 256 * MIB

    @field_validator("journal_reserve")
    @classmethod
    def _reserve(cls, value: int | None) -> int | None:
        if value is not None and value != 0 and not MIB <= value <= 64 * 2**30:
            raise ValueError(
                f"journal_reserve of {value} bytes: use 0 (no reserve) or 1 MiB to 64 GiB; "
                "the journal needs at least 1 MiB to open and migrate"
            )
        return value

    @field_validator("min_free")
    @classmethod
    def _min_free(cls, value: int | None) -> int | None:
        if value is not None and value > 2**40:
            raise ValueError(f"min_free of {value} bytes is more than 1 TiB: is the unit right?")
        return value

    def sizes_for(self, filesystem_bytes: int) -> tuple[int, int]:
        """(journal reserve, minimum free) in bytes on a filesystem of that size.

        A value set in the configuration is used as it is; a default is capped
        at 1/16 of the filesystem (a 64 MiB reserve makes no sense on a 48 MiB disk).
        """
        cap = max(0, filesystem_bytes // 16)
        reserve = self.journal_reserve if self.journal_reserve is not None else min(self.DEFAULT_JOURNAL_RESERVE, cap)
        min_free = self.min_free if self.min_free is not None else min(self.DEFAULT_MIN_FREE, cap)
        return reserve, min_free


class EdgeConfig(_Model):
    """The site's edge node (SVR): its own DICOM address and local store."""

    ae_title: AETitle
    host: str = "127.0.0.1"
    port: Port
    store: str | None = Field(None, description="local store folder; relative paths are under the data folder")
    stable_age: float = Field(
        60.0, gt=0, description="seconds without a new instance before a study counts as complete"
    )
    tls: TLSConfig | None = None
    retention: RetentionConfig = RetentionConfig()
    limits: EdgeLimits = EdgeLimits()
    disk: EdgeDiskConfig = EdgeDiskConfig()


class LinkConfig(_Model):
    """The site's line to the center (best-effort fibre on an IP-VPN)."""

    bandwidth_mbps: float = Field(100.0, gt=0)
    rtt_ms: float = Field(10.0, ge=0)
    max_concurrent_uploads: int | None = Field(None, ge=1, le=64, description="default: derived from the bandwidth")

    @property
    def upload_slots(self) -> int:
        """Concurrent uploads this link carries: one per 25 Mbit/s, between 1 and 16."""
        if self.max_concurrent_uploads is not None:
            return self.max_concurrent_uploads
        return max(1, min(16, int(self.bandwidth_mbps // 25)))


class SiteConfig(_Model):
    """One site of the region: the hub (core hospital) or a clinic."""

    id: str
    name: str
    role: Literal["hub", "clinic"]
    institution_name: str = Field("", description="Institution Name its modalities write")
    aliases: tuple[str, ...] = Field((), description="other names by which studies refer to this site")
    issuer_of_patient_id: str = Field("", description="Issuer of Patient ID for this site's patient numbers")
    edge: EdgeConfig
    pacs: DicomPeer | None = None
    workstations: tuple[DicomPeer, ...] = ()
    link: LinkConfig = LinkConfig()
    hl7: HL7Config = HL7Config()

    @field_validator("id")
    @classmethod
    def _site_id(cls, value: str) -> str:
        if not _SITE_ID_RE.fullmatch(value):
            raise ValueError(
                f"site id {value!r} must be lower-case letters, digits and '-', "
                "starting with a letter, at most 32 characters"
            )
        return value

    @property
    def issuer(self) -> str:
        return self.issuer_of_patient_id or self.id.upper()


class S3Options(_Model):
    """Connection options for s3:// storage. Secrets come from the environment only."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default $RENKEI_S3_ENDPOINT_URL or AWS's"
    )
    region: str | None = None


class CenterConfig(_Model):
    """The off-site center (DSP server center): object storage and the catalog."""

    storage_url: str = Field("center", description="a folder (relative to the data folder) or s3://bucket/prefix")
    catalog_url: str | None = Field(None, description="default: <storage_url>/catalog")
    catalog_backup_url: str | None = Field(
        None,
        description="the catalog's second location (witness and backups); default: the folder "
        "'catalog-backup' in the data folder, or <catalog_url>-backup on S3. Put it on other storage "
        "(another bucket or region) in production",
    )
    s3: S3Options = S3Options()
    service_url: str | None = Field(
        None,
        description="the center's DICOMweb service (renkei center serve), e.g. https://center.example/dicomweb: "
        "a site with it sends its studies there with its own credential ($RENKEI_CENTER_TOKEN) and needs "
        "no S3 keys or catalog",
    )
    verify_fraction: float = Field(
        1.0, gt=0, le=1, description="share of objects the nightly verification reads each night"
    )

    @field_validator("service_url")
    @classmethod
    def _service_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r}: the service's URL starts with https:// (or http:// on one machine)")
        return value.rstrip("/") if value else value

    @field_validator("storage_url", "catalog_url", "catalog_backup_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "://" in value and not value.startswith(("s3://", "file://", "memory://")):
            raise ValueError(f"{value!r}: use a folder path or s3://bucket/prefix")
        if value.startswith("s3://") and len(value) <= len("s3://"):
            raise ValueError("s3:// URL needs a bucket name: s3://bucket/prefix")
        return value.rstrip("/") or value


class RuleMatch(_Model):
    """Which studies a rule applies to; every given condition must hold."""

    origin_sites: tuple[str, ...] = ()
    origin_roles: tuple[Literal["hub", "clinic"], ...] = ()
    modalities: tuple[str, ...] = ()


class GrantTarget(_Model):
    """To whom a rule grants: listed sites, every site of a role, and/or the referring site."""

    sites: tuple[str, ...] = ()
    roles: tuple[Literal["hub", "clinic"], ...] = ()
    referring_site: bool = False

    @model_validator(mode="after")
    def _not_empty(self) -> GrantTarget:
        if not (self.sites or self.roles or self.referring_site):
            raise ValueError("grant_to needs sites, roles or referring_site: true")
        return self


class PolicyRule(_Model):
    name: str
    description: str = ""
    when: RuleMatch = RuleMatch()
    grant_to: GrantTarget
    deliver: Literal["none", "edge", "pacs"] = Field(
        "none",
        description="push granted studies ahead of time: to the site's edge, or to its edge "
        "and its PACS (reconciled to the site's patient ID); 'none' leaves them in the center, "
        "retrieved on demand",
    )


REFERRING_KEYWORDS = ("RequestingService", "ReferringPhysicianName", "InstitutionName")


class ReferringSiteConfig(_Model):
    """How the site that ordered a study is read from it.

    The attributes are tried in order; a value is compared with `mapping` (glob
    patterns, case-insensitive), then with each site's name, institution name
    and aliases.
    """

    attributes: tuple[str, ...] = ("RequestingService", "ReferringPhysicianName")
    mapping: dict[str, str] = Field(default_factory=dict)

    @field_validator("attributes")
    @classmethod
    def _known_keywords(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for keyword in value:
            if keyword not in REFERRING_KEYWORDS:
                raise ValueError(
                    f"{keyword!r} cannot name the referring site; use "
                    f"{', '.join(REFERRING_KEYWORDS)} (or the mapping table)"
                )
        return value


class PolicyConfig(_Model):
    """The sharing policy. The default is the source system's rules."""

    version: str = "1"
    rules: tuple[PolicyRule, ...] = (
        PolicyRule(
            name="clinic-studies-to-hub",
            description="Everything a clinic uploads is published to the core hospital.",
            when=RuleMatch(origin_roles=("clinic",)),
            grant_to=GrantTarget(roles=("hub",)),
        ),
        PolicyRule(
            name="hub-exam-to-referring-clinic",
            description="A hub exam ordered by a clinic is published to that clinic.",
            when=RuleMatch(origin_roles=("hub",)),
            grant_to=GrantTarget(referring_site=True),
            deliver="pacs",
        ),
    )
    referring_site: ReferringSiteConfig = ReferringSiteConfig()
    auto_link_exact_match: bool = Field(
        True,
        description="link a patient across sites automatically when kanji and kana name, "
        "birth date and sex all match exactly one person",
    )


class AlertsConfig(_Model):
    """Who is told when something needs action (`renkei watch`), and the limits the checks use."""

    notify: tuple[str, ...] = Field(
        (),
        description="Apprise URLs to notify: json://host:port/path (a webhook), mailto://user:pass@host, "
        "mailtos://..., slack://... (see the apprise documentation); URLs holding a secret are better "
        "given in the environment variable named by notify_env",
    )
    notify_env: str = Field(
        "RENKEI_ALERT_URLS",
        description="environment variable with more Apprise URLs "
        "(separated by spaces), for URLs that hold a password or token",
    )
    every_s: float = Field(120, gt=0, description="how often `renkei watch` checks the region")
    repeat_h: float = Field(24, gt=0, description="a problem that persists is notified again after this long")
    verification_max_age_h: float = Field(26, gt=0, description="the nightly verification is overdue after")
    backup_max_age_min: float = Field(60, gt=0, description="the catalog's backup is overdue after")
    edge_silent_s: float = Field(
        120,
        gt=0,
        description="an edge whose last heartbeat is older is reported "
        "as not running (a running edge beats every 0.25-2 s)",
    )
    stuck_after_min: float = Field(
        15, gt=0, description="a site whose oldest waiting study waits longer is reported as stuck, with the cause"
    )

    @field_validator("notify")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if "://" not in url:
                raise ValueError(f"{url!r} is not an Apprise URL (e.g. json://host:port/path, mailto://...)")
        return value


class RegionConfig(_Model):
    """The whole region: sites, center and sharing policy."""

    version: Literal[1] = 1
    region: str = "region"
    name: str = ""
    timezone: str = "Asia/Tokyo"
    center: CenterConfig = CenterConfig()
    sites: tuple[SiteConfig, ...]
    policy: PolicyConfig = PolicyConfig()
    alerts: AlertsConfig = AlertsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> RegionConfig:
        errors: list[str] = []
        ids = [s.id for s in self.sites]
        for site_id, n in Counter(ids).items():
            if n > 1:
                errors.append(f"sites: site id {site_id!r} appears {n} times")
        if not any(s.role == "hub" for s in self.sites):
            errors.append("sites: the region needs one site with role: hub")

        ae_owners: dict[str, list[str]] = {}
        ports: dict[tuple[str, int], list[str]] = {}
        for i, site in enumerate(self.sites):
            base = f"sites[{i}]"
            nodes = [(f"{base}.edge", site.edge.ae_title, site.edge.host, site.edge.port)]
            if site.pacs:
                nodes.append((f"{base}.pacs", site.pacs.ae_title, site.pacs.host, site.pacs.port))
            for j, ws in enumerate(site.workstations):
                nodes.append((f"{base}.workstations[{j}]", ws.ae_title, ws.host, ws.port))
            for where, ae, host, port in nodes:
                ae_owners.setdefault(ae, []).append(where)
                ports.setdefault((_host_key(host), port), []).append(where)
        for ae, owners in ae_owners.items():
            if len(owners) > 1:
                errors.append(f"{owners[1]}.ae_title: duplicate AE title {ae!r} (also used by {owners[0]})")
        for (host, port), owners in ports.items():
            if len(owners) > 1:
                errors.append(f"{owners[1]}.port: duplicate port {port} on {host} (also used by {owners[0]})")

        known = set(ids)
        for i, rule in enumerate(self.policy.rules):
            for field, values in (
                ("when.origin_sites", rule.when.origin_sites),
                ("grant_to.sites", rule.grant_to.sites),
            ):
                for value in values:
                    if value not in known:
                        errors.append(f"policy.rules[{i}].{field}: unknown site {value!r} (known: {', '.join(ids)})")
        for pattern, site_id in self.policy.referring_site.mapping.items():
            if site_id not in known:
                errors.append(
                    f"policy.referring_site.mapping[{pattern!r}]: unknown site {site_id!r} (known: {', '.join(ids)})"
                )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # -- lookups -------------------------------------------------------------
    def site(self, site_id: str) -> SiteConfig:
        for site in self.sites:
            if site.id == site_id:
                return site
        raise UsageError(f"unknown site {site_id!r}; this region has: {', '.join(s.id for s in self.sites)}")

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.sites)

    @property
    def hub(self) -> SiteConfig:
        return next(s for s in self.sites if s.role == "hub")

    def site_of_edge_ae(self, ae_title: str) -> SiteConfig | None:
        for site in self.sites:
            if site.edge.ae_title == ae_title:
                return site
        return None

    def site_of_ae(self, ae_title: str) -> SiteConfig | None:
        """The site an AE title belongs to: its edge, its PACS or one of its workstations."""
        for site in self.sites:
            if site.edge.ae_title == ae_title:
                return site
            if site.pacs and site.pacs.ae_title == ae_title:
                return site
            if any(ws.ae_title == ae_title for ws in site.workstations):
                return site
        return None

    def peer(self, ae_title: str) -> DicomPeer | None:
        """Any DICOM node of the region by AE title (edges returned as peers too)."""
        for site in self.sites:
            if site.edge.ae_title == ae_title:
                return DicomPeer(ae_title=ae_title, host=site.edge.host, port=site.edge.port)
            if site.pacs and site.pacs.ae_title == ae_title:
                return site.pacs
            for ws in site.workstations:
                if ws.ae_title == ae_title:
                    return ws
        return None

    def site_for_name(self, value: str) -> str | None:
        """The site a free-text name refers to (policy mapping first, then names and aliases)."""
        text = value.strip().lower()
        if not text:
            return None
        for pattern, site_id in self.policy.referring_site.mapping.items():
            if fnmatch.fnmatchcase(text, pattern.lower()):
                return site_id
        for site in self.sites:
            names = {site.id, site.name, site.institution_name, *site.aliases}
            if text in {n.strip().lower() for n in names if n}:
                return site.id
        return None


def _host_key(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "127.0.0.1", "::1") else host


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: the configuration is not valid:"]
    for item in err.errors():
        loc = ""
        for part in item["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and indentation)"
        elif item["type"] == "missing":
            msg = "required field is missing"
        if not loc and "; " in msg:
            lines.extend(f"  - {m}" for m in msg.split("; "))
            continue
        given = item.get("input")
        shown = "" if isinstance(given, (dict, list)) or item["type"] == "missing" else f" (got {given!r})"
        lines.append(f"  - {loc or '(top level)'}: {msg}{shown}")
    return "\n".join(lines)


def parse_config(text: str, source: Path | str = "<config>") -> RegionConfig:
    """Validate YAML text into a RegionConfig; errors name `source` and the field."""
    source = Path(source)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with 'sites:' at the top level")
    try:
        return RegionConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def load_config(path: str | os.PathLike[str]) -> RegionConfig:
    """Read and validate the network configuration file at `path`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None
    return parse_config(text, path)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: the argument, else $RENKEI_DATA_DIR, else ./renkei-data."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Layout:
    """Where a running region keeps its state: everything under one data folder."""

    config: RegionConfig
    data_dir: Path

    def edge_store(self, site_id: str) -> Path:
        site = self.config.site(site_id)
        if site.edge.store:
            store = Path(site.edge.store).expanduser()
            return store if store.is_absolute() else self.data_dir / store
        return self.data_dir / "edges" / site_id

    def _url(self, value: str) -> str:
        if value.startswith(("s3://", "memory://")):
            return value
        if value.startswith("file://"):
            value = value[len("file://") :]
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else self.data_dir / path)

    @property
    def center_url(self) -> str:
        return self._url(self.config.center.storage_url)

    @property
    def catalog_url(self) -> str:
        if self.config.center.catalog_url:
            return self._url(self.config.center.catalog_url)
        return self.center_url.rstrip("/") + "/catalog"

    @property
    def catalog_backup_url(self) -> str:
        if self.config.center.catalog_backup_url:
            return self._url(self.config.center.catalog_backup_url)
        if self.catalog_url.startswith("s3://"):
            return self.catalog_url.rstrip("/") + "-backup"
        return str(self.data_dir / "catalog-backup")

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"
