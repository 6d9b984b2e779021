"""A small demo-like region for the dashboard's tests: four edges synced by real flow runs.

Every site gets synthetic studies (small images) put into its edge; `sync_site`
runs for each site in-process (a Prefect API must be up: the `prefect_api`
fixture), one verify_backups run repairs an object damaged on purpose, a person
publishes a hub study, workstations make cross-site accesses, and one study is
left waiting at an edge. A pydicom test file in a compressed transfer syntax
with no decoder here exercises the thumbnail placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from helpers_region import LONG_AGO, layout_of, put_into_edge, region_config

from renkei import synth
from renkei.config import Layout
from renkei.runtime import open_catalog, open_store

# JPEG-LS: pydicom decodes it only with pylibjpeg-libjpeg or pyjpegls, which renkei does not install
UNDECODABLE_TEST_FILE = "MR_small_jpeg_ls_lossless.dcm"


@dataclass
class DemoRegion:
    config_path: Path
    layout: Layout
    studies: dict[str, list[str]] = field(default_factory=dict)  # site -> study UIDs synced
    waiting: tuple[str, str] = ("", "")  # (site, study UID) left at the edge
    undecodable: tuple[str, str] = ("", "")  # (study UID, series UID)
    repaired_sop: str = ""
    flow_runs: dict[str, str] = field(default_factory=dict)  # site -> sync flow run id


def undecodable_file() -> Path | None:
    """A pydicom test file pydicom cannot decode here (None when it can, e.g. a decoder was installed)."""
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file(UNDECODABLE_TEST_FILE)
    if path is None:
        return None
    try:
        _ = pydicom.dcmread(path).pixel_array
    except Exception:
        return Path(path)
    return None


def build_region(tmp_path: Path, data_dir: Path, patients: int = 2) -> DemoRegion:
    """Synthesize, sync every site through real flow runs, verify once (repairing one object), audit accesses."""
    from renkei.flows.sync_site import sync_site
    from renkei.flows.verify_backups import verify_backups
    from renkei.sharing import Sharing

    config_path = region_config(tmp_path, stable_age=0.2)
    lay = layout_of(config_path, data_dir)
    region = DemoRegion(config_path, lay)
    for n, site in enumerate(lay.config.site_ids):
        result = synth.generate_site(
            lay.config, site, patients, 11 + n, tmp_path / "synth" / site, ct_slices=5, size=64, modalities=("CT", "CR")
        )
        put_into_edge(lay, site, result.files, received_ago=LONG_AGO)
        region.studies[site] = [s.info.study_uid for s in result.studies]
    odd = undecodable_file()
    if odd is not None:
        import pydicom

        header = pydicom.dcmread(odd, stop_before_pixels=True)
        put_into_edge(lay, "hub", [odd], received_ago=LONG_AGO)
        region.studies["hub"].append(str(header.StudyInstanceUID))
        region.undecodable = (str(header.StudyInstanceUID), str(header.SeriesInstanceUID))
    for site in lay.config.site_ids:
        state = sync_site(site, str(config_path), str(data_dir), return_state=True)
        assert state.is_completed(), f"sync_site {site}: {state.message}"
        assert state.result()["studies"] == len(region.studies[site])
        region.flow_runs[site] = str(state.state_details.flow_run_id)

    # damage one object of the center: the verification finds it and repairs it from the edge
    store = open_store(lay)
    with open_catalog(lay) as catalog:
        victim = catalog.instances(region.studies["clinic-b"][0])[0]
    path = Path(store.path(victim["object_key"]))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    region.repaired_sop = victim["sop_instance_uid"]
    report = verify_backups(full=True, config=str(config_path), data_dir=str(data_dir))
    assert report["repaired"] == 1, report

    with open_catalog(lay) as catalog:
        sharing = Sharing(lay.config, catalog)
        own_hub = [uid for uid in region.studies["hub"] if uid != region.undecodable[0]]
        sharing.publish(own_hub[0], ["clinic-b"], "operator", "second opinion")
        sharing.record_access("hub", "HUB_WS1", "find", region.studies["clinic-c"][:2])
        sharing.record_access("hub", "HUB_WS2", "retrieve", region.studies["clinic-c"][:1])
        sharing.record_access("clinic-b", "CLB_WS", "retrieve", own_hub[:1])
        sharing.record_access("hub", "HUB_WS1", "find", own_hub[:1])  # its own study: not cross-site

    # one more study arrives at clinic-a after the sync: it waits at the edge
    late = synth.generate_site(
        lay.config, "clinic-a", 1, 99, tmp_path / "synth-late", ct_slices=3, size=64, modalities=("CR",)
    )
    put_into_edge(lay, "clinic-a", late.files[:1])
    region.waiting = ("clinic-a", late.studies[0].info.study_uid)
    return region


def module_region(tmp_path_factory, name: str) -> DemoRegion:
    """A synced region in a folder of its own (`name`), for a module-scoped fixture."""
    tmp = tmp_path_factory.mktemp(name)
    data_dir = tmp / "renkei-data"
    data_dir.mkdir()
    return build_region(tmp, data_dir)
