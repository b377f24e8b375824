"""``study=NAME_OR_FILE``: shipped studies (heart, nordic5) and study folders outside the package, from
the command line (nordfl-sim, its -m sweeps, nordfl-bench suites), with the study's Table 1 in the run folder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nordfl.conf.schema import ConfigError
from nordfl.conf.studies import study_overrides
from nordfl.tasks import catalogue
from nordfl.tasks.heart import SCHEMA, SITES, VENDORED_CSV
from nordfl.tasks.nordic5 import SITES as NORDIC5_SITES, write_nordic5

BIN = Path(sys.executable).parent


def _sim(*overrides, cwd, env=None, timeout=300):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([str(BIN / "nordfl-sim"), *overrides, "logger.progress=false"], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_study_becomes_the_study_task_overrides_in_its_place(tmp_path):
    assert study_overrides(["seed=1"]) == ["seed=1"]
    heart = catalogue.locate("heart")
    out = study_overrides(["-m", "study=heart", "seed=0,1"])
    assert out == ["-m", "task=study", f"task.study='{heart.study}'", f"task.sites='{heart.sites}'", "task.test_fraction=0.34",
                   "task.model=logistic_regression", "seed=0,1"]
    assert "task.test_fraction=0.34" not in study_overrides(["task.test_fraction=0.2", "study=heart"])  # the user's wins
    write_nordic5(tmp_path / "mine, 2025", seed=1)  # a folder name Hydra would otherwise split
    sites = tmp_path / "elsewhere"
    sites.mkdir()
    out = study_overrides([f"study='{tmp_path / 'mine, 2025' / 'study.yaml'}'", f"study_sites={sites}"])
    assert out == ["task=study", f"task.study='{tmp_path / 'mine, 2025' / 'study.yaml'}'", f"task.sites='{sites}'",
                   "task.model=logistic_regression"]


@pytest.mark.parametrize("overrides, message", [
    (["study=unknown"], "study: 'unknown' is neither a shipped study (heart, nordic5, nordic5_los) nor a study file"),
    (["study_sites=x"], "study_sites: 'x' needs study=FILE"),
    (["study=heart", "task=heart"], "study: 'heart' sets task=study with its files; drop 'task=heart'"),
    (["study=heart", "study_sites=/no/such/folder"], "study_sites: '/no/such/folder' is not a folder"),
    (["study=heart,nordic5"], "study: 'heart,nordic5' names several; a command runs one study"),
])
def test_a_bad_study_override_is_named(overrides, message):
    with pytest.raises(ConfigError) as error:
        study_overrides(overrides)
    assert message in str(error.value)


def test_nordic5_is_written_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORDFL_CACHE", str(tmp_path / "cache"))
    files = catalogue.locate("nordic5")
    assert files.study == tmp_path / "cache" / "studies" / "nordic5-seed0" / "study.yaml" and files.test_fraction is None
    assert sorted(p.name for p in files.sites.glob("*.yaml")) == sorted([*(f"{s}.yaml" for s in NORDIC5_SITES), "study.yaml"])
    written = {p.name: p.stat().st_mtime_ns for p in files.sites.iterdir()}
    assert catalogue.locate("nordic5") == files
    assert {p.name: p.stat().st_mtime_ns for p in files.sites.iterdir()} == written  # reused, not rewritten
    assert [p.name for p in files.sites.parent.iterdir()] == ["nordic5-seed0"]  # no temporary folder left behind


def test_a_suite_may_name_a_study():
    from nordfl.sim.suite import compose_run

    cfg = compose_run(["study=heart", "sim.rounds=2"])
    assert (cfg.task.name, cfg.task.test_fraction, Path(cfg.task.study).name) == ("study", 0.34, "study.yaml")


def _pooled_from_the_csv():
    """The heart rows the study keeps (complete in every column the heart task reads), pooled with NumPy."""
    from importlib import resources

    with resources.files("nordfl.tasks").joinpath("data", VENDORED_CSV).open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if all(r[c.name].strip() for c in SCHEMA)]
    age = np.array([float(r["age"]) for r in rows])
    return {("age", "n"): len(age), ("age", "mean"): age.mean(), ("age", "sd"): age.std(ddof=1), ("age", "min"): age.min(),
            ("sex", "Male"): sum(r["sex"] == "Male" for r in rows), ("sex", "Female"): sum(r["sex"] == "Female" for r in rows),
            ("disease", "yes"): sum(r["num"] != "0" for r in rows)}


def test_nordfl_sim_runs_the_shipped_heart_study_and_writes_its_table_one(tmp_path):
    run = tmp_path / "run"
    done = _sim("study=heart", "sim.rounds=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Table 1 of study heart: {run / 'table1.md'} and {run / 'table1.csv'}" in " ".join(done.stdout.split())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "heart" and list(summary["final"]["sites"]) == list(SITES)
    with open(run / "table1.csv", newline="") as f:
        table = {(r["variable"], r["statistic"]): r for r in csv.DictReader(f)}
    assert list(next(iter(table.values())))[2:] == [*SITES, "pooled"]
    for key, expected in _pooled_from_the_csv().items():
        assert float(table[key]["pooled"]) == pytest.approx(expected, rel=1e-12), key
    assert "| age mean |" in (run / "table1.md").read_text()


def test_nordfl_sim_runs_nordic5_from_the_cache_and_study_unknown_lists_the_shipped_ones(tmp_path):
    cache = tmp_path / "cache"
    done = _sim("study=nordic5", "sim.rounds=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                env={"NORDFL_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cache / "studies" / "nordic5-seed0" / "Oslo.csv").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["final"]["sites"]) == set(NORDIC5_SITES)
    unknown = _sim("study=unknown", cwd=tmp_path, timeout=120)
    assert unknown.returncode == 2
    assert ("nordfl-sim: config error: study: 'unknown' is neither a shipped study (heart, nordic5, nordic5_los) nor a study file"
            in " ".join(unknown.stderr.split()))


@pytest.mark.slow
def test_a_sweep_over_a_study_folder_outside_the_package(tmp_path):
    write_nordic5(tmp_path / "my study", seed=3)
    sweep = tmp_path / "sweep"
    done = _sim("-m", f"study={tmp_path / 'my study' / 'study.yaml'}", "algorithm=fedavg,scaffold", "sim.rounds=2",
                f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(runs) == 2
    for run in runs:
        assert set(json.loads((run / "summary.json").read_text())["final"]["sites"]) == set(NORDIC5_SITES)
        assert (run / "table1.csv").read_text() == (runs[0] / "table1.csv").read_text()


def test_the_studys_own_model_is_the_default_and_the_command_line_wins(tmp_path):
    """``model: {name, options}`` in the study file sizes the run's model unless task.model is given."""
    import yaml

    write_nordic5(tmp_path, seed=0)
    study = yaml.safe_load((tmp_path / "study.yaml").read_text())
    study["model"] = {"name": "mlp", "options": {"hidden": [8, 4]}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = study_overrides([f"study={tmp_path / 'study.yaml'}"])
    assert out[-2:] == ["task.model=mlp", "+task.model_options.hidden=[8, 4]"]
    assert study_overrides([f"study={tmp_path / 'study.yaml'}", "task.model=logistic_regression"])[-1] == "task.model=logistic_regression"
