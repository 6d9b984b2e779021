"""`publish`: an operator publishes a study to chosen sites (or takes it back), from the Prefect UI."""

from __future__ import annotations

from prefect import flow

from renkei.flows import run_names
from renkei.flows.deliver import distribute
from renkei.runtime import Region
from renkei.tasks.center import publish_study
from renkei.tasks.common import publish_artifacts
from renkei.tasks.sync import Delivery


@flow(name="publish", flow_run_name=run_names.publish)
def publish(
    study_uid: str,
    to_sites: list[str],
    operator: str,
    reason: str = "",
    unpublish: bool = False,
    deliver: bool = True,
    config: str | None = None,
    data_dir: str | None = None,
) -> list[str]:
    """Grant `study_uid` to `to_sites` (revoke with unpublish=True); audited under `operator`.

    With `deliver`, newly granted sites also get the study pushed to their edge.
    """
    changed = publish_study(Region(config, data_dir), study_uid, to_sites, operator, reason, unpublish)
    verb = "unpublished from" if unpublish else "published to"
    lines = [
        f"Study `{study_uid}` {verb} {', '.join(changed) or 'no site (nothing changed)'} by {operator}.",
        f"Reason: {reason or '(none given)'}",
    ]
    if changed and deliver and not unpublish:
        result = distribute({site: Delivery([study_uid]) for site in changed}, config, data_dir)
        lines += [f"- delivery to {site}: {info}" for site, info in result.items()]
    publish_artifacts(f"publish-{study_uid[-12:]}", "publish", lines, [], "A publication change")
    return changed
