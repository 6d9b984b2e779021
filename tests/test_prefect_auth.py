"""A Prefect server with basic authentication (Prefect 3's own): renkei's commands use the credential.

`renkei server` with PREFECT_SERVER_API_AUTH_STRING refuses requests without
it; `renkei deploy` and `renkei status` given PREFECT_API_AUTH_STRING work,
and `renkei status` without it names the missing credential instead of
calling the server down.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest
from helpers_region import layout_of, region_config

from renkei import peers
from renkei.regionrun import REPO, RegionRunner

AUTH = "operator:a-long-secret"


@pytest.mark.slow
def test_renkei_speaks_to_a_prefect_server_with_basic_auth(tmp_path) -> None:
    config_path = region_config(tmp_path, pacs_at=())
    layout = layout_of(config_path, tmp_path / "renkei-data")
    layout.data_dir.mkdir()
    port = peers.free_port()
    api = f"http://127.0.0.1:{port}/api"
    runner = RegionRunner(config_path, layout, api)
    try:
        proc = subprocess.Popen(
            runner.renkei("server", "--port", str(port)),
            cwd=REPO,
            env=runner.env({"PREFECT_SERVER_API_AUTH_STRING": AUTH}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        peers.wait_for_port("127.0.0.1", port, 120, proc, "the Prefect server")

        def refused() -> bool:
            try:
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"{api}/work_pools/filter", data=b"{}", headers={"Content-Type": "application/json"}
                    ),
                    timeout=5,
                )
            except urllib.error.HTTPError as exc:
                return exc.code == 401
            except OSError:
                return False
            return False

        runner.wait_until(refused, 120, "the server refusing a request without credentials", every=1)
        with_auth = runner.env({"PREFECT_API_AUTH_STRING": AUTH})
        deploy = subprocess.run(
            runner.renkei("deploy"), cwd=REPO, env=with_auth, capture_output=True, text=True, timeout=300
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        status = subprocess.run(
            runner.renkei("status", "--json"), cwd=REPO, env=with_auth, capture_output=True, text=True, timeout=120
        )
        report = json.loads(status.stdout)
        assert not [p for p in report["problems"] if p["what"] == "prefect"], report["problems"]
        assert {p["site"] for p in report["problems"] if p["what"] == "pool"} >= {"hub", "clinic-a"}  # no workers

        without = subprocess.run(
            runner.renkei("status", "--json"), cwd=REPO, env=runner.env(), capture_output=True, text=True, timeout=120
        )
        problems = [p for p in json.loads(without.stdout)["problems"] if p["what"] == "prefect"]
        assert problems and "refuses" in problems[0]["cause"] and "PREFECT_API_AUTH_STRING" in problems[0]["action"]
    finally:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
        except (ProcessLookupError, NameError, subprocess.TimeoutExpired):
            pass
        runner.stop()
