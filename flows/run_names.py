"""Flow run names that say what a run moves and where (never a patient's name or ID)."""

from __future__ import annotations

from prefect.runtime import flow_run


def _parameters() -> dict:
    return dict(flow_run.parameters or {})


def deliver() -> str:
    p = _parameters()
    n = len(p.get("study_uids") or [])
    return f"deliver-{n}-stud{'y' if n == 1 else 'ies'}-to-{p.get('site')}{'-pacs' if p.get('to_pacs') else ''}"


def publish() -> str:
    p = _parameters()
    verb = "unpublish" if p.get("unpublish") else "publish"
    return f"{verb}-to-{'+'.join(p.get('to_sites') or []) or 'nobody'}"


def verify() -> str:
    return "verify-backups-full" if _parameters().get("full") else "verify-backups"
