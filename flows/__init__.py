"""Prefect flows: orchestration only (they call tasks, branch and fan out)."""
