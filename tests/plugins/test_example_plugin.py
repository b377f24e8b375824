"""The example plugin package (examples/fednova: an algorithm, a model and a partitioner, each
with its YAML option) runs in nordfl-sim, in nordfl-bench and over mTLS in the runtime with no
change to NordFL's files; a site without that exact plugin refuses the job before training."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from nordfl import registry
from nordfl.conf.plugins import prepare
from tests.runtime.helpers import SITES, provisioned, run_sites, site_agent, start_federation

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fednova"
PLUGIN = ["plugins=[nordfl_fednova]"]


def _env(*paths) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in paths))
    env.pop("WANDB_MODE", None)
    return env


def _copy(tmp: Path, name: str, *, version=None, edit=None) -> Path:
    """A copy of the plugin in its own folder; ``version`` adds a dist-info as pip leaves, ``edit`` changes its code."""
    folder = tmp / name
    shutil.copytree(EXAMPLE / "nordfl_fednova", folder / "nordfl_fednova")
    if version is not None:
        dist = folder / f"nordfl_fednova-{version}.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nordfl-fednova\nVersion: {version}\n")
        (dist / "top_level.txt").write_text("nordfl_fednova\n")
    if edit is not None:
        path = folder / "nordfl_fednova" / "algorithm.py"
        path.write_text(path.read_text() + edit)
    return folder


@pytest.mark.slow
def test_the_plugin_runs_in_nordfl_sim_from_a_plain_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", *PLUGIN, "algorithm=fednova", "task=digits", "partition=shards",
         "partition.num_clients=8", "sim.rounds=2", "sim.eval_every=1", "logger.progress=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path, env=_env(EXAMPLE), timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if r.get("test_accuracy") is not None][-1]
    assert final["round"] == 2 and 0.1 < final["test_accuracy"] <= 1  # trained on 10 classes: above chance
    # The plugin's YAML options compose with their typed schemas: shards has shards_per_client, fednova no mu.
    cfg = (tmp_path / ".hydra" / "config.yaml").read_text()
    assert "shards_per_client: 2" in cfg and "name: fednova" in cfg and "mu:" not in cfg


def test_without_the_plugin_the_options_are_unknown_names(tmp_path):
    out = subprocess.run([sys.executable, "-m", "nordfl.sim.app", "plugins=[nordfl_fednova]", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert out.returncode == 2
    assert "plugins: cannot import 'nordfl_fednova': no module named 'nordfl_fednova'" in " ".join(out.stderr.split())


@pytest.mark.slow
def test_the_plugin_runs_as_a_suite_entry_in_nordfl_bench(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.bench", *PLUGIN, "suite=fednova", "seeds=[0]", 'settings=["data=shards"]',
         "only=[fednova,fedavg]", "logger.progress=false", f"hydra.run.dir={tmp_path}"],  # the plugin's partitioner
        capture_output=True, text=True, cwd=tmp_path, env=_env(EXAMPLE), timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    board = (tmp_path / "leaderboard.md").read_text()
    assert "| fednova |" in board and "| fedavg |" in board and "data=shards" in board  # the plugin's partitioner too
    assert "hydra.searchpath" not in board  # a local path, derived from plugins=


@pytest.mark.slow
def test_the_plugin_runs_over_mtls_and_matches_the_simulator_site_by_site(tmp_path, monkeypatch, clean_registry):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    overrides = [*PLUGIN, "algorithm=fednova", "task=heart_residual", "seed=3"]
    federation, files = provisioned(tmp_path)
    coordinator, port, driver = start_federation(tmp_path, federation, overrides + ["runtime.rounds=3"])
    assert {p["module"] for p in coordinator.job.plugins} == {"nordfl_fednova.algorithm", "nordfl_fednova.model"}
    results, errors = run_sites([site_agent(tmp_path, federation, files, name, port) for name in SITES])
    driver.join(timeout=60)
    assert not errors and set(results) == set(SITES)

    from nordfl.sim.config import build, register
    from nordfl.sim.engine import Simulator

    register()
    with initialize_config_module("nordfl.conf", version_base=None):
        cfg = compose("config", overrides=prepare(overrides))
    experiment = build(cfg)
    assert registry.lookup("model", cfg.task.model).module == "nordfl_fednova.model"
    sim = Simulator(experiment.algorithm, experiment.task, experiment.options, seed=cfg.seed, aggregate=experiment.aggregate)
    state = sim.init(experiment.task.model.init_params)
    for _ in range(3):
        state, _ = sim.run_round(state)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                           coordinator.server.params, state.server.params)
    sites = sim.evaluate(state.server.params).sites
    for i, client in enumerate(experiment.task.data.clients):
        site = client.name.replace(" ", "_")
        np.testing.assert_allclose(coordinator.final_metrics[site]["accuracy"], sites.accuracy[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(coordinator.final_metrics[site]["loss"], sites.loss[i], rtol=1e-4, atol=1e-5)


def _job(tmp_path: Path, plugin_folder: Path) -> Path:
    """The coordinator's job for the plugin as installed in ``plugin_folder``, written as JSON."""
    code = ("from nordfl.runtime.config import compose_config, job_from_config; "
            "cfg = compose_config(['plugins=[nordfl_fednova]', 'algorithm=fednova', 'runtime.min_cohort=1', 'runtime.min_sites=1']); "
            "print(job_from_config(cfg, ['Cleveland']).to_json())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(plugin_folder), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path = tmp_path / "job.json"
    path.write_text(out.stdout)
    return path


def _dry_run(job: Path, data: Path, *paths, policy=None):
    command = [sys.executable, "-m", "nordfl.runtime.cli", "site", "--dry-run", "--name", "Cleveland", "--data", str(data),
               "--job", str(job)] + (["--policy", str(policy)] if policy else [])
    return subprocess.run(command, capture_output=True, text=True, env=_env(*paths), timeout=300)


@pytest.mark.slow
def test_a_site_refuses_a_job_whose_plugin_it_lacks_or_has_in_another_version_or_code(tmp_path):
    released = _copy(tmp_path, "released", version="0.1.0")
    job = _job(tmp_path, released)
    (plugin,) = json.loads(job.read_text())["plugins"]
    assert (plugin["module"], plugin["distribution"], plugin["version"]) == ("nordfl_fednova.algorithm", "nordfl-fednova", "0.1.0")
    _, files = provisioned(tmp_path)
    data = files["Cleveland"]

    same = _dry_run(job, data, released)
    assert same.returncode == 0, same.stderr[-2000:]
    assert f"runs plugin nordfl_fednova.algorithm (nordfl-fednova 0.1.0, sha256 {plugin['sha256'][:16]}...)" in same.stdout

    cases = {
        "absent": ([], "this site does not have it installed"),
        "newer": ([_copy(tmp_path, "newer", version="0.2.0")], "this site has plugin nordfl_fednova.algorithm (nordfl-fednova 0.2.0"),
        "edited": ([_copy(tmp_path, "edited", version="0.1.0", edit="\n# a local change\n")], "this site has plugin nordfl_fednova.algorithm (nordfl-fednova 0.1.0, sha256"),
    }
    for name, (paths, why) in cases.items():
        out = _dry_run(job, data, *paths)
        message = " ".join(out.stderr.split())
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert f"the job needs plugin nordfl_fednova.algorithm (nordfl-fednova 0.1.0, sha256 {plugin['sha256'][:16]}...)" in message, name
        assert why in message, (name, message)
        assert "dry run: one local round trained" not in out.stdout  # refused before training

    policy = tmp_path / "policy.yaml"
    policy.write_text("allowed_plugins:\n  - {distribution: nordfl-fednova, version: 0.0.9}\n")
    out = _dry_run(job, data, released, policy=policy)
    assert out.returncode == 2 and "which this site's policy (allowed_plugins) does not allow" in " ".join(out.stderr.split())
    policy.write_text(f"allowed_plugins:\n  - {{distribution: nordfl-fednova, version: 0.1.0, sha256: {plugin['sha256']}}}\n")
    assert _dry_run(job, data, released, policy=policy).returncode == 0


def test_a_connected_site_refuses_and_audits_a_job_naming_a_plugin_it_does_not_have(tmp_path):
    from nordfl.runtime.site import SiteAgent, SiteRefused

    _, files = provisioned(tmp_path)
    agent = SiteAgent("Cleveland", "localhost:1", [files["Cleveland"]], tmp_path / "state", None, log=lambda m: None)
    wanted = {"module": "no_such_study.fednova", "distribution": "no-such-study", "version": "2.0", "sha256": "ab" * 32}
    with pytest.raises(SiteRefused, match=r"Cleveland: refused the job of run r1: the job needs plugin no_such_study.fednova "
                                          r"\(no-such-study 2.0, sha256 abababababababab...\); this site does not have it installed"):
        agent._check_plugins("r1", [wanted])
    agent.audit.close()
    entries = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "plugin_refused" and "no_such_study.fednova" in entries[-1]["reason"]
