"""nordic5_los: the five sites' length of stay as a regression study. Every site's mapping checks
clean, FedAvg in the simulator comes within 5 % of the pooled-data least-squares RMSE, and the
per-site RMSE / MAE / R² it reports are those of the final model on each site's test rows."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.conf.schema import ConfigError
from nordfl.runtime.cli import main
from nordfl.sim import Simulator
from nordfl.sim.metrics_log import evaluation_row
from nordfl.tasks import RegressionMetrics, make_task
from nordfl.tasks.nordic5 import LOS_FOLDER, SITES, generate, write_nordic5
from nordfl.tasks.study import load_study
from nordfl.tasks.study_data import load_sites

ROUNDS, CLIENT_LR, EPOCHS, BATCH = 10, 0.05, 1, 32


@pytest.fixture(scope="module")
def nordic5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nordic5")
    write_nordic5(folder, seed=0)
    return folder


def test_every_site_checks_clean_and_maps_the_generated_length_of_stay(nordic5, capsys):
    los = nordic5 / LOS_FOLDER
    for site in SITES:
        assert main(["site", "check", "--study", str(los / "study.yaml"), "--mapping", str(los / f"{site}.yaml"),
                     "--data", str(nordic5 / f"{site}.csv")]) == 0
    sites = load_sites(load_study(los / "study.yaml"), los)  # the mappings read ../<site>.csv
    truth = generate(seed=0)
    for site, values in sites.items():
        np.testing.assert_allclose(values["los"], truth[site]["los"], atol=0.05 + 1e-9)  # exported to 0.1 day
    assert "nothing was sent" in capsys.readouterr().out


def test_both_studies_mappings_may_share_one_folder(nordic5, tmp_path):
    for site in SITES:
        shutil.copy(nordic5 / f"{site}.csv", tmp_path)
        shutil.copy(nordic5 / f"{site}.yaml", tmp_path)
        text = (nordic5 / LOS_FOLDER / f"{site}.yaml").read_text(encoding="utf-8").replace(f"../{site}.csv", f"{site}.csv")
        (tmp_path / f"{site}_los.yaml").write_text(text, encoding="utf-8")
    binary = load_sites(load_study(nordic5 / "study.yaml"), tmp_path)
    los = load_sites(load_study(nordic5 / LOS_FOLDER / "study.yaml"), tmp_path)
    assert set(binary) == set(los) == set(SITES)
    assert "event" in binary["Oslo"] and "los" not in binary["Oslo"] and "los" in los["Oslo"] and "event" not in los["Oslo"]


def test_nordic5_los_is_shipped_beside_nordic5_in_the_cache_even_one_written_before_it(tmp_path, monkeypatch):
    from nordfl.tasks import catalogue

    monkeypatch.setenv("NORDFL_CACHE", str(tmp_path))
    files = catalogue.locate("nordic5_los")
    assert files.study == tmp_path / "studies" / "nordic5-seed0" / LOS_FOLDER / "study.yaml"
    assert load_study(files.study).task == "regression" and set(load_sites(load_study(files.study), files.sites)) == set(SITES)
    shutil.rmtree(files.sites)  # a cache folder from before nordic5_los: the study is added, nordic5's files are kept
    binary = catalogue.locate("nordic5").study
    written = binary.stat().st_mtime_ns
    assert catalogue.locate("nordic5_los") == files and files.study.is_file() and binary.stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["nordic5-seed0"]  # no temporary folder left behind


def _numpy_metrics(params, x, y):
    prediction = x.astype(np.float64) @ np.asarray(params["linear"]["kernel"], np.float64)[:, 0] + float(params["linear"]["bias"][0])
    residual = prediction - y
    mse = np.mean(residual**2)
    return {"loss": mse, "rmse": np.sqrt(mse), "mae": np.mean(np.abs(residual)),
            "r2": 1 - np.sum(residual**2) / np.sum((y - y.mean()) ** 2)}


def test_fedavg_reaches_the_pooled_least_squares_rmse_and_reports_every_site(nordic5):
    task = make_task("study", study=str(nordic5 / LOS_FOLDER / "study.yaml"), sites=str(nordic5 / LOS_FOLDER), seed=0)
    clients = task.data.clients
    assert task.data.num_classes == 1 and all(c.train.y.dtype == np.float32 for c in clients)
    # The pooled-data reference: ordinary least squares with an intercept on every site's training rows.
    x = np.concatenate([c.train.x for c in clients]).astype(np.float64)
    y = np.concatenate([c.train.y for c in clients]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(y))], y, rcond=None)
    test = task.data.pooled_test()
    pooled_rmse = float(np.sqrt(np.mean((np.c_[test.x, np.ones(len(test.y))] @ coef - test.y) ** 2)))

    algorithm = make_algorithm("fedavg", task.loss_fn, client_lr=CLIENT_LR, num_epochs=EPOCHS, batch_size=BATCH)
    sim = Simulator(algorithm, task, seed=0)
    state = sim.init(task.model.init_params)
    for _ in range(ROUNDS):
        state, _ = sim.run_round(state)
    params = state.server.params
    evaluation = sim.evaluate(params)
    federated_rmse = float(evaluation.pooled.rmse)
    print(f"nordic5_los: FedAvg {ROUNDS} rounds, client_lr {CLIENT_LR}, {EPOCHS} epoch(s) of batch {BATCH}: pooled test RMSE "
          f"{federated_rmse:.4f} days; pooled-data OLS {pooled_rmse:.4f} days (ratio {federated_rmse / pooled_rmse:.4f})")
    assert isinstance(evaluation.pooled, RegressionMetrics)
    assert federated_rmse <= 1.05 * pooled_rmse, (federated_rmse, pooled_rmse)

    row = evaluation_row(evaluation, [c.name for c in clients])
    np.testing.assert_allclose(row["test_rmse"], _numpy_metrics(params, test.x, test.y.astype(np.float64))["rmse"], rtol=1e-4)
    for client in clients:
        want = _numpy_metrics(params, client.test.x, client.test.y.astype(np.float64))
        got = row["sites"][client.name]
        assert set(got) == {"loss", "rmse", "mae", "r2"}
        for metric, value in want.items():
            np.testing.assert_allclose(got[metric], value, rtol=1e-4, atol=1e-5, err_msg=f"{client.name} {metric}")


@pytest.mark.slow
def test_nordfl_sim_trains_the_regression_study_and_reports_rmse_mae_r2(nordic5, tmp_path):
    los = nordic5 / LOS_FOLDER
    out = subprocess.run([sys.executable, "-m", "nordfl.sim.app", "task=study", f"task.study={los / 'study.yaml'}",
                          f"task.sites={los}", "algorithm=scaffold", "sim.rounds=3", "sim.eval_every=3", "sim.straggler_fraction=0.4",
                          "algorithm.num_epochs=2", "logger.progress=false", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(column in out.stdout for column in ("RMSE", "MAE", "R²")) and "accuracy" not in out.stdout
    final = json.loads((tmp_path / "summary.json").read_text())["final"]
    assert {"test_rmse", "test_mae", "test_r2"} <= set(final) and "test_accuracy" not in final
    assert set(final["sites"]) == set(SITES) and all(set(m) == {"loss", "rmse", "mae", "r2"} for m in final["sites"].values())
    assert 0 < final["test_rmse"] < 5


def test_label_skew_partitions_and_suites_refuse_a_regression_study_before_training(nordic5, tmp_path):
    from hydra import compose, initialize_config_module

    from nordfl.sim.config import build
    from nordfl.sim.suite import compose_run, run_suite

    los = nordic5 / LOS_FOLDER
    study = [f"task.study={los / 'study.yaml'}", f"task.sites={los}"]
    with pytest.raises(ConfigError, match="partition.name: dirichlet deals out class labels, but task nordic5_los"):
        build(compose_run(["task=study", *study, "partition=dirichlet", "partition.num_clients=3"]))
    with initialize_config_module("nordfl.conf", version_base=None):
        bench = compose("bench", overrides=["logger.progress=false", "suite=quick", "only=[fedavg]", "seeds=[0]"])
    bench.suite.common = ["task=study", *study, "sim.rounds=2"]
    with pytest.raises(ConfigError, match="task.name: must be a classification task: suites rank by test accuracy"):
        run_suite(bench, tmp_path)
    assert not (tmp_path / "suite.json").exists()
