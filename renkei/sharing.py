"""The sharing policy applied to the catalog: flags, publication, consent, decisions, access audit.

`renkei.policy` decides (pure); this module reads the facts from the catalog,
writes the grants and revocations the decisions call for (each one an audit
event, written by the catalog in the same commit), and records cross-site
accesses. Every exit asks `Sharing.decide`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from renkei.catalog import tables
from renkei.catalog.audit import AuditDraft
from renkei.catalog.catalog import Catalog, GrantRecord, GrantRequest, StudyRow
from renkei.config import RegionConfig
from renkei.errors import PolicyError, UsageError
from renkei.policy import Decision, GrantFact, RuleGrant, decide, rule_grants

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleGrants:
    """What applying the rules did: rule grants written, and grants a rule wanted but consent or history stopped."""

    studies: int
    granted: tuple[tuple[str, str, str], ...]  # (study_uid, site, rule)
    skipped_consent: tuple[str, ...] = ()
    skipped_history: tuple[tuple[str, str], ...] = ()  # a person or consent act already decided


class Sharing:
    """The one place where sharing is decided and recorded, for a region's catalog."""

    def __init__(self, config: RegionConfig, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog

    # ------------------------------------------------------------------ facts
    def _study(self, study_uid: str) -> StudyRow:
        row = self.catalog.study(study_uid)
        if row is None:
            raise PolicyError(f"study {study_uid} is not in the catalog (has it been uploaded and registered?)")
        return row

    def consent_withdrawn(self, row: StudyRow) -> bool:
        consent = self.catalog.consent_of(row.origin_site, row.patient_id, row.issuer_of_patient_id)
        return consent is not None and consent.state == "withdrawn"

    @staticmethod
    def _facts(grants: Iterable[GrantRecord]) -> list[GrantFact]:
        return [
            GrantFact(g.site, g.by_kind, g.by, g.reason, g.at.isoformat() if g.at else "", g.rule)
            for g in grants
            if g.active
        ]

    # ------------------------------------------------------------------ decisions
    def decide(self, site: str, study_uid: str) -> Decision:
        """May `site` see `study_uid`? (Every exit asks this.)"""
        row = self.catalog.study(study_uid)
        if row is None:
            return decide(self.config, site, None, [], study_uid=study_uid)
        return decide(
            self.config,
            site,
            row.study_info(),
            self._facts(self.catalog.grants(study_uid)),
            self.consent_withdrawn(row),
        )

    def visible_study_uids(self, site: str, study_uids: Iterable[str]) -> set[str]:
        return {uid for uid in study_uids if self.decide(site, uid).allowed}

    def explain(self, site: str, study_uid: str) -> list[str]:
        """The lines `renkei explain` prints: the verdict, its basis, and the study's grant history."""
        self.config.site(site)
        decision = self.decide(site, study_uid)
        verdict = "MAY see" if decision.allowed else "may NOT see"
        lines = [f"{site} {verdict} study {study_uid}", f"  because {decision.explanation}"]
        row = self.catalog.study(study_uid)
        if row is not None:
            lines.append(f"  study origin: {row.origin_site}; policy version {self.config.policy.version}")
            if decision.basis != "origin":
                for rg in decision.rule_grants_possible:
                    lines.append(f"  rule {rg.rule!r} applies to {site}: {rg.reason}")
            history = [g for g in self.catalog.grants(study_uid) if g.site == site]
            if history:
                lines.append(f"  history for {site}:")
                for g in history:
                    lines.append(
                        f"    {g.at:%Y-%m-%d %H:%M:%S} {g.action} by {g.by_kind} {g.by}"
                        f"{' (' + g.reason + ')' if g.reason else ''}"
                    )
            if self.consent_withdrawn(row):
                c = self.catalog.consent_of(row.origin_site, row.patient_id, row.issuer_of_patient_id)
                lines.append(f"  consent withdrawn at {row.origin_site} by {c.by if c else '?'}")
        return lines

    # ------------------------------------------------------------------ the rules
    def apply_rules(self, study_uids: Sequence[str]) -> RuleGrants:
        """Apply the policy's rules to registered studies: write the grants they ask for.

        A rule never re-grants a (study, site) pair that already has a history (a
        person unpublished it, or a consent withdrawal revoked it), and never
        grants while the patient's consent is withdrawn. Idempotent.
        """
        requests: list[GrantRequest] = []
        granted: list[tuple[str, str, str]] = []
        skipped_consent: list[str] = []
        skipped_history: list[tuple[str, str]] = []
        for uid in dict.fromkeys(study_uids):
            row = self.catalog.study(uid)
            if row is None:
                continue
            wanted = rule_grants(self.config, row.study_info())
            if not wanted:
                continue
            if self.consent_withdrawn(row):
                skipped_consent.append(uid)
                continue
            history = {g.site: g for g in self.catalog.grants(uid) if g.current}
            for rg in wanted:
                current = history.get(rg.site)
                if current is not None:
                    if not current.active:
                        skipped_history.append((uid, rg.site))
                    continue
                requests.append(self._rule_request(uid, rg))
                granted.append((uid, rg.site, rg.rule))
        if requests:
            self.catalog.grant_many(requests)
            log.info(
                "apply-rules: %d rule grants written for %d studies", len(requests), len(set(u for u, _, _ in granted))
            )
        return RuleGrants(len(study_uids), tuple(granted), tuple(skipped_consent), tuple(skipped_history))

    def _rule_request(self, study_uid: str, rg: RuleGrant) -> GrantRequest:
        return GrantRequest(study_uid, rg.site, "rule", rg.rule, rg.reason, rg.rule, self.config.policy.version)

    # ------------------------------------------------------------------ people's acts
    def _check_sites(self, row: StudyRow, sites: Sequence[str]) -> list[str]:
        if not sites:
            raise UsageError("name at least one site (--to SITE)")
        out = []
        for site in sites:
            self.config.site(site)
            if site == row.origin_site:
                raise UsageError(f"{site} is the study's own site: it always sees it")
            out.append(site)
        return out

    def publish(
        self,
        study_uid: str,
        sites: Sequence[str],
        operator: str,
        reason: str = "",
        despite_withdrawn_consent: bool = False,
    ) -> list[str]:
        """A person publishes a study to sites; returns the sites newly granted."""
        row = self._study(study_uid)
        targets = self._check_sites(row, sites)
        if self.consent_withdrawn(row) and not despite_withdrawn_consent:
            raise PolicyError(
                f"the patient of study {study_uid} withdrew consent to sharing at {row.origin_site}; "
                "publish only with --despite-withdrawn-consent and a --reason"
            )
        before = {g.site for g in self.catalog.grants(study_uid) if g.active}
        self.catalog.grant_many(
            [
                GrantRequest(
                    study_uid, s, "person", operator, reason or "published by hand", None, self.config.policy.version
                )
                for s in targets
            ],
            actor_site=self.config.hub.id,
        )
        return [s for s in targets if s not in before]

    def unpublish(self, study_uid: str, sites: Sequence[str], operator: str, reason: str = "") -> list[str]:
        """A person takes a publication back; effective on the next request. Returns sites revoked."""
        row = self._study(study_uid)
        targets = self._check_sites(row, sites)
        before = {g.site for g in self.catalog.grants(study_uid) if g.active}
        self.catalog.grant_many(
            [
                GrantRequest(
                    study_uid,
                    s,
                    "person",
                    operator,
                    reason or "unpublished by hand",
                    None,
                    self.config.policy.version,
                    tables.REVOKE,
                )
                for s in targets
            ],
            actor_site=self.config.hub.id,
        )
        return [s for s in targets if s in before]

    # ------------------------------------------------------------------ consent
    def _patient_studies(self, site: str, patient_id: str, issuer: str) -> list[StudyRow]:
        return [r for r in self.catalog.visible_studies(site, [(patient_id, issuer or None)]) if r.origin_site == site]

    def withdraw_consent(self, site: str, patient_id: str, issuer: str, operator: str, reason: str = "") -> int:
        """The patient withdraws sharing at `site`: rule grants stop and are revoked. Returns revocations."""
        self.config.site(site)
        issuer = issuer or self.config.site(site).issuer
        self.catalog.set_consent(site, patient_id, issuer, "withdrawn", operator, reason)
        revoke = []
        for row in self._patient_studies(site, patient_id, issuer):
            for g in self.catalog.grants(row.study_uid):
                if g.active and g.by_kind == "rule":
                    revoke.append(
                        GrantRequest(
                            row.study_uid,
                            g.site,
                            "consent",
                            operator,
                            reason or "consent withdrawn",
                            g.rule,
                            self.config.policy.version,
                            tables.REVOKE,
                        )
                    )
        if revoke:
            self.catalog.grant_many(revoke, actor_site=site)
        return len(revoke)

    def give_consent(self, site: str, patient_id: str, issuer: str, operator: str, reason: str = "") -> int:
        """The patient consents again: rules grant again what consent had revoked. Returns grants."""
        self.config.site(site)
        issuer = issuer or self.config.site(site).issuer
        self.catalog.set_consent(site, patient_id, issuer, "given", operator, reason)
        requests = []
        for row in self._patient_studies(site, patient_id, issuer):
            current = {g.site: g for g in self.catalog.grants(row.study_uid) if g.current}
            for rg in rule_grants(self.config, row.study_info()):
                g = current.get(rg.site)
                if g is None or (not g.active and g.by_kind == "consent"):
                    requests.append(self._rule_request(row.study_uid, rg))
        if requests:
            self.catalog.grant_many(requests, actor_site=site)
        return len(requests)

    # ------------------------------------------------------------------ access audit
    def record_access(
        self,
        site: str,
        actor: str,
        action: str,
        study_uids: Sequence[str],
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Audit a cross-site access: a query answer or a retrieval by `actor` (an AE title) of `site`."""
        drafts = []
        for uid in study_uids:
            row = self.catalog.study(uid)
            origin = row.origin_site if row else None
            drafts.append(AuditDraft(site, actor, action, uid, origin, outcome, detail or {}))
        if drafts:
            self.catalog.append_audits(drafts)
