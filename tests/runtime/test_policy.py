"""A site's privacy policy: each rule refuses what it should, naming the rule, the job's value and the limit."""

import json
import math

import pytest

from nordfl.runtime import policy as policy_module
from nordfl.runtime.config import Job
from nordfl.runtime.policy import PolicyError, PolicyViolation, PrivacyCost, SitePolicy, check_job, check_spend, load_policy


def _job(algorithm="fedavg", min_cohort=3, secure_aggregation=False, dp=None, rounds=5):
    algorithm_config = {"name": algorithm, "num_epochs": 1}
    if dp is not None:
        algorithm_config["dp"] = dp
    return Job(0, ("A", "B", "C", "D"), rounds, algorithm_config, {"name": "heart"}, min_cohort, secure_aggregation,
               3 if secure_aggregation else 0)


@pytest.fixture
def accountant(monkeypatch):
    """A stand-in for the DP accounting: the tests here check the rules, not the arithmetic."""
    def cost(job, dp, num_examples, steps, updates, delta):
        return PrivacyCost("dp_sgd", float(dp["epsilon"]), float(dp.get("delta", 1e-5)), steps or 0)

    monkeypatch.setattr(policy_module, "_accounted", cost)


def _refused(policy, job, rule):
    with pytest.raises(PolicyViolation) as info:
        check_job(policy, job, num_examples=100)
    assert info.value.rule == rule
    message = str(info.value)
    assert f"site policy rule {rule}" in message and str(info.value.job_value) in message and str(info.value.limit) in message
    return message


def test_allowed_algorithms():
    policy = SitePolicy(allowed_algorithms=("fedavg", "fedprox"))
    message = _refused(policy, _job("scaffold"), "allowed_algorithms")
    assert "'scaffold'" in message and "fedavg, fedprox" in message
    check_job(policy, _job("fedprox"), 100)


def test_min_cohort():
    policy = SitePolicy(min_cohort=5)
    message = _refused(policy, _job(min_cohort=3), "min_cohort")
    assert "runtime.min_cohort=3" in message and "at least 5" in message
    check_job(policy, _job(min_cohort=5), 100)


def test_require_secure_aggregation():
    policy = SitePolicy(require_secure_aggregation=True)
    message = _refused(policy, _job(secure_aggregation=False), "require_secure_aggregation")
    assert "runtime.secure_aggregation=false" in message
    check_job(policy, _job(secure_aggregation=True), 100)


def test_require_dp(accountant):
    policy = SitePolicy(require_dp=True)
    message = _refused(policy, _job(), "require_dp")
    assert "algorithm.dp.mode=none" in message
    check_job(policy, _job(dp={"mode": "sgd", "epsilon": 3.0}), 100)


def test_max_epsilon(accountant):
    policy = SitePolicy(max_epsilon=4.0)
    message = _refused(policy, _job(dp={"mode": "sgd", "epsilon": 7.5}), "max_epsilon")
    assert "epsilon 7.5" in message and "epsilon <= 4" in message
    # A job without DP spends an unbounded epsilon: a maximum implies DP.
    assert "unbounded" in _refused(policy, _job(), "max_epsilon")
    assert check_job(policy, _job(dp={"mode": "sgd", "epsilon": 3.0}), 100).epsilon == 3.0


def test_max_delta(accountant):
    policy = SitePolicy(max_delta=1e-6)
    message = _refused(policy, _job(dp={"mode": "sgd", "epsilon": 1.0, "delta": 1e-4}), "max_delta")
    assert "delta 0.0001" in message and "delta <= 1e-06" in message
    check_job(policy, _job(dp={"mode": "sgd", "epsilon": 1.0, "delta": 1e-7}), 100)


def test_spending_past_the_maximum_is_refused():
    policy = SitePolicy(max_epsilon=2.0)
    check_spend(policy, PrivacyCost("dp_sgd", 1.9, 1e-5, 40))
    with pytest.raises(PolicyViolation, match=r"max_epsilon: the job's value is epsilon 2.1 after this update \(44 steps\)"):
        check_spend(policy, PrivacyCost("dp_sgd", 2.1, 1e-5, 44))
    check_spend(None, PrivacyCost("dp_sgd", math.inf, 1e-5, 44))  # no policy, no limit


def test_load_yaml_and_json_and_hash(tmp_path):
    text = "allowed_algorithms: [fedavg]\nmax_epsilon: 8\nmax_delta: 1.0e-5\nmin_cohort: 4\nrequire_secure_aggregation: true\nrequire_dp: true\n"
    (tmp_path / "p.yaml").write_text(text)
    loaded = load_policy(tmp_path / "p.yaml")
    assert loaded.allowed_algorithms == ("fedavg",) and loaded.max_epsilon == 8.0 and loaded.min_cohort == 4
    assert loaded.require_secure_aggregation and loaded.require_dp
    import hashlib

    assert loaded.sha256 == hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "p.json").write_text(json.dumps({"min_cohort": 4}))
    assert load_policy(tmp_path / "p.json").rules() == {"min_cohort": 4}
    assert load_policy(tmp_path / "p.json").sha256 != loaded.sha256


@pytest.mark.parametrize("text, expected", [
    ("max_epsilom: 8\n", "max_epsilom: is not a policy rule"),
    ("max_epsilon: -1\n", "max_epsilon: expected a number > 0, got -1"),
    ("max_delta: 2\n", "max_delta: expected a number in (0, 1), got 2"),
    ("min_cohort: 2.5\n", "min_cohort: expected an integer >= 1, got 2.5"),
    ("require_dp: yes please\n", "require_dp: expected true or false, got 'yes please'"),
    ("allowed_algorithms: []\n", "allowed_algorithms: expected a non-empty list"),
    ("[1, 2]\n", "expected a mapping of rules"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_policy_files_are_refused_with_the_key(tmp_path, text, expected):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "p.yaml")
    assert expected in str(info.value) and "p.yaml" in str(info.value)


def test_a_site_refuses_the_coordinators_job_before_training(tmp_path):
    """Over the real runtime: the site joins, reads the job, refuses it, and logs the policy's hash and the rule."""
    from nordfl.runtime.site import SiteRefused
    from tests.runtime.helpers import provisioned, site_agent, start_coordinator

    federation, files = provisioned(tmp_path, sites=("Cleveland", "Hungary", "Switzerland"))
    coordinator, server, port = start_coordinator(tmp_path, federation, ["runtime.rounds=1"])
    try:
        (tmp_path / "policy.yaml").write_text("require_secure_aggregation: true\n")
        agent = site_agent(tmp_path, federation, files, "Cleveland", port, policy=load_policy(tmp_path / "policy.yaml"))
        with pytest.raises(SiteRefused, match="site policy rule require_secure_aggregation: the job's value is "
                                              "runtime.secure_aggregation=false"):
            agent.run()
    finally:
        server.stop(grace=0)
    log = [json.loads(line) for line in (tmp_path / "sites" / "Cleveland" / "audit.jsonl").read_text().splitlines()]
    loaded = next(e for e in log if e["event"] == "policy_loaded")
    assert loaded["sha256"] == load_policy(tmp_path / "policy.yaml").sha256
    refused = next(e for e in log if e["event"] == "policy_refused")
    assert refused["rule"] == "require_secure_aggregation" and refused["policy_sha256"] == loaded["sha256"]
    assert not any(e["event"] in ("update_sent", "task_received") for e in log)  # refused before any training


def test_the_jobs_own_epsilon_budget(accountant):
    from nordfl.runtime.policy import check_job_budget

    job = _job(dp={"mode": "sgd", "epsilon": 9.0, "epsilon_budget": 5.0})
    with pytest.raises(PolicyViolation, match=r"algorithm.dp.epsilon_budget: the job's value is planned epsilon 9 at this site"):
        check_job_budget(job, check_job(SitePolicy(), job, 100))
    stopping = _job(dp={"mode": "sgd", "epsilon": 9.0, "epsilon_budget": 5.0, "stop_at_budget": True})
    check_job_budget(stopping, check_job(SitePolicy(), stopping, 100))  # runs, and stops at the budget:
    with pytest.raises(PolicyViolation, match="algorithm.dp.epsilon_budget"):
        check_spend(None, PrivacyCost("dp_sgd", 5.1, 1e-5, 30), stopping)


def test_planned_epsilon_is_the_accountants():
    from nordfl.algorithms import accounting
    from nordfl.runtime.policy import privacy_cost

    sgd = _job(dp={"mode": "sgd", "noise_multiplier": 1.5, "delta": 1e-5}, rounds=10)
    sgd.algorithm_config.update(batch_size=16, num_epochs=2, drop_remainder=False)
    planned = privacy_cost(sgd, num_examples=199)
    assert planned.mechanism == "dp_sgd" and planned.steps == 10 * 2 * 13
    assert planned.epsilon == pytest.approx(accounting.epsilon_spent(1.5, 16 / 199, 260, 1e-5))
    assert privacy_cost(sgd, 199, steps=26, updates=1).epsilon < planned.epsilon  # one round of the ledger
    update = _job(dp={"mode": "update", "noise": "distributed", "noise_multiplier": 5.0, "delta": 1e-5}, rounds=10)
    cost = privacy_cost(update, num_examples=199)
    assert cost.mechanism == "dp_fedavg_distributed"
    assert cost.epsilon == pytest.approx(accounting.site_level_epsilon(5.0, 4, 4, 10, 1e-5))
