"""use_cpu_cores: one JAX CPU device per core, asked for before JAX starts (in a fresh interpreter)."""

import os
import subprocess
import sys

import pytest

PROBE = ("from nordfl.sim.devices import use_cpu_cores; import jax; "
         "asked = use_cpu_cores({arg}); print(asked, jax.device_count('cpu'), use_cpu_cores(5))")


def _probe(arg, xla_flags=""):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": xla_flags} if xla_flags else {})
    out = subprocess.run([sys.executable, "-c", PROBE.format(arg=arg)], env=env, capture_output=True, text=True, check=True)
    return [int(v) for v in out.stdout.split()]


@pytest.mark.parametrize("arg, expected", [("3", 3), ("None", len(os.sched_getaffinity(0)))])
def test_asks_for_the_devices_once_then_leaves_them(arg, expected):
    asked, count, again = _probe(arg)
    assert asked == count == expected
    assert again == 0  # JAX is running now: a second request is ignored, not an error


def test_xla_flags_win():
    assert _probe("3", "--xla_force_host_platform_device_count=2") == [0, 2, 0]


@pytest.mark.parametrize("setting, expected", [(None, len(os.sched_getaffinity(0))), ("1", 1), ("3", 3)])
def test_importing_the_simulator_gives_one_device_per_core_by_default(setting, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORDFL_CPU_DEVICES")}
    env |= {"NORDFL_CPU_DEVICES": setting} if setting else {}
    out = subprocess.run([sys.executable, "-c", "import nordfl.sim, jax; print(jax.device_count('cpu'))"],
                         env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == expected


def test_a_bad_device_count_in_the_environment_is_named():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"NORDFL_CPU_DEVICES": "many"}
    out = subprocess.run([sys.executable, "-c", "import nordfl.sim"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "NORDFL_CPU_DEVICES: must be an integer >= 1 (or unset for one device per core), got 'many'" in out.stderr
