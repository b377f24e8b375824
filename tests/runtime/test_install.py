"""What a hospital's IT installs: the systemd units, checked by systemd itself and against the `nordfl` command
line they run. (The offline install from a wheelhouse is tests/test_packaging.py's.)"""

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
