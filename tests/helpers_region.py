"""Helpers for tests that run a region: they live in renkei.testing (the benchmarks use them too)."""

from __future__ import annotations

from renkei.testing import EXAMPLE, LONG_AGO, REPO, dataset_bytes, layout_of, put_into_edge, region_config

__all__ = ["EXAMPLE", "LONG_AGO", "REPO", "dataset_bytes", "layout_of", "put_into_edge", "region_config"]
