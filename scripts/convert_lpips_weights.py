#!/usr/bin/env python
"""Build the LPIPS-alex weights `.npz` that `vrtspike_jax.metrics.load_lpips` reads (no downloads).

LPIPS-alex = torchvision's ImageNet AlexNet features + the `lpips` package's linear heads
(`lpips/weights/v0.1/alex.pth`). Either give the two files:

    python scripts/convert_lpips_weights.py --alexnet alexnet-owt-7be5be79.pth \
        --lin <site-packages>/lpips/weights/v0.1/alex.pth --output lpips_alex.npz

or a whole `lpips.LPIPS(net='alex').state_dict()` saved as .pth/.npz:

    python scripts/convert_lpips_weights.py --state lpips_alex_state.pth --output lpips_alex.npz

`.pth` inputs need PyTorch; `.npz` inputs do not. The output uses the lpips state_dict names
(`scaling_layer.*`, `net.sliceK.N.*`, `lin{k}.model.1.weight`) in PyTorch layouts and is checked by
loading it into the JAX module.
"""
from __future__ import annotations

import argparse

import numpy as np

from flax import nnx

from vrtspike_jax.convert import CheckpointError, read_tensor_file
from vrtspike_jax.metrics import LPIPS, load_lpips_state, lpips_state_keys

# torchvision alexnet `features.N` -> lpips `net.sliceK.N`
_ALEX_TO_LPIPS = {0: "net.slice1.0", 3: "net.slice2.3", 6: "net.slice3.6", 8: "net.slice4.8", 10: "net.slice5.10"}
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """name -> array from a `.npz` or a PyTorch `.pth` (a state_dict, or one under 'state_dict'); exits naming the
    file when it cannot be read."""
    try:
        return read_tensor_file(path)
    except CheckpointError as err:
        raise SystemExit(str(err)) from None


def assemble(alexnet: dict | None = None, lin: dict | None = None, state: dict | None = None,
             prefix: str = "") -> dict[str, np.ndarray]:
    """The lpips state_dict from (torchvision alexnet, lpips lin heads) or from a full lpips state."""
    if state is not None:
        return {key: np.asarray(state[prefix + key], np.float32)
                for key in lpips_state_keys() if prefix + key in state}
    out = {"scaling_layer.shift": _SHIFT, "scaling_layer.scale": _SCALE}
    for index, name in _ALEX_TO_LPIPS.items():
        for suffix in ("weight", "bias"):
            key = f"features.{index}.{suffix}"
            if key in alexnet:
                out[f"{name}.{suffix}"] = np.asarray(alexnet[key], np.float32)
    for k in range(5):
        key = f"lin{k}.model.1.weight"
        if key in lin:
            out[key] = np.asarray(lin[key], np.float32)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alexnet", help="torchvision AlexNet state_dict (.pth or .npz)")
    parser.add_argument("--lin", help="lpips linear heads, lpips/weights/v0.1/alex.pth (or .npz)")
    parser.add_argument("--state", help="a full lpips.LPIPS(net='alex') state_dict instead of --alexnet/--lin")
    parser.add_argument("--prefix", default="", help="key prefix in --state")
    parser.add_argument("--output", required=True, help="output .npz")
    args = parser.parse_args(argv)
    if args.state:
        if args.alexnet or args.lin:
            parser.error("give either --state or --alexnet with --lin, not both")
        out = assemble(state=read_state_dict(args.state), prefix=args.prefix)
        source = args.state
    else:
        if not (args.alexnet and args.lin):
            parser.error("--alexnet and --lin are both needed (or --state)")
        out = assemble(alexnet=read_state_dict(args.alexnet), lin=read_state_dict(args.lin))
        source = f"{args.alexnet} + {args.lin}"
    module = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
    try:
        load_lpips_state(module, out, source=source)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    np.savez(args.output, **out)
    print(f"wrote {len(out)} arrays to {args.output}")


if __name__ == "__main__":
    main()
