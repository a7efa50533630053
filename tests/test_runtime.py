"""The process-level XLA setting applied at import (vrtspike_jax/runtime.py): the memory-minimising XLA:CPU
scheduler on single-device CPU hosts only, never over the user's choice."""
import os

import pytest

from vrtspike_jax import runtime
import helpers as testing


@pytest.mark.parametrize("flags, platforms, keep, added", [
    ("", "cpu", None, True),
    ("--xla_backend_optimization_level=0", "cpu", None, True),
    ("", "cuda", None, False),                                                    # accelerator host
    ("--xla_force_host_platform_device_count=8", "cpu", None, False),           # fsdp collectives deadlock with it
    ("--xla_force_host_platform_device_count=1", "cpu", None, True),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", "cpu", None, False),  # the user's own choice
    ("", "cpu", "1", False),                                                      # opt-out
])
def test_memory_scheduler_flag_only_where_safe(monkeypatch, flags, platforms, keep, added):
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    if keep is None:
        monkeypatch.delenv("VRTSPIKE_KEEP_XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("VRTSPIKE_KEEP_XLA_FLAGS", keep)
    assert runtime.prefer_memory_scheduler_on_cpu() is added
    assert (runtime.CPU_SCHEDULER_FLAG in os.environ["XLA_FLAGS"].split()) is added
    assert all(f in os.environ["XLA_FLAGS"].split() for f in flags.split())  # nothing of the user's removed


def test_multi_device_subprocesses_do_not_inherit_the_scheduler_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", runtime.CPU_SCHEDULER_FLAG)
    many = testing.subprocess_env(device_count=8)["XLA_FLAGS"].split()
    assert runtime.CPU_SCHEDULER_FLAG not in many and "--xla_force_host_platform_device_count=8" in many
    assert runtime.CPU_SCHEDULER_FLAG in testing.subprocess_env()["XLA_FLAGS"].split()
    assert runtime.forced_cpu_device_count("--a=1 --xla_force_host_platform_device_count=4") == 4
