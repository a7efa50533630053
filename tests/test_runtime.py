"""The process-level XLA settings the entry points make (vrtspike_jax/runtime.py): XLA's own convolution kernels on
CPU-only hosts, the memory-minimising XLA:CPU scheduler on single-device CPU hosts only, neither over the user's
choice; importing the package changes nothing; the flags the docs name are ones this XLA accepts and computes right
with."""
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


@pytest.mark.parametrize("flags, platforms, keep, scheduler, conv", [
    ("", "cpu", None, True, True),
    ("--xla_backend_optimization_level=0", "cpu", None, True, True),
    ("", "cuda", None, False, False),                                                    # accelerator host
    ("--xla_force_host_platform_device_count=8", "cpu", None, False, True),    # fsdp collectives deadlock with it
    ("--xla_force_host_platform_device_count=1", "cpu", None, True, True),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", "cpu", None, False, True),  # the user's own choice
    ("--xla_cpu_experimental_ynn_fusion_type=-reduce", "cpu", None, True, False),        # the user's own choice
    ("", "cpu", "1", False, False),                                                      # opt-out
])
def test_cpu_flags_only_where_safe_and_never_over_the_users_choice(monkeypatch, flags, platforms, keep, scheduler,
                                                                   conv):
    _host(monkeypatch, flags, platforms, keep)
    added = runtime.set_cpu_xla_flags()
    assert added == [f for f, want in ((runtime.CPU_CONV_FLAG, conv), (runtime.CPU_SCHEDULER_FLAG, scheduler)) if want]
    assert (runtime.CPU_SCHEDULER_FLAG in os.environ["XLA_FLAGS"].split()) is scheduler
    assert (runtime.CPU_CONV_FLAG in os.environ["XLA_FLAGS"].split()) is conv
    assert all(f in os.environ["XLA_FLAGS"].split() for f in flags.split())  # nothing of the user's removed
    assert runtime.set_cpu_xla_flags() == []                                 # a second call adds nothing


_CONV_PROBE = """
import jax, jax.numpy as jnp, numpy as np
x = np.random.default_rng(0).standard_normal((1, 16, 16, 32)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((3, 3, 32, 48)).astype(np.float32)
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
program = conv.lower(x, w).compile().as_text()
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
ref = sum(np.einsum("nhwc,co->nhwo", xp[:, i:i + 16, j:j + 16], w[i, j].astype(np.float64))
          for i in range(3) for j in range(3))
print("__ynn_fusion" in program, float(np.linalg.norm(np.asarray(conv(x, w)) - ref) / np.linalg.norm(ref)))
"""


@pytest.mark.parametrize("flag", ["conv", "reduce"])
def test_the_kernel_flags_are_ones_this_xla_accepts_and_convolve_right(flag):
    """XLA refuses to start on a flag it does not know. With CPU_CONV_FLAG (set by the entry points) or the opt-in
    CPU_REDUCE_FLAG a 3x3 convolution that YNNPACK would take runs on XLA's own kernel and matches a float64
    reference; without either it is YNNPACK's (so the probe would see a change of kernel)."""
    env = testing.subprocess_env()
    plain = " ".join(f for f in env.get("XLA_FLAGS", "").split() if runtime.YNN_FUSION_OPTION not in f)
    outputs = {}
    for name, extra in (("none", ""), (flag, runtime.CPU_CONV_FLAG if flag == "conv" else runtime.CPU_REDUCE_FLAG)):
        env["XLA_FLAGS"] = f"{plain} {extra}".strip()
        run = subprocess.run([sys.executable, "-c", _CONV_PROBE], capture_output=True, text=True, env=env,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        uses_ynn, error = run.stdout.split()[-2:]
        outputs[name] = (uses_ynn == "True", float(error))
    assert outputs["none"][0] and not outputs[flag][0], outputs
    assert outputs[flag][1] < 1e-6, outputs


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
    assert runtime.CPU_CONV_FLAG in run.stdout.strip().splitlines()[-1]
    assert runtime.CPU_REDUCE_FLAG not in run.stdout.strip().splitlines()[-1]
