#!/usr/bin/env python
"""Convert torchvision's VGG state_dict into the `.npz` the perceptual loss reads (no downloads).

    python scripts/convert_vgg_weights.py --input vgg16-397923af.pth --output vgg16_features.npz
    python scripts/convert_vgg_weights.py --input svrt_vgg_loss.npz --prefix vgg. --output vgg16_features.npz

Input: a `.pth` (needs PyTorch) or `.npz` holding `<prefix>features.N.weight / .bias` arrays, e.g.
`torchvision.models.vgg16(weights=...).state_dict()` (prefix "") or S-VRT's VGGPerceptualLoss
state_dict (prefix "vgg."). Output: `features.N.weight (O, I, 3, 3)` and `features.N.bias (O,)` float32
for every conv up to `--up-to` (default: the network's last ReLU), checked against the network layout.

A user error (missing or unreadable input, a file that is not a VGG state_dict, missing or mis-shaped keys, an
unknown --up-to) is one line on stderr naming the file or value, exit status 2, and no output file is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from vrtspike_jax.convert import CheckpointError, read_tensor_file
from vrtspike_jax.cli import UsageError, exit_with_error, require_input_file, write_npz_atomically
from vrtspike_jax.losses import vgg_layer_indices, vgg_params_from_state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """name -> array from a `.npz` or a PyTorch `.pth` (a state_dict, or one under 'state_dict'); UsageError naming
    the file when it is missing or cannot be read."""
    require_input_file(path, "--input")
    try:
        return read_tensor_file(path)
    except CheckpointError as err:
        raise UsageError(f"--input {err} (give a torchvision VGG state_dict as .npz or .pth)") from None


def convert(input_path: str, output_path: str, network: str = "vgg16", up_to: str | None = None,
            prefix: str = "") -> tuple[list[str], Path]:
    """Write the checked features of `input_path` to `output_path` (atomically); returns (keys written, file).
    Raises UsageError on a user error."""
    names = vgg_layer_indices(network)
    if up_to is not None and up_to not in names:
        raise UsageError(f"--up-to {up_to!r} is not a {network} ReLU; known: {sorted(names, key=names.get)}")
    up_to = up_to or max(names, key=names.get)
    state = read_state_dict(input_path)
    try:
        params = vgg_params_from_state(state, network, [up_to], prefix=prefix, source=input_path)
    except ValueError as err:
        raise UsageError(f"{err} (check --input, --network, --prefix and --up-to)") from None
    out = {}
    for name in params:
        out[f"{name}.weight"] = np.asarray(state[f"{prefix}{name}.weight"], np.float32)
        out[f"{name}.bias"] = np.asarray(state[f"{prefix}{name}.bias"], np.float32)
    written = write_npz_atomically(output_path, out)
    return sorted(out), written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="torchvision VGG state_dict (.pth or .npz)")
    parser.add_argument("--output", required=True, help="output .npz (features.N.weight/bias)")
    parser.add_argument("--network", default="vgg16", choices=["vgg16", "vgg19"])
    parser.add_argument("--up-to", default=None, help="deepest ReLU to keep, e.g. relu3_3 (default: all)")
    parser.add_argument("--prefix", default="", help="key prefix before 'features.' in the input, e.g. 'vgg.'")
    args = parser.parse_args(argv)
    try:
        keys, written = convert(args.input, args.output, args.network, args.up_to, args.prefix)
    except UsageError as err:
        exit_with_error(err)
    print(f"wrote {len(keys)} arrays ({keys[0]} ... {keys[-1]}) to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
