"""A site's own privacy policy: the limits a hospital sets on any job, whatever the coordinator says.

The policy is a small YAML or JSON file that the site's DPO writes and keeps next to the site
agent (``nordfl site --policy FILE``). Every key is optional; a missing key sets no limit::

    allowed_algorithms: [fedavg, fedprox]   # algorithm.name must be one of these
    allowed_plugins:                         # plugins a job may use (default: any the site has installed)
      - {distribution: my-study, version: 0.1.0, sha256: 9f2c...}   # pin version and code hash ...
      - my_study.models                                              # ... or allow a module by name
    max_epsilon: 8.0                         # the job may spend at most this epsilon at this site ...
    max_delta: 1.0e-5                        # ... for a delta of at most this
    min_cohort: 5                            # runtime.min_cohort must be at least this
    require_secure_aggregation: true         # runtime.secure_aggregation must be on
    require_dp: true                         # the job must use differential privacy

``check_job`` refuses a job that breaks a rule before any training, with a ``PolicyViolation``
naming the rule, the job's value and the policy's limit. The policy's hash (SHA-256 of the file's
bytes) goes into the site's audit log (``policy_loaded``), so a DPO can tell which policy was
in force. A key the schema does not know is an error, not ignored: a misspelt ``max_epsilom``
must not silently lift a limit.

Privacy accounting is ``nordfl.algorithms.accounting`` (RDP via dp-accounting), the same functions
the simulator uses; ``privacy_cost`` only feeds it the job's DP settings and this site's numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Optional

__all__ = ["PolicyError", "PolicyViolation", "PrivacyCost", "SitePolicy", "check_job", "check_job_budget", "check_spend",
           "load_policy", "privacy_cost", "RULES"]

RULES = ("allowed_algorithms", "max_epsilon", "max_delta", "min_cohort", "require_secure_aggregation", "require_dp",
         "allowed_plugins")
"""The policy file's keys, in the order ``check_job`` checks them."""


class PolicyError(ValueError):
    """The policy file itself is unreadable or malformed (the message names the key and the value)."""


class PolicyViolation(Exception):
    """A job breaks one rule of the site's policy.

    Attributes: ``rule`` (the policy key), ``job_value`` (what the job asks for) and ``limit``
    (what the policy allows); ``str()`` says all three in one sentence.
    """

    def __init__(self, rule: str, job_value: Any, limit: Any, detail: str = ""):
        self.rule, self.job_value, self.limit = rule, job_value, limit
        super().__init__(f"site policy rule {rule}: the job's value is {job_value}, the policy's limit is {limit}"
                         + (f" ({detail})" if detail else ""))


class SitePolicy(NamedTuple):
    """A parsed policy; ``None`` means no limit. ``sha256`` is the hash of the file's bytes."""

    allowed_algorithms: Optional[tuple[str, ...]] = None
    max_epsilon: Optional[float] = None
    max_delta: Optional[float] = None
    min_cohort: Optional[int] = None
    require_secure_aggregation: bool = False
    require_dp: bool = False
    allowed_plugins: Optional[tuple[dict, ...]] = None  # each {module or distribution, version?, sha256?}
    sha256: str = ""
    path: str = ""

    def rules(self) -> dict:
        """The rules that are set, as plain data (for the audit log and the dry run)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in zip(RULES, self) if v not in (None, False)}


class PrivacyCost(NamedTuple):
    """What a job spends at one site: its DP mechanism and (epsilon, delta); epsilon is inf without DP."""

    mechanism: str  # "none", "dp_sgd", "dp_fedavg_central" or "dp_fedavg_distributed" (algorithm.dp.mode, .noise)
    epsilon: float
    delta: float
    steps: int = 0  # the mechanism's steps counted (DP-SGD: local steps; DP-FedAvg: rounds)


NO_DP = PrivacyCost("none", math.inf, 1.0)


def _bad(key: str, value: Any, expected: str, path: str):
    raise PolicyError(f"site policy {path}: {key}: {expected}, got {value!r}")


def load_policy(path) -> SitePolicy:
    """Reads and checks a policy file (``.json``, or YAML for any other name)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"site policy {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(data.decode("utf-8"))
        else:
            import yaml

            raw = yaml.safe_load(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and yaml.YAMLError are ValueErrors
        raise PolicyError(f"site policy {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                          f"({' '.join(str(e).split())})") from None
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise PolicyError(f"site policy {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"site policy {path}: expected a mapping of rules ({', '.join(RULES)}), got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(RULES))
    if unknown:
        _bad(unknown[0], raw[unknown[0]], f"is not a policy rule; expected one of {', '.join(RULES)}", str(path))
    where = str(path)
    algorithms = raw.get("allowed_algorithms")
    if algorithms is not None:
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        if not isinstance(algorithms, list) or not algorithms or not all(isinstance(a, str) and a for a in algorithms):
            _bad("allowed_algorithms", algorithms, "expected a non-empty list of algorithm names", where)
        algorithms = tuple(algorithms)
    eps = raw.get("max_epsilon")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
        _bad("max_epsilon", eps, "expected a number > 0", where)
    delta = raw.get("max_delta")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
        _bad("max_delta", delta, "expected a number in (0, 1)", where)
    cohort = raw.get("min_cohort")
    if cohort is not None and (isinstance(cohort, bool) or not isinstance(cohort, int) or cohort < 1):
        _bad("min_cohort", cohort, "expected an integer >= 1", where)
    flags = {}
    for key in ("require_secure_aggregation", "require_dp"):
        value = raw.get(key, False)
        if not isinstance(value, bool):
            _bad(key, value, "expected true or false", where)
        flags[key] = value
    plugins = _allowed_plugins(raw.get("allowed_plugins"), where)
    return SitePolicy(algorithms, None if eps is None else float(eps), None if delta is None else float(delta), cohort,
                      flags["require_secure_aggregation"], flags["require_dp"], plugins, hashlib.sha256(data).hexdigest(), where)


def _allowed_plugins(value: Any, where: str) -> Optional[tuple[dict, ...]]:
    """``allowed_plugins``: module names, or mappings naming a module or distribution, optionally pinned."""
    if value is None:
        return None
    expected = "expected a list of module names or {module|distribution, version, sha256} mappings"
    if not isinstance(value, list):
        _bad("allowed_plugins", value, expected, where)
    entries = []
    for item in value:
        entry = {"module": item} if isinstance(item, str) else item
        if (not isinstance(entry, dict) or not set(entry) <= {"module", "distribution", "version", "sha256"}
                or not (entry.get("module") or entry.get("distribution")) or not all(isinstance(v, str) for v in entry.values())):
            _bad("allowed_plugins", item, expected, where)
        entries.append(dict(entry))
    return tuple(entries)


# ----------------------------------------------------------------------------- privacy accounting


def privacy_cost(job, num_examples: int, steps: Optional[int] = None, updates: Optional[int] = None,
                 delta: Optional[float] = None) -> PrivacyCost:
    """What ``job`` spends at a site with ``num_examples`` training rows.

    With ``steps`` and ``updates`` both None: the planned cost of the whole job (every round,
    every local step). Otherwise the cost of what this site actually ran: ``steps`` local
    (DP-SGD) steps in ``updates`` updates sent. ``delta`` defaults to the job's.
    Without DP the cost is ``NO_DP`` (epsilon inf). The arithmetic is the accounting module's
    (``nordfl.algorithms.accounting``); this function only reads the job's DP settings for it.
    """
    dp = _dp_settings(job)
    if dp is None:
        return NO_DP
    return _accounted(job, dp, num_examples, steps, updates, delta)


def uses_dp(job) -> bool:
    """Whether the job trains with differential privacy (``algorithm.dp.mode`` other than none)."""
    return _dp_settings(job) is not None


def _dp_settings(job) -> Optional[dict]:
    """The job's DP settings (``algorithm.dp``), or None when the job uses no DP."""
    dp = job.algorithm_config.get("dp")
    if not dp or dp.get("mode", "none") == "none":
        return None
    return dp


def _accounted(job, dp: dict, num_examples: int, steps: Optional[int], updates: Optional[int],
               delta: Optional[float]) -> PrivacyCost:
    """Epsilon from ``nordfl.algorithms.accounting`` (RDP, dp-accounting) for the job's DP settings.

    DP-SGD (``dp.mode=sgd``, unit: one row of this site): ``epsilon_spent`` of the local steps at
    this site's Poisson rate ``q = min(1, batch_size / n)``; planned: every round's
    ``num_epochs * steps_per_epoch(n)``. DP-FedAvg (``dp.mode=update``, unit: the whole site):
    ``site_level_epsilon`` of the rounds charged, cohorts of ``cohort_size`` of the federation's sites.
    """
    from nordfl.algorithms import accounting
    from nordfl.algorithms.dp import sampling_rate
    from nordfl.algorithms.local import steps_per_epoch

    z, delta = dp.get("noise_multiplier"), float(dp["delta"] if delta is None else delta)
    if z is None:
        raise PolicyError("algorithm.dp.noise_multiplier: the runtime needs a value (only the simulator calibrates it "
                          "from algorithm.dp.epsilon_budget), got None")
    try:
        if dp["mode"] == "sgd":
            local = job.local
            if steps is None:
                steps = int(job.rounds * local.num_epochs * steps_per_epoch(num_examples, local.batch_size, local.drop_remainder))
            q = sampling_rate(num_examples, local.batch_size)
            return PrivacyCost("dp_sgd", accounting.epsilon_spent(float(z), q, int(steps), delta), delta, int(steps))
        rounds = job.rounds if updates is None else int(updates)
        num_sites = len(job.sites)
        cohort = job.cohort_size or num_sites
        epsilon = accounting.site_level_epsilon(float(z), num_sites, cohort, rounds, delta)
        return PrivacyCost(f"dp_fedavg_{dp.get('noise', 'central')}", epsilon, delta, rounds)
    except ValueError as e:
        raise PolicyError(f"algorithm.dp: cannot account this job's privacy: {e}") from None


def check_job(policy: SitePolicy, job, num_examples: int) -> PrivacyCost:
    """Raises ``PolicyViolation`` for the first rule ``job`` breaks; returns the job's planned cost.

    ``num_examples`` is this site's number of training rows (the DP-SGD sampling rate depends
    on it). Checked before any training.
    """
    name = job.algorithm_config["name"]
    if policy.allowed_algorithms is not None and name not in policy.allowed_algorithms:
        raise PolicyViolation("allowed_algorithms", f"algorithm {name!r}", f"one of {', '.join(policy.allowed_algorithms)}")
    if policy.min_cohort is not None and job.min_cohort < policy.min_cohort:
        raise PolicyViolation("min_cohort", f"runtime.min_cohort={job.min_cohort}", f"at least {policy.min_cohort}",
                              "an aggregate of fewer sites could single out this site's update")
    if policy.require_secure_aggregation and not job.secure_aggregation:
        raise PolicyViolation("require_secure_aggregation", "runtime.secure_aggregation=false", "secure aggregation required")
    cost = privacy_cost(job, num_examples)
    if policy.require_dp and cost.mechanism == "none":
        raise PolicyViolation("require_dp", "algorithm.dp.mode=none", "differential privacy required (sgd or update)")
    if policy.max_delta is not None and cost.mechanism != "none" and cost.delta > policy.max_delta:
        raise PolicyViolation("max_delta", f"delta {cost.delta:.3g}", f"delta <= {policy.max_delta:.3g}")
    if policy.max_epsilon is not None and not cost.epsilon <= policy.max_epsilon:
        shown = ("unbounded epsilon (no differential privacy)" if cost.mechanism == "none"
                 else f"epsilon {cost.epsilon:.4g} at delta {cost.delta:.3g} over the job's {job.rounds} rounds ({cost.mechanism})")
        raise PolicyViolation("max_epsilon", shown, f"epsilon <= {policy.max_epsilon:.4g}")
    return cost


def check_spend(policy: Optional[SitePolicy], spent: PrivacyCost, job=None) -> None:
    """Raises ``PolicyViolation`` if epsilon already spent plus the next update (``spent``) passes the
    policy's maximum, or the job's own ``algorithm.dp.epsilon_budget`` (retried rounds spend too, so
    the plan can be exceeded)."""
    if policy is not None and policy.max_epsilon is not None and not spent.epsilon <= policy.max_epsilon:
        raise PolicyViolation("max_epsilon", f"epsilon {spent.epsilon:.4g} after this update ({spent.steps} steps)",
                              f"epsilon <= {policy.max_epsilon:.4g}", "the site stops sending rather than exceed it")
    budget = _job_budget(job)
    if budget is not None and not spent.epsilon <= budget:
        raise PolicyViolation("algorithm.dp.epsilon_budget", f"epsilon {spent.epsilon:.4g} after this update "
                              f"({spent.steps} steps)", f"epsilon <= {budget:.4g}", "the job's own budget; the site stops")


def check_job_budget(job, planned: PrivacyCost) -> None:
    """The job's own ``algorithm.dp.epsilon_budget`` against its planned cost at this site, as the simulator
    checks it: refused unless ``algorithm.dp.stop_at_budget`` (then the site stops at the budget)."""
    budget = _job_budget(job)
    if budget is not None and planned.epsilon > budget and not job.algorithm_config["dp"].get("stop_at_budget"):
        raise PolicyViolation("algorithm.dp.epsilon_budget", f"planned epsilon {planned.epsilon:.4g} at this site "
                              f"over {job.rounds} rounds", f"epsilon <= {budget:.4g}",
                              "raise the noise, run fewer rounds, or set algorithm.dp.stop_at_budget=true")


def _job_budget(job) -> Optional[float]:
    dp = _dp_settings(job) if job is not None else None
    return None if dp is None or dp.get("epsilon_budget") is None else float(dp["epsilon_budget"])
