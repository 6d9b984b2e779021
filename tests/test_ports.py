"""Ports a region's configuration names are never handed out again by a process that starts its parts."""

from __future__ import annotations

from helpers_region import layout_of, region_config

from renkei import peers
from renkei.regionrun import RegionRunner, config_ports


def test_the_configured_ports_are_never_handed_out_for_something_else(tmp_path, monkeypatch) -> None:
    """A demo's PACS once failed to bind its configured port: the demo process had just given it to
    another PACS's HTTP server (free_port saw it free: nothing was bound there yet)."""
    config_path = region_config(tmp_path)
    lay = layout_of(config_path, tmp_path / "data")
    ports = config_ports(lay.config)
    for site in lay.config.sites:
        assert site.edge.port in ports
        assert site.pacs is None or site.pacs.port in ports
    # a range of two ports, a configured one and the next: without the runner's marking, free_port
    # hands out the configured one by the second call at the latest
    port = next(p for p in sorted(ports) if p + 1 not in ports)
    monkeypatch.setenv("RENKEI_PORT_RANGE", f"{port}-{port + 1}")
    monkeypatch.setattr(peers, "_GIVEN", [])
    RegionRunner(config_path, lay, "http://127.0.0.1:1/api")
    for _ in range(5):
        assert peers.free_port() not in ports
