"""``nordfl-bench``: run an algorithm comparison suite and write its leaderboard.

``nordfl-bench suite=heart`` runs every algorithm × setting × seed of ``conf/suite/heart.yaml``
into ``bench/heart/<time>/`` and writes ``leaderboard.md``, ``leaderboard.csv`` and plots
there; ``nordfl-bench suite=heart mode=tune`` runs the tuning protocol instead and prints the
hyperparameters it chose, as the ``tuned:`` section to paste into the suite config. Rerun
with ``hydra.run.dir=<folder>`` to continue an interrupted suite: finished cells are skipped.

On a cluster, ``nordfl-bench -m part=0/4,1/4,2/4,3/4 hydra/launcher=submitit_slurm`` runs the
suite as 4 jobs through Hydra's launcher plugin, each training its share of the programs into
the sweep folder; when they are all in, ``AssembleParts`` writes the leaderboard there.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nordfl.conf.schema import ConfigError
from nordfl.conf.plugins import cli_main
from nordfl.sim.devices import use_cpu_cores
from nordfl.sim.leaderboard import training_seconds, write_leaderboard
from nordfl.sim.suite import choose_hyperparameters, parse_part, part_manifest, run_suite


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
            self.start = time.perf_counter()  # the time left extrapolates training, not building the cells before it
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
    hydra_config = HydraConfig.get()
    # The parts of a multirun share the sweep folder; one job alone writes into its run folder.
    multirun = hydra_config.mode == RunMode.MULTIRUN and cfg.get("part") is not None
    suite_dir = Path(hydra_config.sweep.dir if multirun else hydra_config.runtime.output_dir)
    reporter = ProgressReporter(console, cfg.logger.progress)
    try:
        part = parse_part(cfg.get("part"))
        manifest = run_suite(cfg, suite_dir, reporter)
    except ConfigError as e:
        reporter.close()
        Console(stderr=True).print(f"[red]nordfl-bench: config error:[/red] {e}", highlight=False)
        sys.exit(2)
    reporter.close()
    if part is not None:
        console.print(f"part {part[0]}/{part[1]} of {manifest['suite']['name']} done ({suite_dir / part_manifest(part)}); "
                      f"the leaderboard is written when every part is in (at the end of a multirun, or by "
                      f"nordfl-bench without part= into {suite_dir})", highlight=False)
        return
    finish(suite_dir, manifest, console)


def finish(suite_dir: Path, manifest: dict, console: Console) -> None:
    """A whole suite's leaderboard, and in tune mode the chosen hyperparameters (``tuned.yaml``)."""
    paths = write_leaderboard(suite_dir)
    console.print(f"{manifest['suite']['name']}: {len(manifest['cell_order'])} cells × {len(manifest['seeds'])} seeds, "
                  f"{training_seconds(manifest):.0f}s of training; leaderboard: {paths[0]}")
    if manifest["mode"] == "tune":
        chosen = choose_hyperparameters(suite_dir)
        (suite_dir / "tuned.yaml").write_text(yaml.safe_dump({"tuned": chosen}, sort_keys=False))
        console.print("chosen hyperparameters (the suite config's tuned: section), also in "
                      f"{suite_dir / 'tuned.yaml'}:\n" + yaml.safe_dump({"tuned": chosen}, sort_keys=False))


class AssembleParts(Callback):
    """After a multirun whose jobs were parts of one suite (``part=i/n``), the suite run once more without
    ``part`` in the sweep folder: every cell is found finished, and the leaderboard is written."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        suite_dir = Path(config.hydra.sweep.dir)
        if not any(suite_dir.glob("suite.part-*-of-*.json")):
            return  # a sweep over something else
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
        with open_dict(config):
            config.part = None
        finish(suite_dir, run_suite(config, suite_dir), Console())


def cli() -> None:
    """``nordfl-bench``: loads the plugins the command line names, then runs ``main``."""
    cli_main(main, "nordfl-bench", studies=False)  # study= belongs in a suite's run overrides


if __name__ == "__main__":
    cli()
