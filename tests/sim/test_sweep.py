"""End to end: a Hydra sweep through nordfl-sim -m (a global and a personalised algorithm), then nordfl-report on its folder."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_sweep_then_report(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    done = subprocess.run(
        [str(BIN / "nordfl-sim"), "-m", "algorithm=fedavg,ditto", "seed=0,1", "sim.rounds=3", "sim.eval_every=1",
         "logger.progress=false", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.jsonl"))
    assert len(runs) == 4
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert set(rows[-1]["sites"]) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}
        assert rows[-1]["test_loss"] < 0.8  # training happened: the initial model's pooled loss is about 0.95
        summary = json.loads((run / "summary.json").read_text())
        own = summary["final"]["own_site"]
        assert rows[-1]["own_site_accuracy"] == pytest.approx(sum(site["accuracy"] for site in own.values()) / 4)
        if summary["algorithm"] == "fedavg":  # the global model is every site's own
            assert own == rows[-1]["sites"]
        else:  # Ditto's personal models, trained 3 rounds at each site, score otherwise
            assert own != rows[-1]["sites"]

    report = subprocess.run(
        [str(BIN / "nordfl-report"), str(sweep)], cwd=tmp_path, capture_output=True, text=True, env=dict(env, COLUMNS="200")
    )
    assert report.returncode == 0, report.stderr
    assert "algorithm=fedavg" in report.stdout and "algorithm=ditto" in report.stdout and "own site accuracy" in report.stdout
    with open(sweep / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["configuration"] for row in table] == ["algorithm=ditto", "algorithm=fedavg"]
    assert all(row["seeds"] == "2" for row in table)
    assert all(0 < float(row["own_site_accuracy_mean"]) <= 1 for row in table)
    for metric in ("train_loss", "test_loss", "test_accuracy", "client_loss"):
        png = sweep / f"{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_logger_writes_an_offline_run(tmp_path):
    env = dict(os.environ, WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "logger=wandb", "logger.mode=offline", "sim.rounds=2", "sim.eval_every=1",
         "logger.progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))  # the run's records, ready for `wandb sync`
