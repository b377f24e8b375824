"""The nordfl command line as an operator uses it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "nordfl"


def _run(*args, timeout=300):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_provision_and_revoke(tmp_path):
    done = _run("provision", tmp_path / "fed", "Oslo", "Tartu")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fed" / "sites" / "Oslo" / "key.pem").stat().st_mode & 0o777 == 0o600
    assert _run("revoke", tmp_path / "fed", "Tartu").returncode == 0
    assert json.loads((tmp_path / "fed" / "federation.json").read_text())["revoked"] == ["Tartu"]
    unknown = _run("revoke", tmp_path / "fed", "Turku")
    assert unknown.returncode == 2 and "Turku" in unknown.stderr
    again = _run("provision", tmp_path / "fed", "Oslo")
    assert again.returncode == 2 and "fed" in again.stderr


def test_site_with_bad_csv_stops_before_connecting(tmp_path):
    bad = tmp_path / "heart.csv"
    bad.write_text("id,age,sex\n1,63,Male\n")
    done = _run("site", "--name", "Oslo", "--coordinator", "localhost:9", "--data", bad, "--state", tmp_path / "s",
                "--insecure", timeout=60)
    assert done.returncode == 2
    assert "heart.csv" in done.stderr and "cp" in done.stderr and "expected" in done.stderr
    assert "unreachable" not in done.stdout  # it never tried to connect


def test_audit_verify_passes_then_catches_an_edited_line(tmp_path):
    from nordfl.runtime.audit import AuditLog

    log = tmp_path / "audit.jsonl"
    with AuditLog(log, actor="coordinator") as audit:
        for r in range(5):
            audit.record("round_closed", round=r, contributors=["Oslo", "Tartu"])
    ok = _run("audit", "verify", log)
    assert ok.returncode == 0 and "OK: 5 entries" in ok.stdout
    lines = log.read_text().splitlines()
    lines[2] = lines[2].replace('"Tartu"', '"Turku"')
    log.write_text("\n".join(lines) + "\n")
    broken = _run("audit", "verify", log)
    assert broken.returncode == 1 and "line 3" in broken.stdout


@pytest.mark.slow
def test_demo_trains_four_hospitals_over_mtls(tmp_path):
    done = _run("demo", "--rounds", "2", "--dir", tmp_path / "demo", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for site in ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach"):
        assert f"final model at {site}: accuracy" in done.stdout
    assert "round 2/2" in done.stdout
    assert done.stdout.count("chain intact") == 5  # the coordinator's and every site's audit log
    _export_reproduces_the_sites_final_scores(tmp_path)


def _pooled_scores_match_the_pooled_test_rows(card, demo, params):
    """The card's pooled line equals the exported model scored on every site's test rows at once."""
    import jax.numpy as jnp

    from nordfl.runtime.config import Job
    from nordfl.runtime.site import local_setup, metrics_row, site_records

    job = Job.from_json(json.dumps(card["job"]))
    tests = [local_setup(s["name"], site_records([demo / "data" / s["name"] / "heart.csv"], "heart"), job).test
             for s in card["sites"]]
    assert [s["test_rows"] for s in card["sites"]] == [len(t.y) for t in tests]
    x, y = jnp.concatenate([t.x for t in tests]), jnp.concatenate([t.y for t in tests])
    fns = local_setup(card["sites"][0]["name"], site_records([demo / "data" / card["sites"][0]["name"] / "heart.csv"],
                                                             "heart"), job).fns
    pooled = metrics_row(fns.evaluate(params, type(tests[0])(x, y), jnp.ones(len(y), bool)))
    assert set(card["metrics"]["pooled_test_rows"]) == {"loss", "accuracy"}
    for name, value in card["metrics"]["pooled_test_rows"].items():
        assert value == pytest.approx(pooled[name], abs=1e-6), name


def _export_reproduces_the_sites_final_scores(tmp_path):
    """`nordfl export` of the demo's run: the reloaded model scores each site's test rows exactly as the site
    did at the end of the run, and the card names the job, the study and the audit chain heads."""
    import jax
    import numpy as np
    from flax import serialization

    from nordfl.runtime.export import load_exported, score_at_site

    demo, out = tmp_path / "demo", tmp_path / "export"
    done = _run("export", "--state", demo / "coordinator", "--out", out)
    assert done.returncode == 0, done.stderr
    card = json.loads((out / "model_card.json").read_text())
    coordinator_log = [json.loads(line) for line in (demo / "coordinator" / "audit.jsonl").read_text().splitlines()]
    assert card["audit"]["coordinator_head"] == coordinator_log[-1]["hash"]
    assert card["job_sha256"] in (out / "model_card.md").read_text() and card["rounds"] == {
        "completed": 2, "planned": 2, "finished": True}
    for site in card["sites"]:
        site_log = [json.loads(line) for line in (demo / "sites" / site["name"] / "audit.jsonl").read_text().splitlines()]
        finished = next(e for e in site_log if e["event"] == "finished")
        assert site["final_metrics"] == finished["metrics"]  # what the site scored, as the coordinator recorded it
        assert site["last_audit_head"] in {e["hash"] for e in site_log}  # a head of the site's own chain
        data = [demo / "data" / site["name"] / "heart.csv"]
        assert score_at_site(out, site["name"], data) == finished["metrics"]  # reloaded: exactly the same scores
    weights = np.array([s["declared_rows"] for s in card["sites"]], float)
    accuracy = np.array([s["final_metrics"]["accuracy"] for s in card["sites"]])
    assert card["metrics"]["weighted_by_rows"]["accuracy"] == pytest.approx(float(weights @ accuracy / weights.sum()), abs=1e-12)
    params = load_exported(out).params
    _pooled_scores_match_the_pooled_test_rows(card, demo, params)
    restored = serialization.from_bytes(params, (out / "model.msgpack").read_bytes())
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)))
    again = _run("export", "--state", demo / "coordinator", "--out", out)
    assert again.returncode == 2 and "not empty" in again.stderr  # an export is never overwritten
    with open(out / "model.npz", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ValueError, match="does not match the model card"):
        load_exported(out)


@pytest.mark.slow
def test_study_demo_runs_table_one_then_training_at_five_hospitals(tmp_path):
    """``nordfl demo --study nordic5``: five sites each reading their own export, a Table 1 job, then FedAvg."""
    done = _run("demo", "--study", "nordic5", "--rounds", "2", "--dir", tmp_path / "demo", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| age n | 300 | 420 | 200 | 260 | 360 | 1540 |" in done.stdout  # Table 1: Aarhus, Oslo, Tartu, Turku, Uppsala
    for site in ("Aarhus", "Oslo", "Tartu", "Turku", "Uppsala"):
        assert f"final model at {site}: accuracy" in done.stdout
        log = (tmp_path / "demo" / "sites" / site / "audit.jsonl").read_text()
        assert '"summary_sent"' in log and '"update_sent"' in log  # one site process took part in both jobs
    assert done.stdout.count("chain intact") == 7  # both coordinators' audit logs and every site's
    assert (tmp_path / "demo" / "coordinator" / "table1" / "table1.csv").is_file()
    # The training job's model card names the study by its hash, as every site checked it.
    assert _run("export", "--state", tmp_path / "demo" / "coordinator" / "train", "--out", tmp_path / "model").returncode == 0
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    checked = [json.loads(line) for line in (tmp_path / "demo" / "sites" / "Oslo" / "audit.jsonl").read_text().splitlines()
               if '"site_checked"' in line][0]
    assert card["study"]["sha256"] == checked["study_sha256"] and card["study"]["sha256"] in (tmp_path / "model" / "model_card.md").read_text()



@pytest.mark.slow
def test_private_demo_runs_dp_and_secure_aggregation_to_completion(tmp_path):
    """DP-SGD + secure aggregation + a policy at every site, as separate processes over mTLS; each site's
    epsilon ledger matches the accountant for the steps it ran, and the coordinator never saw a plain update."""
    from nordfl.algorithms import accounting
    from nordfl.algorithms.dp import sampling_rate
    from nordfl.runtime.site_data import load_site_table
    from nordfl.tasks.heart import prepare_site

    done = _run("demo", "--private", "--rounds", "2", "--dir", tmp_path / "demo", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 2/2: 4 sites" in done.stdout and "(secure aggregation)" in done.stdout
    assert done.stdout.count("chain intact") == 5
    coordinator = [json.loads(line) for line in (tmp_path / "demo" / "coordinator" / "audit.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "update_accepted" for e in coordinator)
    for site in ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach"):
        log = [json.loads(line) for line in (tmp_path / "demo" / "sites" / site / "audit.jsonl").read_text().splitlines()]
        policy = next(e for e in log if e["event"] == "policy_loaded")
        spent = [e for e in log if e["event"] == "privacy_spent"]
        assert [e["round"] for e in spent] == [0, 1] and 0 < spent[0]["epsilon"] < spent[1]["epsilon"] <= 15
        assert all(e["policy_sha256"] == policy["sha256"] and e["mechanism"] == "dp_sgd" for e in spent)
        rows = len(prepare_site(site, load_site_table([tmp_path / "demo" / "data" / site / "heart.csv"]), seed=0).train.y)
        assert spent[-1]["epsilon"] == pytest.approx(accounting.epsilon_spent(1.5, sampling_rate(rows, 16), spent[-1]["steps"], 1e-5))
        assert f"{site}: spent epsilon" in done.stdout
