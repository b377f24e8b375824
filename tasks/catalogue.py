"""The studies NordFL ships, by name, and where a study named on the command line lives.

``nordfl-sim study=heart`` runs a shipped study; ``study=path/to/study.yaml`` one outside the
package, its site mapping files in the same folder (or in ``study_sites=FOLDER``). ``locate``
turns either into the study file and the folder of mappings, plus the train/test split the
study was shipped with; ``nordfl.conf.studies`` turns that into the ``task=study`` overrides.

- ``heart``: the UCI heart-disease data as a study file and one mapping per hospital
  (``tasks/studies/heart/``, package data), reading the vendored CSV through a row selector.
- ``nordic5``: the synthetic five-country cohort (``tasks.nordic5``). Its files are generated
  once, seeded, into the cache folder (``$NORDFL_CACHE``, else ``$XDG_CACHE_HOME/nordfl``, else
  ``~/.cache/nordfl``) under ``studies/nordic5-seed0``, and reused when present.
- ``nordic5_los``: the same cohort's length of stay in days, a regression study; its study file
  and mappings are in that folder's ``los/``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import NamedTuple, Optional

STUDY_FILE = "study.yaml"


class StudyFiles(NamedTuple):
    """A study to train: its file, the folder of its sites' mapping files, and the split it ships with."""

    study: Path
    sites: Path
    test_fraction: Optional[float] = None  # None: the study task's default


def _heart() -> StudyFiles:
    folder = Path(str(resources.files("nordfl.tasks").joinpath("studies", "heart")))
    return StudyFiles(folder / STUDY_FILE, folder, test_fraction=0.34)  # as task=heart splits


def cache_dir() -> Path:
    """Where generated files are kept: ``$NORDFL_CACHE``, ``$XDG_CACHE_HOME/nordfl`` or ``~/.cache/nordfl``."""
    if os.environ.get("NORDFL_CACHE"):
        return Path(os.environ["NORDFL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "nordfl"


def nordic5_folder(seed: int = 0) -> Path:
    """The nordic5 files for ``seed`` in the cache, written once: into a temporary folder beside the
    final one, then renamed, so a reader never sees half a folder and two writers do not clash."""
    from nordfl.tasks.nordic5 import LOS_FOLDER, write_nordic5

    folder = cache_dir() / "studies" / f"nordic5-seed{seed}"

    def complete() -> bool:
        return (folder / STUDY_FILE).is_file() and (folder / LOS_FOLDER / STUDY_FILE).is_file()

    if complete():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_nordic5(partial, seed=seed)
        if (folder / STUDY_FILE).is_file():  # written before nordic5_los shipped: add its folder (same CSV files)
            os.rename(partial / LOS_FOLDER, folder / LOS_FOLDER)
        else:
            os.rename(partial, folder)
    except OSError:
        if not complete():  # not another writer's finished folder: a real failure
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _nordic5() -> StudyFiles:
    folder = nordic5_folder(0)
    return StudyFiles(folder / STUDY_FILE, folder)


def _nordic5_los() -> StudyFiles:
    from nordfl.tasks.nordic5 import LOS_FOLDER

    folder = nordic5_folder(0) / LOS_FOLDER
    return StudyFiles(folder / STUDY_FILE, folder)


SHIPPED = {"heart": _heart, "nordic5": _nordic5, "nordic5_los": _nordic5_los}
"""Shipped study name -> a function giving its files (nordic5's are written on first use)."""


def locate(study: str, sites: Optional[str] = None) -> StudyFiles:
    """The study named ``study`` (shipped) or in the file ``study``, with its mappings in ``sites``
    (default: the study file's folder).

    Raises:
      ValueError: naming the value, the shipped studies and what a file needs.
    """
    if study in SHIPPED:
        files = SHIPPED[study]()
    else:
        path = Path(study).expanduser()
        if not path.is_file():
            raise ValueError(f"study: {study!r} is neither a shipped study ({', '.join(SHIPPED)}) nor a study file; expected "
                             "one of those names or the path to a study YAML with its sites' mapping files beside it")
        files = StudyFiles(path.resolve(), path.resolve().parent)
    if sites is not None:
        folder = Path(sites).expanduser()
        if not folder.is_dir():
            raise ValueError(f"study_sites: {sites!r} is not a folder; expected the folder of the sites' mapping files")
        files = files._replace(sites=folder.resolve())
    return files
