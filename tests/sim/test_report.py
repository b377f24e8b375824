"""nordfl-report on fabricated simulator run folders: grouping, averages, worst site, files, errors."""

import csv
import json

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from nordfl.sim import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ("Cleveland", "Hungary", "Switzerland")
FEDAVG = "algorithm=fedavg"
FEDPROX = "algorithm=fedprox partition.alpha=0.1"
SCAFFOLD = "algorithm=scaffold"


def make_rows(seed, rounds=4, eval_every=2, auc=False, last_sites=None):
    """Random but reproducible metric rows; evaluation rows every ``eval_every`` rounds and at the end."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(1, rounds + 1):
        row = {"round": r, "client_loss": float(rng.uniform(0.2, 1.0)), "num_clients": 4, "elapsed_s": 0.1 * r}
        if r % eval_every == 0 or r == rounds:
            sites = {name: float(rng.uniform(0.5, 0.9)) for name in SITES}
            row |= {
                "train_loss": float(rng.uniform(0.2, 1.0)),
                "test_loss": float(rng.uniform(0.2, 1.0)),
                "test_accuracy": float(rng.uniform(0.5, 0.9)),
                "test_auc": float(rng.uniform(0.5, 0.9)) if auc else None,
                "sites": {name: {"loss": 0.5, "accuracy": acc, "auc": None} for name, acc in sites.items()},
            }
        rows.append(row)
    if last_sites is not None:
        rows[-1]["sites"] = {name: {"loss": 0.5, "accuracy": acc, "auc": None} for name, acc in last_sites.items()}
    return rows


def write_run(folder, rows, *, seed, algorithm, overrides=None, finished=True, hydra=True, planned=None):
    """A run folder laid out as the simulator (under Hydra) writes it."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if hydra:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump(overrides if overrides is not None else [f"seed={seed}"])
        )
        config = {"seed": seed, "algorithm": {"name": algorithm}, "task": {"name": "heart"}}
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if finished:
        summary = {"algorithm": algorithm, "task": "heart", "seed": seed, "rounds": planned or len(rows)}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A Hydra multirun: 2 configurations x 2 seeds, plus one single-seed run nested deeper. Returns the
    sweep folder and, per expected label, the rows of its runs in seed order."""
    root = tmp_path_factory.mktemp("sweep")
    # fedavg's worst single site value is Hungary (0.50), but on average over seeds Switzerland (0.61) is worst;
    # the earlier evaluation rounds have a worse Cleveland, which must be ignored.
    fedavg_sites = [
        {"Cleveland": 0.9, "Hungary": 0.50, "Switzerland": 0.60},
        {"Cleveland": 0.9, "Hungary": 0.80, "Switzerland": 0.62},
    ]
    rows = {
        FEDAVG: [make_rows(10 + s, last_sites=fedavg_sites[s]) for s in (0, 1)],
        FEDPROX: [make_rows(20 + s) for s in (0, 1)],
        SCAFFOLD: [make_rows(30)],
    }
    for s in (0, 1):
        write_run(root / str(s), rows[FEDAVG][s], seed=s, algorithm="fedavg", overrides=["algorithm=fedavg", f"seed={s}"])
        overrides = [f"seed={s}", "partition.alpha=0.1", "algorithm=fedprox"]  # unsorted on purpose
        write_run(root / str(2 + s), rows[FEDPROX][s], seed=s, algorithm="fedprox", overrides=overrides)
    write_run(root / "4" / "nested", rows[SCAFFOLD][0], seed=7, algorithm="scaffold", overrides=[])
    return root, rows


@pytest.fixture(scope="module")
def summaries(sweep):
    return {s.label: s for s in report.summarise([sweep[0]])}


@pytest.fixture(scope="module")
def written(sweep, summaries, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return out, report.write_report(list(summaries.values()), out)


def test_runs_group_by_overrides_without_seed(summaries):
    assert {label: s.seeds for label, s in summaries.items()} == {FEDAVG: (0, 1), FEDPROX: (0, 1), SCAFFOLD: (7,)}
    assert all(s.rounds == (4,) * len(s.seeds) and s.finished for s in summaries.values())


def test_a_sweep_passed_with_one_of_its_runs_counts_that_run_once(sweep):
    root, _ = sweep
    by_label = {s.label: s.seeds for s in report.summarise([root, root / "0"])}
    assert by_label[FEDAVG] == (0, 1)


@pytest.mark.parametrize("metric", ["train_loss", "test_loss", "test_accuracy"])
def test_final_metrics_are_mean_and_sample_std_of_last_evaluation(sweep, summaries, metric):
    for label, runs in sweep[1].items():
        values = [rows[-1][metric] for rows in runs]
        stat = summaries[label].final[metric]
        assert stat.mean == pytest.approx(np.mean(values))
        if len(values) >= 2:
            assert stat.std == pytest.approx(np.std(values, ddof=1))
        else:
            assert np.isnan(stat.std)


def test_curves_average_each_round_over_seeds(sweep, summaries):
    runs = sweep[1][FEDPROX]
    client = summaries[FEDPROX].curves["client_loss"]
    per_round = np.array([[row["client_loss"] for row in rows] for rows in runs])
    np.testing.assert_array_equal(client.rounds, [1, 2, 3, 4])
    np.testing.assert_allclose(client.mean, per_round.mean(axis=0))
    np.testing.assert_allclose(client.std, per_round.std(axis=0, ddof=1))
    accuracy = summaries[FEDPROX].curves["test_accuracy"]
    np.testing.assert_array_equal(accuracy.rounds, [2, 4])  # evaluation rounds only
    np.testing.assert_allclose(accuracy.mean, [np.mean([rows[r - 1]["test_accuracy"] for rows in runs]) for r in (2, 4)])


def test_worst_site_has_lowest_final_accuracy_averaged_over_seeds(summaries):
    site, accuracy = summaries[FEDAVG].worst_site
    assert site == "Switzerland"
    assert accuracy == pytest.approx(0.61)


def test_all_null_auc_is_left_out_everywhere(summaries, written):
    out, paths = written
    assert all(np.isnan(s.final["test_auc"].mean) for s in summaries.values())
    assert report.table_metrics(list(summaries.values())) == ["train_loss", "test_loss", "test_accuracy"]
    assert "auc" not in (out / "report.md").read_text()
    assert not (out / "test_auc.png").exists()
    assert sorted(p.name for p in paths) == sorted(
        ["report.md", "report.csv", "train_loss.png", "test_loss.png", "test_accuracy.png", "client_loss.png"]
    )


def test_markdown_holds_the_table_numbers(summaries, written):
    text = (written[0] / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| configuration | seeds | rounds | train loss | test loss | test accuracy | worst site |"
    fedavg = next(line for line in lines if line.startswith(f"| {FEDAVG} |"))
    stat = summaries[FEDAVG].final["test_loss"]
    assert f"| {stat.mean:.4f} ± {stat.std:.4f} |" in fedavg
    assert fedavg.endswith("| Switzerland (0.6100) |")
    scaffold = next(line for line in lines if line.startswith(f"| {SCAFFOLD} |"))
    assert "±" not in scaffold and f"| {summaries[SCAFFOLD].final['test_loss'].mean:.4f} |" in scaffold


def test_csv_holds_full_precision_numbers(sweep, written):
    with (written[0] / "report.csv").open() as file:
        reader = csv.DictReader(file)
        rows = {row["configuration"]: row for row in reader}
    assert reader.fieldnames == [
        "configuration", "seeds", "rounds",
        "train_loss_mean", "train_loss_std", "test_loss_mean", "test_loss_std", "test_accuracy_mean", "test_accuracy_std",
        "worst_site", "worst_site_accuracy",
    ]  # fmt: skip
    accuracies = [rows_[-1]["test_accuracy"] for rows_ in sweep[1][FEDPROX]]
    assert float(rows[FEDPROX]["test_accuracy_mean"]) == pytest.approx(np.mean(accuracies), rel=1e-12)
    assert float(rows[FEDPROX]["test_accuracy_std"]) == pytest.approx(np.std(accuracies, ddof=1), rel=1e-12)
    assert (rows[FEDAVG]["seeds"], rows[FEDAVG]["rounds"], rows[FEDAVG]["worst_site"]) == ("2", "4", "Switzerland")
    assert rows[SCAFFOLD]["seeds"] == "1" and rows[SCAFFOLD]["test_loss_std"] == ""


def test_plots_are_real_pngs(written):
    out, _ = written
    for name in ("train_loss", "test_loss", "test_accuracy", "client_loss"):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 5_000  # axes, three lines and a legend, not an empty canvas
        pixels = imread(path)
        assert pixels.shape[:2] == (500, 800) and pixels.std() > 0


def test_auc_column_and_plot_appear_when_any_seed_has_auc(tmp_path):
    rows = [make_rows(1, auc=True), make_rows(2)]
    for seed in (0, 1):
        write_run(tmp_path / "runs" / str(seed), rows[seed], seed=seed, algorithm="fedavg")
    [summary] = report.summarise([tmp_path / "runs"])
    assert summary.label == "algorithm=fedavg"  # no overrides but the seed
    assert summary.final["test_auc"].mean == pytest.approx(rows[0][-1]["test_auc"])  # the null seed is skipped
    paths = report.write_report([summary], tmp_path / "out", metrics=("test_auc",))
    assert [p.name for p in paths] == ["report.md", "report.csv", "test_auc.png"]
    assert f"| {rows[0][-1]['test_auc']:.4f} |" in (tmp_path / "out" / "report.md").read_text()


def test_killed_run_is_marked_and_uses_its_last_evaluation(tmp_path):
    finished, killed = make_rows(1), make_rows(2)[:3]  # killed: evaluated at round 2, stopped after training round 3
    write_run(tmp_path / "0", finished, seed=0, algorithm="fedavg")
    write_run(tmp_path / "1", killed, seed=1, algorithm="fedavg", finished=False)
    [summary] = report.summarise([tmp_path])
    assert (summary.rounds, summary.finished) == ((4, 3), False)
    assert summary.final["test_loss"].mean == pytest.approx(np.mean([finished[3]["test_loss"], killed[1]["test_loss"]]))
    assert np.isnan(summary.curves["client_loss"].std[-1])  # round 4: one seed only
    report.write_report([summary], tmp_path / "out", metrics=("test_loss",))
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| 3-4* |" in markdown and "unfinished" in markdown


def test_run_without_hydra_is_labelled_from_summary(tmp_path):
    write_run(tmp_path / "run", make_rows(3), seed=5, algorithm="fedyogi", hydra=False)
    [summary] = report.summarise([tmp_path / "run"])
    assert (summary.label, summary.seeds) == ("algorithm=fedyogi task=heart", (5,))


def test_main_prints_table_and_writes_to_out(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert report.main([str(sweep[0]), "--out", str(tmp_path / "out"), "--metrics", "test_accuracy,client_loss"]) == 0
    stdout = capsys.readouterr().out
    assert all(label in stdout for label in (FEDAVG, FEDPROX, SCAFFOLD)) and "Switzerland (0.6100)" in stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "client_loss.png",
        "report.csv",
        "report.md",
        "test_accuracy.png",
    ]
    assert "test_loss_mean" not in (tmp_path / "out" / "report.csv").read_text()


def test_main_writes_into_first_folder_by_default(tmp_path):
    write_run(tmp_path / "run", make_rows(4), seed=0, algorithm="fedavg")
    assert report.main([str(tmp_path / "run"), "--metrics", "client_loss"]) == 0
    assert (tmp_path / "run" / "report.csv").is_file() and (tmp_path / "run" / "client_loss.png").is_file()


def test_unknown_metric_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path), "--metrics", "test_accuracy,test_acc"])
    assert exit_info.value.code == 2
    assert "got test_acc;" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_folder_exits_2_naming_it(tmp_path, capsys, make):
    folder = tmp_path / "runs"
    if make == "empty":
        (folder / "0").mkdir(parents=True)
    assert report.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and ("does not exist" if make == "missing" else "no run folder") in err
    assert "Traceback" not in err


def test_malformed_line_is_named_by_file_and_number(tmp_path, capsys):
    run = write_run(tmp_path / "run", make_rows(5), seed=0, algorithm="fedavg")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]  # a truncated third line
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert report.main([str(tmp_path)]) == 2
    assert f"{run / 'metrics.jsonl'}:3: not valid JSON" in capsys.readouterr().err


def test_row_without_round_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "client_loss": 0.5}\n{"client_loss": 0.4}\n')
    with pytest.raises(report.ReportError, match=r"metrics.jsonl:2: expected an integer 'round'"):
        report.read_metrics(path)


def test_same_configuration_and_seed_twice_is_refused(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name, make_rows(6), seed=3, algorithm="fedavg")
    with pytest.raises(report.ReportError, match="with seed 3; pass only one") as error:
        report.summarise([tmp_path])
    assert str(tmp_path / "a") in str(error.value) and str(tmp_path / "b") in str(error.value)


def test_labels_show_what_differs_and_ignore_resume_and_hydra_keys(tmp_path):
    common = ["sim.rounds=3", "logger.progress=false"]
    write_run(tmp_path / "a0", make_rows(0), seed=0, algorithm="fedavg", overrides=["algorithm=fedavg", "seed=0", *common])
    write_run(tmp_path / "a1", make_rows(1), seed=1, algorithm="fedavg",
              overrides=["algorithm=fedavg", "seed=1", "resume=true", "hydra.run.dir=x", *common])
    write_run(tmp_path / "b0", make_rows(2), seed=0, algorithm="scaffold", overrides=["algorithm=scaffold", "seed=0", *common])
    labels = {s.label: s.seeds for s in report.summarise([tmp_path])}
    assert labels == {"algorithm=fedavg": (0, 1), "algorithm=scaffold": (0,)}


def test_a_regression_run_reports_rmse_mae_r2_and_its_worst_site_by_highest_rmse(tmp_path):
    for seed, rmse in ((0, {"Cleveland": 1.0, "Hungary": 2.5, "Switzerland": 2.0}), (1, {"Cleveland": 1.2, "Hungary": 1.5, "Switzerland": 2.2})):
        row = {"round": 2, "client_loss": 3.0, "num_clients": 3, "train_loss": 3.1, "test_loss": 3.3, "test_rmse": 1.8 + seed,
               "test_mae": 1.5, "test_r2": 0.3,
               "sites": {name: {"loss": r * r, "rmse": r, "mae": 0.8 * r, "r2": 0.3} for name, r in rmse.items()}}
        write_run(tmp_path / f"run{seed}", [row], seed=seed, algorithm="fedavg")
    (summary,) = report.summarise([tmp_path])
    assert report.table_metrics([summary]) == ["train_loss", "test_loss", "test_rmse", "test_mae", "test_r2"]
    assert tuple(summary.final["test_rmse"]) == pytest.approx((2.3, np.std([1.8, 2.8], ddof=1)))
    assert summary.worst_metric == "rmse" and summary.worst_site == ("Switzerland", pytest.approx(2.1))
    report.write_report([summary], tmp_path / "out")
    assert "| test rmse | test mae | test r2 | worst site |" in (tmp_path / "out" / "report.md").read_text()
    assert "Switzerland (rmse 2.1000)" in (tmp_path / "out" / "report.md").read_text()
    with open(tmp_path / "out" / "report.csv") as f:
        (line,) = list(csv.DictReader(f))
    assert line["worst_site"] == "Switzerland" and float(line["worst_site_rmse"]) == pytest.approx(2.1)
    assert (tmp_path / "out" / "test_rmse.png").read_bytes()[:8] == PNG_SIGNATURE
