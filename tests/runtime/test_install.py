"""What a hospital's IT installs: the systemd units (checked by systemd itself and against the `nordfl` command
line they run) and the offline install from a wheelhouse with no package index."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nordfl.runtime.cli import _parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = {"nordfl-coordinator.service": "coordinator.env", "nordfl-site.service": "site.env"}
NORDFL = Path(sys.executable).parent / "nordfl"


def _unit(name: str) -> str:
    return (DEPLOY / name).read_text().replace("/opt/nordfl/venv/bin/nordfl", str(NORDFL))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_accepts_the_unit_files(tmp_path):
    for name in UNITS:
        (tmp_path / name).write_text(_unit(name))
    done = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr  # an unknown key is only a warning
    (tmp_path / "typo.service").write_text(_unit("nordfl-site.service").replace("NoNewPrivileges", "NoNewPrivilegs"))
    typo = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "typo.service")], capture_output=True, text=True,
                          timeout=60)
    assert "Unknown key 'NoNewPrivilegs'" in typo.stderr  # so the check above can fail


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_units_run_a_command_line_nordfl_accepts(unit):
    """ExecStart with the example environment file filled in parses as `nordfl` arguments (no misspelt flag)."""
    env = dict(re.findall(r"^([A-Z_]+)=(.*)$", (DEPLOY / UNITS[unit]).read_text(), re.M))
    line = re.search(r"^ExecStart=(.*)$", (DEPLOY / unit).read_text(), re.M)[1]
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], line)  # ${VAR}: one word
    words = [w for word in shlex.split(line) for w in (env[word[1:]].split() if word.startswith("$") else [word])]
    args = _parser().parse_args(words[1:])
    assert args.log_format == "json" and (args.state or args.jobs).startswith("/var/lib/nordfl/")
    assert "Restart=on-failure" in (DEPLOY / unit).read_text() and "RestartPreventExitStatus=2" in (DEPLOY / unit).read_text()


@pytest.mark.slow
def test_the_wheel_installs_with_no_package_index(tmp_path):
    """The offline path of docs/deployment.md: a wheel built here installs with `pip install --no-index` from a
    wheelhouse folder, the index made unreachable too. (Its dependencies come from this environment here; on a
    hospital server they come from the same wheelhouse, filled by `pip download` on a connected machine.)"""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(Path(__file__).resolve().parents[2], source,
                    ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "outputs", "multirun"))
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheelhouse),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    venv_site = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (jax, grpcio, ...) from this environment, after the new venv's own packages.
    Path(venv_site, "dependencies.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    pip = tmp_path / "venv" / "bin" / "pip"
    offline = os.environ | {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run([str(pip), "install", "--no-index", "--find-links", str(wheelhouse), "--ignore-installed",
                           "--no-deps", "nordfl"], capture_output=True, text=True, timeout=300, env=offline)
    assert done.returncode == 0, done.stderr[-2000:]
    installed = subprocess.run([str(tmp_path / "venv" / "bin" / "nordfl"), "provision", str(tmp_path / "fed")],
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0 and (tmp_path / "fed" / "ca" / "ca.pem").exists(), installed.stderr
    where = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import nordfl.runtime; print(nordfl.runtime.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(venv_site)  # the wheel's copy ran, not this checkout
    missing = subprocess.run([str(pip), "install", "--no-index", "--find-links", str(wheelhouse), "no-such-package"],
                             capture_output=True, text=True, timeout=120, env=offline)
    assert missing.returncode != 0  # nothing came from an index
