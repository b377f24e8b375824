"""One run over several processes (``jax.distributed``, the local launcher) equals the same run in one process,
through a killed process and a resume on another process count."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nordfl.sim import distributed, launch

ROUNDS = 40
COMMON = ["algorithm=scaffold", "task=heart", "sim.cohort_size=2", f"sim.rounds={ROUNDS}", "sim.checkpoint_every=1",
          f"sim.eval_every={ROUNDS}", "logger.progress=false"]


def _sim(run_dir, *extra):
    return [sys.executable, "-m", "nordfl.sim.app", *COMMON, *extra, f"hydra.run.dir={run_dir}"]


def _launched(processes, run_dir, *extra):
    return [sys.executable, "-m", "nordfl.sim.launch", "-n", str(processes), "--", *_sim(run_dir, *extra)]


def _checkpoint(run_dir):
    """(round, arrays) of the run's checkpoint; (0, None) while there is none."""
    try:
        with np.load(run_dir / "checkpoint" / "checkpoint.npz") as archive:
            arrays = {k: archive[k] for k in archive.files if k != "__meta__"}
            return json.loads(str(archive["__meta__"]))["round"], arrays
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return 0, None


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_four_processes_killed_and_resumed_on_two_equal_one_process(tmp_path):
    """SCAFFOLD (client state per site) with a sampled cohort: 4 processes, one of them SIGKILLed mid-run, the
    launcher stops the other three; the run resumes from its checkpoint on 2 processes and ends where a single
    process, one device, ends."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    one = subprocess.run(_sim(single), env=os.environ | {"NORDFL_CPU_DEVICES": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "1 device(s) ->" in one.stdout

    four = subprocess.Popen(_launched(4, multi), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while _checkpoint(multi)[0] < 3 and four.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = _children(four.pid)
        assert len(workers) == 4, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = _checkpoint(multi)[0]
        output, _ = four.communicate(timeout=60)
    finally:
        if four.poll() is None:
            four.kill()
    assert 3 <= killed_at < ROUNDS, killed_at  # killed mid-run, after some checkpoints
    assert four.returncode == 128 + signal.SIGKILL, output[-3000:]  # the killed process's status, passed on
    assert "stopping the others" in output and "4 device(s) in 4 processes" in output
    assert not any(_alive(pid) for pid in workers)  # no process left waiting for its peers

    two = subprocess.run(_launched(2, multi, "resume=true"), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "resume: continuing from round" in two.stdout and "2 device(s) in 2 processes" in two.stdout

    (rounds_one, want), (rounds_multi, got) = _checkpoint(single), _checkpoint(multi)
    assert rounds_one == rounds_multi == ROUNDS
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    summaries = [json.loads((d / "summary.json").read_text())["final"] for d in (single, multi)]
    np.testing.assert_allclose(summaries[1]["test_loss"], summaries[0]["test_loss"], rtol=1e-5)
    assert summaries[1]["test_accuracy"] == summaries[0]["test_accuracy"]
    rows = (multi / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == list(range(1, ROUNDS + 1))  # each round once, by process 0


def test_the_launcher_stops_every_process_when_one_fails(tmp_path):
    marker = tmp_path / "survivor"
    script = ("import os, sys, time\n"
              f"if os.environ['{distributed.PROCESS_ID}'] == '1': sys.exit(3)\n"
              f"time.sleep(60); open({str(marker)!r}, 'w').write('ran on')\n")
    started = time.monotonic()
    assert launch.launch([sys.executable, "-c", script], 3) == 3
    assert time.monotonic() - started < 30 and not marker.exists()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),
    ({distributed.COORDINATOR: "10.0.0.1:1234", distributed.NUM_PROCESSES: "4", distributed.PROCESS_ID: "3"},
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}),
])
def test_the_environment_names_the_run(monkeypatch, env, expected):
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID, "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.requested() == expected


@pytest.mark.parametrize("env, names", [
    ({distributed.COORDINATOR: "h:1"}, "NORDFL_NUM_PROCESSES, NORDFL_PROCESS_ID"),
    ({distributed.COORDINATOR: "h:1", distributed.NUM_PROCESSES: "2", distributed.PROCESS_ID: "2"}, "NORDFL_PROCESS_ID"),
    ({distributed.COORDINATOR: "h:1", distributed.NUM_PROCESSES: "two", distributed.PROCESS_ID: "0"}, "NORDFL_NUM_PROCESSES"),
])
def test_an_incomplete_or_wrong_environment_is_named(monkeypatch, env, names):
    for name in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.LaunchError, match=names):
        distributed.requested()


@pytest.mark.parametrize("count, cores, expected", [
    (2, [0, 1], [{0}, {1}]),
    (2, [4, 5, 6, 7, 8], [{4, 5}, {6, 7}]),
    (4, [0, 1], [None] * 4),
])
def test_each_process_gets_its_own_share_of_the_cores(count, cores, expected):
    assert launch.core_shares(count, cores) == expected
