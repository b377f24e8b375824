"""The benchmark suite's smoke mode (NordFL and the NumPy loop reach the same loss) and its measuring tools."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import run, workloads
from benchmarks.peers import common
from benchmarks.proctree import PeakMemory, tree_rss


@pytest.mark.slow
def test_smoke_suite_nordfl_and_numpy_loop_reach_the_same_loss(tmp_path):
    code = run.main(["--suite", "smoke", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "smoke.json").read_text())
    rows = {r["peer"]: r for r in summary["rows"]}
    assert code == 0 and set(rows) == {"nordfl", "numpy_loop"}
    nordfl, numpy_loop = rows["nordfl"], rows["numpy_loop"]
    assert nordfl["status"] == numpy_loop["status"] == "ok"
    # Both trained (the initial model's loss is 2.78), to the same loss within shuffle noise.
    assert nordfl["loss"] < 0.8 * nordfl["initial_loss"]
    assert abs(nordfl["loss"] - numpy_loop["loss"]) / numpy_loop["loss"] < run.LOSS_TOLERANCE
    assert not nordfl["flagged"] and len(nordfl["round_s"]) == 3
    table = (tmp_path / "out" / "smoke.md").read_text()
    assert "NordFL (vmap simulator)" in table and "NumPy loop (sequential)" in table


def test_numpy_reference_gradients_match_finite_differences():
    from benchmarks.peers.numpy_loop import loss_grads

    rng = np.random.default_rng(0)
    params = {"w0": rng.normal(size=(5, 4)), "b0": rng.normal(size=4), "w1": rng.normal(size=(4, 3)), "b1": rng.normal(size=3)}
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    _, grads = loss_grads(params, x, y)
    eps = 1e-6
    for name, value in params.items():
        for index in np.ndindex(value.shape):
            bumped = {k: v.copy() for k, v in params.items()}
            bumped[name][index] += eps
            numeric = (loss_grads(bumped, x, y)[0] - loss_grads(params, x, y)[0]) / eps
            assert abs(numeric - grads[name][index]) < 1e-4, (name, index)


def test_scorer_matches_a_direct_cross_entropy():
    rng = np.random.default_rng(1)
    params = {"w0": rng.normal(size=(3, 4)).astype(np.float32), "b0": rng.normal(size=4).astype(np.float32)}
    x, y = rng.normal(size=(2, 5, 3)).astype(np.float32), rng.integers(0, 4, (2, 5))
    logits = x.reshape(-1, 3) @ params["w0"] + params["b0"]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.log(probs[np.arange(10), y.reshape(-1)]).mean()
    loss, accuracy = common.loss_and_accuracy(params, x, y, chunk=3)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert accuracy == np.mean(logits.argmax(1) == y.reshape(-1))


def test_flop_count_of_w1_by_hand():
    # 100 clients x 5 epochs x 200 rows, 600 weights: 3 passes x 2 flops; plus 610 params updated per step.
    assert workloads.W1.flops_per_round() == 6 * 600 * 100_000 + 2 * 610 * 100 * 5 * 20


def test_tree_memory_counts_a_grandchild():
    hog = "import time; a = bytearray(200 * 2**20); a[::4096] = b'x' * len(a[::4096]); print('ready', flush=True); time.sleep(30)"
    parent = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "{hog}"'], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        with PeakMemory(parent.pid, interval=0.01) as peak:
            time.sleep(0.2)
        assert tree_rss(parent.pid) > 200 * 2**20 and peak.bytes > 200 * 2**20
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


def test_bare_floor_round_is_the_numpy_loops_fedavg_round(tmp_path):
    """benchmarks.floors times a 'bare' round as the floor for the same maths: check it is the same maths."""
    import dataclasses

    import jax
    from jax.sharding import Mesh

    from benchmarks import floors
    from benchmarks.peers import numpy_loop

    spec = workloads.find("W1-smoke")
    w = spec.workload(workloads.write_data(spec, tmp_path, lambda message: None))
    data = common.Data(w.data)

    class NoRecorder:
        def ready(self):
            pass

        def round_done(self, r):
            pass

    train = lambda p, x, y, rng, c: numpy_loop.client_update(w, p, x, y, rng, c)  # noqa: E731
    one_round = common.sequential_rounds(dataclasses.replace(w, rounds=1), data, NoRecorder(), train)
    xs, ys = floors.host_batches(w, data, data.cohorts[0], np.random.default_rng(w.seed))
    bare = floors.bare_round_program(w, Mesh(np.asarray(jax.devices()[:1]), ("clients",)), chunk=w.cohort_size)
    params = {k: v.astype(np.float32) for k, v in data.init.items()}
    out = bare(params, xs, ys)
    assert set(out) == set(one_round)
    for k in one_round:
        np.testing.assert_allclose(np.asarray(out[k]), one_round[k], rtol=2e-4, atol=2e-6)
    assert not np.allclose(one_round["w0"], params["w0"])  # the round did train
