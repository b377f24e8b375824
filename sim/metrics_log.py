"""Where a run's metrics go: one JSON row per round in ``metrics.jsonl`` (always, in the
run folder) and, with ``logger=wandb``, the same rows and the resolved config to Weights &
Biases, offline unless the user has logged in."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

FILENAME = "metrics.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined metrics (an AUC over one class) are written as null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flatten(row: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}/")
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def wandb_mode(requested: Optional[str]) -> str:
    """``requested``, or online when an API key is configured and offline otherwise."""
    if requested:
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    return "online" if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


class MetricsLog:
    """Appends rows to ``run_dir/metrics.jsonl`` and mirrors them to W&B when enabled.

    On resume, rows past the checkpoint's round are dropped first, so the file holds each
    round once, exactly as an uninterrupted run writes it.
    """

    def __init__(self, run_dir: Path, *, config: dict, use_wandb: bool, project: str, mode: Optional[str],
                 run_name: str, resume_round: int = 0):
        self.path = Path(run_dir) / FILENAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_round and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["round"] <= resume_round]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._wandb = None
        if use_wandb:
            import wandb  # imported only when asked for: it is slow to import

            self._wandb = wandb.init(
                project=project, config=config, dir=str(run_dir), mode=wandb_mode(mode), name=run_name,
                reinit="finish_previous",
            )

    def log(self, row: dict) -> None:
        row = _clean(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(_flatten(row), step=row["round"])

    def close(self, summary: Optional[dict] = None) -> None:
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update(_flatten(_clean(summary)))
            self._wandb.finish()


def write_summary(path: Path, summary: dict) -> None:
    """``summary.json``: a finished run's final numbers, with undefined ones (NaN) written as null."""
    Path(path).write_text(json.dumps(summary, indent=2, default=float).replace("NaN", "null"))


def evaluation_row(evaluation, site_names) -> dict:
    """An ``Evaluation`` as the metrics row fields ``nordfl-report`` and the leaderboards read: ``train_loss``,
    ``test_<field>`` pooled and ``sites: {name: {field: value}}`` for every field of the task's metrics
    (classification: loss, accuracy, auc; regression: loss, rmse, mae, r2)."""
    pooled = {f"test_{f}": float(v) for f, v in zip(evaluation.pooled._fields, evaluation.pooled)}
    return {"train_loss": float(evaluation.train_loss), **pooled, "sites": site_rows(evaluation.sites, site_names)}


def site_rows(metrics, site_names) -> dict:
    """Per-site metrics (each field one value per site) as ``{name: {field: value}}``."""
    return {name: {f: float(getattr(metrics, f)[i]) for f in metrics._fields} for i, name in enumerate(site_names)}


def upload_to_wandb(run_dir: Path, *, config: dict, project: str, mode: Optional[str], run_name: str,
                    group: Optional[str] = None, summary: Optional[dict] = None) -> None:
    """Sends a finished run folder's ``metrics.jsonl`` to W&B as one run.

    ``nordfl-bench`` trains the seeds of a cell together, and W&B keeps one active run per
    process, so each seed is uploaded after its cell, one run at a time.
    """
    import wandb

    run = wandb.init(project=project, config=config, dir=str(run_dir), mode=wandb_mode(mode), name=run_name, group=group,
                     reinit="finish_previous")
    for line in (Path(run_dir) / FILENAME).read_text().splitlines():
        if line:
            row = json.loads(line)
            run.log(_flatten(row), step=row["round"])
    if summary:
        run.summary.update(_flatten(_clean(summary)))
    run.finish()
