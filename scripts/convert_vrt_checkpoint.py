"""Converts an official PyTorch VRT checkpoint into an Orbax checkpoint that the rest of the project restores.

    python scripts/convert_vrt_checkpoint.py --input 006_VRT_videodeblurring_GoPro.pth --preset deblur \
        --output checkpoints/vrt_gopro
    python scripts/convert_vrt_checkpoint.py --input weights.npz --official_config '{"upscale": 1, ...}' \
        --output checkpoints/vrt_custom

The output folder has the layout of one step of a training run's checkpoints (`params/`, `config/`), so that
  * `vrtspike_jax.train.checkpointing.load_model_from_checkpoint(OUTPUT)` returns the plain VRT (a VRTWithSpike
    with use_spike=False) with the official weights, and `scripts/test.py --checkpoint OUTPUT` restores videos;
  * training starts its RGB branch from it with `--config.model.init_vrt_from=OUTPUT`.
The input is an `.npz` of official state_dict names (optionally behind `param/` / `buffer/` prefixes) or a `.pth`
(needs torch). Every official parameter must be used exactly once; errors name the key. Exit status 1 with the
reason (no traceback) on a bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402

from vrtspike_jax.convert import CheckpointError, load_official_weights_into  # noqa: E402
from vrtspike_jax.models import build_model, model_config_from_dict  # noqa: E402
from vrtspike_jax.models.vrt import PRESETS, config_from_official_kwargs  # noqa: E402

_ARCHITECTURE_FIELDS = ("upscale", "in_chans", "out_chans", "window_size", "depths", "indep_reconsts",
                        "embed_dims", "num_heads", "mul_attn_ratio", "mlp_ratio", "qkv_bias", "qk_scale",
                        "drop_path_rate", "pa_frames", "deformable_groups", "nonblind_denoising")


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
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass --overwrite to replace it")
    section = model_section(preset_name, official_config)
    model = build_model(model_config_from_dict(section), rngs=nnx.Rngs(0))
    load_official_weights_into(model, input_path)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    config = {"model": section, "source": {"converted_from": os.fspath(Path(input_path).resolve()),
                                           "official_kwargs": official_config, "preset": preset_name}}
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
    return output_dir


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
    official = None
    if args.official_config:
        text = args.official_config
        try:
            official = json.loads(Path(text[1:]).read_text() if text.startswith("@") else text)
        except (OSError, ValueError) as exc:
            print(f"ERROR: --official_config: not valid JSON or file ({exc})", file=sys.stderr)
            return 1
    try:
        out = convert(args.input, args.output, args.preset, official, args.overwrite)
    except (CheckpointError, FileExistsError, TypeError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} (load with vrtspike_jax.train.checkpointing.load_model_from_checkpoint, or "
          f"--config.model.init_vrt_from={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
