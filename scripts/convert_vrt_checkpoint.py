r"""Converts an official PyTorch VRT checkpoint into an Orbax checkpoint that the rest of the project restores.

    python scripts/convert_vrt_checkpoint.py --input 006_VRT_videodeblurring_GoPro.pth --preset deblur \
        --output checkpoints/vrt_gopro
    python scripts/convert_vrt_checkpoint.py --input weights.npz --official_config '{"upscale": 1, ...}' \
        --output checkpoints/vrt_custom

The output folder has the layout of one step of a training run's checkpoints (`params/`, `config/`), so that
  * `vrtspike_jax.train.checkpointing.load_model_from_checkpoint(OUTPUT)` returns the plain VRT (a VRTWithSpike
    with use_spike=False) with the official weights, and `scripts/test.py --checkpoint OUTPUT` restores videos;
  * training starts its RGB branch from it with `--config.init.vrt_from=OUTPUT`.
The input is an `.npz` of official state_dict names (optionally behind `param/` / `buffer/` prefixes) or a `.pth`
(needs torch). Every official parameter must be used exactly once; errors name the key.

A user error (a missing or unreadable input, a file that is not a VRT state_dict of the architecture asked for:
missing, extra or mis-shaped keys; a bad --official_config; an existing output without --overwrite) is one line on
stderr naming the file or value and what to do, exit status 2, no traceback, and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)

import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

from vrtspike_jax.convert import CheckpointError, load_official_weights_into  # noqa: E402
from vrtspike_jax.cli import UsageError, exit_with_error, summarize_problems  # noqa: E402
from vrtspike_jax.models import build_model, model_config_from_dict  # noqa: E402
from vrtspike_jax.models.vrt import PRESETS, config_from_official_kwargs  # noqa: E402

_ARCHITECTURE_FIELDS = ("upscale", "in_chans", "out_chans", "window_size", "depths", "indep_reconsts",
                        "embed_dims", "num_heads", "mul_attn_ratio", "mlp_ratio", "qkv_bias", "qk_scale",
                        "drop_path_rate", "pa_frames", "deformable_groups", "nonblind_denoising")


class ArchitectureError(ValueError):
    """--preset / --official_config do not describe a VRT that can be built."""


def model_section(preset_name, official_config):
    """The `model` config section (as training configs write it) of a plain VRT."""
    if official_config is not None:
        vrt = config_from_official_kwargs(**official_config)
        overrides = {k: getattr(vrt, k) for k in _ARCHITECTURE_FIELDS}
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
        return {"vrt_preset": "deblur", "vrt_overrides": overrides, "use_spike": False}
    return {"vrt_preset": preset_name, "vrt_overrides": {}, "use_spike": False}


def convert(input_path, output_dir, preset_name="deblur", official_config=None, overwrite=False) -> Path:
    """Writes OUTPUT/params (Orbax) and OUTPUT/config (JSON); returns the output folder."""
    output_dir = Path(output_dir).absolute()   # Orbax writes to absolute paths only
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it")
    try:
        section = model_section(preset_name, official_config)
        model = build_model(model_config_from_dict(section), rngs=nnx.Rngs(0))
    except (TypeError, ValueError) as exc:  # unknown or inconsistent architecture arguments
        raise ArchitectureError(str(exc)) from exc
    load_official_weights_into(model, input_path)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config = {"model": section, "source": {"converted_from": os.fspath(Path(input_path).resolve()),
                                           "official_kwargs": official_config, "preset": preset_name}}
    created = next((p for p in reversed(output_dir.parents) if not p.exists()), None)  # removed on failure
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        try:
            target = staging / "checkpoint"
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                checkpointer.save(os.fspath(target), args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config)))
            if output_dir.exists():
                shutil.rmtree(output_dir)
            target.rename(output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return output_dir


def _official_config(text):
    """--official_config as a dict (JSON text, or @file.json); UsageError naming the value or file."""
    source = f"--official_config {text}"
    try:
        if text.startswith("@"):
            source = f"--official_config file {text[1:]}"
            text = Path(text[1:]).read_text()
        value = json.loads(text)
    except OSError as exc:
        raise UsageError(f"{source}: cannot be read ({exc.strerror or exc}; give an existing .json file after @)") \
            from None
    except ValueError as exc:
        raise UsageError(f"{source}: not valid JSON ({exc}; give the official VRT(...) keywords as a JSON object)") \
            from None
    if not isinstance(value, dict):
        raise UsageError(f"{source}: expected a JSON object of VRT(...) keywords, got {type(value).__name__}")
    return value


def _checkpoint_problem(exc: CheckpointError) -> str:
    message = summarize_problems(str(exc))
    if "cannot load into VRT" in message:
        return (f"--input {message} (the weights do not fit the architecture: give the one they were trained with, "
                f"via --preset or --official_config)")
    return f"--input {message} (give an official VRT state_dict as .npz, or .pth with torch installed)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="official VRT weights: .npz or .pth")
    parser.add_argument("--output", required=True, help="folder to write (Orbax checkpoint)")
    parser.add_argument("--preset", default="deblur", choices=sorted(PRESETS),
                        help="architecture of the weights (default: the official deblurring VRT)")
    parser.add_argument("--official_config", default=None,
                        help="official VRT constructor kwargs as JSON (or @file.json); overrides --preset")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        official = _official_config(args.official_config) if args.official_config else None
        if not Path(args.input).exists():
            raise UsageError(f"--input {args.input}: no such file (check the path)")
        if Path(args.output).exists() and not args.overwrite:
            raise UsageError(f"--output {args.output} exists (pass --overwrite to replace it, or choose another "
                             f"folder)")
        try:
            out = convert(args.input, args.output, args.preset, official, args.overwrite)
        except CheckpointError as exc:
            raise UsageError(_checkpoint_problem(exc)) from None
        except ArchitectureError as exc:
            option = "--official_config" if official is not None else f"--preset {args.preset}"
            raise UsageError(f"{option}: {exc} (give the official VRT(...) keywords of the weights)") from None
        except FileExistsError as exc:
            raise UsageError(f"--output {exc}") from None
        except OSError as exc:
            raise UsageError(f"--output {args.output}: cannot write there ({exc.strerror or exc})") from None
    except UsageError as exc:
        exit_with_error(exc)
    print(f"wrote {out} (load with vrtspike_jax.train.checkpointing.load_model_from_checkpoint, or "
          f"--config.init.vrt_from={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
