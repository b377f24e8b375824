"""Runs a whole federation in one process on loopback: coordinator + site agents in threads, over mTLS."""

import threading
import time
from pathlib import Path

from nordfl.runtime import tls
from nordfl.runtime.coordinator import coordinator_for, serve
from nordfl.runtime.site import SiteAgent
from nordfl.runtime.site_data import write_site_files

SITES = ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach")


def provisioned(tmp: Path, sites=SITES) -> tuple[Path, dict]:
    """A federation and each hospital's data folder."""
    federation = tls.provision(tmp / "federation", sites)
    files = {name.replace(" ", "_"): path for name, path in write_site_files(tmp / "data").items()}
    return federation, files


def start_coordinator(tmp: Path, federation: Path, overrides=(), *, state="coordinator", port=0, log=lambda m: None,
                      factory=None):
    coordinator = coordinator_for(overrides, federation, tmp / state, log=log, factory=factory)
    server, port = serve(coordinator, f"localhost:{port}", tls.server_credentials(federation / "coordinator"))
    return coordinator, server, port


def site_agent(tmp: Path, federation: Path, files: dict, name: str, port: int, **kw) -> SiteAgent:
    kw.setdefault("signing_key", federation / "sites" / name / "key.pem")  # signed audit logs, as `nordfl site` writes them
    return SiteAgent(name, f"localhost:{port}", [files[name]], tmp / "sites" / name,
                     tls.channel_credentials(federation / "sites" / name), log=lambda m: None, **kw)


def run_sites(agents) -> tuple[dict, dict]:
    """Runs agents in threads until they finish; returns (final metrics, errors) by site."""
    results, errors = {}, {}

    def work(agent):
        try:
            results[agent.name] = agent.run()
        except Exception as e:  # reported to the test, which asserts on it
            errors[agent.name] = e

    threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return results, errors


def start_federation(tmp: Path, federation: Path, overrides=(), *, grace: float = 30.0, factory=None):
    """A coordinator serving on loopback, driven by ``run_until_done`` in a background thread."""
    from nordfl.runtime.coordinator import run_until_done

    coordinator, server, port = start_coordinator(tmp, federation, overrides, factory=factory)
    driver = threading.Thread(target=run_until_done, args=(coordinator, server, grace), daemon=True)
    driver.start()
    return coordinator, port, driver


def run_sites_in_background(agents) -> tuple[threading.Thread, dict]:
    """``run_sites`` in a thread; its (results, errors) land in the returned dict when it ends."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(zip(("results", "errors"), run_sites(agents))), daemon=True)
    thread.start()
    return thread, outcome


def wait_until(condition, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)
