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
