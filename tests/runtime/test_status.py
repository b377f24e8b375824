"""The coordinator's status on its admin port during a real run over mTLS: Prometheus metrics, /status.json,
`nordfl status` and the status page (screenshotted by headless Chromium where it is installed); and a site's
own metrics endpoint."""

import json
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nordfl.runtime.cli import main as nordfl
from nordfl.runtime.status import SiteBoard, StatusBoard, serve_admin

from .helpers import SITES, provisioned, run_sites_in_background, site_agent, start_federation, wait_until

DP = ["algorithm.dp.mode=sgd", "algorithm.dp.noise_multiplier=1.5", "algorithm.dp.clip=1.0", "algorithm.dp.delta=1e-5"]


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.read().decode()


def _metrics(port):
    samples = {}
    for family in text_string_to_metric_families(_get(port, "/metrics")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.slow
def test_status_metrics_and_page_during_and_after_a_dp_run(tmp_path, capsys):
    federation, files = provisioned(tmp_path)
    coordinator, port, driver = start_federation(tmp_path, federation, ["runtime.rounds=3", *DP], grace=5)
    server, admin = serve_admin(StatusBoard(coordinator, federation), "127.0.0.1:0")
    try:
        before = json.loads(_get(admin, "/status.json"))
        assert (before["job"]["round"], before["sites_online"]) == (0, 0)
        assert all(s["certificate_days_left"] >= 800 for s in before["sites"])  # provisioned for 825 days
        agents = [site_agent(tmp_path, federation, files, s, port) for s in SITES]
        site_server, site_port = serve_admin(SiteBoard(agents[0]), "127.0.0.1:0")  # one site's own endpoint
        thread, outcome = run_sites_in_background(agents[:-1])  # the last site is late: round 0 waits for it
        wait_until(lambda: len(coordinator.updates) == len(SITES) - 1)
        during = _metrics(admin)
        assert during[("nordfl_sites_online", ())] == len(SITES) - 1 and during[("nordfl_rounds_planned", ())] == 3
        assert during[("nordfl_round", ())] == 0 and during[("nordfl_job_finished", ())] == 0
        assert ("nordfl_site_last_seen_seconds", (("site", SITES[-1]),)) not in during  # never seen yet
        page = _get(admin, "/")
        assert all(site in page for site in SITES) and "running" in page and "offline" in page
        browser = _chromium()
        if browser:  # the page as a person sees it, while the run waits for the late site
            shot = tmp_path / "status.png"
            done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                                   "--window-size=1000,600", f"http://127.0.0.1:{admin}/"], capture_output=True, timeout=120)
            assert done.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
            dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                                  f"http://127.0.0.1:{admin}/"], capture_output=True, text=True, timeout=120).stdout
            assert "NordFL coordinator" in dom and f'<b id="online">{len(SITES) - 1}</b>' in dom and "running" in dom
        late, late_outcome = run_sites_in_background(agents[-1:])
        late.join(timeout=600)
        assert not late_outcome["errors"], late_outcome["errors"]
        thread.join(timeout=600)
        assert not outcome["errors"], outcome["errors"]
        driver.join(timeout=60)
        after = _metrics(admin)
        assert after[("nordfl_round", ())] == 3 and after[("nordfl_job_finished", ())] == 1
        for site in SITES:  # epsilon as each site's own ledger has it
            log = [json.loads(line) for line in (tmp_path / "sites" / site / "audit.jsonl").read_text().splitlines()]
            spent = [e["epsilon"] for e in log if e["event"] == "privacy_spent"][-1]
            assert after[("nordfl_site_epsilon", (("site", site),))] == pytest.approx(spent, rel=1e-12)
        own = _metrics(site_port)
        first_log = [json.loads(line) for line in (tmp_path / "sites" / SITES[0] / "audit.jsonl").read_text().splitlines()]
        assert own[("nordfl_site_round", ())] == 2  # rounds 0, 1, 2
        assert own[("nordfl_site_epsilon", ())] == pytest.approx([e["epsilon"] for e in first_log if e["event"] == "privacy_spent"][-1])
        assert own[("nordfl_site_connected", ())] == 1
        site_server.shutdown()
        assert nordfl(["status", "--admin", f"127.0.0.1:{admin}"]) == 0
        shown = capsys.readouterr().out
        assert "round 3/3, finished" in shown and f"{SITES[0]}: online" in shown and "epsilon" in shown
    finally:
        server.shutdown()


def test_status_says_where_it_looked_when_nothing_answers(capsys):
    assert nordfl(["status", "--admin", "127.0.0.1:9"]) == 2
    assert "no coordinator status at http://127.0.0.1:9/status.json" in capsys.readouterr().err
