"""``nordfl-report``: mean ± std over seeds of simulator runs, as a table, Markdown, CSV and plots.

Given suite folders (``nordfl-bench`` output, with ``suite.json``), it writes their leaderboards
instead (``nordfl.sim.leaderboard``).

A run folder is any directory holding ``metrics.jsonl`` (a simulator's Hydra run directory);
a sweep folder holds run folders below it. Runs whose Hydra overrides differ only in
``seed`` form one configuration. Final metrics come from each run's last evaluation row.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import yaml
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

FINAL_METRICS = ("train_loss", "test_loss", "test_accuracy", "test_auc", "test_rmse", "test_mae", "test_r2", "own_site_accuracy")
"""Classification runs report accuracy and AUC, regression runs RMSE, MAE and R²; tables show those a run has.
``own_site_accuracy`` (final round only): the mean over sites of each site's accuracy with the model it would use
(its personalised model, or the global one; docs/algorithms/personalisation.md)."""
METRICS = (*FINAL_METRICS, "client_loss")
FINAL_ROUND_ONLY = ("own_site_accuracy",)
"""Metrics a run logs once, in its last round: a table column, never a curve."""
EVAL_KEY = "test_loss"  # only rows of evaluation rounds have it
UNFINISHED_NOTE = "* unfinished: at least one run stopped before its planned rounds (no summary.json, or fewer rounds)"


class ReportError(Exception):
    """Bad input, reported to the user as one message (naming the folder, file or line) without a traceback."""


class Run(NamedTuple):
    """One simulator run, reduced to what grouping and averaging need."""

    folder: Path
    label: str
    seed: int
    rows: list[dict]
    finished: bool


class Stat(NamedTuple):
    """Mean and sample std (ddof=1) over seeds; std is NaN below two values, both are NaN with none."""

    mean: float
    std: float


class Curve(NamedTuple):
    """A metric per round, mean and std over the seeds that report it in that round."""

    rounds: np.ndarray
    mean: np.ndarray
    std: np.ndarray


class ConfigSummary(NamedTuple):
    """One configuration over its seeds: final metrics, weakest site, and per-round curves."""

    label: str
    seeds: tuple[int, ...]
    rounds: tuple[int, ...]  # rounds done by each seed's run, in the order of ``seeds``
    finished: bool
    final: dict[str, Stat]  # every name in FINAL_METRICS
    worst_site: Optional[tuple[str, float]]  # lowest final test accuracy (highest RMSE) averaged over seeds
    curves: dict[str, Curve]  # every name in METRICS
    worst_metric: str = "accuracy"  # what ``worst_site`` ranks by: accuracy, or rmse for a regression task


# ---------------------------------------------------------------------------- reading


def find_run_folders(folder: Path) -> list[Path]:
    """Every run folder at or below ``folder``, so a single run and a sweep are passed the same way."""
    if not folder.exists():
        raise ReportError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder")
    found = sorted({path.parent for path in folder.rglob("metrics.jsonl") if path.is_file()})
    if not found:
        raise ReportError(f"no run folder (a folder with metrics.jsonl) found in {folder}")
    return found


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, checked so that a bad line is named rather than misread."""
    rows: list[dict] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ReportError(f"{path}:{lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if not isinstance(row.get("round"), int) or "client_loss" not in row:
            raise ReportError(f"{path}:{lineno}: expected an integer 'round' and a 'client_loss', got keys {sorted(row)}")
        if rows and row["round"] <= rows[-1]["round"]:
            raise ReportError(f"{path}:{lineno}: round {row['round']} does not follow round {rows[-1]['round']}")
        rows.append(row)
    return rows


def _read_file(path: Path, kind: type, parse) -> Optional[Union[dict, list]]:
    """A YAML or JSON file of the expected top-level type, or None when absent (optional Hydra files)."""
    if not path.exists():
        return None
    try:
        value = parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: cannot be parsed ({error})") from None
    value = kind() if value is None else value
    if not isinstance(value, kind):
        raise ReportError(f"{path}: expected a {kind.__name__} at the top level, got {type(value).__name__}")
    return value


def _algorithm_name(folder: Path, config: Optional[dict], summary: Optional[dict]) -> str:
    """The algorithm, which names a configuration run without overrides."""
    algorithm = (config or {}).get("algorithm")
    if isinstance(algorithm, dict) and "name" in algorithm:
        return str(algorithm["name"])
    if summary and "algorithm" in summary:
        return str(summary["algorithm"])
    raise ReportError(f"run folder {folder}: no algorithm.name in .hydra/config.yaml nor algorithm in summary.json")


def _label(folder: Path, overrides: Optional[list], config: Optional[dict], summary: Optional[dict]) -> str:
    """The overrides without the seed name the configuration, so seeds of one setting group together."""
    if overrides is None:
        if not summary or not {"algorithm", "task"} <= summary.keys():
            raise ReportError(f"run folder {folder}: no .hydra/overrides.yaml, and no summary.json with algorithm and task")
        return f"algorithm={summary['algorithm']} task={summary['task']}"
    if not all(isinstance(item, str) for item in overrides):
        raise ReportError(f"{folder / '.hydra/overrides.yaml'}: expected a list of strings, got {overrides!r}")
    kept = sorted(item for item in overrides if not _run_only(item.split("=", 1)[0].lstrip("+~")))
    return " ".join(kept) if kept else f"algorithm={_algorithm_name(folder, config, summary)}"


def _run_only(key: str) -> bool:
    """Overrides that do not change what is computed: the seed groups runs; resume and Hydra's own keys are bookkeeping."""
    return key in ("seed", "resume") or key.startswith("hydra.")


def _seed(folder: Path, config: Optional[dict], summary: Optional[dict]) -> int:
    """The run's seed, from Hydra's config or, for runs not started by Hydra, summary.json."""
    for source in (config, summary):
        if source and isinstance(source.get("seed"), int):
            return source["seed"]
    raise ReportError(f"run folder {folder}: no integer seed in .hydra/config.yaml or summary.json")


def load_run(folder: Path) -> Run:
    """One run folder; summary.json is written only at the end, so its absence marks a killed run."""
    config = _read_file(folder / ".hydra" / "config.yaml", dict, yaml.safe_load)
    overrides = _read_file(folder / ".hydra" / "overrides.yaml", list, yaml.safe_load)
    summary = _read_file(folder / "summary.json", dict, json.loads)
    rows = read_metrics(folder / "metrics.jsonl")
    done = rows[-1]["round"] if rows else 0
    finished = summary is not None and done >= int(summary.get("rounds", done))
    return Run(folder, _label(folder, overrides, config, summary), _seed(folder, config, summary), rows, finished)


def load_runs(folders: Sequence[Union[str, Path]]) -> list[Run]:
    """Every run below ``folders`` once; two runs of one configuration and seed would fake a smaller std."""
    runs: dict[Path, Run] = {}
    for folder in folders:
        for run_folder in find_run_folders(Path(folder)):
            if run_folder.resolve() not in runs:  # a sweep and one of its runs may both be passed
                runs[run_folder.resolve()] = load_run(run_folder)
    by_key: dict[tuple[str, int], Run] = {}
    for run in _without_shared_overrides(list(runs.values())):
        other = by_key.setdefault((run.label, run.seed), run)
        if other is not run:
            raise ReportError(
                f"runs {other.folder} and {run.folder} are both configuration '{run.label}' with seed {run.seed}; pass only one"
            )
    return list(by_key.values())


def _without_shared_overrides(runs: list[Run]) -> list[Run]:
    """Drops overrides every run shares (``sim.rounds=3`` on a whole sweep): labels show what differs."""
    items = [run.label.split(" ") for run in runs]
    shared = set.intersection(*map(set, items)) if len(runs) > 1 else set()
    if not shared or any(not set(i) - shared for i in items):
        return runs
    return [run._replace(label=" ".join(i for i in parts if i not in shared)) for run, parts in zip(runs, items)]


# ---------------------------------------------------------------------------- averaging


def stat(values: Sequence[Optional[float]]) -> Stat:
    """Mean ± sample std of the defined values; null (e.g. AUC on a multi-class task) is skipped."""
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return Stat(math.nan, math.nan)
    std = float(np.std(defined, ddof=1)) if len(defined) >= 2 else math.nan
    return Stat(float(np.mean(defined)), std)


def _last_eval(rows: list[dict]) -> dict:
    """The last evaluation row: a killed run's last row may be a training-only round."""
    return next((row for row in reversed(rows) if EVAL_KEY in row), {})


def _curve(runs: Sequence[Run], metric: str) -> Curve:
    """Mean and std per round over the runs that report ``metric`` that round (runs may stop early)."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in run.rows:
            if row.get(metric) is not None:
                by_round[row["round"]].append(row[metric])
    stats = [stat(by_round[r]) for r in sorted(by_round)]
    return Curve(np.array(sorted(by_round), int), np.array([s.mean for s in stats]), np.array([s.std for s in stats]))


def _worst_metric(finals: Sequence[dict]) -> str:
    """Accuracy ranks the sites of a classification task; RMSE those of a regression task (whose rows have no accuracy)."""
    regression = any("rmse" in m and "accuracy" not in m for final in finals for m in final.get("sites", {}).values())
    return "rmse" if regression else "accuracy"


def _worst_site(finals: Sequence[dict], metric: str = "accuracy") -> Optional[tuple[str, float]]:
    """The site with the lowest final test accuracy (highest RMSE) averaged over seeds: who the federation serves worst."""
    values: dict[str, list[float]] = defaultdict(list)
    for final in finals:
        for site, metrics in final.get("sites", {}).items():
            if metrics.get(metric) is not None:
                values[site].append(metrics[metric])
    if not values:
        return None
    means = {site: float(np.mean(v)) for site, v in sorted(values.items())}
    worst = (max if metric == "rmse" else min)(means, key=means.__getitem__)
    return worst, means[worst]


def _summarise_config(label: str, runs: Sequence[Run]) -> ConfigSummary:
    """Averages one configuration's runs over seeds."""
    runs = sorted(runs, key=lambda run: run.seed)
    finals = [_last_eval(run.rows) for run in runs]
    worst_metric = _worst_metric(finals)
    return ConfigSummary(
        label=label,
        seeds=tuple(run.seed for run in runs),
        rounds=tuple(run.rows[-1]["round"] if run.rows else 0 for run in runs),
        finished=all(run.finished for run in runs),
        final={metric: stat([final.get(metric) for final in finals]) for metric in FINAL_METRICS},
        worst_site=_worst_site(finals, worst_metric),
        curves={metric: _curve(runs, metric) for metric in METRICS},
        worst_metric=worst_metric,
    )


def summarise(folders: Sequence[Union[str, Path]]) -> list[ConfigSummary]:
    """One summary per configuration found below ``folders``, sorted by label."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in load_runs(folders):
        groups[run.label].append(run)
    return [_summarise_config(label, runs) for label, runs in sorted(groups.items())]


# ---------------------------------------------------------------------------- writing


def table_metrics(summaries: Sequence[ConfigSummary], metrics: Sequence[str] = FINAL_METRICS) -> list[str]:
    """The final metrics worth a column: asked for, and defined for at least one configuration."""
    return [m for m in FINAL_METRICS if m in metrics and any(not math.isnan(s.final[m].mean) for s in summaries)]


def _title(metric: str) -> str:
    return metric.replace("_", " ")


def stat_text(stat: Stat) -> str:
    if math.isnan(stat.mean):
        return "n/a"
    return f"{stat.mean:.4f}" if math.isnan(stat.std) else f"{stat.mean:.4f} ± {stat.std:.4f}"


def _rounds_text(summary: ConfigSummary) -> str:
    """Rounds done, as a range when seeds differ, starred when a run did not finish."""
    low, high = min(summary.rounds), max(summary.rounds)
    text = str(high) if low == high else f"{low}-{high}"
    return text if summary.finished else text + "*"


def _worst_text(summary: ConfigSummary) -> str:
    if summary.worst_site is None:
        return "n/a"
    metric = "" if summary.worst_metric == "accuracy" else f"{summary.worst_metric} "
    return f"{summary.worst_site[0]} ({metric}{summary.worst_site[1]:.4f})"


def _header(columns: Sequence[str]) -> list[str]:
    return ["configuration", "seeds", "rounds", *map(_title, columns), "worst site"]


def _text_rows(summaries: Sequence[ConfigSummary], columns: Sequence[str]) -> list[list[str]]:
    """The cells shared by the printed table and report.md, so the two cannot disagree."""
    return [
        [s.label, str(len(s.seeds)), _rounds_text(s), *(stat_text(s.final[m]) for m in columns), _worst_text(s)]
        for s in summaries
    ]


def make_table(summaries: Sequence[ConfigSummary], metrics: Sequence[str] = FINAL_METRICS) -> Table:
    """The summary as a rich table for the terminal."""
    columns = table_metrics(summaries, metrics)
    unfinished = not all(s.finished for s in summaries)
    table = Table(title="Final metrics, mean ± std over seeds", caption=UNFINISHED_NOTE if unfinished else None)
    for i, name in enumerate(_header(columns)):  # folded, not cut with "…": cells stay whole in a narrow terminal
        table.add_column(name, justify="left" if i == 0 or name == "worst site" else "right", overflow="fold")
    for row in _text_rows(summaries, columns):
        table.add_row(*row)
    return table


def write_markdown(summaries: Sequence[ConfigSummary], columns: Sequence[str], path: Path) -> Path:
    """report.md: the printed table as a Markdown table, for pasting into notes and pull requests."""
    header = _header(columns)
    align = ["---" if i == 0 or name == "worst site" else "---:" for i, name in enumerate(header)]
    rows = [header, align, *_text_rows(summaries, columns)]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if not all(s.finished for s in summaries):
        lines += ["", "\\" + UNFINISHED_NOTE]
    path.write_text("\n".join(lines) + "\n")
    return path


def _number(value: float) -> str:
    """Full precision for CSV readers; empty for undefined, which spreadsheets read as missing."""
    return "" if math.isnan(value) else repr(float(value))


def write_csv(summaries: Sequence[ConfigSummary], columns: Sequence[str], path: Path) -> Path:
    """report.csv: the numbers of the table at full precision, one configuration per line."""
    stat_names = [f"{m}_{part}" for m in columns for part in ("mean", "std")]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        metrics = sorted({s.worst_metric for s in summaries}, key=("accuracy", "rmse").index)
        writer.writerow(["configuration", "seeds", "rounds", *stat_names, "worst_site", *(f"worst_site_{m}" for m in metrics)])
        for s in summaries:
            site, value = s.worst_site or ("", math.nan)
            stats = [_number(v) for m in columns for v in s.final[m]]
            worst = [_number(value if m == s.worst_metric else math.nan) for m in metrics]
            writer.writerow([s.label, len(s.seeds), _rounds_text(s), *stats, site, *worst])
    return path


def plot_metric(summaries: Sequence[ConfigSummary], metric: str, path: Path) -> Path:
    """One line per configuration over rounds, with a ±1 std band where there are >= 2 seeds."""
    figure = Figure(figsize=(8, 5), layout="constrained")  # no pyplot: no display, no global backend
    axes = figure.add_subplot()
    for s in summaries:
        curve = s.curves[metric]
        if not len(curve.rounds):
            continue
        marker = "o" if len(curve.rounds) <= 30 else None  # a lone evaluation round is otherwise invisible
        (line,) = axes.plot(curve.rounds, curve.mean, marker=marker, markersize=3, label=s.label)
        if len(s.seeds) >= 2:
            band = (curve.mean - curve.std, curve.mean + curve.std)
            axes.fill_between(curve.rounds, *band, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set(xlabel="round", ylabel=_title(metric), title=f"{_title(metric)}: mean over seeds, band ±1 std")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path


def write_report(summaries: Sequence[ConfigSummary], out_dir: Union[str, Path], metrics: Sequence[str] = METRICS) -> list[Path]:
    """Writes report.md, report.csv and one PNG per metric with data into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = table_metrics(summaries, metrics)
    paths = [write_markdown(summaries, columns, out_dir / "report.md"), write_csv(summaries, columns, out_dir / "report.csv")]
    for metric in METRICS:
        if metric in metrics and metric not in FINAL_ROUND_ONLY and any(len(s.curves[metric].rounds) for s in summaries):
            paths.append(plot_metric(summaries, metric, out_dir / f"{metric}.png"))
    return paths


# ---------------------------------------------------------------------------- command line


def _metric_list(text: str) -> tuple[str, ...]:
    """Parses ``--metrics`` so a typo is refused instead of silently plotting nothing."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        got = ", ".join(unknown) if unknown else "nothing"
        raise argparse.ArgumentTypeError(f"got {got}; expected a comma-separated subset of {','.join(METRICS)}")
    return names


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nordfl-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or sweep folders (searched recursively)")
    parser.add_argument("--out", type=Path, help="where to write report.md, report.csv and plots (default: the first folder)")
    parser.add_argument("--metrics", type=_metric_list, default=METRICS, help=f"comma-separated subset of {','.join(METRICS)}")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if all((Path(folder) / "suite.json").exists() for folder in args.folders):
        return _suite_main(args)
    try:
        summaries = summarise(args.folders)
        console = Console()
        console.print(make_table(summaries, args.metrics))
        out_dir = args.out or args.folders[0]
        paths = write_report(summaries, out_dir, args.metrics)
    except (ReportError, OSError) as error:
        print(f"nordfl-report: error: {error}", file=sys.stderr)
        return 2
    console.print(f"wrote {', '.join(path.name for path in paths)} to {out_dir}")
    return 0


def _suite_main(args: argparse.Namespace) -> int:
    """Suite folders (``nordfl-bench`` output): their leaderboards, into each folder or ``--out``."""
    from nordfl.sim.leaderboard import write_leaderboard  # the leaderboard builds on this module

    console = Console()
    for folder in args.folders:
        out_dir = args.out / folder.name if args.out and len(args.folders) > 1 else args.out or folder
        try:
            paths = write_leaderboard(folder, out_dir)
        except (ReportError, OSError) as error:
            print(f"nordfl-report: error: {error}", file=sys.stderr)
            return 2
        console.print(f"wrote {', '.join(p.name for p in paths[:2])} and {len(paths) - 2} plot(s) to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
