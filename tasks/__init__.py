"""Thin Prefect tasks over the pure code of edge/, catalog/ and renkei/: retries, limits, run logs.

Tasks take and return site ids, UIDs, paths and counts, never live objects.
"""
