r"""Speed and memory of the models: forward and train step, compile time, peak memory, FLOPs, FLOP/s (and MFU).

    python scripts/benchmark.py --model deblur --frames 6 --height 64 --width 64 --mode forward,train
    python scripts/benchmark.py --model deblur_spike --frames 5 --height 256 --width 256 --dtype bfloat16 \
        --remat full --json runs/bench.json

Synthetic inputs of the real shapes (no data pipeline, no TensorFlow/CLU/ml_collections: it runs unchanged on
the GPU machines). Times are wall-clock medians over --runs calls after --warmup calls, each ended with
block_until_ready. Peak memory: on accelerators the device's peak bytes in use; on CPU the process's peak
resident set (VmHWM), reset before each phase so that compile and run peaks are reported separately, and XLA's
own buffer-assignment figure for the compiled program. FLOPs come from XLA's cost analysis of the compiled
program; MFU divides the achieved FLOP/s by --peak_tflops (default: 790 TFLOP/s dense bf16 on H100/H200, the
figure measured on these cards; none on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Importing the package first sets its XLA:CPU options (vrtspike_jax/runtime.py) before jax starts.
import vrtspike_jax  # noqa: E402,F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from vrtspike_jax import cli  # noqa: E402
from vrtspike_jax.models.vrt import preset  # noqa: E402
from vrtspike_jax.models.vrt_spike import VRTWithSpike, VRTWithSpikeConfig, part_parameter_counts  # noqa: E402

TINY = dict(depths=(2,) * 7 + (1, 1), embed_dims=(16,) * 7 + (24, 24), num_heads=(2,) * 7 + (3, 3),
            deformable_groups=4, indep_reconsts=(8,))

# Named models: (VRT preset, VRT architecture overrides, spike settings)
MODELS = {
    "deblur": ("deblur", {}, dict(use_spike=False)),
    "deblur_spike": ("deblur", {}, dict(use_spike=True, fuse_stages=(1, 2, 3, 4, 5, 6, 7))),
    "deblur_spike14": ("deblur", {}, dict(use_spike=True, fuse_stages=(1, 2, 3, 4))),
    "vrt120": ("deblur", dict(embed_dims=(120,) * 7 + (120,) * 4, deformable_groups=12), dict(use_spike=False)),
    "vrt120_spike": ("deblur", dict(embed_dims=(120,) * 7 + (120,) * 4, deformable_groups=12),
                     dict(use_spike=True)),
    "small": ("small_fixture", {}, dict(use_spike=False)),
    "small_spike": ("small_fixture", {}, dict(use_spike=True)),
    "tiny_spike": ("small_fixture", TINY, dict(use_spike=True)),
}

PEAK_TFLOPS = {"H100": 790.0, "H200": 790.0}


def _proc_status_bytes(field):
    """A memory field of /proc/self/status ('VmHWM': peak resident set, 'VmRSS': resident set) in bytes."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _reset_hwm():
    """Returns freed heap to the OS (glibc keeps what XLA's compiler freed), then resets the peak-RSS mark."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _device_peak_bytes():
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        return None
    return stats.get("peak_bytes_in_use")


def _gib(value):
    return None if value is None else value / 2 ** 30


def build(args):
    vrt_preset, overrides, spike = MODELS[args.model]
    overrides = dict(overrides)
    overrides.update(remat=args.remat, remat_stages=bool(args.remat_stages), scan_blocks=args.scan_blocks,
                     attention_chunk_windows=args.attention_chunk_windows,
                     attention_per_head=bool(args.attention_per_head), alignment_chunk=args.alignment_chunk,
                     dtype=None if args.dtype == "float32" else args.dtype)
    config = VRTWithSpikeConfig(vrt=preset(vrt_preset, **overrides), spike_bins=args.spike_bins, **spike)
    return VRTWithSpike(config, rngs=nnx.Rngs(0))


def _measure(fn, argsets, runs, warmup):
    """Calls fn(*argsets[i % len]) warmup + runs times; returns (first call seconds, list of run seconds)."""
    times = []
    first = None
    for i in range(warmup + runs):
        args = argsets(i)
        start = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        if first is None:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
    return first, times


def _flops(compiled):
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:
        return None


def _memory_analysis(compiled):
    try:
        m = compiled.memory_analysis()
        return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
                    generated_code=m.generated_code_size_in_bytes)
    except Exception:
        return None


def run_phase(name, jitted, make_args, args, peak_tflops, call=None):
    """Lowers and compiles `jitted` on make_args(0), then times `call(compiled, *make_args(i))` (default: the
    compiled function itself) over warm-up + runs calls."""
    _reset_hwm()
    start = time.perf_counter()
    compiled = jitted.lower(*make_args(0)).compile()
    compile_s = time.perf_counter() - start
    compile_rss = _proc_status_bytes("VmHWM")
    _reset_hwm()
    rss_before_run = _proc_status_bytes("VmRSS")
    fn = compiled if call is None else (lambda *a: call(compiled, *a))
    first, times = _measure(fn, make_args, args.runs, args.warmup)
    run_rss = _proc_status_bytes("VmHWM") if first is not None else None
    flops = _flops(compiled)
    median = statistics.median(times) if times else None   # --runs 0 --warmup 0: compile only
    achieved = flops / median if (flops and median) else None
    return dict(phase=name, compile_s=compile_s, first_call_s=first, times_s=times, median_s=median,
                flops=flops, tflops_per_s=None if achieved is None else achieved / 1e12,
                mfu=None if (achieved is None or not peak_tflops) else achieved / (peak_tflops * 1e12),
                xla_memory_bytes=_memory_analysis(compiled), peak_rss_compile_bytes=compile_rss,
                rss_before_run_bytes=rss_before_run, peak_rss_run_bytes=run_rss,
                device_peak_bytes=_device_peak_bytes())


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Bad flags end the run before anything is built: one line naming the flag and its value, exit status 2."""
    from vrtspike_jax.models.vrt.config import check_input_shape

    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("forward", "train")]
    if unknown or not modes:
        parser.error(f"--mode {args.mode!r}: expected a comma list of forward, train")
    for name in ("batch", "spike_bins"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("runs", "warmup", "remat_stages", "attention_chunk_windows", "alignment_chunk"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.runs == 0 and args.warmup > 0:
        parser.error("--runs 0 compiles only: give --warmup 0 as well")
    try:
        check_input_shape((args.batch, args.frames, args.height, args.width, 3))
    except ValueError as err:
        parser.error(f"--frames {args.frames} --height {args.height} --width {args.width}: {err}")
    spike_scale = MODELS[args.model][2].get("spike_scale", 1)
    if args.height % spike_scale or args.width % spike_scale:
        parser.error(f"--height {args.height} --width {args.width}: model {args.model} has spike_scale "
                     f"{spike_scale}, which must divide both")


def main(argv=None):
    parser = cli.ArgumentParser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deblur", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--spike_bins", type=int, default=32)
    parser.add_argument("--mode", default="forward,train", help="comma list of: forward, train")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots_saveable",
                                                            "dots_with_no_batch_dims_saveable"])
    parser.add_argument("--remat_stages", type=int, default=0,
                        help="1: also rematerialise each stage as a whole (leanest training memory, one more forward)")
    parser.add_argument("--scan_blocks", type=int, default=1)
    parser.add_argument("--attention_chunk_windows", type=int, default=0)
    parser.add_argument("--attention_per_head", type=int, default=1)
    parser.add_argument("--alignment_chunk", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3,
                        help="timed calls; --runs 0 --warmup 0 compiles only (compile time, FLOPs, XLA's memory plan: "
                             "for shapes that do not fit this host)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"],
                        help="jax_default_matmul_precision for float32 matmuls (TF32 on GPUs unless 'highest')")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    check_args(parser, args)
    args.scan_blocks = bool(args.scan_blocks)
    jax.config.update("jax_default_matmul_precision", args.precision)

    device = jax.local_devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    model = build(args)
    counts = part_parameter_counts(model)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    f = model.config.spike_scale
    shape = (args.batch, args.frames, args.height, args.width, 3)
    spike_shape = (args.batch, args.frames, args.height // f, args.width // f, args.spike_bins)

    def make_inputs(i):
        frames = jnp.asarray(rng.random(shape, np.float32))
        spikes = jnp.asarray(rng.standard_normal(spike_shape).astype(np.float32)) if model.config.use_spike \
            else None
        return frames, spikes

    inputs = [make_inputs(i) for i in range(2)]
    target = jnp.asarray(rng.random(shape, np.float32))
    results = []
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]

    if "forward" in modes:
        @jax.jit
        def forward(params, frames, spikes):
            return nnx.merge(graphdef, params)(frames, spikes)

        results.append(run_phase("forward", forward, lambda i: (params,) + inputs[i % 2], args, peak_tflops))

    if "train" in modes:
        optimizer = optax.adamw(2e-4, b1=0.9, b2=0.99, weight_decay=1e-4)
        opt_state = optimizer.init(params)

        def loss_fn(p, frames, spikes, key):
            out = nnx.merge(graphdef, p)(frames, spikes, rng=key)
            return jnp.mean(jnp.sqrt((out - target) ** 2 + 1e-6))

        def train_step(p, opt_state, frames, spikes, key):
            loss, grads = jax.value_and_grad(loss_fn)(p, frames, spikes, key)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        step = jax.jit(train_step, donate_argnums=(0, 1))
        state = {"params": params, "opt": opt_state}

        def make_args(i):
            return (state["params"], state["opt"]) + inputs[i % 2] + (jax.random.key(i),)

        def call(compiled, p, o, frames, spikes, key):
            state["params"], state["opt"], loss = compiled(p, o, frames, spikes, key)
            return loss

        results.append(run_phase("train", step, make_args, args, peak_tflops, call=call))

    header = dict(model=args.model, parameters=counts, input=list(shape), spike_input=list(spike_shape)
                  if model.config.use_spike else None, dtype=args.dtype, remat=args.remat,
                  remat_stages=bool(args.remat_stages), scan_blocks=args.scan_blocks,
                  attention_chunk_windows=args.attention_chunk_windows,
                  attention_per_head=bool(args.attention_per_head),
                  alignment_chunk=args.alignment_chunk, precision=args.precision, runs=args.runs,
                  warmup=args.warmup, device=kind, platform=device.platform, device_count=jax.device_count(),
                  jax=jax.__version__, python=platform.python_version(), host=platform.node(),
                  cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"model {args.model} ({sum(counts.values()):,} parameters), input {shape}, {args.dtype}, remat "
          f"{args.remat}, on {kind} x{jax.device_count()} (jax {jax.__version__})")
    cols = ["phase", "compile s", "median s", "runs s", "TFLOP/step", "TFLOP/s", "MFU", "XLA temp GiB",
            "RSS before run GiB", "peak RSS run GiB", "peak RSS compile GiB", "device peak GiB"]
    print(" | ".join(cols))
    for r in results:
        mem = r["xla_memory_bytes"] or {}
        fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(" | ".join([r["phase"], fmt(r["compile_s"], 1), fmt(r["median_s"], 3),
                          ",".join(f"{t:.2f}" for t in r["times_s"]),
                          fmt(None if r["flops"] is None else r["flops"] / 1e12, 3), fmt(r["tflops_per_s"], 3),
                          "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", fmt(_gib(mem.get("temp"))),
                          fmt(_gib(r["rss_before_run_bytes"])), fmt(_gib(r["peak_rss_run_bytes"])),
                          fmt(_gib(r["peak_rss_compile_bytes"])),
                          fmt(_gib(r["device_peak_bytes"]))]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
