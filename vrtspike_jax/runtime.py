"""Process-level XLA settings, and what XLA says of a compiled program.

`compiled_memory(compiled)`: the memory XLA plans for a compiled program (the one reading of `memory_analysis()`:
training logs it, the benchmark reports it, the restorer checks a window against free memory).

XLA settings: the entry points (main.py, scripts/*.py, the tests' conftest) make first thing,
before jax starts: `set_cpu_xla_flags()`. Importing `vrtspike_jax` does not; a library user who wants the same
behaviour calls it before the first jax computation. On hosts with a GPU or TPU it adds nothing.

CPU_CONV_FLAG, on every CPU-only host: convolutions run on XLA's own (Eigen) kernels instead of YNNPACK's. On an
Intel Xeon host with 2 vCPUs (2026-12-02) YNNPACK took 937 ms for the weight gradient of a 3x3 convolution from 96
to 432 channels over 10x64x64 pixels (the last offset convolution of the deformable alignment; 33 GFLOP/s), Eigen
125 ms; the forward convolution 232 against 162 ms, the input gradient 250 against 145 ms. The plain-VRT train step
at 1x6x64x64 took 33.56 s with it against 35.67 s without, the forward pass 7.40 against 8.60 s
(docs/PERFORMANCE.md). It is added whatever the device count, so that multi-device runs compute what one device
does, and not where the user already set `xla_cpu_experimental_ynn_fusion_type`.

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

Not set by default: CPU_REDUCE_FLAG, XLA's own kernels for reductions (and, as CPU_CONV_FLAG, convolutions) instead
of YNNPACK's. It made the 1x6x64x64 plain-VRT train step 17 % faster on this project's 2-core CPU (28.1 -> 23.2 s,
docs/PERFORMANCE.md), but XLA's reductions round more: a float32 sum over 49,152 rows (a bias gradient's sum at
batch 2 x 6 frames x 64x64) is off by 3.4e-6 relative instead of 1.3e-7, and a two-process run then matches the
one-process run only to 2e-5 after one step instead of 1e-6. Add it to XLA_FLAGS yourself where speed matters more
than that on a CPU host (jaxlib 0.10 knows it; an XLA without the option refuses to start).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_CONV_FLAG = f"--{YNN_FUSION_OPTION}=-individual_convolution"
# Opt-in only (see the module docstring); it keeps CPU_CONV_FLAG's choice, which the user's own setting replaces.
CPU_REDUCE_FLAG = f"--{YNN_FUSION_OPTION}=-reduce,-individual_convolution"


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


def set_cpu_xla_flags() -> List[str]:
    """Adds to XLA_FLAGS, on CPU-only hosts, the flags of the module docstring that the user has not set: CPU_CONV_FLAG
    (any number of CPU devices) and CPU_SCHEDULER_FLAG (one CPU device only). Nothing with VRTSPIKE_KEEP_XLA_FLAGS=1
    or on a host with an accelerator. Returns the flags it added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("VRTSPIKE_KEEP_XLA_FLAGS") == "1" or has_accelerator():
        return []
    added = []
    if YNN_FUSION_OPTION not in flags:
        added.append(CPU_CONV_FLAG)
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags and forced_cpu_device_count(flags) == 1:
        added.append(CPU_SCHEDULER_FLAG)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags] + added).strip()
    return added


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
