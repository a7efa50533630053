#!/usr/bin/env python
r"""Build the LPIPS-alex weights `.npz` that `vrtspike_jax.metrics.load_lpips` reads (no downloads).

LPIPS-alex = torchvision's ImageNet AlexNet features + the `lpips` package's linear heads
(`lpips/weights/v0.1/alex.pth`). Either give the two files:

    python scripts/convert_lpips_weights.py --alexnet alexnet-owt-7be5be79.pth \
        --lin <site-packages>/lpips/weights/v0.1/alex.pth --output lpips_alex.npz

or a whole `lpips.LPIPS(net='alex').state_dict()` saved as .pth/.npz:

    python scripts/convert_lpips_weights.py --state lpips_alex_state.pth --output lpips_alex.npz

`.pth` inputs need PyTorch; `.npz` inputs do not. The output uses the lpips state_dict names
(`scaling_layer.*`, `net.sliceK.N.*`, `lin{k}.model.1.weight`) in PyTorch layouts and is checked by
loading it into the JAX module.

A user error (a missing or unreadable input, missing or mis-shaped keys, named in the input's own names) is one
line on stderr naming the file, exit status 2, and no output file is written.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from flax import nnx

from vrtspike_jax.convert import CheckpointError, read_tensor_file
from vrtspike_jax.cli import UsageError, exit_with_error, require_input_file, write_npz_atomically
from vrtspike_jax.metrics import LPIPS, load_lpips_state, lpips_state_keys

# torchvision alexnet `features.N` -> lpips `net.sliceK.N`
_ALEX_TO_LPIPS = {0: "net.slice1.0", 3: "net.slice2.3", 6: "net.slice3.6", 8: "net.slice4.8", 10: "net.slice5.10"}
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1)
_HINTS = {"--alexnet": "give torchvision's AlexNet state_dict, e.g. alexnet-owt-7be5be79.pth",
          "--lin": "give the lpips package's lpips/weights/v0.1/alex.pth",
          "--state": "give a whole lpips.LPIPS(net='alex') state_dict, or set --prefix"}


def read_state_dict(path: str, option: str = "--input") -> dict[str, np.ndarray]:
    """name -> array from a `.npz` or a PyTorch `.pth` (a state_dict, or one under 'state_dict'); UsageError naming
    the option and the file when it is missing or cannot be read."""
    require_input_file(path, option)
    try:
        return read_tensor_file(path)
    except CheckpointError as err:
        raise UsageError(f"{option} {err} ({_HINTS.get(option, 'give a .npz or .pth state_dict')})") from None


def _take(arrays: dict, names: dict[str, str], option: str, path) -> dict[str, np.ndarray]:
    """{lpips name: array} for `names` (input name -> lpips name); UsageError naming `option`, the file and every
    missing or mis-shaped key in the input's own names."""
    expected = lpips_state_keys()
    out, problems = {}, []
    for key, name in names.items():
        if key not in arrays:
            problems.append(f"missing {key}")
            continue
        array = np.asarray(arrays[key], np.float32)
        if array.shape != expected[name]:
            problems.append(f"{key}: expected shape {expected[name]}, found {array.shape}")
        out[name] = array
    if problems:
        raise UsageError(f"{option} {path} is not usable for LPIPS-alex: " + "; ".join(problems) +
                         f" ({_HINTS[option]})")
    return out


def assemble(alexnet: dict | None = None, lin: dict | None = None, state: dict | None = None,
             prefix: str = "", sources: dict | None = None) -> dict[str, np.ndarray]:
    """The lpips state_dict from (torchvision alexnet, lpips lin heads) or from a full lpips state. UsageError
    naming the input (its option and file, from `sources`) and every missing or mis-shaped key."""
    sources = sources or {}
    if state is not None:
        return _take(state, {prefix + key: key for key in lpips_state_keys()}, "--state", sources.get("--state"))
    out = {"scaling_layer.shift": _SHIFT, "scaling_layer.scale": _SCALE}
    out.update(_take(alexnet, {f"features.{index}.{suffix}": f"{name}.{suffix}"
                               for index, name in _ALEX_TO_LPIPS.items() for suffix in ("weight", "bias")},
                     "--alexnet", sources.get("--alexnet")))
    out.update(_take(lin, {f"lin{k}.model.1.weight": f"lin{k}.model.1.weight" for k in range(5)}, "--lin",
                     sources.get("--lin")))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alexnet", help="torchvision AlexNet state_dict (.pth or .npz)")
    parser.add_argument("--lin", help="lpips linear heads, lpips/weights/v0.1/alex.pth (or .npz)")
    parser.add_argument("--state", help="a full lpips.LPIPS(net='alex') state_dict instead of --alexnet/--lin")
    parser.add_argument("--prefix", default="", help="key prefix in --state")
    parser.add_argument("--output", required=True, help="output .npz")
    args = parser.parse_args(argv)
    if args.state and (args.alexnet or args.lin):
        parser.error("give either --state or --alexnet with --lin, not both")
    if not args.state and not (args.alexnet and args.lin):
        parser.error("--alexnet and --lin are both needed (or --state)")
    try:
        if args.state:
            out = assemble(state=read_state_dict(args.state, "--state"), prefix=args.prefix,
                           sources={"--state": args.state})
            source = args.state
        else:
            out = assemble(alexnet=read_state_dict(args.alexnet, "--alexnet"),
                           lin=read_state_dict(args.lin, "--lin"),
                           sources={"--alexnet": args.alexnet, "--lin": args.lin})
            source = f"{args.alexnet} + {args.lin}"
        module = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
        try:
            load_lpips_state(module, out, source=source)
        except ValueError as err:
            raise UsageError(err) from None
        written = write_npz_atomically(args.output, out)
    except UsageError as err:
        exit_with_error(err)
    print(f"wrote {len(out)} arrays to {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
