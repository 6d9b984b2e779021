"""The sharing policy: who may see which study, decided in one place.

Pure functions over the configuration and plain facts. A study is visible to
its own site, and to another site only through an active grant, written either
by a rule of the configured policy (when the center registers the study) or by
a person (publish). A withdrawn consent stops rules from granting that
patient's studies and revokes the rule grants already made; it is checked again
at every decision, so a race between a grant and a withdrawal never leaks.

`renkei.sharing` applies these decisions to the catalog (writing grants and
audit events); every exit (edge C-FIND/C-MOVE/C-GET, distribution, exports,
HTTP) asks `decide`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from renkei.config import PolicyRule, RegionConfig
from renkei.records import StudyInfo

# Which StudyInfo field holds each DICOM attribute a policy may read the referring site from.
REFERRING_ATTRIBUTES = {
    "RequestingService": "requesting_service",
    "ReferringPhysicianName": "referring_physician",
    "InstitutionName": "institution_name",
}


@dataclass(frozen=True)
class RuleGrant:
    """A grant a rule of the policy asks for: `site` may see the study because of `rule`."""

    site: str
    rule: str
    reason: str
    deliver: str = "none"  # 'none' | 'edge' | 'pacs'


@dataclass(frozen=True)
class GrantFact:
    """An active grant as the catalog holds it (the latest event for study x site is a grant)."""

    site: str
    by_kind: str  # 'rule' | 'person' | 'system'
    by: str
    reason: str = ""
    at: str = ""
    rule: str | None = None


@dataclass(frozen=True)
class Decision:
    """Whether `site` may see `study_uid`, and why (the text `renkei explain` prints)."""

    allowed: bool
    site: str
    study_uid: str
    basis: str  # 'origin' | 'grant' | 'consent-withdrawn' | 'no-grant' | 'unknown-study'
    explanation: str
    grant: GrantFact | None = None
    rule_grants_possible: tuple[RuleGrant, ...] = field(default_factory=tuple)


def referring_site(config: RegionConfig, study: StudyInfo) -> tuple[str | None, str]:
    """The site that ordered the study, and the attribute it was read from ('' if none)."""
    for keyword in config.policy.referring_site.attributes:
        value = getattr(study, REFERRING_ATTRIBUTES[keyword], "") or ""
        for candidate in _name_variants(value):
            site_id = config.site_for_name(candidate)
            if site_id:
                return site_id, keyword
    return None, ""


def _name_variants(value: str) -> list[str]:
    """The whole value, then each PN component group, then each group without '^'."""
    value = value.strip()
    if not value:
        return []
    variants = [value]
    for group in value.split("="):
        group = group.strip()
        if group and group not in variants:
            variants.append(group)
        spaced = " ".join(p for p in group.split("^") if p)
        if spaced and spaced not in variants:
            variants.append(spaced)
    return variants


def _rule_matches(rule: PolicyRule, config: RegionConfig, study: StudyInfo) -> bool:
    origin = config.site(study.origin_site)
    when = rule.when
    if when.origin_sites and study.origin_site not in when.origin_sites:
        return False
    if when.origin_roles and origin.role not in when.origin_roles:
        return False
    if when.modalities and not set(m.upper() for m in study.modalities) & {m.upper() for m in when.modalities}:
        return False
    return True


def rule_grants(config: RegionConfig, study: StudyInfo) -> list[RuleGrant]:
    """Every grant the configured rules ask for this study (never to its own site)."""
    wanted: dict[str, RuleGrant] = {}
    for rule in config.policy.rules:
        if not _rule_matches(rule, config, study):
            continue
        targets: list[tuple[str, str]] = [(s, f"listed in rule {rule.name!r}") for s in rule.grant_to.sites]
        for site in config.sites:
            if site.role in rule.grant_to.roles:
                targets.append((site.id, f"every {site.role} (rule {rule.name!r})"))
        if rule.grant_to.referring_site:
            ref, keyword = referring_site(config, study)
            if ref:
                targets.append((ref, f"referring site, read from {keyword} (rule {rule.name!r})"))
        for site_id, why in targets:
            if site_id != study.origin_site and site_id not in wanted:
                wanted[site_id] = RuleGrant(site=site_id, rule=rule.name, reason=why, deliver=rule.deliver)
    return list(wanted.values())


def deliveries(config: RegionConfig, study: StudyInfo, granted_sites: Iterable[str]) -> dict[str, str]:
    """For sites just granted the study, how far to push it ahead of time ('edge' or 'pacs')."""
    granted = set(granted_sites)
    return {g.site: g.deliver for g in rule_grants(config, study) if g.site in granted and g.deliver != "none"}


def decide(
    config: RegionConfig,
    site: str,
    study: StudyInfo | None,
    active_grants: Iterable[GrantFact],
    consent_withdrawn: bool = False,
    study_uid: str = "",
) -> Decision:
    """Whether `site` may see `study`, from the facts the catalog holds.

    `active_grants` are the study's grants that are in force (any site);
    `consent_withdrawn` is whether the patient withdrew sharing at the study's
    origin site.
    """
    config.site(site)  # unknown site: UsageError naming the known ones
    uid = study.study_uid if study else study_uid
    if study is None:
        return Decision(False, site, uid, "unknown-study", f"study {uid} is not in the catalog")
    if study.origin_site == site:
        return Decision(True, site, uid, "origin", f"the study was taken at {site} (its own site)")
    mine = [g for g in active_grants if g.site == site]
    possible = tuple(g for g in rule_grants(config, study) if g.site == site)
    if consent_withdrawn:
        person = [g for g in mine if g.by_kind == "person"]
        if person:
            g = person[0]
            return Decision(
                True,
                site,
                uid,
                "grant",
                f"published to {site} by {g.by} at {g.at or '?'} ({g.reason or 'no reason given'}); "
                f"the patient withdrew consent at {study.origin_site}, which stops rule grants only",
                grant=g,
                rule_grants_possible=possible,
            )
        return Decision(
            False,
            site,
            uid,
            "consent-withdrawn",
            f"the patient withdrew consent to sharing at {study.origin_site}: no rule grants this study to {site}",
            rule_grants_possible=possible,
        )
    if mine:
        g = sorted(mine, key=lambda x: (x.by_kind != "person", x.at))[0]
        if g.by_kind == "rule":
            text = f"granted to {site} by rule {g.rule or g.by!r} at {g.at or '?'}: {g.reason}"
        else:
            text = f"granted to {site} by {g.by_kind} {g.by} at {g.at or '?'} ({g.reason or 'no reason given'})"
        return Decision(True, site, uid, "grant", text, grant=g, rule_grants_possible=possible)
    if possible:
        text = (
            f"no grant to {site} is in force (rule {possible[0].rule!r} would grant it: "
            f"{possible[0].reason}; it may have been unpublished, or applying the rules has not run yet)"
        )
    else:
        text = f"no rule grants studies of {study.origin_site} to {site}, and nobody published it there"
    return Decision(False, site, uid, "no-grant", text, rule_grants_possible=possible)


def explain_lines(decision: Decision) -> Sequence[str]:
    """Lines for `renkei explain`."""
    verdict = "MAY see" if decision.allowed else "may NOT see"
    return [f"{decision.site} {verdict} study {decision.study_uid}", f"  because {decision.explanation}"]
