"""Process-level XLA settings, and what XLA says of a compiled program.

`compiled_memory(compiled)`: the memory XLA plans for a compiled program (the one reading of `memory_analysis()`:
training logs it, the benchmark reports it, the restorer checks a window against free memory).

XLA settings: the entry points (main.py, scripts/*.py, the tests' conftest) make first thing,
before jax starts: `prefer_memory_scheduler_on_cpu()`. Importing `vrtspike_jax` does not; a library user who wants
the same memory behaviour calls it before the first jax computation.

On CPU-only hosts, XLA's default concurrency-optimised scheduler keeps the buffers of independent branches
alive together. For VRT that costs a lot of memory: the official deblurring model's forward pass at
1x12x128x128 needs 6.0 GiB of XLA temporaries with it and 2.7 GiB with the memory-minimising scheduler (with
per-head attention), and the train step's temporaries roughly halve too. So, unless the user already chose, we
ask XLA for the memory-minimising scheduler on hosts without accelerators. It must happen before jax creates its
CPU client (the first computation). Set VRTSPIKE_KEEP_XLA_FLAGS=1 to opt out.
Hosts with a GPU or TPU are left alone (the flag only concerns XLA:CPU), and so are processes with several CPU
devices (`--xla_force_host_platform_device_count=N`, N > 1): there the memory-minimising schedule deadlocks the
in-process collectives of parameter-sharded (fsdp) train steps (observed with jax 0.10.2: 8 fake devices, data=2 x
fsdp=4, every thread asleep in the first step; the default scheduler runs the same step in about a minute).

Not set by default: CPU_REDUCE_FLAG, XLA's own kernels for reductions instead of YNNPACK's. It made the
1x6x64x64 plain-VRT train step 17 % faster on this project's 2-core CPU (28.1 -> 23.2 s, docs/PERFORMANCE.md),
but XLA's reductions round more: a float32 sum over 49,152 rows (a bias gradient's sum at batch 2 x 6 frames x
64x64) is off by 3.4e-6 relative instead of 1.3e-7, and a two-process run then matches the one-process run only
to 2e-5 after one step instead of 1e-6. Add it to XLA_FLAGS yourself where speed matters more than that on a CPU
host (jaxlib 0.10 knows it; an XLA without the option refuses to start).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
CPU_REDUCE_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"   # opt-in only (see the module docstring)


def has_accelerator() -> bool:
    """Whether this host looks like it has a GPU or TPU (without initialising jax)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p in platforms for p in ("cuda", "gpu", "tpu", "rocm"))
    return bool(shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists() or Path("/dev/accel0").exists())


def forced_cpu_device_count(flags: str) -> int:
    """N of the last `--xla_force_host_platform_device_count=N` in an XLA_FLAGS string (1 when absent)."""
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(counts[-1]) if counts else 1


def prefer_memory_scheduler_on_cpu() -> bool:
    """Adds CPU_SCHEDULER_FLAG to XLA_FLAGS on CPU-only hosts with one CPU device (see the module docstring).
    Returns whether it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("VRTSPIKE_KEEP_XLA_FLAGS") == "1" or "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return False
    if has_accelerator() or forced_cpu_device_count(flags) > 1:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}".strip()
    return True


MEMORY_FIELDS = ("argument", "output", "temp", "alias", "generated_code")


def compiled_memory(compiled):
    """XLA's memory analysis of a compiled program (`jax.jit(f).lower(...).compile()`), in bytes per device:
    {"argument_bytes", "output_bytes", "temp_bytes" (the temporaries: activations kept for the backward pass,
    workspace), "alias_bytes" (outputs written into donated arguments), "generated_code_bytes", "total_bytes"
    (argument + output + temp)}; None when the backend gives no analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if stats is None:
        return None
    out = {f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes", 0)) for name in MEMORY_FIELDS}
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out
