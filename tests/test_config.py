"""The network configuration: the example validates, broken files name the field, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_parts import EXAMPLE_CONFIG

from renkei.cli.main import main
from renkei.config import Layout, load_config
from renkei.errors import ConfigError
from renkei.regionrun import REPO


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "region.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _example() -> dict:
    return yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))


def test_example_region_has_the_documented_names() -> None:
    config = load_config(EXAMPLE_CONFIG)
    expected = {
        "hub": ("HUB_SVR", 11112, "HUB_PACS", 4242, {"HUB_WS1": 11120, "HUB_WS2": 11121}),
        "clinic-a": ("CLA_SVR", 11113, "CLA_PACS", 4243, {"CLA_WS": 11122}),
        "clinic-b": ("CLB_SVR", 11114, "CLB_PACS", 4244, {"CLB_WS": 11123}),
        "clinic-c": ("CLC_SVR", 11115, "CLC_PACS", 4245, {"CLC_WS": 11124}),
    }
    assert config.site_ids == tuple(expected)
    for site_id, (edge_ae, edge_port, pacs_ae, pacs_port, ws) in expected.items():
        site = config.site(site_id)
        assert (site.edge.ae_title, site.edge.port, site.edge.host) == (edge_ae, edge_port, "127.0.0.1")
        assert site.pacs is not None and (site.pacs.ae_title, site.pacs.port) == (pacs_ae, pacs_port)
        assert {w.ae_title: w.port for w in site.workstations} == ws
    assert config.hub.id == "hub"
    assert (
        config.site("clinic-c").link.bandwidth_mbps < config.hub.link.bandwidth_mbps
        or config.site("clinic-c").link.rtt_ms > config.hub.link.rtt_ms
    )


def test_layout_puts_everything_under_the_data_dir(tmp_path: Path) -> None:
    layout = Layout(load_config(EXAMPLE_CONFIG), tmp_path)
    assert layout.edge_store("clinic-a") == tmp_path / "edges" / "clinic-a"
    assert layout.center_url == str(tmp_path / "center")
    assert layout.catalog_url == str(tmp_path / "center" / "catalog")
    assert layout.logs_dir == tmp_path / "logs"


def test_config_check_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(EXAMPLE_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    for text in ("HUB_SVR@127.0.0.1:11112", "CLC_WS:11124", "clinic-studies-to-hub", "Goto clinic"):
        assert text in out


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda raw: raw["sites"][1]["edge"].__setitem__("port", "eleven"), ["sites[1].edge.port", "valid integer"]),
        (
            lambda raw: raw["policy"]["rules"][0]["grant_to"].__setitem__("sites", ["clinic-z"]),
            ["policy.rules[0].grant_to.sites", "unknown site 'clinic-z'"],
        ),
        (
            lambda raw: raw["sites"][2]["edge"].__setitem__("ae_title", "CLA_SVR"),
            ["sites[2].edge.ae_title", "duplicate AE title 'CLA_SVR'"],
        ),
        (
            lambda raw: raw["sites"][3]["workstations"][0].__setitem__("port", 11120),
            ["sites[3].workstations[0].port", "duplicate port 11120"],
        ),
        (lambda raw: raw["sites"][0].__setitem__("role", "hospital"), ["sites[0].role", "'hub' or 'clinic'"]),
        (
            lambda raw: raw["sites"][0]["edge"].__setitem__("stable_age", -1),
            ["sites[0].edge.stable_age", "greater than 0"],
        ),
        (
            lambda raw: raw["sites"][0]["edge"].__setitem__("ae_title", "THIS_AE_IS_TOO_LONG"),
            ["sites[0].edge.ae_title", "1-16"],
        ),
        (lambda raw: raw["sites"][0].__setitem__("edgee", {}), ["sites[0].edgee", "unknown field"]),
    ],
    ids=[
        "wrong-type",
        "unknown-policy-site",
        "duplicate-ae",
        "duplicate-port",
        "bad-role",
        "negative-stable-age",
        "long-ae",
        "misspelt-field",
    ],
)
def test_broken_config_names_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage, expected: list[str]
) -> None:
    raw = _example()
    breakage(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for text in expected:
        assert text in message, message
    assert main(["config", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and expected[0] in captured.err
    assert "Traceback" not in captured.err


def test_broken_config_from_the_installed_command_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sites: [\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "renkei.cli.main", "config", "check", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "no such configuration file" in capsys.readouterr().err


def test_config_check_finds_a_site_without_deployments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A site added to the region but not to prefect.yaml would never sync on schedule: said at once."""
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    extra = dict(raw["sites"][-1], id="clinic-d", name="Another clinic")
    extra["edge"] = dict(extra["edge"], ae_title="CLD_SVR", port=extra["edge"]["port"] + 100)
    extra["workstations"] = []
    extra.pop("pacs", None)
    raw["sites"].append(extra)
    path = _write(tmp_path, raw)
    # the deployments renkei deploy applies are generated from the sites: the new one has its own
    assert main(["config", "check", str(path)]) == 0
    assert "the deployments match its sites" in capsys.readouterr().out
    assert main(["deployments", "--config", str(path)]) == 0
    generated = yaml.safe_load(capsys.readouterr().out)
    mine = {d["name"]: d for d in generated["deployments"] if d.get("parameters", {}).get("site") == "clinic-d"}
    assert set(mine) == {"sync-clinic-d", "deliver-clinic-d", "fetch-priors-clinic-d"}
    assert {d["work_pool"]["name"] for d in mine.values()} == {"renkei-clinic-d"}
    assert mine["sync-clinic-d"]["schedules"] and mine["sync-clinic-d"]["concurrency_limit"]["limit"] == 1
    # a hand-made prefect.yaml (the example's) lacks it, and config check says so
    assert main(["config", "check", "--prefect-file", str(REPO / "prefect.yaml"), str(path)]) == 2
    err = capsys.readouterr().err
    assert "deployment sync-clinic-d is missing" in err and "renkei-clinic-d" in err
    assert "Traceback" not in err
    assert main(["config", "check", "--no-deployments", str(path)]) == 0
    capsys.readouterr()

    # a deployment whose work pool is another site's would run that site's steps on the wrong machine
    prefect_yaml = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    for dep in prefect_yaml["deployments"]:
        if dep["name"] == "sync-clinic-b":
            dep["work_pool"] = dict(dep["work_pool"], name="renkei-clinic-a")
        if dep["name"] == "verify-backups":
            dep.pop("schedules")
    other = tmp_path / "prefect.yaml"
    other.write_text(yaml.safe_dump(prefect_yaml), encoding="utf-8")
    assert main(["config", "check", "--prefect-file", str(other), str(EXAMPLE_CONFIG)]) == 2
    err = capsys.readouterr().err
    assert "sync-clinic-b: work pool 'renkei-clinic-a', expected 'renkei-clinic-b'" in err
    assert "verify-backups has no schedule" in err


def test_config_check_refuses_an_alert_url_apprise_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    raw["alerts"] = {"notify": ["nosuchscheme://secret@host/x"]}
    path = _write(tmp_path, raw)
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nosuchscheme://..." in err and "secret" not in err and "Traceback" not in err


def test_the_checked_in_prefect_yaml_is_the_example_region_generated(capsys: pytest.CaptureFixture[str]) -> None:
    """prefect.yaml is generated (renkei deployments --write prefect.yaml); nobody edits it by hand."""
    code = main(["deployments", "--config", str(EXAMPLE_CONFIG), "--check", str(REPO / "prefect.yaml")])
    out = capsys.readouterr()
    assert code == 0, out.err + "\nregenerate: renkei deployments --config examples/nagasaki.yaml --write prefect.yaml"
