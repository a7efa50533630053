"""Prints the shapes at every fused stage of VRTWithSpike and the parameters of each part; fails on misalignment.

    python scripts/validate_model_shapes.py --config=configs/baseline.py[:variant] [--frames 5 --height 256 --width 256]

Nothing is computed: the model is built abstractly (nnx.eval_shape) and the forward pass is traced with
jax.eval_shape, so the full baseline is checked in seconds on a laptop. Exit status 1 (with the reason, no
traceback) when the configuration cannot be built or the shapes do not line up.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from vrtspike_jax.models import build_model, model_config_from_dict, part_parameter_counts
from vrtspike_jax.models.vrt_spike import ENCODER_SCALE_OF_STAGE

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (with a `model` section).",
                                          lock_config=False)
_FRAMES = flags.DEFINE_integer("frames", None, "Clip length T (default: config.data.clip_length, else 5).")
_HEIGHT = flags.DEFINE_integer("height", None, "Frame height (default: config.data.crop_size, else 256).")
_WIDTH = flags.DEFINE_integer("width", None, "Frame width (default: config.data.crop_size, else 256).")


def _data_default(config, name, fallback):
    data = config.get("data", None) if hasattr(config, "get") else None
    value = data.get(name, None) if data is not None else None
    return fallback if value in (None, 0) else int(value)


def validate(config, frames: int, height: int, width: int, out=print) -> int:
    """Prints the report; returns 0 when every fused stage lines up, 1 otherwise."""
    try:
        model_config = model_config_from_dict(config.model)
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
    out(f"use_spike={model_config.use_spike}, fused stages {list(model.fuse_stages)}, spike_scale={f}")
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


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        print("ERROR: --config is required, e.g. --config=configs/baseline.py", file=sys.stderr)
        return 2
    frames = _FRAMES.value or _data_default(config, "clip_length", 5)
    height = _HEIGHT.value or _data_default(config, "crop_size", 256)
    width = _WIDTH.value or _data_default(config, "crop_size", 256)
    return validate(config, frames, height, width)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
