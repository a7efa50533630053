#!/usr/bin/env python
"""Validate and prepare a spike deblurring dataset for training (see docs/DATA.md).

  python scripts/prepare_data.py --root DIR                 # validate, build voxel cache + stats + index
  python scripts/prepare_data.py --root DIR --check_only    # validate only, write nothing
  python scripts/prepare_data.py --convert_from SRC --root DIR   # convert Spk-X4K1000FPS / Spk-GoPro, then prepare
  python scripts/prepare_data.py --root DIR --build_tfds    # also build the TFDS dataset of the prepared frames
  python scripts/prepare_data.py --root DIR --spike_representation tfp   # also TFP's cache + stats (training's
                                                            # --config.data.spike_representation=tfp)

Exit status: 0 the root is sound; 1 problems were found (one line each on stderr, naming the file and the
reason; bad samples were dropped and the rest prepared); 2 nothing usable (unknown layout, no root, no train
frame) or bad flags.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_pipelines.errors import DataError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--root", required=True, help="dataset root in our layout (written by --convert_from)")
    p.add_argument("--check_only", action="store_true", help="validate only; write nothing")
    p.add_argument("--num_bins", type=int, default=32, help="K, voxel time bins per exposure (default 32)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: min(8, CPU count))")
    p.add_argument("--overwrite", action="store_true", help="rebuild every voxel cache (default: resume)")
    p.add_argument("--spike_representation", default="voxel", choices=["voxel", "tfp", "tfi", "raw"],
                   help="also build this representation's cache and train-split statistics (spike_<tag>/, "
                        "spike_stats_<tag>.json; default: voxels only, which are always built)")
    p.add_argument("--tfp_half_window", type=int, default=None, help="TFP's h: 2h + 1 frames (default 8)")
    p.add_argument("--tfi_max_search", type=int, default=None, help="TFI's search length in frames (default 20)")
    p.add_argument("--no_decode_images", action="store_true",
                   help="check PNG headers only (faster; corrupt pixel data is then not detected)")
    p.add_argument("--noprogress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    g = p.add_argument_group("conversion from public layouts")
    g.add_argument("--convert_from", default=None, help="source folder in a public dataset layout")
    g.add_argument("--source_layout", default="auto",
                   choices=["auto", "spk_x4k1000fps", "spk_gopro_ssdm", "spk_gopro_spkdeblurnet"])
    g.add_argument("--spike_scale", type=int, default=None, help="RGB/spike size ratio (default: the layout's)")
    g.add_argument("--x4k_blur_frames", type=int, default=None, choices=[33, 65])
    g.add_argument("--spike_margin", type=int, default=0, help="X4K: spike frames kept beyond the exposure")
    g.add_argument("--ssdm_spikes", default="auto", choices=["auto", "data", "full"])
    g.add_argument("--ssdm_exposure_frames", type=int, default=97)
    g.add_argument("--ssdm_margin", type=int, default=20)
    g.add_argument("--gopro_window", type=int, default=56)
    g.add_argument("--gopro_blur", default="blur_gamma")
    g.add_argument("--val_from_train", type=float, default=0.1,
                   help="GoPro layouts: train sequences moved whole to our val split (model selection): a fraction "
                        "in (0, 1), a whole number >= 1, or 0; chosen by the SHA-256 of their names (default 0.1). "
                        "The official test split stays our test split")
    t = p.add_argument_group("TFDS")
    t.add_argument("--build_tfds", action="store_true", help="build the TFDS dataset of the prepared root")
    t.add_argument("--tfds_dir", default=None, help="TFDS data_dir (default ROOT/tfds)")
    args = p.parse_args(argv)
    if args.check_only and (args.convert_from or args.build_tfds):
        p.error("--check_only writes nothing: run it on the converted root, without --convert_from/--build_tfds")
    if args.num_bins < 1:
        p.error(f"--num_bins must be >= 1, got {args.num_bins}")
    for flag, low in (("tfp_half_window", 0), ("tfi_max_search", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            p.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    v = args.val_from_train
    if not (v >= 0 and (v < 1 or float(v).is_integer())):
        p.error(f"--val_from_train must be 0, a fraction in (0, 1) or a whole number of sequences, got {v:g}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import os

    # The converters and prepare log every dropped frame; this script prints each of them itself (one
    # "problem:"/"note:" line), so their log records must not reach Python's last-resort stderr handler too.
    logging.getLogger("data_pipelines").addHandler(logging.NullHandler())

    from data_pipelines import prepare

    def problem(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    root = Path(args.root).expanduser()
    exit_code = 0
    if args.convert_from:
        from data_pipelines import converters
        start = time.time()
        report = converters.convert(args.convert_from, root, converters.ConvertOptions(
            layout=args.source_layout, spike_scale=args.spike_scale, x4k_blur_frames=args.x4k_blur_frames,
            spike_margin=args.spike_margin, ssdm_spikes=args.ssdm_spikes,
            ssdm_exposure_frames=args.ssdm_exposure_frames, ssdm_margin=args.ssdm_margin,
            gopro_window=args.gopro_window, gopro_blur=args.gopro_blur, val_from_train=args.val_from_train,
            progress=not args.noprogress))
        for err in report.problems:
            problem(f"problem: {err.message}")
        for note in report.notes:
            problem(f"note: {note}")
        print(f"converted {converters.LAYOUT_NAMES[report.layout]} from {args.convert_from}: {report.frames} frames "
              f"in {report.sequences} sequences -> {root} ({time.time() - start:.1f} s, "
              f"{len(report.problems)} problem(s), {len(report.notes)} note(s))")
        if report.problems:
            exit_code = 1
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    representation = {"spike_representation": args.spike_representation}
    representation.update({k: getattr(args, k) for k in ("tfp_half_window", "tfi_max_search")
                           if getattr(args, k) is not None})
    result = prepare.prepare_root(prepare.PrepareOptions(
        root=root, num_bins=args.num_bins, check_only=args.check_only, workers=workers,
        overwrite=args.overwrite, decode_images=not args.no_decode_images, progress=not args.noprogress,
        **representation), log=problem)
    for note in result.notes:
        problem(f"note: {note}")
    if result.fatal and not args.check_only:   # the problem line(s) above say why
        what = f"the {args.spike_representation} representation was not prepared" if result.stats_written else \
            "nothing prepared"
        print(f"error: {what} in {root} ({prepare.summary_line(result)})", file=sys.stderr)
        return max(exit_code, result.exit_code)
    verb = "checked" if args.check_only else "prepared"
    print(f"{verb} {root} in {result.seconds:.1f} s: {prepare.summary_line(result)}")
    exit_code = max(exit_code, result.exit_code)
    if args.build_tfds and not result.fatal:
        from data_pipelines import tfds_builder
        tfds_dir = Path(args.tfds_dir) if args.tfds_dir else root / "tfds"
        path = tfds_builder.build(root, tfds_dir, num_bins=args.num_bins)
        print(f"built TFDS dataset {path}")
    return exit_code


if __name__ == "__main__":
    debug = "--debug" in sys.argv
    try:
        sys.exit(main())
    except DataError as err:
        print(f"problem: {err.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # one line, not a traceback, unless asked
        if debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(3)
