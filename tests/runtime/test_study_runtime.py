"""A study defined outside the package runs over mTLS: each site checks its own files, the Table 1 job
releases the suppressed table and the federated scaling, a FedAvg job trains with it, and the simulator
on the same files gives the same model and per-site metrics."""

import csv
import io
import json
import socket

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from nordfl.runtime import tls
from nordfl.runtime.cli import main
from nordfl.runtime.site import SiteAgent, SiteRefused
from nordfl.runtime.site_data import load_study_records
from nordfl.sim.config import build, register
from nordfl.sim.engine import Simulator
from nordfl.tasks.describe import summarise, table_one
from nordfl.tasks.mapping import MappingError
from nordfl.tasks.nordic5 import SITES, write_nordic5
from nordfl.tasks.study import load_study
from nordfl.tasks.study_data import load_sites
from tests.runtime.helpers import run_sites, start_federation

ROUNDS = 3


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory):
    """Five hospitals' exports in their own formats, their mapping files and the study file: nothing of the package."""
    folder = tmp_path_factory.mktemp("consortium")
    write_nordic5(folder, seed=0)
    return folder


def _agents(tmp, federation, folder, port, state):
    return [SiteAgent(site, f"localhost:{port}", load_study_records(folder / "study.yaml", folder / f"{site}.yaml"),
                      tmp / state / site, tls.channel_credentials(federation / "sites" / site), log=lambda m: None)
            for site in SITES]


def _simulator(folder, overrides):
    register()
    with initialize_config_module("nordfl.conf", version_base=None):
        cfg = compose("config", overrides=[f"task.study={folder / 'study.yaml'}", f"task.sites={folder}", *overrides])
    experiment = build(cfg)
    sim = Simulator(experiment.algorithm, experiment.task, experiment.options, seed=cfg.seed, aggregate=experiment.aggregate)
    return sim, experiment


@pytest.mark.slow
def test_a_study_from_outside_the_package_runs_its_table_one_and_training_jobs_as_the_simulator_does(tmp_path, study_folder):
    folder = study_folder
    for site in SITES:  # each hospital checks its own files first; nothing connects
        assert main(["site", "check", "--study", str(folder / "study.yaml"), "--mapping", str(folder / f"{site}.yaml")]) == 0
    federation = tls.provision(tmp_path / "federation", SITES)
    task = ["task=study", f"task.study={folder / 'study.yaml'}", f"task.sites={folder}", "seed=2"]

    # The Table 1 job.
    describe, port, driver = start_federation(tmp_path, federation, [*task, "runtime.job=describe"], grace=20.0)
    results, errors = run_sites(_agents(tmp_path, federation, folder, port, "describe"))
    driver.join(timeout=60)
    assert not errors and set(results) == set(SITES)
    released = tmp_path / "coordinator"
    statistics = json.loads((released / "statistics.json").read_text())
    study = load_study(folder / "study.yaml")
    assert statistics["study_sha256"] == study.sha256 and statistics["sites"] == sorted(SITES)
    # The released pooled figures equal a pooled NumPy computation over the sites' mapped rows.
    pooled_rows = load_sites(study, folder)
    table = {(row["variable"], row["statistic"]): row for row in csv.DictReader(io.StringIO((released / "table1.csv").read_text()))}
    chol = np.concatenate([rows["chol"] for rows in pooled_rows.values()])
    assert int(table["chol", "n"]["pooled"]) == np.sum(~np.isnan(chol))
    np.testing.assert_allclose(float(table["chol", "mean"]["pooled"]), np.nanmean(chol), rtol=1e-12)
    np.testing.assert_allclose(float(table["chol", "sd"]["pooled"]), np.nanstd(chol, ddof=1), rtol=1e-9)
    sexes = np.concatenate([rows["sex"] for rows in pooled_rows.values()])
    assert int(table["sex", "male"]["pooled"]) == np.sum(sexes == 1)
    assert float(table["age", "min"]["Oslo"]) == np.min(pooled_rows["Oslo"]["age"])
    # A small count is withheld, at its site and by complementary suppression: no released margin has one hidden cell.
    hidden = {(key, site) for key, row in table.items() for site in SITES if row[site] in (f"<{study.min_cell}", "withheld")}
    assert hidden and all(len([k for k in hidden if k[0][0] == v and k[1] == s]) != 1 for v, _ in table for s in SITES)
    assert f"{np.nanmean(chol):.4g}" in (released / "table1.md").read_text()
    # The same table, to the last digit, as the simulator writes from the same files.
    simulated = table_one(study, {site: summarise(study, rows) for site, rows in sorted(pooled_rows.items())})
    assert (released / "table1.csv").read_text() == simulated.csv()
    # A site's audit log holds exactly what it sent, and the coordinator's log the study hash.
    site_log = [json.loads(line) for line in (tmp_path / "describe" / "Oslo" / "audit.jsonl").read_text().splitlines()]
    sent = [e for e in site_log if e["event"] == "summary_sent"]
    assert len(sent) == 1 and sent[0]["summary"]["all"]["age"][0] == summarise(study, pooled_rows["Oslo"])["age"].count
    coordinator_log = (released / "audit.jsonl").read_text()
    assert study.sha256 in coordinator_log and "table_one_released" in coordinator_log

    # The training job, scaled with the Table 1 job's statistics.
    training = [*task, "runtime.job=train", f"runtime.statistics={released / 'statistics.json'}", f"runtime.rounds={ROUNDS}"]
    (tmp_path / "train").mkdir()
    coordinator, port, driver = start_federation(tmp_path / "train", federation, training)
    results, errors = run_sites(_agents(tmp_path, federation, folder, port, "sites"))
    driver.join(timeout=120)
    assert not errors and set(results) == set(SITES)
    assert coordinator.round == ROUNDS

    sim, experiment = _simulator(folder, ["task=study", "seed=2", f"sim.rounds={ROUNDS}"])
    state = sim.init(experiment.task.model.init_params)
    for _ in range(ROUNDS):
        state, _ = sim.run_round(state)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                           coordinator.server, state.server)
    evaluation = sim.evaluate(state.server.params)
    names = [c.name for c in experiment.task.data.clients]
    for i, site in enumerate(names):
        final = coordinator.final_metrics[site]
        np.testing.assert_allclose(final["accuracy"], evaluation.sites.accuracy[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final["loss"], evaluation.sites.loss[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(final["auc"], evaluation.sites.auc[i], rtol=1e-5, atol=1e-6)


def test_a_site_refuses_a_job_for_another_version_of_its_study(tmp_path, study_folder):
    """The job's study must hash as the site's own file: a changed range at the coordinator is refused."""
    from nordfl.runtime.config import Job

    records = load_study_records(study_folder / "study.yaml", study_folder / "Oslo.yaml")
    agent = SiteAgent("Oslo", "localhost:1", records, tmp_path / "Oslo", None, log=lambda m: None)
    other = records.study.canonical()
    other["variables"][0]["range"] = [0.0, 130.0]
    job = Job(0, ("Oslo",), 1, {"name": "fedavg"}, {"name": "study"}, kind="describe", study=other)
    with pytest.raises(SiteRefused, match="this site's study file is nordic5 sha256"):
        agent._check_study("run", job)
    assert "study_refused" in (tmp_path / "Oslo" / "audit.jsonl").read_text()


FAULTS = {
    "unknown local code": ("Oslo.csv", lambda text: _replace_cell(text, 1, 1, "X"), "'X' is not a code of sex"),
    "wrong unit": ("Uppsala.yaml", lambda text: text.replace("unit: mg/dL", "unit: mg/L"), "no conversion from mg/L to mmol/L"),
    "missing column": ("Oslo.csv", lambda text: text.replace("kolesterol", "chol_total", 1), "lacks column 'kolesterol'"),
    "duplicate column": ("Oslo.csv", lambda text: text.replace("blodtrykk", "alder", 1), "column 'alder' appears more than once"),
    "value outside float32": ("Oslo.csv", lambda text: _replace_cell(text, 1, 4, "1e300"), "beyond what float32 holds"),
    "text in a numeric column": ("Oslo.csv", lambda text: _replace_cell(text, 1, 4, "high"), "'high' is not a number"),
    "too few rows": ("Oslo.csv", lambda text: "\n".join(text.splitlines()[:6]) + "\n", "needs at least min_rows"),
}


def _replace_cell(text: str, row: int, column: int, value: str) -> str:
    lines = text.splitlines()
    cells = lines[row].split(",")
    cells[column] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_mapping_fault_exits_2_before_any_connection(tmp_path, study_folder, capsys, fault):
    """``nordfl site`` checks every row before it dials out: a listener sees no connection."""
    import shutil

    folder = tmp_path / "site"
    shutil.copytree(study_folder, folder)
    name, change, message = FAULTS[fault]
    (folder / name).write_text(change((folder / name).read_text(encoding="utf-8")), encoding="utf-8")
    site = name.split(".")[0]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        code = main(["site", "--name", site, "--coordinator", f"127.0.0.1:{listener.getsockname()[1]}", "--insecure",
                     "--state", str(tmp_path / "state"), "--study", str(folder / "study.yaml"),
                     "--mapping", str(folder / f"{site}.yaml")])
        with pytest.raises(socket.timeout):
            listener.accept()
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "state" / "audit.jsonl").exists()  # nothing was started, nothing recorded as sent


def test_a_mapping_error_names_file_row_column_and_value(study_folder, tmp_path):
    import shutil

    folder = tmp_path / "site"
    shutil.copytree(study_folder, folder)
    (folder / "Oslo.csv").write_text(_replace_cell((folder / "Oslo.csv").read_text(), 3, 3, "high"))
    with pytest.raises(MappingError, match=r"Oslo.csv, row 3, column kolesterol: 'high' is not a number \(chol\)"):
        load_study_records(folder / "study.yaml", folder / "Oslo.yaml")


@pytest.mark.slow
def test_a_regression_study_trains_across_sites_as_in_the_simulator(tmp_path, study_folder):
    """nordic5_los (length of stay, MSE): the sites' final RMSE, MAE and R² equal the simulator's."""
    from nordfl.tasks.study_data import pooled_summary, scaling, split_site

    mappings = study_folder / "los"  # the regression study's file and mappings, reading the same exports
    study_file = mappings / "study.yaml"
    study = load_study(study_file)
    assert study.task == "regression"
    # The scaling a Table 1 job would release: the pooled training rows' means, SDs and modes.
    sites = load_sites(study, mappings)
    trains = [split_site(study, rows, seed=0, test_fraction=0.25)[0] for rows in sites.values()]
    shared = scaling(study, pooled_summary(study, [summarise(study, t) for t in trains]))
    (tmp_path / "statistics.json").write_text(json.dumps({"study_sha256": study.sha256, "data_seed": 0, "test_fraction": 0.25,
                                                          "scaling": shared.as_json()}))
    federation = tls.provision(tmp_path / "federation", SITES)
    overrides = ["task=study", f"task.study={study_file}", f"task.sites={mappings}", f"runtime.rounds={ROUNDS}",
                 f"runtime.statistics={tmp_path / 'statistics.json'}"]
    coordinator, port, driver = start_federation(tmp_path, federation, overrides)
    agents = [SiteAgent(site, f"localhost:{port}", load_study_records(study_file, mappings / f"{site}.yaml"),
                        tmp_path / "sites" / site, tls.channel_credentials(federation / "sites" / site), log=lambda m: None)
              for site in SITES]
    results, errors = run_sites(agents)
    driver.join(timeout=120)
    assert not errors and set(results) == set(SITES)

    sim, experiment = _simulator(mappings, ["task=study", f"task.study={study_file}", f"sim.rounds={ROUNDS}"])
    state = sim.init(experiment.task.model.init_params)
    for _ in range(ROUNDS):
        state, _ = sim.run_round(state)
    evaluation = sim.evaluate(state.server.params)
    for i, site in enumerate(c.name for c in experiment.task.data.clients):
        final = coordinator.final_metrics[site]
        assert set(final) == {"loss", "rmse", "mae", "r2"}
        for key in final:
            np.testing.assert_allclose(final[key], getattr(evaluation.sites, key)[i], rtol=1e-4, atol=1e-6)


def test_the_table_one_job_rejects_a_summary_that_is_not_a_summary(tmp_path, study_folder):
    """Wrong tensors, negative or fractional counts and a second summary are refused, and the job goes on."""
    from nordfl.runtime import wire
    from nordfl.runtime.config import Job
    from nordfl.runtime.coordinator import Limits
    from nordfl.runtime.proto import federation_pb2 as pb
    from nordfl.runtime.table_one import TableOneJob

    records = {site: load_study_records(study_folder / "study.yaml", study_folder / f"{site}.yaml") for site in SITES}
    study = records["Oslo"].study
    job = Job(0, tuple(sorted(SITES)), 1, {"name": "fedavg"}, {"name": "study", "data_seed": 0, "test_fraction": 0.25},
              kind="describe", study=study.canonical())
    limits = Limits(2, 3, 60.0, 1, None, 1e6, 1e7, 10.0, 300.0, 2, 1 << 20, 1 << 24, 1)
    server = TableOneJob(job, limits, tmp_path, admitted=lambda identity: (True, ""), log=lambda m: None, insecure=True)

    def upload(site, arrays):
        specs, payload = wire.encode(arrays)
        head = pb.UpdateHeader(run_id=server.run_id, round=0, site=site, manifest=wire.manifest_to_proto(specs, payload))
        return server.submit(None, iter([pb.UpdateChunk(header=head), pb.UpdateChunk(data=payload)]))

    good = records["Oslo"].describe(job)
    negative = {part: dict(tree) for part, tree in good.items()}
    negative["all"]["sex"] = negative["all"]["sex"] * -1
    fractional = {part: dict(tree) for part, tree in good.items()}
    fractional["train"]["age"] = fractional["train"]["age"] + np.array([0.5, 0, 0, 0, 0, 0])
    missing_variable = {part: {k: v for k, v in tree.items() if k != "sbp"} for part, tree in good.items()}
    for bad, reason in ((negative, "counts must be whole numbers >= 0"), (fractional, "counts must be whole numbers >= 0"),
                        (missing_variable, "")):
        reply = upload("Oslo", bad)
        assert not reply.accepted and reason in reply.reason
    assert upload("Oslo", good).accepted
    reply = upload("Oslo", good)
    assert not reply.accepted and "duplicate summary from Oslo" in reply.reason
    assert not server.finished  # four sites still to answer
    for site in SITES:
        if site != "Oslo":
            assert upload(site, records[site].describe(job)).accepted
    assert server.finished and (tmp_path / "statistics.json").is_file()


def test_a_dry_run_of_the_table_one_job_shows_every_number_that_would_leave(study_folder, capsys):
    folder = study_folder
    code = main(["site", "--dry-run", "--name", "Tartu", "--study", str(folder / "study.yaml"), "--mapping",
                 str(folder / "Tartu.yaml"), f"study={folder / 'study.yaml'}", "runtime.job=describe"])
    out = capsys.readouterr().out
    assert code == 0 and "NOTHING was sent" in out
    rows = load_study_records(folder / "study.yaml", folder / "Tartu.yaml").values
    assert f"age: count 200, total {np.sum(rows['age']):.12g}" in out
    assert f"smoker: no {np.sum(rows['smoker'] == 0)}, yes {np.sum(rows['smoker'] == 1)}, missing {np.sum(rows['smoker'] < 0)}" in out
