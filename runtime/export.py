"""``nordfl export``: the trained model out of the coordinator's state, with a model card saying where it came from.

The export folder holds the global model twice, as named arrays (``model.npz``, readable with NumPy alone)
and as Flax's own serialisation (``model.msgpack``, ``flax.serialization.from_bytes``), plus
``model_card.json`` and ``model_card.md``: the job (so the model can be rebuilt), the study's hash, the
algorithm and its hyperparameters, the sites with their declared rows and final scores, the privacy
settings and each site's epsilon where its audit log is given, and the audit logs' chain heads.

``load_exported`` rebuilds the model from the folder (checking the files against the card's hashes), and
``score_at_site`` scores it on a site's own test rows exactly as the site agent did at the end of the run.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.runtime import wire
from nordfl.runtime.config import Job, build_job
from nordfl.runtime.coordinator import ROWS_FILE, STATE_FILE
from nordfl.runtime.store import atomic_write_text, load_tree

__all__ = ["Exported", "export_model", "load_exported", "score_at_site"]

MODEL_NPZ, MODEL_FLAX, CARD_JSON, CARD_MD = "model.npz", "model.msgpack", "model_card.json", "model_card.md"
ROW_MEANS = ("loss", "accuracy", "mae")
"""Scores that are means over a site's test rows: weighted by the sites' test rows they give the score on
all sites' test rows pooled, exactly. AUC, RMSE and R² do not pool this way and are left out of that line."""


class Exported(NamedTuple):
    """A reloaded export: the job it came from, the model's parameters, and the card."""

    job: Job
    params: Any
    card: dict


def export_model(state_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 site_logs: Mapping[str, str | os.PathLike] = {}) -> dict:
    """Writes the coordinator's current global model and its model card to ``out_dir`` (a new folder);
    returns the card. ``site_logs``: site name -> that site's audit log, for its epsilon spent."""
    state_dir, out = Path(state_dir), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: export into a new folder (an export is never overwritten)")
    entries = _read_log(state_dir / "audit.jsonl")
    start = next((e for e in entries if e["event"] == "start"), None)
    if start is None or "job" not in start or start["job"].get("kind", "train") != "train":
        raise ValueError(f"{state_dir}: not the state of a training job (its audit log has no training `start` entry; "
                         "a Table 1 job has no model to export)")
    job = Job.from_json(json.dumps(start["job"]))
    built = build_job(job)
    server, meta = load_tree(state_dir / STATE_FILE, built.algorithm.server_init(built.model.init_params))
    job_sha256 = wire.sha256_hex(job.to_json().encode())
    if meta.get("job_sha256") != job_sha256:
        raise ValueError(f"{state_dir}: the state and the audit log's job differ (job sha256 {meta.get('job_sha256')} "
                         f"against {job_sha256}); was the folder mixed from two runs?")
    params = built.algorithm.broadcast(server).params
    out.mkdir(parents=True, exist_ok=True)
    files = _write_model(out, params)
    card = _card(job, job_sha256, meta, entries, state_dir, files, {k: Path(v) for k, v in site_logs.items()})
    atomic_write_text(out / CARD_JSON, json.dumps(card, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / CARD_MD, card_markdown(card))
    return card


def _read_log(path: Path) -> list[dict]:
    from nordfl.runtime.audit import read_entries

    try:
        return read_entries(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no audit log at {path}: give the coordinator's --state folder") from None


def _write_model(out: Path, params) -> dict[str, str]:
    """The model as named arrays and as Flax's serialisation; returns each file's SHA-256."""
    from flax import serialization

    names, leaves = wire.leaf_names(params), jax.tree.leaves(params)
    with open(out / MODEL_NPZ, "wb") as f:
        np.savez(f, **{name: np.asarray(leaf) for name, leaf in zip(names, leaves)})
    (out / MODEL_FLAX).write_bytes(serialization.to_bytes(params))
    return {name: wire.sha256_hex((out / name).read_bytes()) for name in (MODEL_NPZ, MODEL_FLAX)}


def _card(job: Job, job_sha256: str, meta: dict, entries: list[dict], state_dir: Path, files: dict,
          site_logs: dict[str, Path]) -> dict:
    rows_file = state_dir / ROWS_FILE
    rows = json.loads(rows_file.read_text()) if rows_file.exists() else {}
    final = {e["site"]: e["metrics"] for e in entries if e["event"] == "final_metrics"}
    test_rows = {e["site"]: e.get("test_rows") for e in entries if e["event"] == "final_metrics"}
    heads = {e["site"]: e.get("site_audit_head") for e in entries if e["event"] == "update_accepted"}
    total = sum(rows.get(s, 0) for s in job.sites) or None
    sites = [{"name": site, "declared_rows": rows.get(site), "weight": None if total is None else rows.get(site, 0) / total,
              "final_metrics": final.get(site), "test_rows": test_rows.get(site), "last_audit_head": heads.get(site),
              "epsilon": _epsilon(site_logs[site]) if site in site_logs else None}
             for site in job.sites]
    spec = job.study_spec
    return {
        "nordfl_version": metadata.version("nordfl"),
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": meta.get("run_id"),
        "job_sha256": job_sha256,
        "study": None if spec is None else {"name": spec.name, "sha256": spec.sha256},
        "algorithm": job.algorithm_config,
        "task": job.task_config,
        "seed": job.seed,
        "rounds": {"completed": int(meta.get("round", 0)), "planned": job.rounds,
                   "finished": any(e["event"] == "finished" for e in entries)},
        "privacy": job.privacy(),
        "sites": sites,
        "metrics": _summary([s for s in sites if s["final_metrics"]]),
        "audit": {"coordinator_head": entries[-1]["hash"] if entries else None, "coordinator_entries": len(entries)},
        "files": files,
        "job": json.loads(job.to_json()),
    }


def _epsilon(log: Path) -> Optional[dict]:
    spent = [e for e in _read_log(log) if e["event"] == "privacy_spent"]
    return None if not spent else {k: spent[-1][k] for k in ("epsilon", "delta", "mechanism") if k in spent[-1]}


def _summary(scored: list[dict]) -> dict:
    """Mean over the scored sites, and weighted by their declared rows, of every metric they all report."""
    if not scored:
        return {}
    keys = sorted(set.intersection(*(set(s["final_metrics"]) for s in scored)))
    out = {"sites_scored": len(scored), "mean_over_sites": {k: float(np.mean([s["final_metrics"][k] for s in scored]))
                                                            for k in keys}}
    for label, field, names in (("weighted_by_rows", "declared_rows", keys),
                                ("pooled_test_rows", "test_rows", [k for k in keys if k in ROW_MEANS])):
        weights = [s[field] for s in scored]
        if names and all(weights) and sum(weights):  # a site that did not report its rows (protocol v1.4): no line
            out[label] = {k: float(np.average([s["final_metrics"][k] for s in scored], weights=weights)) for k in names}
    return out


def card_markdown(card: dict) -> str:
    """The card for people: what was trained, on whose data, with what privacy, and how to check it."""
    study = card["study"]
    rounds = card["rounds"]
    lines = [f"# Model card: {card['algorithm']['name']} on {card['task']['name']}", "",
             f"- NordFL {card['nordfl_version']}, exported {card['exported_at']}, run `{card['run_id']}`",
             f"- Study: {'none (a built-in task)' if study is None else study['name'] + ' (sha256 `' + study['sha256'] + '`)'}",
             f"- Job sha256: `{card['job_sha256']}`",
             f"- Rounds: {rounds['completed']} of {rounds['planned']}{'' if rounds['finished'] else ' (the run had not finished)'}",
             f"- Algorithm: `{json.dumps(_set(card['algorithm']), sort_keys=True)}`",
             f"- Task: `{json.dumps(_set(card['task']), sort_keys=True)}`",
             f"- Privacy: `{json.dumps(_set(card['privacy']), sort_keys=True)}`", "",
             "| site | declared rows | weight | test rows | final scores at the site | epsilon | last audit head |",
             "|---|---:|---:|---:|---|---|---|"]
    for s in card["sites"]:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted((s["final_metrics"] or {}).items())) or "kept at the site"
        eps = "" if s["epsilon"] is None else f"{s['epsilon']['epsilon']:.3g} (delta {s['epsilon'].get('delta')})"
        weight = "" if s["weight"] is None else f"{s['weight']:.3f}"
        lines.append(f"| {s['name']} | {s['declared_rows'] or ''} | {weight} | {s['test_rows'] or ''} | {scores} | {eps} | "
                     f"`{(s['last_audit_head'] or '')[:16]}` |")
    for label, key in (("Mean over sites", "mean_over_sites"), ("Weighted by declared (training) rows", "weighted_by_rows"),
                       ("All sites' test rows pooled", "pooled_test_rows")):
        if key in card["metrics"]:
            lines.append(f"\n{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in card["metrics"][key].items()))
    lines += ["", f"Coordinator audit log: {card['audit']['coordinator_entries']} entries, chain head "
                  f"`{card['audit']['coordinator_head']}`.",
              "", "Files: " + ", ".join(f"`{name}` (sha256 `{digest}`)" for name, digest in card["files"].items()), ""]
    return "\n".join(lines)


def _set(config: dict) -> dict:
    """The options that are set (not None), for reading; the JSON card keeps them all."""
    return {k: _set(v) if isinstance(v, dict) else v for k, v in config.items() if v is not None}


def load_exported(directory: str | os.PathLike) -> Exported:
    """The model of an export, rebuilt from its card's job; the files must match the card's hashes."""
    directory = Path(directory)
    card = json.loads((directory / CARD_JSON).read_text())
    npz = (directory / MODEL_NPZ).read_bytes()
    if wire.sha256_hex(npz) != card["files"][MODEL_NPZ]:
        raise ValueError(f"{directory / MODEL_NPZ} does not match the model card's sha256: the file was changed")
    job = Job.from_json(json.dumps(card["job"]))
    template = build_job(job).model.init_params
    names, leaves = wire.leaf_names(template), jax.tree.leaves(template)
    with np.load(io.BytesIO(npz)) as arrays:  # the bytes whose hash was just checked
        loaded = []
        for name, leaf in zip(names, leaves):
            array = arrays[name]
            if array.shape != leaf.shape or array.dtype != leaf.dtype:
                raise ValueError(f"{name}: {array.dtype}{list(array.shape)} in the export, the job's model has "
                                 f"{leaf.dtype}{list(leaf.shape)}")
            loaded.append(jnp.asarray(array))
    return Exported(job, jax.tree.unflatten(jax.tree.structure(template), loaded), card)


def score_at_site(directory: str | os.PathLike, site: str, data, task: Optional[str] = None) -> dict:
    """The exported model's scores on ``site``'s own test rows (``data``: its files or ``StudyRecords``), computed
    as the site agent computes its final scores."""
    from nordfl.runtime.site import local_setup, metrics_row, site_records

    exported = load_exported(directory)
    setup = local_setup(site, site_records(data, task or exported.job.task_config["name"]), exported.job)
    evaluate = jax.jit(setup.fns.evaluate)
    return metrics_row(evaluate(exported.params, setup.test, jnp.ones(len(setup.test.y), bool)))
