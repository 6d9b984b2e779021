"""`renkei units`: the systemd units of each machine are valid and start what they say (issue 13, point 7).

systemd itself checks the generated files (`systemd-analyze verify`); each
ExecStart is a command line the installed `renkei` accepts; and the edge's
unit, run as written (its environment and command), serves DICOM on the
site's port.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from helpers_parts import require_program
from helpers_region import region_config

from renkei import peers
from renkei.regionrun import REPO


def _units(tmp_path: Path, config_path: Path, data_dir: Path, *who: str) -> Path:
    out = tmp_path / "units"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "renkei.cli.main",
            "--config",
            str(config_path),
            "--data-dir",
            str(data_dir),
            "units",
            *who,
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _service(path: Path) -> tuple[dict[str, str], list[str]]:
    env, cmd = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
        elif line.startswith("ExecStart="):
            cmd = shlex.split(line.removeprefix("ExecStart="))
    return env, cmd


def test_units_are_valid_and_the_edge_unit_starts_the_edge(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    config_path = region_config(tmp_path)
    data_dir = tmp_path / "renkei-data"
    out = _units(tmp_path, config_path, data_dir, "--site", "clinic-c", "--hl7-port", str(peers.free_port()))
    _units(tmp_path, config_path, data_dir, "--center")
    names = sorted(p.name for p in out.glob("*.service"))
    assert names == sorted(
        [
            "renkei-edge-clinic-c.service",
            "renkei-worker-clinic-c.service",
            "renkei-hl7-clinic-c.service",
            "renkei-prefect-server.service",
            "renkei-worker-center.service",
            "renkei-dashboard.service",
            "renkei-watch.service",
        ]
    )
    assert not data_dir.exists(), "writing units must not create the data folder"
    check = subprocess.run(
        [analyze, "verify", *map(str, sorted(out.glob("*.service")))], capture_output=True, text=True, timeout=120
    )
    assert check.returncode == 0, check.stderr
    for name in names:
        text = (out / name).read_text()
        assert "User=renkei" in text and f"ReadWritePaths={data_dir.resolve()}" in text
        assert "Restart=on-failure" in text and "EnvironmentFile=-/etc/renkei/renkei.env" in text
        assert ("KillSignal=SIGINT" in text) == (
            "worker" in name or "server" in name or "dashboard" in name or "watch" in name
        )
        env, cmd = _service(out / name)
        assert Path(cmd[0]).is_file(), cmd[0]
        helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert helped.returncode == 0, (name, helped.stderr[-1000:])

    # the edge's unit as systemd would run it (its Environment= lines and ExecStart), here as this user
    env, cmd = _service(out / "renkei-edge-clinic-c.service")
    data_dir.mkdir()
    import os

    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=env["RENKEI_HOME"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        from renkei.config import load_config

        site = load_config(config_path).site("clinic-c")
        peers.wait_for_port("127.0.0.1", site.edge.port, 60, proc, "the edge started from its unit")
    finally:
        proc.terminate()
        proc.wait(30)
