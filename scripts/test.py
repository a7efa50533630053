#!/usr/bin/env python
"""Restore a folder of blurry frames (with their spikes) into sharp PNG frames, with timings and metrics.

  python scripts/test.py --checkpoint runs/baseline --input_blur DIR/blur --input_spike DIR/spike \\
      --output out/ [--gt DIR/sharp] [--tile 12 256 --tile_overlap 2 20]
  python scripts/test.py --checkpoint runs/baseline --input_blur DIR/blur --input_spike_vox DIR/spike_vox ...
  python scripts/test.py --checkpoint 006_VRT_videodeblurring_GoPro.npz --vrt_preset deblur \\
      --input_blur DIR --output out/                                  # plain VRT with the official weights

Inputs (see docs/INFERENCE.md):
  --input_blur: the clip, one image per frame (PNG, JPEG, BMP, TIFF; 8-bit), all the same size, in name order.
  --input_spike: one SpikeCV .dat per frame, named like its frame (000012.png -> 000012.dat), with an alignment log
    (alignment.csv of docs/DATA.md: frame_idx,t0,t1,event_count,seq,spike_t0) giving each frame's exposure window;
    the frames are turned into the run's spike representation (config.data.spike_representation: voxels in the
    model's K bins, or TFP / TFI / raw windows; voxel for runs older than the switch) exactly as prepare_data does.
  --input_spike_vox: one .npy of integer spike counts [K, H/f, W/f] per frame (prepare_data's spike_vox/ cache;
    voxel runs only).
  The spike input is normalised with the run's train-split statistics (--spike_stats, alias --voxel_stats:
  voxel_stats.json, or spike_stats_<tag>.json for another representation, written by prepare_data).
  --gt: ground-truth frames with the same names, for training validation's metrics (psnr, psnr_y, ssim, ssim_y and
  input_* of the blurry frames; KAIR/BasicSR conventions).

Outputs: OUTPUT/<name>.png per frame (names of the inputs) and OUTPUT/metrics.json (time per frame, peak memory,
tile settings, metrics). Everything is written into a hidden sibling folder that is renamed to OUTPUT only when the
run succeeds, so OUTPUT never holds the remains of a failed run. The work is done by the library:
vrtspike_jax.inference.load_model, vrtspike_jax.restore, data_pipelines.fileio.atomic_folder.

Exit status: 0 done; 2 bad input or flags (one line naming the file, the expected and the found value; checked
before any compute, nothing written); 3 the restoration failed (nothing written; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from vrtspike_jax import runtime

runtime.set_cpu_xla_flags()   # before jax starts (XLA reads its flags once)

from data_pipelines import fileio  # noqa: E402
from data_pipelines.errors import DataError  # noqa: E402
from vrtspike_jax import cli, inference, restore  # noqa: E402
from vrtspike_jax.inference import InputError  # noqa: E402
from vrtspike_jax.restore import DEFAULT_TILE, DEFAULT_TILE_OVERLAP  # noqa: E402

EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED = 0, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Flags


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", required=True,
                   help="a training workdir / checkpoint folder (VRT+Spike or VRT), or official VRT weights "
                        "(.npz of state_dict names, or .pth with torch installed)")
    m.add_argument("--which", default="best", choices=["best", "last"], help="training checkpoint to use")
    m.add_argument("--step", type=int, default=None, help="training checkpoint step (default: --which)")
    m.add_argument("--vrt_preset", default=None,
                   help="official weights: architecture preset (deblur, deblur_gopro, deblur_dvd, deblur_reds, "
                        "sr_reds, small_fixture)")
    m.add_argument("--official_config", default=None,
                   help="official weights: the official VRT(...) keyword arguments as JSON, or a .json file")
    i = p.add_argument_group("inputs")
    i.add_argument("--input_blur", required=True, help="folder of blurry frames")
    s = i.add_mutually_exclusive_group()
    s.add_argument("--input_spike", default=None, help="folder of .dat spike files, one per frame")
    s.add_argument("--input_spike_vox", default=None, help="folder of .npy spike counts [K, H/f, W/f], one per frame")
    i.add_argument("--alignment", default=None,
                   help="alignment log for --input_spike (default: alignment.csv in the spike folder or above it)")
    i.add_argument("--seq", default=None, help="the clip's seq in the alignment log (default: inferred)")
    i.add_argument("--spike_stats", "--voxel_stats", dest="spike_stats", default=None,
                   help="the run's statistics file: voxel_stats.json (train-split mean/std of log1p counts), or "
                        "spike_stats_<tag>.json for another representation (default: from the training config, "
                        "else that file in the spike folder or above it; --voxel_stats is its older name)")
    i.add_argument("--gt", default=None, help="folder of ground-truth frames named like the inputs")
    o = p.add_argument_group("output")
    o.add_argument("--output", required=True, help="output folder (created; must not exist or be empty)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    o.add_argument("--metrics_name", default="metrics.json", help="name of the metrics file inside --output")
    t = p.add_argument_group("tiling (VRT's test script: --tile frames size --tile_overlap frames pixels)")
    t.add_argument("--tile", type=int, nargs="+", default=None, metavar="N",
                   help=f"frames per chunk and tile size in pixels (0 = whole); 3 values (D H W) are accepted "
                        f"with H == W (default: a training checkpoint's clip length T and {DEFAULT_TILE[1]}; "
                        f"{DEFAULT_TILE[0]} {DEFAULT_TILE[1]} for official VRT weights)")
    t.add_argument("--tile_overlap", type=int, nargs="+", default=None, metavar="N",
                   help=f"overlap in frames and pixels (default: 0 {DEFAULT_TILE_OVERLAP[1]} for a training checkpoint, "
                        f"{DEFAULT_TILE_OVERLAP[0]} {DEFAULT_TILE_OVERLAP[1]} for official VRT weights)")
    r = p.add_argument_group("run")
    r.add_argument("--attention_chunk_windows", type=int, default=0, metavar="N",
                   help="run attention over chunks of N windows (less memory per tile, same result)")
    r.add_argument("--attention_per_head", action="store_true",
                   help="run attention one head at a time (less memory per tile, same result)")
    r.add_argument("--skip_memory_check", action="store_true",
                   help="run even if XLA's estimate of a window's memory exceeds what is available")
    r.add_argument("--estimate_tiles", type=int, default=0, metavar="N",
                   help="only time the first N tiles and extrapolate to the clip (writes metrics.json, no PNGs)")
    r.add_argument("--noprogress", action="store_true", help="no progress bar")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    for name in ("tile", "tile_overlap"):
        values = getattr(args, name)
        if values is None:
            continue
        if len(values) == 3:
            if values[1] != values[2]:
                p.error(f"--{name} {' '.join(map(str, values))}: tiles are square here; give H == W, or two values "
                        "(frames, pixels)")
            values = values[:2]
        if len(values) != 2:
            p.error(f"--{name} takes 2 values (frames, pixels) or 3 (D H W with H == W), got {len(values)}")
        setattr(args, name, values)
    if args.estimate_tiles < 0:
        p.error(f"--estimate_tiles must be >= 0, got {args.estimate_tiles}")
    if (args.alignment or args.seq) and not args.input_spike:
        p.error("--alignment and --seq belong to --input_spike (.dat files)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, prep: restore.Prepared, staging: Path, apply_fn: inference.ApplyFn,
        compile_seconds: float) -> Dict[str, Any]:
    """Restores the clip into `staging` (or times --estimate_tiles windows); returns the report (metrics.json)."""
    report = restore.report_header(args, prep)
    if args.estimate_tiles:
        report["estimate"] = restore.estimate(apply_fn, prep, args.estimate_tiles)
        report["timing"] = {"compile_seconds": compile_seconds,
                            "seconds_per_frame": report["estimate"]["estimated_seconds_per_frame"],
                            "measured": False}
        report["memory"] = restore.memory_report(apply_fn)
        return report
    report["timing"], per_frame = restore.restore_into(staging, prep, apply_fn, compile_seconds,
                                                       progress=not args.noprogress)
    report["memory"] = restore.memory_report(apply_fn)
    report["outputs"] = [f"{n}.png" for n in prep.names]
    if per_frame is not None:
        report["metrics"], notes = restore.metrics_section(per_frame)
        for note in notes:
            report["notes"].append(note)
            print(f"note: {note}", file=sys.stderr)
    return report


def _refuse(args, err: BaseException) -> int:
    """Bad input or flags: one line (a list of problems, e.g. weights of another architecture, shortened), exit
    status 2 (the traceback with --debug)."""
    if args.debug:
        raise err
    print(f"error: {cli.summarize_problems(err)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prep = restore.prepare(args)
    except (InputError, DataError, ValueError, OSError) as err:  # CheckpointError is a ValueError
        return _refuse(args, err)
    for note in prep.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in prep.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        apply_fn, compile_seconds = restore.compile_model(args, prep)
    except (InputError, ValueError) as err:
        return _refuse(args, err)

    output = Path(args.output)
    try:
        with fileio.atomic_folder(output) as staging:   # becomes OUTPUT only if everything below succeeds
            report = run(args, prep, staging, apply_fn, compile_seconds)
            fileio.atomic_write_json(staging / args.metrics_name, report)
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or args.debug:
            raise
        kind = "bad input" if isinstance(err, (InputError, DataError)) else type(err).__name__
        print(f"error: restoration failed ({kind}): {err}; nothing was written to {output}", file=sys.stderr)
        return EXIT_FAILED
    print(restore.summary_line(report, output))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
