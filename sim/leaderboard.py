"""A suite's leaderboard: per setting, every algorithm's final test accuracy and loss (and,
on natural splits, its worst site's accuracy) as mean ± std over seeds, rounds to the target
accuracy, and a rank; plus accuracy-per-round plots. Written from the suite's run folders
and ``suite.json`` alone, so ``nordfl-report <suite folder>`` rebuilds it at any time.

Ranks are competition ranks ("1, 2, 2, 4") by mean test accuracy among the federated
algorithms of a setting; the baselines (pooled, local) are shown for reference, unranked.
Each ranked algorithm is compared with the setting's first, paired by seed (``nordfl.sim.paired``):
the difference's 95 % interval, and a tie mark (≈) where the Holm-corrected paired t-test cannot
tell it from the first at the 5 % level.

What each hospital gets is a table of its own: per site, the accuracy of the model that site
would use (the global model; a personalised algorithm's own model; the local baseline's model
trained alone) on that site's test rows, with the mean and the worst site, each with its 95 %
t-interval over seeds (``sites.csv`` holds the same numbers).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import yaml
from matplotlib.figure import Figure

from nordfl.sim.paired import Paired, holm, paired_t
from nordfl.sim.report import ReportError, Stat, read_metrics, stat, stat_text
from nordfl.sim.suite_config import grid_edges, split_key

MANIFEST = "suite.json"
LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_CSV = "leaderboard.csv"
SITES_CSV = "sites.csv"
MAX_SITE_COLUMNS = 8
"""More sites than this (e.g. 100 simulated clients) show only the mean and worst site."""


class Entry(NamedTuple):
    """One algorithm in one setting, over its seeds."""

    setting: str
    algorithm: str
    kind: str
    seeds: int
    accuracy: Stat
    loss: Stat
    worst_site_accuracy: Optional[Stat]  # natural splits only
    rounds_to_target: Stat  # over the seeds that reached it
    reached: int
    curve: tuple[np.ndarray, np.ndarray, np.ndarray]  # rounds, mean, std of test accuracy
    rank: Optional[int] = None
    per_seed: tuple[tuple[int, float], ...] = ()  # (seed, final test accuracy)
    versus_first: Optional[Paired] = None  # the setting's first minus this one, over their common seeds
    p_holm: float = math.nan
    tied: bool = False  # not distinguishable from the first (Holm-corrected p >= ALPHA)
    own_site: tuple[dict[str, float], ...] = ()  # per seed: site -> accuracy of the model it would use, on its test rows


ALPHA = 0.05


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: cannot be read ({error})") from None


def _entry(suite_dir: Path, folder: str, kind: str, seeds: list[int], target: float, score: str = "global") -> Optional[Entry]:
    """The entry of one cell, or None when none of its seeds has finished. ``score="own_site"`` ranks by the
    mean over sites of each site's own-model accuracy instead of the global model's pooled accuracy."""
    setting, algorithm = folder.split("/", 1)
    finals, curves, first_reach, natural, per_seed, own_site = [], [], [], False, [], []
    for seed in seeds:
        run = suite_dir / folder / f"seed_{seed}"
        if not (run / "summary.json").exists():
            continue
        finals.append(_read_json(run / "summary.json")["final"])
        own = own_site_accuracy(finals[-1], kind)
        if own:
            own_site.append(own)
        if score == "own_site":
            if own:
                per_seed.append((seed, float(np.mean(list(own.values())))))
        elif finals[-1].get("test_accuracy") is not None:
            per_seed.append((seed, float(finals[-1]["test_accuracy"])))
        rows = [row for row in read_metrics(run / "metrics.jsonl") if row.get("test_accuracy") is not None]
        curves.append({row["round"]: row["test_accuracy"] for row in rows})
        first_reach.append(next((row["round"] for row in rows if row["test_accuracy"] >= target), None))
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
        natural = (config or {}).get("partition", {}).get("name") == "natural"
    if not finals:
        return None
    worst = None
    if natural:
        worst = stat([min((s["accuracy"] for s in f["sites"].values() if s["accuracy"] is not None), default=None) for f in finals])
    rounds = sorted(set().union(*curves))
    per_round = [stat([c.get(r) for c in curves]) for r in rounds]
    curve = (np.array(rounds), np.array([s.mean for s in per_round]), np.array([s.std for s in per_round]))
    reached = [r for r in first_reach if r is not None]
    accuracy = stat([a for _, a in per_seed]) if score == "own_site" else stat([f["test_accuracy"] for f in finals])
    return Entry(setting, algorithm, kind, len(finals), accuracy,
                 stat([f["test_loss"] for f in finals]), worst, stat(reached), len(reached), curve, per_seed=tuple(per_seed),
                 own_site=tuple(own_site) if len(own_site) == len(finals) else ())


def own_site_accuracy(final: dict, kind: str) -> dict[str, float]:
    """Site -> accuracy of the model the site would use, from a run's final row (``own_site``, written since
    personalisation; before it, a non-local run's per-site scores of its global model are the same thing)."""
    sites = final.get("own_site") or (final.get("sites") if kind != "local" else None) or {}
    return {name: float(m["accuracy"]) for name, m in sites.items()
            if m.get("accuracy") is not None and math.isfinite(float(m["accuracy"]))}


def _ranked(entries: list[Entry]) -> list[Entry]:
    """Competition ranks by mean accuracy among the federated entries; baselines keep None."""
    def score(e: Entry) -> float:
        return round(e.accuracy.mean, 9)  # equal accuracies tie, whatever the order of summation

    scores = [score(e) for e in entries if e.kind == "federated" and not math.isnan(e.accuracy.mean)]
    out = []
    for e in entries:
        rank = None
        if e.kind == "federated" and not math.isnan(e.accuracy.mean):
            rank = 1 + sum(s > score(e) for s in scores)
        out.append(e._replace(rank=rank))
    return _compared_with_first(out)


def _compared_with_first(entries: list[Entry]) -> list[Entry]:
    """Each ranked entry against the first (rank 1, then by name): paired over their common seeds, Holm-corrected."""
    ranked = sorted((e for e in entries if e.rank is not None), key=lambda e: (e.rank, e.algorithm))
    if len(ranked) < 2:
        return entries
    first = dict(ranked[0].per_seed)
    others = ranked[1:]
    tests = {}
    for e in others:
        mine = dict(e.per_seed)
        common = sorted(set(first) & set(mine))
        tests[e.algorithm] = paired_t([first[s] for s in common], [mine[s] for s in common])
    adjusted = dict(zip(tests, holm([t.p for t in tests.values()])))
    out = []
    for e in entries:
        if e.algorithm in tests:
            p = adjusted[e.algorithm]
            e = e._replace(versus_first=tests[e.algorithm], p_holm=p, tied=not math.isnan(p) and p >= ALPHA)
        out.append(e)
    return out


def load_leaderboard(suite_dir: Path) -> tuple[dict, dict[str, list[Entry]]]:
    """The suite's manifest and its entries per setting, ranked."""
    suite_dir = Path(suite_dir)
    if not (suite_dir / MANIFEST).exists():
        raise ReportError(f"{suite_dir} has no {MANIFEST}: not a suite folder (run nordfl-bench first)")
    manifest = _read_json(suite_dir / MANIFEST)
    target = manifest["suite"]["target_accuracy"]
    by_setting: dict[str, list[Entry]] = {setting: [] for setting in manifest["settings"]}
    for folder in manifest["cell_order"]:
        algorithm = folder.split("/", 1)[1]
        entry = _entry(suite_dir, folder, manifest["kinds"].get(algorithm, "federated"), manifest["seeds"], target,
                       manifest["suite"].get("score", "global"))
        if entry is not None:
            by_setting.setdefault(entry.setting, []).append(entry)
    return manifest, {setting: _ranked(entries) for setting, entries in by_setting.items() if entries}


# ---------------------------------------------------------------------------- writing


def _rounds_text(e: Entry) -> str:
    if not e.reached:
        return f"not reached (0/{e.seeds})"
    mean, std = e.rounds_to_target
    text = f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"
    return text if e.reached == e.seeds else f"{text} ({e.reached}/{e.seeds})"


def _rank_text(e: Entry) -> str:
    return (f"{e.rank}≈" if e.tied else str(e.rank)) if e.rank is not None else "baseline"


def _versus_first_text(e: Entry) -> str:
    v = e.versus_first
    if v is None:
        return "first" if e.rank is not None else ""
    if math.isnan(v.low):
        return f"{v.mean:+.4f}"
    return f"{v.mean:+.4f} [{v.low:+.4f}, {v.high:+.4f}], p {e.p_holm:.2g}"


def _setting_table(entries: list[Entry], target: float, scored_on: str) -> list[str]:
    natural = any(e.worst_site_accuracy is not None for e in entries)
    header = ["rank", "algorithm", "seeds", f"{scored_on} accuracy", "first minus this (95% CI), Holm p", f"{scored_on} loss",
              *(["worst-site accuracy"] if natural else []), f"rounds to {target:.0%} accuracy"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if h not in ("algorithm",) else "---" for h in header) + "|"]
    order = sorted(entries, key=lambda e: (e.rank is None, e.rank or 0, e.algorithm))
    for e in order:
        cells = [_rank_text(e), e.algorithm, str(e.seeds), stat_text(e.accuracy), _versus_first_text(e), stat_text(e.loss)]
        if natural:
            cells.append(stat_text(e.worst_site_accuracy) if e.worst_site_accuracy is not None else "n/a")
        cells.append(_rounds_text(e))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _interval(values: list[float]) -> Paired:
    """The mean of accuracies ``values`` and its 95 % t-interval, clipped to [0, 1] (NaN bounds with fewer than 2)."""
    v = paired_t(values, [0.0] * len(values))
    return v._replace(low=max(v.low, 0.0), high=min(v.high, 1.0)) if not math.isnan(v.low) else v


def _interval_text(values: list[float]) -> str:
    v = _interval(values)
    return f"{v.mean:.3f}" if math.isnan(v.low) else f"{v.mean:.3f} [{v.low:.3f}, {v.high:.3f}]"


def _site_rows(e: Entry) -> dict[str, list[float]]:
    """Column -> per-seed values of one entry: every site, then the mean over sites and the worst site."""
    sites = list(dict.fromkeys(name for seed in e.own_site for name in seed))
    columns = {name: [seed[name] for seed in e.own_site if name in seed] for name in sites}
    columns["mean over sites"] = [float(np.mean(list(seed.values()))) for seed in e.own_site]
    columns["worst site"] = [min(seed.values()) for seed in e.own_site]
    return columns


def _site_table(entries: list[Entry]) -> list[str]:
    """What each hospital gets: per site, mean accuracy [95 % CI] over seeds of the model it would use."""
    rows = [e for e in sorted(entries, key=lambda e: (e.rank is None, e.rank or 0, e.algorithm)) if e.own_site]
    if not rows:
        return []
    columns = list(dict.fromkeys(c for e in rows for c in _site_rows(e)))
    if len(columns) - 2 > MAX_SITE_COLUMNS:
        columns = ["mean over sites", "worst site"]
    lines = ["| algorithm | seeds | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for e in rows:
        values = _site_rows(e)
        lines.append(f"| {e.algorithm} | {len(e.own_site)} | " + " | ".join(_interval_text(values[c]) if values.get(c) else ""
                                                                         for c in columns) + " |")
    return ["Each site's accuracy with the model it would use, on its own test rows: the global model, or the "
            "algorithm's personal model (Ditto, FedPer, FedRep, FedBN, fine-tuned), or for the local baseline the "
            "model it trained alone. Mean over seeds [95 % t-interval, clipped to [0, 1]].", "", *lines]


def _overview(entries: dict[str, list[Entry]]) -> list[str]:
    """Algorithms × settings: mean test accuracy ± std and the rank in that setting."""
    settings = list(entries)
    algorithms = list(dict.fromkeys(e.algorithm for es in entries.values() for e in es))
    lines = ["| algorithm | " + " | ".join(settings) + " | mean rank |", "|---|" + "---:|" * (len(settings) + 1)]
    for algorithm in algorithms:
        cells, ranks = [], []
        for setting in settings:
            e = next((e for e in entries[setting] if e.algorithm == algorithm), None)
            if e is None:
                cells.append("")
                continue
            cells.append(f"{stat_text(e.accuracy)} ({_rank_text(e)})")
            if e.rank is not None:
                ranks.append(e.rank)
        mean_rank = f"{np.mean(ranks):.2f}" if ranks else "n/a"
        lines.append(f"| {algorithm} | " + " | ".join(cells) + f" | {mean_rank} |")
    return lines


def training_seconds(manifest: dict) -> float:
    """Training time of the cells the suite has now. A cell rerun with other hyperparameters replaces its
    record, while the manifest's running total (``wall_s``) still counts the training it superseded."""
    records = manifest.get("cells", {})
    current = [records[c]["wall_s"] for c in manifest.get("cell_order", []) if c in records]
    return sum(current) if current else manifest.get("wall_s", 0.0)


def _provenance(manifest: dict) -> list[str]:
    suite, versions, machine = manifest["suite"], manifest["versions"], manifest["machine"]
    wall = training_seconds(manifest)
    command = manifest.get("command") or f"nordfl-bench suite={suite['name']}" + (" mode=tune" if manifest["mode"] == "tune" else "")
    return [
        f"- command: `{command}`",
        f"- mode: {manifest['mode']}; seeds: {', '.join(map(str, manifest['seeds']))}"
        + (f"; each seed also draws the data split ({split_key(suite)} = seed)" if split_key(suite) and manifest["mode"] == "run" else
           "; one data split for every seed (task.data_seed)") + f"; target accuracy: {suite['target_accuracy']:.0%}",
        f"- common overrides: `{' '.join(suite['common'])}`",
        f"- training wall time (all cells): {wall:.0f} s ({wall / 60:.1f} min); started {manifest.get('started')}, "
        f"finished {manifest.get('finished', 'not yet')}",
        f"- machine: {machine['platform']}, {machine['cpu_count']} CPU cores, JAX backend {machine['jax_backend']} "
        f"({len(machine['jax_devices'])} device(s))",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        *([f"- tuning budget: {len(manifest['cell_order'])} (setting, grid point) cells × {len(manifest['seeds'])} seeds = "
           f"{len(manifest['cell_order']) * len(manifest['seeds'])} runs; validation split: "
           f"{suite.get('validation_fraction', 0):.0%} of each site's training rows; test rows never used"]
          if manifest["mode"] == "tune" else []),
    ]


def write_leaderboard(suite_dir: Path, out_dir: Optional[Path] = None) -> list[Path]:
    """Writes leaderboard.md, leaderboard.csv and one accuracy-per-round PNG per setting; returns the paths."""
    suite_dir = Path(suite_dir)
    out_dir = Path(out_dir or suite_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, entries = load_leaderboard(suite_dir)
    if not entries:
        raise ReportError(f"{suite_dir}: no finished run yet")
    suite = manifest["suite"]
    target = suite["target_accuracy"]
    lines = [f"# Leaderboard: {suite['name']}" + (" (tuning, validation split)" if manifest["mode"] == "tune" else ""), ""]
    if suite.get("description"):
        lines += [suite["description"].strip(), ""]
    lines += _provenance(manifest) + [""]
    scored_on = "validation" if manifest["mode"] == "tune" else "test"
    if suite.get("score") == "own_site":
        lines += [f"Ranked by each site's {scored_on} accuracy with the model it would use (its personal model, or the global "
                  f"one), averaged over the sites with equal weight: the \"{scored_on} accuracy\" columns below. The loss, "
                  f"worst-site and rounds columns and the curves are the global model's.", ""]
    lines += [f"Final {scored_on} accuracy, mean ± std over seeds (rank in the setting; baselines unranked). "
              f"≈ marks a rank the setting's first cannot be told apart from: the paired t-test over seeds of "
              f"their difference, Holm-corrected over the setting's comparisons, has p ≥ {ALPHA:g}.", ""]
    lines += _overview(entries) + [""]
    paths = []
    for setting, setting_entries in entries.items():
        lines += [f"## {setting}", "", *_setting_table(setting_entries, target, scored_on), ""]
        edges = {e.algorithm: grid_edges(suite, setting, e.algorithm) for e in setting_entries} if manifest["mode"] == "run" else {}
        edges = {a: found for a, found in edges.items() if found}
        if edges:
            lines += ["At the edge of its tuning grid (the best value may lie beyond it): "
                      + "; ".join(f"{a} {', '.join(found)}" for a, found in edges.items()) + ".", ""]
        site_lines = _site_table(setting_entries)
        if site_lines:
            lines += [f"### What each site gets ({scored_on} rows)", "", *site_lines, ""]
        if manifest["mode"] == "tune":
            continue  # tuning evaluates once, at the end: there is no curve to draw
        plot = out_dir / "curves" / (re.sub(r"[^A-Za-z0-9._=-]+", "_", setting).strip("_") + ".png")  # a plain link target
        paths.append(_plot(setting, setting_entries, target, plot))
        lines += [f"![accuracy per round, {setting}](curves/{plot.name})", ""]
    md = out_dir / LEADERBOARD_MD
    md.write_text("\n".join(lines))
    return [md, _write_csv(entries, out_dir / LEADERBOARD_CSV), _write_sites_csv(entries, out_dir / SITES_CSV), *paths]


def _number(value: float) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def _write_csv(entries: dict[str, list[Entry]], path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["setting", "algorithm", "kind", "rank", "seeds", "test_accuracy_mean", "test_accuracy_std",
                         "test_loss_mean", "test_loss_std", "worst_site_accuracy_mean", "worst_site_accuracy_std",
                         "rounds_to_target_mean", "rounds_to_target_std", "seeds_reaching_target",
                         "first_minus_this_mean", "first_minus_this_ci_low", "first_minus_this_ci_high", "p_holm", "tied_with_first"])
        for setting, setting_entries in entries.items():
            for e in setting_entries:
                worst = e.worst_site_accuracy or Stat(math.nan, math.nan)
                writer.writerow([setting, e.algorithm, e.kind, "" if e.rank is None else e.rank, e.seeds,
                                 *map(_number, e.accuracy), *map(_number, e.loss), *map(_number, worst),
                                 *map(_number, e.rounds_to_target), e.reached,
                                 *(map(_number, e.versus_first[1:4]) if e.versus_first else ("", "", "")), _number(e.p_holm),
                                 "" if e.rank is None else int(e.tied)])
    return path


def _write_sites_csv(entries: dict[str, list[Entry]], path: Path) -> Path:
    """One row per (setting, algorithm, site or summary): the model-it-would-use accuracy over seeds."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["setting", "algorithm", "kind", "site", "seeds", "accuracy_mean", "accuracy_ci_low", "accuracy_ci_high"])
        for setting, setting_entries in entries.items():
            for e in setting_entries:
                for column, values in (_site_rows(e).items() if e.own_site else ()):
                    v = _interval(values)
                    writer.writerow([setting, e.algorithm, e.kind, column, len(values), _number(v.mean), _number(v.low), _number(v.high)])
    return path


def _plot(setting: str, entries: list[Entry], target: float, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for e in entries:
        rounds, mean, std = e.curve
        style = "-" if e.kind == "federated" else "--"
        (line,) = axes.plot(rounds, mean, style, label=e.algorithm if e.kind == "federated" else f"{e.algorithm} (baseline)")
        if e.seeds >= 2:
            axes.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    axes.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    axes.set(xlabel="round", ylabel="test accuracy", title=f"{setting}: mean over seeds, band ±1 std")
    axes.legend(fontsize="small", ncol=2)
    figure.savefig(path, dpi=90)
    return path
