"""``nordfl-bench``: run an algorithm comparison suite and write its leaderboard.

``nordfl-bench suite=heart`` runs every algorithm × setting × seed of ``conf/suite/heart.yaml``
into ``bench/heart/<time>/`` and writes ``leaderboard.md``, ``leaderboard.csv`` and plots
there; ``nordfl-bench suite=heart mode=tune`` runs the tuning protocol instead and prints the
hyperparameters it chose, as the ``tuned:`` section to paste into the suite config. Rerun
with ``hydra.run.dir=<folder>`` to continue an interrupted suite: finished cells are skipped.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nordfl.conf.schema import ConfigError
from nordfl.conf.plugins import cli_main
from nordfl.sim.devices import use_cpu_cores
from nordfl.sim.leaderboard import write_leaderboard
from nordfl.sim.suite import choose_hyperparameters, run_suite


class ProgressReporter:
    """Runs done of all runs (a cell advances by its seeds) with the time left; a line per cell in logs."""

    def __init__(self, console: Console, enabled: bool):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=console, disable=not enabled,
        )
        self.bar = None
        self.done = self.total = 0
        self.cell_start = self.start = time.perf_counter()
        self.trained_runs = 0

    def __call__(self, event: str, **fields) -> None:
        if event == "start":  # runs an earlier invocation finished count as done from the start
            self.total, self.done = fields["total"], fields["finished"]
            self.progress.start()
            self.bar = self.progress.add_task("suite", total=self.total, completed=self.done, status="")
            if fields["finished"]:
                self.console.print(f"continuing: {fields['finished']} of {self.total} runs already finished")
        elif event == "skip":
            pass  # counted at the start
        elif event == "cell":
            self.cell_start = time.perf_counter()
            self.progress.update(self.bar, status=f"{fields['cell'].setting} {fields['cell'].algorithm}")
        elif event == "round":
            cell = fields["cell"]
            self.progress.update(self.bar, status=f"{cell.setting} {cell.algorithm} round {fields['round']}/{fields['rounds']}")
        elif event == "done":
            self._advance(fields["runs"], trained=True)
            if not self.console.is_terminal:
                cell, result = fields["cell"], fields["result"]
                elapsed = time.perf_counter() - self.start
                left = elapsed / max(self.trained_runs, 1) * (self.total - self.done)
                accuracy = sum(result.final_accuracy) / len(result.final_accuracy)
                own = sum(result.own_site_accuracy) / len(result.own_site_accuracy)
                own_text = f", per-site mean {own:.3f}" if own == own and abs(own - accuracy) > 5e-4 else ""
                self.console.print(f"[{self.done}/{self.total} runs] {cell.setting} {cell.algorithm}: test accuracy "
                                   f"{accuracy:.3f}{own_text} (mean of seeds) in {result.wall_s:.1f}s; about {left / 60:.1f} min left",
                                   highlight=False)

    def _advance(self, runs: int, trained: bool) -> None:
        self.done += runs
        self.trained_runs += runs if trained else 0
        self.progress.update(self.bar, completed=self.done)

    def close(self) -> None:
        self.progress.stop()


@hydra.main(version_base=None, config_path="pkg://nordfl.conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    use_cpu_cores(cfg.get("cpu_devices"))
    console = Console()
    suite_dir = Path(HydraConfig.get().runtime.output_dir)
    reporter = ProgressReporter(console, cfg.logger.progress)
    try:
        manifest = run_suite(cfg, suite_dir, reporter)
    except ConfigError as e:
        reporter.close()
        Console(stderr=True).print(f"[red]nordfl-bench: config error:[/red] {e}", highlight=False)
        sys.exit(2)
    reporter.close()
    paths = write_leaderboard(suite_dir)
    console.print(f"{manifest['suite']['name']}: {len(manifest['cell_order'])} cells × {len(manifest['seeds'])} seeds, "
                  f"{manifest['wall_s']:.0f}s of training; leaderboard: {paths[0]}")
    if manifest["mode"] == "tune":
        chosen = choose_hyperparameters(suite_dir)
        (suite_dir / "tuned.yaml").write_text(yaml.safe_dump({"tuned": chosen}, sort_keys=False))
        console.print("chosen hyperparameters (the suite config's tuned: section), also in "
                      f"{suite_dir / 'tuned.yaml'}:\n" + yaml.safe_dump({"tuned": chosen}, sort_keys=False))


def cli() -> None:
    """``nordfl-bench``: loads the plugins the command line names, then runs ``main``."""
    cli_main(main, "nordfl-bench", studies=False)  # study= belongs in a suite's run overrides


if __name__ == "__main__":
    cli()
