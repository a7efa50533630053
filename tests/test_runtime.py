"""The process-level XLA setting the entry points make (vrtspike_jax/runtime.py): the memory-minimising XLA:CPU
scheduler on single-device CPU hosts only, never over the user's choice; importing the package changes nothing; the
opt-in reduction flag the docs name is one this XLA accepts."""
import os
import subprocess
import sys

import pytest

from vrtspike_jax import runtime
import helpers as testing


def _host(monkeypatch, flags, platforms, keep):
    """A process environment: XLA_FLAGS, JAX_PLATFORMS and VRTSPIKE_KEEP_XLA_FLAGS (None: unset)."""
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    if keep is None:
        monkeypatch.delenv("VRTSPIKE_KEEP_XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("VRTSPIKE_KEEP_XLA_FLAGS", keep)


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
    _host(monkeypatch, flags, platforms, keep)
    assert runtime.prefer_memory_scheduler_on_cpu() is added
    assert (runtime.CPU_SCHEDULER_FLAG in os.environ["XLA_FLAGS"].split()) is added
    assert all(f in os.environ["XLA_FLAGS"].split() for f in flags.split())  # nothing of the user's removed


def test_the_reduce_flag_is_one_this_xla_accepts():
    """XLA refuses to start on a flag it does not know: a process with the opt-in CPU_REDUCE_FLAG (docs) runs and
    reduces right; the entry points do not add it."""
    probe = ("import jax, jax.numpy as jnp, numpy as np; x = np.arange(64 * 96 * 96, dtype=np.float32)"
             ".reshape(64, 96, 96) / 1e4; print(float(np.abs(jax.jit(lambda a: jnp.sum(a, 0))(x) - x.sum(0)).max()))")
    env = testing.subprocess_env()
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {runtime.CPU_REDUCE_FLAG}"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1e-3


def test_multi_device_subprocesses_do_not_inherit_the_scheduler_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", runtime.CPU_SCHEDULER_FLAG)
    many = testing.subprocess_env(device_count=8)["XLA_FLAGS"].split()
    assert runtime.CPU_SCHEDULER_FLAG not in many and "--xla_force_host_platform_device_count=8" in many
    assert runtime.CPU_SCHEDULER_FLAG in testing.subprocess_env()["XLA_FLAGS"].split()
    assert runtime.forced_cpu_device_count("--a=1 --xla_force_host_platform_device_count=4") == 4


def test_importing_the_package_changes_no_process_setting():
    """A library user's process keeps its XLA_FLAGS; an entry point (main.py, imported) sets them first thing."""
    probe = ("import os, vrtspike_jax, vrtspike_jax.train.train_lib, vrtspike_jax.inference; "
             "print(repr(os.environ.get('XLA_FLAGS')))")
    env = testing.subprocess_env(extra={"XLA_FLAGS": "--xla_backend_optimization_level=0"})
    env.pop("VRTSPIKE_KEEP_XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300,
                         cwd=testing.REPO_ROOT)
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "'--xla_backend_optimization_level=0'", \
        run.stdout + run.stderr
    entry = "import os, main; print(repr(os.environ.get('XLA_FLAGS')))"
    run = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, env=env, timeout=300,
                         cwd=testing.REPO_ROOT)
    assert run.returncode == 0 and runtime.CPU_SCHEDULER_FLAG in run.stdout.strip().splitlines()[-1], \
        run.stdout + run.stderr
    assert runtime.CPU_REDUCE_FLAG not in run.stdout.strip().splitlines()[-1]
