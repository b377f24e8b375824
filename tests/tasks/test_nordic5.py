"""nordic5: five sites' exports in five local formats, harmonised by their mapping files into one
study, check clean at every site, and train with FedAvg towards the known ground-truth model."""

import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.runtime.cli import main
from nordfl.runtime.site_data import read_table
from nordfl.sim import Simulator
from nordfl.tasks import classification_task
from nordfl.tasks.mapping import apply_mapping, load_mapping
from nordfl.tasks.models import logistic_regression
from nordfl.tasks.nordic5 import SITES, TRUE_LOGIT, generate, write_nordic5
from nordfl.tasks.study import load_study
from nordfl.tasks.study_data import study_dataset


def _auc(score, label):
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    positives = label == 1
    return (ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (positives.sum() * (~positives).sum())


@pytest.fixture(scope="module")
def nordic5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nordic5")
    return folder, write_nordic5(folder, seed=0)


def test_every_site_checks_clean_and_maps_back_to_the_generated_patients(nordic5, capsys):
    folder, files = nordic5
    study = load_study(folder / "study.yaml")
    truth = generate(seed=0)
    for site, (mapping_file, data) in files.items():
        assert main(["site", "check", "--study", str(folder / "study.yaml"), "--mapping", str(mapping_file), "--data", str(data)]) == 0
        mapped = apply_mapping(*read_table(data), load_mapping(mapping_file, study), study, str(data))
        assert mapped.report.rows_kept == SITES[site][0]
        expected = truth[site]
        np.testing.assert_allclose(mapped.values["age"], expected["age"], atol=0.51)  # whole years, or a birth date (Aarhus)
        np.testing.assert_allclose(mapped.values["chol"], expected["chol"], atol=0.5 / 38.67 + 0.005)  # Uppsala: whole mg/dL
        for name in ("sex", "smoker", "event"):
            np.testing.assert_array_equal(mapped.values[name], expected[name])
    assert "nothing was sent" in capsys.readouterr().out


def test_fedavg_on_the_harmonised_sites_approaches_the_ground_truth_model(nordic5):
    folder, files = nordic5
    study = load_study(folder / "study.yaml")
    sites = {site: apply_mapping(*read_table(data), load_mapping(m, study), study).values for site, (m, data) in files.items()}
    data = study_dataset(study, sites, seed=0)
    task = classification_task("nordic5", data, logistic_regression(len(data.feature_names), data.num_classes))
    algorithm = make_algorithm("fedavg", task.loss_fn, client_lr=0.1, num_epochs=2, batch_size=16)
    sim = Simulator(algorithm, task, seed=0)
    state = sim.init(task.model.init_params)
    for _ in range(20):
        state, _ = sim.run_round(state)
    trained = float(sim.evaluate(state.server.params).pooled.auc)
    truth = generate(seed=0)
    scores = np.concatenate([TRUE_LOGIT(t["age"], t["sex"], np.maximum(t["smoker"], 0), np.nan_to_num(t["chol"], nan=5.5), t["sbp"],
                                        SITES[s][3]) for s, t in truth.items()])
    best = _auc(scores, np.concatenate([t["event"] for t in truth.values()]))
    assert 0.7 < trained and trained > best - 0.06, (trained, best)


def test_nordfl_sim_trains_a_study_from_its_site_files(nordic5, tmp_path):
    import json
    import subprocess
    import sys

    folder, _ = nordic5
    out = subprocess.run([sys.executable, "-m", "nordfl.sim.app", "task=study", f"task.study={folder / 'study.yaml'}",
                          f"task.sites={folder}", "algorithm=scaffold", "sim.rounds=3", "sim.eval_every=3",
                          "logger.progress=false", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["final"]["sites"]) == set(SITES) and 0.5 < summary["final"]["test_auc"] <= 1
    missing = subprocess.run([sys.executable, "-m", "nordfl.sim.app", "task=study", f"hydra.run.dir={tmp_path / 'x'}"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode == 2 and "task.study: the study file is needed" in " ".join(missing.stderr.split())
