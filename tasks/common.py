"""Shared bits of the tasks: retry policy, the upload concurrency limit, artifacts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from renkei.errors import ConfigError, InvalidUID, PolicyError, UsageError

IO_RETRIES = 4
IO_RETRY_DELAYS: list[float] = [2, 4, 8, 16]  # seconds: exponential backoff for I/O tasks


def retry_io_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry failures of I/O; not a refusal of the policy or a wrong argument (retrying changes nothing)."""
    try:
        state.result()
    except (PolicyError, UsageError, ConfigError, InvalidUID):
        return False
    except Exception:
        return True
    return True


def run_marker() -> str:
    """'flow-run:<id>' of the current flow run (recorded as who moved a study), '' outside one."""
    run_id = flow_run.get_id()
    return f"flow-run:{run_id}" if run_id else ""


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def artifact_key(text: str) -> str:
    """Artifact keys allow lower-case letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_artifacts(
    key: str, title: str, summary_lines: Sequence[str], rows: Sequence[dict[str, Any]], description: str
) -> None:
    """A markdown summary and, when there are rows, a table: what the run did, for the Prefect UI."""
    create_markdown_artifact(
        "\n".join([f"# {title}", "", *summary_lines]), key=artifact_key(key), description=description
    )
    if rows:
        create_table_artifact(list(rows), key=artifact_key(key + "-table"), description=description)
