r"""Speed and memory of the step training runs and of the forward pass: compile time, peak memory, FLOPs, FLOP/s (MFU).

    python scripts/benchmark.py --config configs/baseline.py:vrt_only --frames 6 --height 64 --width 64
    python scripts/benchmark.py --config configs/baseline.py --frames 5 --height 256 --width 256 --dtype bfloat16 \
        --json runs/bench.json
    python scripts/benchmark.py --config configs/baseline.py:frozen_backbone --set optimizer.grad_clip_norm=0

The model, loss and optimizer come from a training config (a configs/*.py file with ':variant' args, plus `--set
key=value` overrides; the model knobs --dtype, --remat, ... override `model.*`). The train phase compiles and times
`train_lib.TrainSetup.jit_step()`, the very step `train_and_evaluate` runs: Charbonnier + VGG perceptual loss,
global-norm clipping, the non-finite guard, parameter groups, spike dropout, the mesh's shardings (all local
devices) and donated state. Batches are synthetic arrays of the real shapes (no data pipeline, no TensorFlow or
CLU). Without `loss.vgg_weights` the VGG16 features get random values of torchvision's shapes (the same compute;
said in the output). The forward phase times the model's inference call (no drop path).

Times are wall-clock medians over --runs calls after --warmup calls, each ended with block_until_ready. Peak
memory: on accelerators the device's peak bytes in use; on CPU the process's peak resident set (VmHWM), reset before
each phase so that compile and run peaks are reported separately, and XLA's own buffer-assignment figure for the
compiled program. FLOPs come from XLA's cost analysis of the compiled program; MFU divides the achieved FLOP/s by
--peak_tflops (default: 790 TFLOP/s dense bf16 on H100/H200, the figure measured on these cards; none on CPU).
Exit status 2 with one line for a bad flag or config.
"""
from __future__ import annotations

import argparse
import ast
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # the XLA:CPU options of every entry point, before jax starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vrtspike_jax import cli  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Flags that override `model.<field>` of the config (None: keep the config's value).
MODEL_KNOBS = ("dtype", "remat", "remat_stages", "remat_attention", "scan_blocks", "attention_chunk_windows",
               "attention_per_head", "alignment_chunk", "tie_parameter_gradients")

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


_START = time.perf_counter()


def progress(message: str) -> None:
    """One line on stderr, with the seconds since the script started: where a long run is (model build, tracing,
    XLA's compile, the calls), also when a time limit cuts it off."""
    print(f"[benchmark {time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)


def _device_peak_bytes():
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        return None
    return stats.get("peak_bytes_in_use")


def _gib(value):
    return None if value is None else value / 2 ** 30


def _measure(fn, argsets, runs, warmup, name=None):
    """Calls fn(*argsets[i % len]) warmup + runs times; returns (first call seconds, list of run seconds). With a
    `name`, each call's time is printed (`progress`) as it ends and a call running past 30 s says so every 30 s: a
    run cut off by a time limit still shows how long its calls took."""
    from vrtspike_jax.train import train_lib

    times = []
    first = None
    total = warmup + runs
    for i in range(total):
        args = argsets(i)
        kind = "warm-up" if i < warmup else "timed"
        label = f"{name}: call {i + 1}/{total} ({kind})"
        start = time.perf_counter()
        if name is None:
            jax.block_until_ready(fn(*args))
        else:
            with train_lib.progress_while(label, emit=progress):
                jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        if name is not None:
            progress(f"{label} {elapsed:.2f} s")
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


def _profile_call(fn, argsets, index, folder):
    """One more call of fn(*argsets(index)) under jax.profiler, written to `folder` (TensorBoard's and Perfetto's
    formats); returns its seconds (the profiler's overhead included)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        start = time.perf_counter()
        jax.block_until_ready(fn(*argsets(index)))
        return time.perf_counter() - start


def run_phase(name, jitted, make_args, args, peak_tflops, call=None):
    """Lowers and compiles `jitted` on make_args(0), then times `call(compiled, *make_args(i))` (default: the
    compiled function itself) over warm-up + runs calls; with --profile_dir, one more call is traced there (into
    <profile_dir>/<phase>) after the timed ones, so the profiler does not touch the medians."""
    from vrtspike_jax.train import train_lib

    # What an earlier phase or the model's eager initialisation compiled is dropped first: each phase's memory is its
    # own, as in a process that runs only that phase (and as training holds it).
    gc.collect()
    jax.clear_caches()
    _reset_hwm()
    progress(f"{name}: tracing and lowering")
    compiled, lower_s, compile_s = train_lib.lower_and_compile(jitted, make_args(0), name, emit=progress)
    progress(f"{name}: compiled in {compile_s:.1f} s (XLA {compile_s - lower_s:.1f} s); {args.warmup} warm-up and "
             f"{args.runs} timed calls")
    compile_rss = _proc_status_bytes("VmHWM")
    _reset_hwm()
    rss_before_run = _proc_status_bytes("VmRSS")
    fn = compiled if call is None else (lambda *a: call(compiled, *a))
    first, times = _measure(fn, make_args, args.runs, args.warmup, name=name)
    if first is not None:
        progress(f"{name}: first call {first:.2f} s" + (f", median {statistics.median(times):.3f} s" if times else ""))
    run_rss = _proc_status_bytes("VmHWM") if first is not None else None
    profiled_s = None
    if args.profile_dir:
        profiled_s = _profile_call(fn, make_args, args.warmup + args.runs, Path(args.profile_dir) / name)
    flops = _flops(compiled)
    median = statistics.median(times) if times else None   # --runs 0 --warmup 0: compile only
    achieved = flops / median if (flops and median) else None
    return dict(phase=name, compile_s=compile_s, lower_s=lower_s, first_call_s=first, times_s=times, median_s=median,
                flops=flops, tflops_per_s=None if achieved is None else achieved / 1e12,
                mfu=None if (achieved is None or not peak_tflops) else achieved / (peak_tflops * 1e12),
                xla_memory_bytes=runtime.compiled_memory(compiled), peak_rss_compile_bytes=compile_rss,
                rss_before_run_bytes=rss_before_run, peak_rss_run_bytes=run_rss,
                device_peak_bytes=_device_peak_bytes(), profiled_call_s=profiled_s)


def load_config(spec: str, sets):
    """`path[:variants]` -> the config (`get_config(variants)`), with `key=value` overrides typed like the default."""
    path, _, variants = spec.partition(":")
    file = Path(path) if Path(path).exists() else REPO_ROOT / path
    if not file.exists():
        raise ValueError(f"--config {spec}: config file {path} not found")
    module_spec = importlib.util.spec_from_file_location("benchmark_config", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variants or None)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parent = config
        for part in key.split(".")[:-1]:
            if part not in parent:
                raise ValueError(f"--set {item}: unknown config key {key!r}")
            parent = parent[part]
        name = key.split(".")[-1]
        if name not in parent:
            raise ValueError(f"--set {item}: unknown config key {key!r}")
        try:
            parent[name] = value
        except (TypeError, ValueError) as err:
            raise ValueError(f"--set {item}: {err}") from None
    return config


def configure(args):
    """The training config of the flags (ConfigError / ValueError for a bad one)."""
    from vrtspike_jax.train import preflight, run_config

    config = load_config(args.config, args.set)
    config.global_batch_size = args.batch
    config.data.clip_length = args.frames
    if args.spike_bins is not None:
        config.data.num_bins = args.spike_bins
    for knob in MODEL_KNOBS:
        value = getattr(args, knob)
        if value is not None:
            config.model[knob] = None if (knob == "dtype" and value == "float32") else value
    config = run_config.read(config)   # unknown keys, types and ranges
    preflight.check_model(config)
    preflight.check_training(config)
    return config


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Bad flags end the run before anything is built: one line naming the flag and its value, exit status 2."""
    from vrtspike_jax.models.vrt.config import check_input_shape

    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("forward", "train")]
    if unknown or not modes:
        parser.error(f"--mode {args.mode!r}: expected a comma list of forward, train")
    for name in ("batch", "spike_bins"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("runs", "warmup", "attention_chunk_windows", "alignment_chunk"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.runs == 0 and args.warmup > 0:
        parser.error("--runs 0 compiles only: give --warmup 0 as well")
    if args.profile_dir and args.runs == 0:
        parser.error(f"--profile_dir {args.profile_dir}: --runs 0 compiles only, there is no call to profile")
    try:
        check_input_shape((args.batch, args.frames, args.height, args.width, 3))
    except ValueError as err:
        parser.error(f"--frames {args.frames} --height {args.height} --width {args.width}: {err}")


def _flag_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/baseline.py",
                        help="training config file with ':variant' args (default: configs/baseline.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set optimizer.grad_clip_norm=0 (repeatable)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--spike_bins", type=int, default=None, help="K (default: the config's data.num_bins)")
    parser.add_argument("--mode", default="forward,train", help="comma list of: forward, train")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="compute dtype (default: the config's model.dtype, 'auto' = bfloat16 on accelerators)")
    parser.add_argument("--remat", default=None, choices=["none", "full", "dots_saveable",
                                                          "dots_with_no_batch_dims_saveable"])
    parser.add_argument("--remat_stages", type=_flag_bool, default=None,
                        help="1: also rematerialise each stage as a whole (leanest training memory, one more forward)")
    parser.add_argument("--remat_attention", type=_flag_bool, default=None,
                        help="1: also recompute each TMSA block's attention after its MLP's backward pass")
    parser.add_argument("--scan_blocks", type=_flag_bool, default=None)
    parser.add_argument("--attention_chunk_windows", type=int, default=None)
    parser.add_argument("--attention_per_head", type=_flag_bool, default=None)
    parser.add_argument("--alignment_chunk", type=int, default=None)
    parser.add_argument("--tie_parameter_gradients", default=None, choices=["auto", "on", "off"],
                        help="each stage's input gradient waits for its weight gradients (default: the config's; "
                             "auto = on with one device)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timed calls; --runs 0 --warmup 0 compiles only (compile time, FLOPs, XLA's memory plan: "
                             "for shapes that do not fit this host)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="highest", choices=["default", "high", "highest"],
                        help="jax_default_matmul_precision for float32 matmuls (TF32 on GPUs unless 'highest')")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile_dir", default=None,
                        help="trace one more call of each phase, after the timed ones, with jax.profiler into "
                             "DIR/<phase> (TensorBoard / Perfetto; scripts/time_breakdown.py reads it by model part)")
    return parser


def build(args):
    """The benchmark's model and step for the flags, built as training builds them: (config, mesh, setup,
    host_params, vgg_note). The setup is `train_lib.build_train_setup` of the typed config on the mesh of all local
    devices; without `loss.vgg_weights` and a non-zero perceptual weight the VGG features get random values."""
    from vrtspike_jax import factory, losses
    from vrtspike_jax.train import preflight, sharding, train_lib

    try:
        config = configure(args)
        mesh = sharding.make_mesh(config.mesh)
        sharding.check_batch_size(args.batch, mesh, jax.process_count())
    except (ValueError, preflight.ConfigError) as err:
        cli.exit_with_error(err)
    if args.height % config.data.spike_scale or args.width % config.data.spike_scale:
        cli.exit_with_error(f"--height {args.height} --width {args.width}: the config's data.spike_scale "
                            f"{config.data.spike_scale} must divide both")
    progress(f"building the model, loss and optimizer of {args.config} and the parameters ({jax.default_backend()})")
    vgg_note, vgg_params, loss = None, None, config.loss
    if loss.perceptual_weight != 0 and not loss.vgg_weights:
        vgg_params = losses.vgg_params_from_state(losses.random_vgg_state(loss.vgg_network, loss.vgg_layers),
                                                  loss.vgg_network, loss.vgg_layers)
        vgg_note = "VGG features with random values (no loss.vgg_weights): the same compute as the real weights"
    setup = train_lib.build_train_setup(config, mesh, vgg_params=vgg_params)
    return config, mesh, setup, factory.initial_params(config), vgg_note


def batch_shapes(args, config, setup):
    """{key: global shape} of the synthetic batch: blur and sharp [B, T, H, W, 3], spikes [B, T, H/f, W/f, K]."""
    f = config.data.spike_scale
    shapes = {"blur": (args.batch, args.frames, args.height, args.width, 3)}
    shapes["sharp"] = shapes["blur"]
    shapes["spike_vox"] = (args.batch, args.frames, args.height // f, args.width // f, config.data.num_bins)
    return {k: shapes[k] for k in setup.keys}


def synthetic_batches(shapes, mesh, keys, count: int = 2):
    """`count` global batches of random values of `shapes` (images in [0, 1), normalised spikes ~ N(0, 1))."""
    from vrtspike_jax.train import sharding

    rng = np.random.default_rng(0)
    make = {"blur": lambda s: rng.random(s, np.float32), "sharp": lambda s: rng.random(s, np.float32),
            "spike_vox": lambda s: rng.standard_normal(s).astype(np.float32)}
    return [sharding.global_batch({k: make[k](shapes[k]) for k in keys}, mesh, keys) for _ in range(count)]


def forward_phase(args, setup, host_params, batches, peak_tflops):
    """Times the model's inference call (no drop path) on the batches."""
    from vrtspike_jax import factory
    from vrtspike_jax.train import sharding

    graphdef, lora_spec = setup.graphdef, setup.lora_spec
    params = sharding.put_global(host_params, setup.param_shardings)

    @jax.jit
    def forward(params, frames, spikes):
        return factory.build(graphdef, params, lora_spec)(frames, spikes)

    def forward_args(i):
        b = batches[i % 2]
        return params, b["blur"], b.get("spike_vox")

    return run_phase("forward", forward, forward_args, args, peak_tflops)


def train_phase(args, config, setup, host_params, batches, peak_tflops):
    """Compiles and times `setup.jit_step()`, the step train_and_evaluate compiles, with donated state."""
    progress("train: placing the parameters and initialising the optimizer state")
    params, train_state = setup.init_state(host_params, config.seed)
    state = {"params": params, "train_state": train_state}

    def make_args(i):
        return state["params"], state["train_state"], batches[i % 2], setup.vgg_params

    def call(compiled, p, t, batch, vgg):
        state["params"], state["train_state"], metrics = compiled(p, t, batch, vgg)
        return metrics["loss"]

    return run_phase("train", setup.jit_step(), make_args, args, peak_tflops, call=call)


def print_table(results) -> None:
    cols = ["phase", "compile s", "median s", "runs s", "TFLOP/step", "TFLOP/s", "MFU", "XLA temp GiB",
            "RSS before run GiB", "peak RSS run GiB", "peak RSS compile GiB", "device peak GiB"]
    print(" | ".join(cols))
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        mem = r["xla_memory_bytes"] or {}
        print(" | ".join([r["phase"], fmt(r["compile_s"], 1), fmt(r["median_s"], 3),
                          ",".join(f"{t:.2f}" for t in r["times_s"]),
                          fmt(None if r["flops"] is None else r["flops"] / 1e12, 3), fmt(r["tflops_per_s"], 3),
                          "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", fmt(_gib(mem.get("temp_bytes"))),
                          fmt(_gib(r["rss_before_run_bytes"])), fmt(_gib(r["peak_rss_run_bytes"])),
                          fmt(_gib(r["peak_rss_compile_bytes"])), fmt(_gib(r["device_peak_bytes"]))]))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from vrtspike_jax.train import param_groups

    jax.config.update("jax_default_matmul_precision", args.precision)
    config, mesh, setup, host_params, vgg_note = build(args)
    progress("built")
    device = jax.local_devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak_tflops = args.peak_tflops
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    counts = param_groups.trainable_count(host_params, param_groups.group_settings(config))
    shapes = batch_shapes(args, config, setup)
    batches = synthetic_batches(shapes, mesh, setup.keys)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    results = []
    if "forward" in modes:
        results.append(forward_phase(args, setup, host_params, batches, peak_tflops))
    if "train" in modes:
        results.append(train_phase(args, config, setup, host_params, batches, peak_tflops))

    header = dict(config=args.config, sets=list(args.set), parameters=counts, input=list(shapes["blur"]),
                  spike_input=list(shapes["spike_vox"]) if setup.use_spike else None,
                  dtype=str(setup.model_mapping.get("dtype") or "float32"),
                  model={knob: config.model[knob] for knob in MODEL_KNOBS if knob != "dtype"},
                  loss=dict(perceptual_weight=config.loss.perceptual_weight, vgg=vgg_note or config.loss.vgg_weights),
                  grad_clip_norm=config.optimizer.grad_clip_norm, precision=args.precision, runs=args.runs,
                  warmup=args.warmup, device=kind, platform=device.platform, device_count=jax.device_count(),
                  jax=jax.__version__, python=platform.python_version(), host=platform.node(),
                  cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"config {args.config} {' '.join('--set ' + s for s in args.set)} ({counts['total']:,} parameters, "
          f"{counts['trainable']:,} trained), input {tuple(shapes['blur'])}, {header['dtype']}, remat "
          f"{config.model.remat}, on {kind} x{jax.device_count()} (jax {jax.__version__})")
    if vgg_note:
        print(f"note: {vgg_note}")
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
