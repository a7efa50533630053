#!/usr/bin/env python
"""Draw one exposure of a prepared root in every spike representation (docs/DATA.md section 2).

  python scripts/show_spike_representations.py --root ROOT --out spike_representations.png \
      [--split val] [--sequence 0] [--frame 4] [--tfp_half_window 8] [--tfi_max_search 20]

Panels: the blurry frame, the sharp frame, the voxel counts of the centre bin (K = the root's num_bins), TFP and TFI
at the centre instant (data_pipelines/spike_repr.py) and the raw centre spike frame. Spike panels are at the spike
camera's resolution (half the RGB size for spike_scale 2). Exit status 2 with one line for a bad flag or root.
"""
from __future__ import annotations

import sys

from vrtspike_jax import cli


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--root", required=True, help="a prepared root (scripts/prepare_data.py)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--split", default="val")
    p.add_argument("--sequence", type=int, default=0, help="index of the sequence in the split (default 0)")
    p.add_argument("--frame", type=int, default=None, help="index of the frame in the sequence (default: middle)")
    p.add_argument("--tfp_half_window", type=int, default=8, help="TFP window 2h + 1 frames (default h = 8)")
    p.add_argument("--tfi_max_search", type=int, default=20,
                   help="TFI search length in frames (default 20: SpikeCV's, as data.tfi_max_search)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_pipelines import layout, prepare, spike_dat, spike_repr
    from data_pipelines.errors import DataError

    root = Path(args.root)
    try:
        prepared = prepare.read_prepared(root)
    except DataError as error:
        cli.exit_with_error(error)
    sequences = prepared["splits"].get(args.split, [])
    if not 0 <= args.sequence < len(sequences):
        cli.exit_with_error(f"--sequence {args.sequence}: the {args.split} split of {root} has {len(sequences)} "
                            "sequence(s)")
    seq = sequences[args.sequence]
    frame = len(seq["frames"]) // 2 if args.frame is None else args.frame
    if not 0 <= frame < len(seq["frames"]):
        cli.exit_with_error(f"--frame {frame}: {seq['name']} has {len(seq['frames'])} frame(s)")
    frame_idx, stem = int(seq["frames"][frame][0]), str(seq["frames"][frame][1])
    rows, _, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    row = rows[(seq["name"], frame_idx)]
    f, k = int(prepared["spike_scale"]), int(prepared["num_bins"])
    spikes = spike_dat.read_dat(root / seq["name"] / layout.SPIKE / f"{stem}.dat", int(seq["height"]) // f,
                                int(seq["width"]) // f)
    times = row.frame_times(spikes.shape[0])
    inside = int(((times >= row.t0) & (times <= row.t1)).sum())
    voxel = spike_repr.represent("voxel", spikes, times, row.t0, row.t1, k)
    panels = [
        (layout.load_png(root / seq["name"] / layout.BLUR / f"{stem}.png"), "blurry frame", None),
        (layout.load_png(root / seq["name"] / layout.SHARP / f"{stem}.png"), "sharp (centre instant)", None),
        (voxel[k // 2], f"voxel: counts in bin {k // 2} of {k}\n({inside / k:g} frames per bin)", "gray"),
        (spike_repr.tfp(spikes, times, row.t0, row.t1, 1, args.tfp_half_window)[0],
         f"TFP, {2 * args.tfp_half_window + 1} frames", "gray"),
        (spike_repr.tfi(spikes, times, row.t0, row.t1, 1, args.tfi_max_search)[0],
         f"TFI, search {args.tfi_max_search} frames", "gray"),
        (spike_repr.raw_window(spikes, times, row.t0, row.t1, 1)[0], "raw centre spike frame", "gray"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 3.0), dpi=110)
    for ax, (image, title, cmap) in zip(axes, panels):
        ax.imshow(image, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{seq['name']} frame {frame_idx}: exposure [{row.t0:g}, {row.t1:g}] ({inside} spike frames, "
                 f"spikes at 1/{f} resolution)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))   # room for the two-line panel titles under the suptitle
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
