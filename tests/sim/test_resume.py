"""A run killed mid-way and resumed with resume=true ends exactly as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

COMMON = ["sim.rounds=40", "sim.checkpoint_every=1", "sim.eval_every=5", "logger.progress=false", "algorithm=fedadam"]


def _start(run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "nordfl.sim.app", *COMMON, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _checkpoint_round(run_dir):
    path = run_dir / "checkpoint" / "checkpoint.npz"
    try:
        with np.load(path) as archive:
            return json.loads(str(archive["__meta__"]))["round"]
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return 0


def _arrays(run_dir):
    with np.load(run_dir / "checkpoint" / "checkpoint.npz") as archive:
        return {k: archive[k] for k in archive.files if k != "__meta__"}


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("elapsed_s")
    return rows


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    reference = _start(whole)

    victim = _start(killed)
    deadline = time.monotonic() + 120
    while _checkpoint_round(killed) < 3:
        assert victim.poll() is None, "the run finished before it could be killed: " + victim.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    stopped_at = _checkpoint_round(killed)
    assert 3 <= stopped_at < 40

    resumed = _start(killed, "resume=true")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resume: continuing from round {stopped_at}" in out
    assert reference.wait(timeout=300) == 0

    assert _checkpoint_round(killed) == _checkpoint_round(whole) == 40
    want, got = _arrays(whole), _arrays(killed)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert _rows(killed) == _rows(whole)  # every round logged once, with the same numbers


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    first = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "sim.rounds=2", "logger.progress=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert first.returncode == 0, first.stderr
    other = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "sim.rounds=4", "algorithm=scaffold", "resume=true",
         "logger.progress=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True,
    )
    assert other.returncode == 2
    assert "was written by a different configuration" in " ".join(other.stderr.split())  # the console wraps long lines
