"""Comparison suites: the quick suite end to end (its leaderboard checked), reruns give the same
numbers, and the suite config, tuning choice and ranking logic on small hand-made inputs."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from scipy import stats

from nordfl.conf.schema import ConfigError
from nordfl.sim.leaderboard import LEADERBOARD_CSV, LEADERBOARD_MD, load_leaderboard, write_leaderboard
from nordfl.sim.suite import choose_hyperparameters, run_suite
from nordfl.sim.suite_config import grid_edges, load_suite, plan_cells, settings
from nordfl.tasks import make_task

QUICK = ("fedavg", "scaffold", "fedadam")  # of the quick suite's 7: one per family (plain, control variates, adaptive server)


def bench_config(*overrides):
    with initialize_config_module("nordfl.conf", version_base=None):
        return compose("bench", overrides=["logger.progress=false", *overrides])


def read_csv(path):
    with open(path) as f:
        return {(row["setting"], row["algorithm"]): row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite, as first-time users run it, cut to three of its algorithms and both baselines (CI time)."""
    folder = tmp_path_factory.mktemp("quick")
    manifest = run_suite(bench_config("suite=quick", f"only=[{','.join(QUICK)},pooled,local]"), folder)
    write_leaderboard(folder)
    return folder, manifest


@pytest.mark.slow
def test_quick_suite_leaderboard_has_each_algorithm_with_mean_and_std_over_seeds(quick):
    folder, manifest = quick
    rows = read_csv(folder / LEADERBOARD_CSV)
    assert {name for _, name in rows} == {*QUICK, "pooled", "local"}
    for (setting, name), row in rows.items():
        assert int(row["seeds"]) == 5, name
        for metric in ("test_accuracy", "test_loss", "worst_site_accuracy"):
            mean, std = float(row[f"{metric}_mean"]), float(row[f"{metric}_std"])
            assert math.isfinite(mean) and math.isfinite(std) and std >= 0, (name, metric)
        assert (row["rank"] == "") == (name in ("pooled", "local"))
    assert sorted(int(rows[("split=natural", a)]["rank"]) for a in QUICK)[0] == 1
    # The centralised ceiling beats each hospital alone on the federation's patients.
    pooled, local = rows[("split=natural", "pooled")], rows[("split=natural", "local")]
    assert float(pooled["test_accuracy_mean"]) >= float(local["test_accuracy_mean"])
    markdown = (folder / LEADERBOARD_MD).read_text()
    for name in (*QUICK, "pooled", "local"):
        assert f"| {name} | 5 |" in markdown
    assert (folder / "curves" / "split=natural.png").stat().st_size > 10_000  # "data=(1,1)" would be data=_1_1
    # What each site gets: the global model's own per-site scores; for the local baseline, each site's own model only.
    final = json.loads((folder / "split=natural" / "fedavg" / "seed_0" / "summary.json").read_text())["final"]
    assert final["own_site"] == final["sites"]
    local = json.loads((folder / "split=natural" / "local" / "seed_0" / "summary.json").read_text())["final"]
    assert set(local["own_site"]) == set(local["sites"]) and local["own_site"] != local["sites"]
    assert "### What each site gets (test rows)" in markdown
    # Traceable: the manifest records versions, the machine and wall times.
    assert manifest["versions"]["jax"] and manifest["machine"]["cpu_count"] >= 1
    assert manifest["wall_s"] > 0 and len(manifest["cells"]) == len(QUICK) + 2


@pytest.mark.slow
def test_a_suite_run_twice_with_the_same_seeds_gives_identical_numbers(quick, tmp_path):
    folder, _ = quick
    again = tmp_path / "again"
    run_suite(bench_config("suite=quick", "only=[scaffold,pooled]"), again)
    write_leaderboard(again)
    first, second = read_csv(folder / LEADERBOARD_CSV), read_csv(again / LEADERBOARD_CSV)
    assert set(second) == {("split=natural", "scaffold"), ("split=natural", "pooled")}
    relative = ("rank", "first_minus_this_mean", "first_minus_this_ci_low", "first_minus_this_ci_high", "p_holm", "tied_with_first")
    for key, row in second.items():  # what depends on the other cells (rank, comparison with the first) aside
        assert {k: v for k, v in row.items() if k not in relative} == {k: v for k, v in first[key].items() if k not in relative}
    # Rerunning into a finished suite folder trains nothing: every cell is skipped.
    events = []
    run_suite(bench_config("suite=quick", "only=[scaffold,pooled]"), again, reporter=lambda event, **_: events.append(event))
    assert events.count("skip") == 2 and "cell" not in events


@pytest.mark.slow
def test_a_suite_run_as_parts_in_separate_jobs_writes_the_in_process_leaderboard(quick, tmp_path):
    """``nordfl-bench -m part=0/2,1/2 hydra/launcher=submitit_local``: two submitit jobs (processes of their own)
    train their shares of the cells into the sweep folder, then the leaderboard is assembled there, equal to
    the in-process run's."""
    import jax

    folder, _ = quick
    sweep = tmp_path / "sweep"
    # As many devices as this process trained on: the sum over devices is done in another order with another count.
    done = subprocess.run([sys.executable, "-m", "nordfl.sim.bench", "-m", "suite=quick", f"only=[{','.join(QUICK)},pooled,local]",
                           "part=0/2,1/2", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "logger.progress=false",
                           f"cpu_devices={jax.device_count()}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2, jobs  # one job (process) per part
    parts = [set(json.loads((sweep / f"suite.part-{i}-of-2.json").read_text())["cells"]) for i in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    manifest = json.loads((sweep / "suite.json").read_text())
    assert parts[0] | parts[1] == set(manifest["cells"]) == set(manifest["cell_order"])
    assert read_csv(sweep / LEADERBOARD_CSV) == read_csv(folder / LEADERBOARD_CSV)


def test_a_part_must_be_i_of_n():
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="part"):
            run_suite(bench_config("suite=quick", f"part='{bad}'"), None)


@pytest.mark.slow
def test_suite_runs_go_to_weights_and_biases_one_run_per_seed(tmp_path):
    run_suite(bench_config("suite=quick", "only=[pooled]", "seeds=[0,1]", "logger.wandb=true", "logger.mode=offline"), tmp_path)
    for seed in (0, 1):
        offline = list((tmp_path / "split=natural" / "pooled" / f"seed_{seed}" / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


SUITE = {
    "name": "toy", "seeds": [0, 1, 2], "target_accuracy": 0.8, "common": ["task=heart"],
    "axes": {"alpha": {"0": ["task.alpha=0"], "1": ["task.alpha=1"]}, "stragglers": {"0": [], "0.5": ["sim.straggler_fraction=0.5"]}},
    "algorithms": {"fedavg": ["algorithm=fedavg"], "fedprox": ["algorithm=fedprox"]},
    "baselines": {"pooled": ["algorithm=fedavg"]},
    "tuning": {"seeds": [0], "grid": {"all": {"algorithm.client_lr": [0.1, 0.3]}, "fedprox": {"algorithm.mu": [0.0, 1.0]}}},
    "tuned": {"alpha=1,stragglers=0.5": {"fedprox": ["algorithm.mu=1.0"]}},
}


def test_suite_settings_are_the_product_of_its_axes_and_tuned_values_reach_their_cells():
    suite = load_suite(OmegaConf.create(SUITE))
    assert list(settings(suite)) == ["alpha=0,stragglers=0", "alpha=0,stragglers=0.5", "alpha=1,stragglers=0", "alpha=1,stragglers=0.5"]
    cells = plan_cells(suite, "run")
    assert len(cells) == 4 * 3
    tuned = [c for c in cells if c.setting == "alpha=1,stragglers=0.5" and c.algorithm == "fedprox"][0]
    assert tuned.overrides == ("task=heart", "task.alpha=1", "sim.straggler_fraction=0.5", "algorithm=fedprox", "algorithm.mu=1.0")
    # Tuning expands each algorithm into its grid: fedavg and pooled 2 points, fedprox 2 x 2.
    tune = plan_cells(suite, "tune", only_settings=["alpha=0,stragglers=0"])
    assert all(c.overrides[-1] == "sim.eval_every=${sim.rounds}" for c in tune)
    assert sorted(c.algorithm for c in tune) == sorted([
        "fedavg@client_lr=0.1", "fedavg@client_lr=0.3", "pooled@client_lr=0.1", "pooled@client_lr=0.3",
        "fedprox@client_lr=0.1,mu=0.0", "fedprox@client_lr=0.1,mu=1.0", "fedprox@client_lr=0.3,mu=0.0", "fedprox@client_lr=0.3,mu=1.0",
    ])


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 0]}, "suite.seeds: must be a non-empty list of distinct integers, got [0, 0]"),
    ({"baselines": {"central": []}}, "suite.baselines: must be one of pooled, local, got 'central'"),
    ({"algorithms": {"fedavg": "algorithm=fedavg"}}, "suite.algorithms.fedavg: must be a list of override strings"),
    ({"tuned": {"alpha=2,stragglers=0": {}}}, "suite.tuned: must name settings as axis=value pairs of the suite's axes"),
    ({"tuning": {"fix": {"stragglers": "0.7"}}}, "suite.tuning.fix.stragglers: must name an axis and one of its values"),
    ({"target_accuracy": 1.5}, "suite.target_accuracy: must be in (0, 1], got 1.5"),
    ({"tuned": {"alpha=1": {"fedsgd": []}}}, "suite.tuned.alpha=1: must be one of the suite's algorithms/baselines"),
    ({"tuning": {"grid": {"fedsgd": {"algorithm.client_lr": [0.1]}}}}, "suite.tuning.grid: must be 'all' or one of"),
])
def test_bad_suite_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError) as error:
        load_suite(OmegaConf.create(SUITE | change))
    assert message in str(error.value)


def test_a_suite_refuses_differential_privacy_it_would_not_account(tmp_path):
    bench = bench_config("suite=quick", "only=[fedavg]", "seeds=[0,1]")
    bench.suite.common = [*bench.suite.common, "algorithm.dp.mode=sgd", "algorithm.dp.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match="algorithm.dp.mode: must be none in a comparison suite"):
        run_suite(bench, tmp_path)
    assert not (tmp_path / "suite.json").exists()  # refused before anything was written


@pytest.mark.parametrize("name", ["quick", "heart", "synthetic", "label_skew", "robustness", "personalisation"])
def test_every_shipped_suite_loads_and_plans_in_both_modes(name):
    from nordfl.sim.suite import compose_run, prepare

    for mode in ("run", "tune"):
        run = prepare(bench_config(f"suite={name}", f"mode={mode}"))
        assert len({c.setting for c in run.cells}) >= 1 and len(run.seeds) >= (5 if mode == "run" else 2)
        cfg = compose_run(run.cells[-1].overrides)  # its overrides compose into a simulator config
        assert cfg.sim.rounds >= 10


@pytest.mark.parametrize("name", ["synthetic", "label_skew"])
def test_a_split_per_seed_config_is_the_one_its_overrides_compose(name):
    """build_group composes a cell once and sets each later seed's seed and split option on a copy: the
    same config, and data, as composing them as overrides (synthetic varies task.split_seed, label_skew
    task.data_seed)."""
    from nordfl.conf.schema import build_task
    from nordfl.sim.suite import build_group, compose_cell, compose_run, prepare, splits_per_seed, with_values

    run = prepare(bench_config(f"suite={name}", "seeds=[3,7]"))
    cell, key = run.cells[-1], splits_per_seed(run)
    first = compose_cell(cell, run, (f"{key}=3",))
    derived = with_values(first, {"seed": 7, key: 7})
    composed = compose_run((*cell.overrides, f"{key}=7", "seed=7"))
    assert OmegaConf.to_container(derived, resolve=True) == OmegaConf.to_container(composed, resolve=True)
    assert OmegaConf.select(first, key) == 3 and first.seed == 3  # the copy left the first seed's config alone

    _, tasks, _ = build_group(cell, run, {})
    def arrays(data):
        return [a for c in data.clients for a in (c.train.x, c.train.y, c.test.x, c.test.y)]

    expected, got = build_task(composed).data, tasks[1].data
    assert [c.name for c in got.clients] == [c.name for c in expected.clients]
    for a, b in zip(arrays(got), arrays(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(arrays(tasks[0].data), arrays(got)))  # seed 3's differ


def test_unknown_algorithm_subset_is_refused():
    suite = load_suite(OmegaConf.create(SUITE))
    with pytest.raises(ConfigError, match=r"only: must be a subset of fedavg, fedprox, pooled, got \['fedsgd'\]"):
        plan_cells(suite, "run", only=["fedsgd"])


def _fake_suite(folder, mode, results, target=0.8, grid_points=None, fix=None):
    """A suite folder written by hand: results[(setting, algorithm)] = per-seed (accuracy, loss, accuracies per round)."""
    settings_ = list(dict.fromkeys(s for s, _ in results))
    manifest = {"suite": {"name": "toy", "target_accuracy": target, "common": [], "description": "", "tuning_fix": fix or {}},
                "mode": mode,
                "seeds": list(range(max(len(seeds) for seeds in results.values()))), "settings": settings_, "cell_order": [f"{s}/{a}" for s, a in results],
                "kinds": {a: ("pooled" if a == "pooled" else "federated") for _, a in results}, "grid_points": grid_points or {},
                "versions": {"jax": "x"}, "machine": {"platform": "p", "cpu_count": 2, "jax_backend": "cpu", "jax_devices": ["d"]},
                "wall_s": 1.0}
    (folder / "suite.json").write_text(json.dumps(manifest))
    for (setting, algorithm), seeds in results.items():
        for seed, (accuracy, loss, curve) in enumerate(seeds):
            run = folder / setting / algorithm / f"seed_{seed}"
            run.mkdir(parents=True)
            site_a = None if accuracy is None else accuracy - 0.1  # None: undefined (NaN), as summary.json writes it
            final = {"test_accuracy": accuracy, "test_loss": loss, "sites": {"a": {"accuracy": site_a}, "b": {"accuracy": accuracy}}}
            (run / "summary.json").write_text(json.dumps({"final": final}))
            rows = [{"round": r + 1, "client_loss": 1.0, "test_accuracy": a, "test_loss": loss} for r, a in enumerate(curve)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            (run / "config.yaml").write_text("partition:\n  name: natural\n")


def test_leaderboard_ranks_reports_rounds_to_target_and_worst_site(tmp_path):
    _fake_suite(tmp_path, "run", {
        ("split=a", "fedavg"): [(0.80, 0.5, [0.5, 0.8, 0.8]), (0.90, 0.4, [0.85, 0.9, 0.9])],
        ("split=a", "scaffold"): [(0.85, 0.5, [0.5, 0.6, 0.85]), (0.85, 0.5, [0.5, 0.6, 0.85])],
        ("split=a", "fedprox"): [(0.70, 0.6, [0.5, 0.6, 0.7]), (0.70, 0.6, [0.5, 0.6, 0.7])],
        ("split=a", "pooled"): [(0.95, 0.3, [0.95] * 3), (0.95, 0.3, [0.95] * 3)],
    })
    _, entries = load_leaderboard(tmp_path)
    by_name = {e.algorithm: e for e in entries["split=a"]}
    assert (by_name["fedavg"].rank, by_name["scaffold"].rank, by_name["fedprox"].rank, by_name["pooled"].rank) == (1, 1, 3, None)
    assert by_name["fedavg"].accuracy.mean == pytest.approx(0.85) and by_name["fedavg"].accuracy.std == pytest.approx(math.sqrt(0.005))
    assert by_name["fedavg"].rounds_to_target.mean == 1.5 and by_name["fedavg"].reached == 2  # rounds 2 and 1
    assert by_name["fedprox"].reached == 0
    assert by_name["scaffold"].worst_site_accuracy.mean == pytest.approx(0.75)
    write_leaderboard(tmp_path)
    markdown = (tmp_path / LEADERBOARD_MD).read_text()
    assert "| 1 | fedavg | 2 | 0.8500 ± 0.0707 |" in markdown and "not reached (0/2)" in markdown


def test_leaderboard_marks_what_the_first_cannot_be_told_apart_from(tmp_path):
    first = [0.80, 0.82, 0.84, 0.86]
    consistent = [0.79, 0.811, 0.829, 0.85]  # 0.01 below the first in every seed: a real difference
    noisy = [0.83, 0.79, 0.85, 0.84]  # about as good, seed by seed up and down: a tie
    _fake_suite(tmp_path, "run", {("s=a", name): [(a, 0.5, [a]) for a in accs]
                                  for name, accs in (("first", first), ("consistent", consistent), ("noisy", noisy))})
    _, entries = load_leaderboard(tmp_path)
    by_name = {e.algorithm: e for e in entries["s=a"]}
    assert [by_name[n].rank for n in ("first", "noisy", "consistent")] == [1, 2, 3]
    p = {n: stats.ttest_rel(first, accs).pvalue for n, accs in (("consistent", consistent), ("noisy", noisy))}
    low, high = sorted(p, key=p.get)  # Holm: the smaller p times 2, the larger times 1 (never below the first)
    assert by_name[low].p_holm == pytest.approx(min(1, 2 * p[low]), rel=1e-8)
    assert by_name[high].p_holm == pytest.approx(min(1, max(2 * p[low], p[high])), rel=1e-8)
    assert by_name["noisy"].tied and not by_name["consistent"].tied and not by_name["first"].tied
    d = np.subtract(first, consistent)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    v = by_name["consistent"].versus_first
    assert (v.mean, v.low, v.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-9)
    write_leaderboard(tmp_path)
    markdown = (tmp_path / LEADERBOARD_MD).read_text()
    assert "| 2≈ | noisy | 4 |" in markdown and "| 3 | consistent | 4 |" in markdown and "(2≈)" in markdown


@pytest.mark.parametrize("score", ["pooled", "own_site"])
def test_tuning_passes_over_a_grid_point_that_diverged(tmp_path, score):
    """A client lr too large for the model makes NaN parameters: summary.json has a null loss (and the
    accuracy of whatever class NaN logits pick). The choice must pass over it, not fail on it."""
    points = {"fedavg@lr=1": ["algorithm.client_lr=1"], "fedavg@lr=3": ["algorithm.client_lr=3"],
              "fedavg@lr=10": ["algorithm.client_lr=10"]}
    _fake_suite(tmp_path, "tune", {
        ("s=a", "fedavg@lr=1"): [(0.8, 0.5, [0.8]), (0.8, 0.5, [0.8])],
        ("s=a", "fedavg@lr=3"): [(0.8, None, [0.8]), (0.8, 0.5, [0.8])],  # diverged in one seed, same accuracy
        ("s=a", "fedavg@lr=10"): [(None, None, [0.1]), (0.9, 0.2, [0.9])],  # no accuracy at all in one seed
    }, grid_points=points)
    if score == "own_site":  # chosen by each site's accuracy, averaged over sites
        manifest = json.loads((tmp_path / "suite.json").read_text())
        manifest["suite"]["score"] = "own_site"
        (tmp_path / "suite.json").write_text(json.dumps(manifest))
    assert choose_hyperparameters(tmp_path) == {"s=a": {"fedavg": ["algorithm.client_lr=1"]}}


def test_the_wall_time_counts_the_cells_the_suite_has_now(tmp_path):
    """A re-tuned cell trains again and replaces its record; the header sums the current cells only."""
    _fake_suite(tmp_path, "run", {("s=a", "fedavg"): [(0.8, 0.5, [0.8])], ("s=a", "fedprox"): [(0.7, 0.5, [0.7])]})
    manifest = json.loads((tmp_path / "suite.json").read_text())
    manifest["cells"] = {"s=a/fedavg": {"wall_s": 10.0}, "s=a/fedprox": {"wall_s": 20.0}, "s=a/fedprox@old": {"wall_s": 900.0}}
    manifest["wall_s"] = 1234.0  # the running total, superseded training included
    (tmp_path / "suite.json").write_text(json.dumps(manifest))
    write_leaderboard(tmp_path)
    assert "- training wall time (all cells): 30 s (0.5 min)" in (tmp_path / LEADERBOARD_MD).read_text()


def test_tuning_picks_the_best_validation_accuracy_and_breaks_ties_by_loss(tmp_path):
    points = {"fedavg@lr=0.1": ["algorithm.client_lr=0.1"], "fedavg@lr=0.3": ["algorithm.client_lr=0.3"],
              "fedprox@mu=0": ["algorithm.mu=0"], "fedprox@mu=1": ["algorithm.mu=1"]}
    _fake_suite(tmp_path, "tune", {
        ("data=x,stragglers=0", "fedavg@lr=0.1"): [(0.7, 0.5, [0.7]), (0.8, 0.5, [0.8])],
        ("data=x,stragglers=0", "fedavg@lr=0.3"): [(0.8, 0.5, [0.8]), (0.8, 0.5, [0.8])],
        ("data=x,stragglers=0", "fedprox@mu=0"): [(0.8, 0.4, [0.8]), (0.8, 0.4, [0.8])],
        ("data=x,stragglers=0", "fedprox@mu=1"): [(0.8, 0.3, [0.8]), (0.8, 0.3, [0.8])],
    }, grid_points=points, fix={"stragglers": "0"})
    # Tuned with stragglers fixed at 0, the choice is keyed by the data axis alone ...
    chosen = choose_hyperparameters(tmp_path)
    assert chosen == {"data=x": {"fedavg": ["algorithm.client_lr=0.3"], "fedprox": ["algorithm.mu=1"]}}
    # ... and so holds for every straggler level when the suite runs.
    suite = load_suite(OmegaConf.create({**SUITE, "axes": {"data": {"x": [], "y": []}, "stragglers": {"0": [], "0.5": []}},
                                         "tuned": chosen, "tuning": {"fix": {"stragglers": "0"}}}))
    cells = {(c.setting, c.algorithm): c.overrides for c in plan_cells(suite, "run")}
    assert cells[("data=x,stragglers=0.5", "fedprox")][-1] == "algorithm.mu=1"
    assert cells[("data=y,stragglers=0.5", "fedprox")][-1] == "algorithm=fedprox"
    tune = plan_cells(suite, "tune")  # only stragglers=0 is tuned: 2 data values x (fedavg, fedprox, pooled)
    assert len(tune) == 2 * 3 and all(c.setting.endswith("stragglers=0") for c in tune)


def test_personalisation_leaderboard_ranks_by_what_each_site_gets_with_intervals(tmp_path):
    """``score: own_site``: ranked by the mean over sites of each site's own-model accuracy; the per-site
    table's intervals are the t-intervals over seeds (checked against SciPy); the local baseline counts its
    own site's model only."""
    own = {"global": [{"a": 0.6, "b": 0.9}, {"a": 0.5, "b": 0.9}, {"a": 0.7, "b": 0.8}],
           "ditto": [{"a": 0.8, "b": 0.9}, {"a": 0.85, "b": 0.95}, {"a": 0.75, "b": 0.9}],
           "local": [{"a": 0.7, "b": 0.7}, {"a": 0.75, "b": 0.7}, {"a": 0.7, "b": 0.75}]}
    # The global model's pooled accuracy ranks them the other way round: the suite's score must decide.
    pooled_accuracy = {"global": 0.9, "ditto": 0.7, "local": 0.5}
    _fake_suite(tmp_path, "run", {("s=a", name): [(pooled_accuracy[name], 0.5, [0.5])] * 3 for name in own})
    manifest = json.loads((tmp_path / "suite.json").read_text())
    manifest["suite"]["score"] = "own_site"
    manifest["kinds"]["local"] = "local"
    (tmp_path / "suite.json").write_text(json.dumps(manifest))
    for name, seeds in own.items():
        for seed, sites in enumerate(seeds):
            path = tmp_path / "s=a" / name / f"seed_{seed}" / "summary.json"
            summary = json.loads(path.read_text())
            summary["final"]["own_site"] = {site: {"accuracy": a} for site, a in sites.items()}
            path.write_text(json.dumps(summary))
    _, entries = load_leaderboard(tmp_path)
    by_name = {e.algorithm: e for e in entries["s=a"]}
    assert (by_name["ditto"].rank, by_name["global"].rank, by_name["local"].rank) == (1, 2, None)
    assert by_name["ditto"].accuracy.mean == pytest.approx(np.mean([0.85, 0.9, 0.825]))
    write_leaderboard(tmp_path)
    with open(tmp_path / "sites.csv") as f:
        rows = {(r["algorithm"], r["site"]): r for r in csv.DictReader(f)}
    a = [s["a"] for s in own["global"]]
    half = stats.t.ppf(0.975, 2) * np.std(a, ddof=1) / math.sqrt(3)
    row = rows[("global", "a")]
    assert (float(row["accuracy_mean"]), float(row["accuracy_ci_low"]), float(row["accuracy_ci_high"])) == pytest.approx(
        (np.mean(a), np.mean(a) - half, np.mean(a) + half), rel=1e-9)
    worst = [min(s.values()) for s in own["ditto"]]
    assert float(rows[("ditto", "worst site")]["accuracy_mean"]) == pytest.approx(np.mean(worst))
    assert float(rows[("global", "b")]["accuracy_ci_high"]) <= 1.0  # accuracy intervals stay inside [0, 1]
    markdown = (tmp_path / LEADERBOARD_MD).read_text()
    assert "### What each site gets (test rows)" in markdown and "| local | 3 |" in markdown


@pytest.mark.slow
def test_vary_split_gives_each_seed_its_own_data_split(tmp_path, monkeypatch):
    """With ``vary_split`` seed s runs as a run with ``task.data_seed=s`` and seed s, for a federated cell and both
    baselines, whether the seeds' splits share one program or each has its own (``split_lanes``), and the split matters."""
    common = "suite.common=['task=heart','partition=natural','sim.rounds=2','algorithm.batch_size=16'{}]"
    base = ("suite=quick", "only=[fedavg,pooled,local]")

    def final(folder, algorithm, seed):
        return json.loads((folder / "split=natural" / algorithm / f"seed_{seed}" / "summary.json").read_text())["final"]

    def same(a, b, where):
        for key in ("test_loss", "test_accuracy", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (where, key)
        for site, scores in b["own_site"].items():
            assert a["own_site"][site]["accuracy"] == pytest.approx(scores["accuracy"], rel=1e-5), (where, site)

    run_suite(bench_config(*base, "seeds=[0,1]", common.format(""), "+suite.vary_split=true"), tmp_path / "varied")
    run_suite(bench_config("suite=quick", "only=[fedavg]", "seeds=[1]", common.format(",'task.data_seed=1'")), tmp_path / "split_1")
    monkeypatch.setattr("nordfl.sim.seeds.SHARED_PADDING_LIMIT", 0.0)  # every seed its own program
    run_suite(bench_config(*base, "seeds=[0,1]", common.format(""), "+suite.vary_split=true"), tmp_path / "apart")
    same(final(tmp_path / "varied", "fedavg", 1), final(tmp_path / "split_1", "fedavg", 1), "fedavg alone")
    for algorithm in ("fedavg", "pooled", "local"):
        for seed in (0, 1):
            config = OmegaConf.load(tmp_path / "varied" / "split=natural" / algorithm / f"seed_{seed}" / "config.yaml")
            assert config.task.data_seed == seed and config.seed == seed
            same(final(tmp_path / "varied", algorithm, seed), final(tmp_path / "apart", algorithm, seed), (algorithm, seed))
        assert final(tmp_path / "varied", algorithm, 0)["test_loss"] != pytest.approx(final(tmp_path / "varied", algorithm, 1)["test_loss"], rel=1e-3)
    manifest = json.loads((tmp_path / "apart" / "suite.json").read_text())
    assert all(record["seeds"] == [0, 1] for record in manifest["cells"].values())
    # The data seed moves patients between each hospital's train and test rows.
    first, second = (make_task("heart", seed=s).data.clients[0].test.x for s in (0, 1))
    assert first.shape == second.shape and not np.array_equal(first, second)
    write_leaderboard(tmp_path / "varied")
    assert "each seed also draws the data split (task.data_seed = seed)" in (tmp_path / "varied" / LEADERBOARD_MD).read_text()


@pytest.mark.slow
def test_tuning_trains_an_algorithms_grid_as_one_program_with_the_results_of_separate_cells(tmp_path):
    """mode=tune: FedProx's grid points (client lr, with mu from the algorithm's own grid) train as one GridBatch
    program, and every (point, seed) gets the validation scores it gets trained as its own cell (tune_grid=false),
    so the same values are chosen. (tests/sim/test_grid.py varies client lr, mu and server lr at once.)"""
    common = "suite.common=['task=heart','partition=natural','sim.rounds=2','algorithm.num_epochs=1','algorithm.batch_size=16']"
    base = ("suite=quick", "mode=tune", "only=[fedprox]", "seeds=[0,1]", common)
    for folder, switch in (("grid", "tune_grid=true"), ("cells", "tune_grid=false")):
        bench = bench_config(*base, switch)
        with open_dict(bench):
            bench.suite.tuning.grid.fedprox = {"algorithm.mu": [1.0]}
        run_suite(bench, tmp_path / folder)
    manifest = json.loads((tmp_path / "grid" / "suite.json").read_text())
    fedprox = [c for c in manifest["cell_order"] if "/fedprox@" in c]
    assert len(fedprox) == 2 and all(manifest["cells"][c]["grid_program"] == 2 for c in fedprox)
    separate = json.loads((tmp_path / "cells" / "suite.json").read_text())
    assert not any("grid_program" in record for record in separate["cells"].values())
    for folder in fedprox:
        for seed in (0, 1):
            together, alone = (json.loads((tmp_path / which / folder / f"seed_{seed}" / "summary.json").read_text())["final"]
                               for which in ("grid", "cells"))
            assert together["test_loss"] == pytest.approx(alone["test_loss"], abs=1e-5), (folder, seed)
            assert together["test_accuracy"] == pytest.approx(alone["test_accuracy"], abs=1e-6), (folder, seed)
    assert choose_hyperparameters(tmp_path / "grid") == choose_hyperparameters(tmp_path / "cells")


@pytest.mark.slow
def test_tuning_a_personalised_algorithm_trains_its_grid_as_one_program_and_chooses_by_what_the_sites_get(tmp_path):
    """Ditto's grid (its lam) trains as one GridBatch program, each point personalising with its own lam, with
    the own-site scores of separate cells; the choice is the point with the best mean own-site validation accuracy."""
    common = "suite.common=['task.model=mlp','sim.rounds=2','sim.eval_every=1','algorithm.num_epochs=1']"
    base = ("suite=personalisation", "mode=tune", "only=[ditto]", "seeds=[0,1]", "settings=['study=heart']", common)
    for folder, switch in (("grid", "tune_grid=true"), ("cells", "tune_grid=false")):
        bench = bench_config(*base, switch)
        with open_dict(bench):
            bench.suite.tuning.grid = {"all": {"algorithm.client_lr": [0.3]}, "ditto": {"algorithm.lam": [0.01, 1.0]}}
        run_suite(bench, tmp_path / folder)
    manifest = json.loads((tmp_path / "grid" / "suite.json").read_text())
    ditto = [c for c in manifest["cell_order"] if "/ditto@" in c]
    assert len(ditto) == 2 and all(manifest["cells"][c]["grid_program"] == 2 for c in ditto)
    mean_own = {}
    for folder in ditto:
        for seed in (0, 1):
            together, alone = (json.loads((tmp_path / which / folder / f"seed_{seed}" / "summary.json").read_text())["final"]
                               for which in ("grid", "cells"))
            for site, scores in alone["own_site"].items():
                assert together["own_site"][site]["accuracy"] == pytest.approx(scores["accuracy"], abs=1e-6), (folder, seed, site)
        mean_own[folder] = np.mean([np.mean([s["accuracy"] for s in json.loads(
            (tmp_path / "grid" / folder / f"seed_{seed}" / "summary.json").read_text())["final"]["own_site"].values()]) for seed in (0, 1)])
    assert len({round(v, 6) for v in mean_own.values()}) > 1  # lam matters, so the choice means something
    best = max(mean_own, key=mean_own.get)
    chosen = choose_hyperparameters(tmp_path / "grid")
    assert chosen == choose_hyperparameters(tmp_path / "cells")
    assert sorted(chosen["study=heart"]["ditto"]) == sorted(manifest["grid_points"][best.split("/", 1)[1]])


def test_grid_edges_names_tuned_values_at_either_end_of_their_grid_but_not_a_floor_of_zero():
    suite = {"grid": {"all": {"algorithm.client_lr": [0.01, 0.1, 1.0]}, "fedprox": {"algorithm.mu": [0.0, 0.01, 0.1]}},
             "tuned": {"a=1": {"fedavg": ["algorithm.client_lr=1.0"], "fedprox": ["algorithm.client_lr=0.1", "algorithm.mu=0.0"],
                               "fedadam": ["algorithm.client_lr=0.01"]},
                       "a=2": {"fedprox": ["algorithm.client_lr=0.1", "algorithm.mu=0.1"]}}}
    assert grid_edges(suite, "a=1", "fedavg") == ["client_lr=1.0 (largest of 0.01, 0.1, 1)"]
    assert grid_edges(suite, "a=1", "fedadam") == ["client_lr=0.01 (smallest of 0.01, 0.1, 1)"]
    assert grid_edges(suite, "a=1", "fedprox") == []  # 0.1 inside; mu 0 cannot go lower
    assert grid_edges(suite, "a=2", "fedprox") == ["mu=0.1 (largest of 0, 0.01, 0.1)"]


def test_a_suite_runs_a_study_from_its_site_files_with_a_split_per_seed(tmp_path):
    """``study=`` in a suite (the personalisation suite's nordic5): the model's shape comes from the study file, and
    each seed's initial model, split and scores are its own."""
    common = "suite.common=['study=nordic5','task.model=mlp','++task.model_options={hidden:[4]}','sim.rounds=1','algorithm.num_epochs=1']"
    run_suite(bench_config("suite=quick", common, "only=[fedavg]", "seeds=[0,1]", "+suite.vary_split=true"), tmp_path)
    finals = [json.loads((tmp_path / "split=natural" / "fedavg" / f"seed_{s}" / "summary.json").read_text())["final"] for s in (0, 1)]
    assert [sorted(f["own_site"]) for f in finals] == [["Aarhus", "Oslo", "Tartu", "Turku", "Uppsala"]] * 2
    assert finals[0]["test_loss"] != pytest.approx(finals[1]["test_loss"], rel=1e-4)


def test_the_time_left_counts_training_not_building_the_cells(monkeypatch):
    """Building a suite's cells (Hydra compositions, data) can take minutes before the first run: the
    estimate of the time left extrapolates from the runs trained since then."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from nordfl.sim import bench

    clock = iter([0.0, 300.0, 300.0, 310.0])  # made; start after 300 s of building; a cell starts; 5 runs done
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    reporter = bench.ProgressReporter(Console(file=out, force_terminal=False, width=200), enabled=False)
    cell = SimpleNamespace(setting="split=natural", algorithm="fedavg")
    reporter("start", total=15, cells=3, finished=0)
    reporter("cell", cell=cell, rounds=10)
    reporter("done", cell=cell, runs=5, result=SimpleNamespace(final_accuracy=[0.5] * 5, own_site_accuracy=[0.5] * 5, wall_s=10.0))
    assert "[5/15 runs] split=natural fedavg" in out.getvalue()
    assert "about 0.3 min left" in out.getvalue()  # 10 s for 5 runs, 10 to go: 20 s (not 620 s)
