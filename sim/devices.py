"""One JAX CPU device per core, so the simulator's client axis runs on every core.

XLA's CPU backend shows one device by default, and a vmapped cohort of small clients then
runs its chain of tiny steps on about one core: a round is bound by per-operation
overhead, not arithmetic. With one device per core the simulator shards the cohort over
them and each core runs its share's chain on its own (W1 on 2 cores: 65 -> 38 ms/round;
see docs/benchmarks.md). It only affects the CPU backend; on a GPU or TPU nothing changes.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)


def use_cpu_cores(count: Optional[int] = None) -> int:
    """Asks JAX for ``count`` CPU devices (default: one per core available to this process).

    Must run before JAX initialises its backends (before any JAX operation). Does nothing,
    and says so at debug level, when ``XLA_FLAGS`` already sets a host device count or the
    backends are already up (e.g. when called from inside a test session).

    Returns:
      The number of CPU devices JAX was asked for (0 if the request was not applied).
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        log.debug("XLA_FLAGS sets the host device count; leaving it")
        return 0
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if count < 1:  # the config check reports it, naming the key
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: keep what they have
        log.debug("JAX backends already initialised; CPU device count left at %d", jax.local_device_count("cpu"))
        return 0
    return count


def cpu_devices_from_env() -> Optional[int]:
    """``NORDFL_CPU_DEVICES`` as a device count (None when unset: one per core)."""
    value = os.environ.get("NORDFL_CPU_DEVICES", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"NORDFL_CPU_DEVICES: must be an integer >= 1 (or unset for one device per core), got {value!r}")
    return int(value)
