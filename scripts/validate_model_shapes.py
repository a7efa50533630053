"""Prints the shapes at every fused stage of VRTWithSpike and the parameters of each part; fails on misalignment.

    python scripts/validate_model_shapes.py --config=configs/baseline.py[:variant] [--frames 5 --height 256 --width 256]

Nothing is computed: the model is built abstractly (nnx.eval_shape) and the forward pass is traced with
jax.eval_shape, so the full baseline is checked in seconds on a laptop. The model is the one training builds:
`model.dtype = "auto"` is resolved as training resolves it (vrtspike_jax/factory.py), so
the compute dtype printed is that of a run on this machine's backend.

Exit status: 0 when every fused stage lines up; 1 (with the reason, no traceback) when the configuration's model
cannot be built or its shapes do not line up; 2 (one line on stderr) for a bad command line: no --config, a config
file that does not exist or cannot be loaded, an unknown variant after the colon, a bad flag value.
"""
from __future__ import annotations

import os
import re
import sys

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags
from flax import nnx
import ml_collections
from ml_collections import config_flags

from vrtspike_jax import factory  # noqa: E402
from vrtspike_jax.models import build_model, part_parameter_counts
from vrtspike_jax.models.vrt_spike import ENCODER_SCALE_OF_STAGE
from vrtspike_jax.train import run_config
from vrtspike_jax.train.preflight import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/baseline.py:variant), "
                                          "or a config with a `model` section alone.",
                                          lock_config=False)
_FRAMES = flags.DEFINE_integer("frames", None, "Clip length T (default: config.data.clip_length).")
_HEIGHT = flags.DEFINE_integer("height", None, "Frame height (default: config.data.crop_size, else 256).")
_WIDTH = flags.DEFINE_integer("width", None, "Frame width (default: config.data.crop_size, else 256).")


def clip_shape(config, frames=None, height=None, width=None):
    """(frames, height, width) checked: the flags' values, else the config's clip length and training crop (256 when
    the config trains on whole frames, crop_size None)."""
    crop = config.data.crop_size or 256
    return frames or config.data.clip_length, height or crop, width or crop


def validate(config, frames: int, height: int, width: int, out=print) -> int:
    """Prints the report; returns 0 when every fused stage lines up, 1 otherwise."""
    try:
        model_config = factory.model_config(config.model)   # dtype 'auto' resolved as training does
        model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    except (ValueError, TypeError) as exc:
        out(f"ERROR: the model cannot be built: {exc}")
        return 1
    f = model_config.spike_scale
    frames_shape = jax.ShapeDtypeStruct((1, frames, height, width, 3), jnp.float32)
    spikes_shape = jax.ShapeDtypeStruct((1, frames, height // f, width // f, model_config.spike_bins), jnp.float32)
    graphdef, state = nnx.split(model)

    def forward(state, x, s):
        return nnx.merge(graphdef, state)(x, s, return_intermediates=True)

    try:
        out_shape, inter = jax.eval_shape(forward, state, frames_shape, spikes_shape)
    except ValueError as exc:
        out(f"ERROR: input [1, {frames}, {height}, {width}, 3] does not fit the model: {exc}")
        return 1
    counts = part_parameter_counts(model)
    out(f"input frames {tuple(frames_shape.shape)}, spike voxels {tuple(spikes_shape.shape)} -> output "
        f"{tuple(out_shape.shape)}")
    dtype = model_config.vrt.dtype
    out(f"use_spike={model_config.use_spike}, fused stages {list(model.fuse_stages)}, spike_scale={f}, "
        f"compute dtype {jnp.dtype(dtype).name if dtype else 'float32'} (backend {jax.default_backend()})")
    status = 0
    if model_config.use_spike:
        out(f"{'stage':>5}  {'Fr_i (RGB)':<22} {'Fs_i (encoder)':<22} {'Fs_i prime (TSA)':<22} {'Ff_i (fused)':<22}")
        for stage in model.fuse_stages:
            shapes = [tuple(inter[f"{k}_{stage}"].shape) for k in ("Fr", "Fs", "Fs'", "Ff")]
            line = f"{stage:>5}  " + " ".join(f"{str(s):<22}" for s in shapes)
            if len(set(shapes)) != 1:
                line += f"  MISALIGNED (encoder scale 1/{2 ** ENCODER_SCALE_OF_STAGE[stage]})"
                status = 1
            out(line)
    total = sum(counts.values())
    out("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f"; total {total:,}")
    return status


class UsageError(Exception):
    """A bad command line: reported as one line on stderr, exit status 2."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _config_argument(argv) -> str:
    """The raw --config value on the command line ('' when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _flag_error(exc: BaseException, argv) -> str:
    chain = [exc]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(chain[-1], KeyError) and any(a.startswith("--config.") for a in argv):
        overrides = [a for a in argv if a.startswith("--config.")]
        return (f"{' '.join(overrides)}: the config of --config={_config_argument(argv)} has no field "
                f"{chain[-1].args[0]!r} (check the name after --config.)")
    if any("Error whilst parsing config file" in str(e) for e in chain) or not isinstance(exc, flags.Error):
        # The config file (or its get_config) raised: its own message, without ml_collections' traceback text.
        return (f"--config={_config_argument(argv)}: {_one_line(chain[-1])} "
                f"(fix the config file, or the variant after the colon)")
    return f"{_one_line(exc)} (see --helpshort)"


def parse_flags(argv):
    """app.run's flag parser: a bad flag or a config file that fails to load is a UsageError, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as exc:  # flags.Error, and whatever a config file raises while it is loaded
        _exit_usage(_flag_error(exc, argv))


def _exit_usage(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_config():
    """The --config value; UsageError naming it when absent, missing or unloadable."""
    config = _CONFIG.value
    if config is None:
        raise UsageError("--config is required, e.g. --config=configs/baseline.py")
    filename = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)[0]   # without the variant
    if not os.path.isfile(filename):
        raise UsageError(f"--config: no such config file {filename!r} (give the path of a config file, e.g. "
                         f"--config=configs/baseline.py)")
    try:
        config.get("model", None)
    except OSError as exc:  # ml_collections defers a failed load until the config is used
        message = re.sub(r"^.*earlier failure to load: ", "", _one_line(exc))
        raise UsageError(f"--config={filename}: cannot be loaded ({message})") from None
    if set(config.keys()) <= {"model", "variant"}:
        # A model section alone (a config of one's own): the clip shape defaults to the baseline's training clip.
        from vrtspike_jax.train.defaults import base_config

        return ml_collections.FrozenConfigDict({"model": config.model, "data": base_config().data})
    try:
        return run_config.read(config)   # a training config: every key known, typed
    except ConfigError as exc:
        raise UsageError(f"--config={filename}: {exc}") from None


def main(argv):
    del argv
    try:
        config = load_config()
    except UsageError as exc:
        _exit_usage(str(exc))
    return validate(config, *clip_shape(config, _FRAMES.value, _HEIGHT.value, _WIDTH.value))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
