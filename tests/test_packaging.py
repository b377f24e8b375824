"""Every module of the source tree imports from a regular (non-editable) install of the wheel, made
offline from a wheelhouse, and the data files ship: a subpackage missing from ``packages`` or a file
missing from ``package-data`` fails here, not on a user's machine."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("algorithms", "tasks", "sim", "runtime", "conf", "registry")


def _source_modules() -> list[str]:
    modules = []
    for top in TOP_LEVEL:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join(("nordfl", *parts)))
    return modules


@pytest.mark.slow
def test_regular_install_imports_every_module(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for top in TOP_LEVEL:
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    # The offline path of docs/deployment.md: a wheel into a wheelhouse, installed with no package index
    # (the index pointed at a closed port too). The dependencies are this environment's here; on a
    # hospital server they come from the same wheelhouse, filled by `pip wheel` on a connected machine.
    wheelhouse = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse),
                    str(source)], check=True, cwd=tmp_path)
    offline = os.environ | {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull}
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheelhouse), "--no-deps",
                    "--target", str(target), "nordfl"], check=True, cwd=tmp_path, env=offline)
    missing = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheelhouse),
                              "--target", str(tmp_path / "nowhere"), "no-such-package"], capture_output=True, cwd=tmp_path, env=offline)
    assert missing.returncode != 0  # nothing comes from an index
    script = textwrap.dedent(
        f"""
        import importlib, sys
        sys.path.insert(0, {str(target)!r})
        for name in {_source_modules()!r}:
            module = importlib.import_module(name)
            where = getattr(module, "__file__", None) or list(module.__path__)[0]
            assert where.startswith({str(target)!r}), (name, where)
        from nordfl.tasks import heart
        assert heart().train_sizes() == [199, 172, 30, 85]
        from nordfl.tasks.catalogue import locate
        from nordfl.tasks.study import load_study
        from nordfl.tasks.study_data import load_sites
        files = locate("heart")
        assert str(files.study).startswith({str(target)!r}), files
        assert list(load_sites(load_study(files.study), files.sites)) == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
        print("imported", len({_source_modules()!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"imported {len(_source_modules())}" in out.stdout
