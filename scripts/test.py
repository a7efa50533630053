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
  The spike input is normalised with the run's train-split statistics (--voxel_stats: voxel_stats.json, or
  spike_stats_<tag>.json for another representation, written by prepare_data).
  --gt: ground-truth frames with the same names, for PSNR/SSIM (RGB and Y, KAIR/BasicSR conventions).

Outputs: OUTPUT/<name>.png per frame (names of the inputs) and OUTPUT/metrics.json (time per frame, peak memory,
tile settings, metrics). Everything is written into a hidden sibling folder that is renamed to OUTPUT only when the
run succeeds, so OUTPUT never holds the remains of a failed run.

Exit status: 0 done; 2 bad input or flags (one line naming the file, the expected and the found value; checked
before any compute, nothing written); 3 the restoration failed (nothing written; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import re
import resource
import shutil
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from vrtspike_jax import runtime

runtime.prefer_memory_scheduler_on_cpu()   # before jax starts (XLA reads its flags once)

import numpy as np  # noqa: E402

from vrtspike_jax import cli, inference  # noqa: E402
from vrtspike_jax.inference import TileSpec  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_TILE = (12, 256)          # VRT's DVD/REDS deblurring test setting (frames, pixels)
DEFAULT_TILE_OVERLAP = (2, 20)
EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED = 0, 2, 3


class InputError(ValueError):
    """Bad input or flags, found before any compute. The message names the file, the expected and the found value."""


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
    i.add_argument("--voxel_stats", default=None,
                   help="the run's statistics file: voxel_stats.json (train-split mean/std of log1p counts), or "
                        "spike_stats_<tag>.json for another representation (default: from the training config, "
                        "else that file in the spike folder or above it)")
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
# Folders and images


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_files(folder: Path, suffixes: Sequence[str], what: str) -> Tuple[Dict[str, Path], List[str]]:
    """{stem: path} of the files with one of `suffixes` in `folder` (in natural name order) and the ignored names."""
    if not folder.exists():
        raise InputError(f"{folder}: {what} folder not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a folder of {what}, found a file")
    found: Dict[str, Path] = {}
    ignored = []
    for entry in sorted(folder.iterdir(), key=lambda e: _natural_key(e.name)):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or entry.suffix.lower() not in suffixes:
            ignored.append(entry.name)
            continue
        if entry.stem in found:
            raise InputError(f"{entry}: two files for frame {entry.stem!r} ({found[entry.stem].name} and "
                             f"{entry.name}): expected one {what} file per frame name")
        found[entry.stem] = entry
    if not found:
        raise InputError(f"{folder}: no {what} files (expected {', '.join(suffixes)})"
                         + (f"; found only {', '.join(ignored[:5])}" if ignored else ""))
    return found, ignored


def load_image(path: Path) -> np.ndarray:
    """Decodes an 8-bit image fully into uint8 [H, W, 3] (RGB; gray, palette and RGBA are converted)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in ("RGB", "RGBA", "L", "P", "LA"):
                raise InputError(f"{path}: expected an 8-bit RGB (or gray) image, found mode {mode!r}")
            array = np.asarray(img.convert("RGB") if mode != "RGB" else img, dtype=np.uint8)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as err:  # PIL raises many types for garbage
        raise InputError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return array


def check_images(paths: Sequence[Path], what: str, size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Decodes every image once (so a corrupt file is found before any compute); all must share one size.

    Returns (H, W). `size`, if given, is the size every image must have."""
    expected = size
    first = None
    for path in paths:
        h, w = load_image(path).shape[:2]
        if expected is None:
            expected, first = (h, w), path
        elif (h, w) != expected:
            ref = f"the first frame {first.name} is" if first is not None else "expected"
            raise InputError(f"{path}: {what} frame of another size: {h}x{w} (HxW), {ref} "
                             f"{expected[0]}x{expected[1]}")
    return expected


# ----------------------------------------------------------------------------------------------------------------
# Lazy clip sources (read one temporal chunk at a time; see inference.restore_video)


class _Chunk:
    """A temporal chunk [t, H, W, C] as the list of its (compact, uint8/uint16) frames; slicing `[:, ys, xs]` cuts
    every frame, stacks only the window and converts it to float32 through `convert`."""

    def __init__(self, frames: List[np.ndarray], convert: Callable[[np.ndarray], np.ndarray]):
        self.frames, self.convert = frames, convert
        self.shape = (len(frames),) + tuple(frames[0].shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        time_index, rest = index[0], index[1:]
        picked = self.frames[time_index] if isinstance(time_index, slice) else [self.frames[time_index]]
        return self.convert(np.stack([frame[rest] for frame in picked]))


class FrameSource:
    """A clip of per-frame files as an array-like [T, H, W, C]: `source[t0:t1]` loads (and caches) those frames."""

    def __init__(self, names: Sequence[str], load: Callable[[int], np.ndarray], frame_shape: Tuple[int, ...],
                 convert: Callable[[np.ndarray], np.ndarray], cache_frames: int = 64):
        self.names = list(names)
        self.load, self.convert = load, convert
        self.shape = (len(self.names),) + tuple(frame_shape)
        self.cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self.cache_frames = max(1, int(cache_frames))
        self.load_seconds = 0.0

    def frame(self, t: int) -> np.ndarray:
        if t in self.cache:
            self.cache.move_to_end(t)
            return self.cache[t]
        start = time.perf_counter()
        data = self.load(t)
        self.load_seconds += time.perf_counter() - start
        if data.shape != self.shape[1:]:
            raise InputError(f"{self.names[t]}: frame data of shape {data.shape}, expected {self.shape[1:]}")
        self.cache[t] = data
        while len(self.cache) > self.cache_frames:
            self.cache.popitem(last=False)
        return data

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("FrameSource supports slices along time only")
        start, stop, step = index.indices(self.shape[0])
        return _Chunk([self.frame(t) for t in range(start, stop, step)], self.convert)


def _to_unit_float(data: np.ndarray) -> np.ndarray:
    return data.astype(np.float32) / np.float32(255.0)


def _compact_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    top = int(counts.max(initial=0))
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    return counts.astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclasses.dataclass
class LoadedModel:
    """The model to run and what it needs."""

    model: Any
    kind: str                 # "official_vrt" or "training_checkpoint"
    description: Dict[str, Any]
    config: Any = None        # the training config, when there is one


def _read_json_arg(text: str, flag: str) -> Dict[str, Any]:
    path = Path(text)
    try:
        if text.strip().startswith("{"):
            return json.loads(text)
        if path.is_file():
            return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{flag}: not valid JSON ({err})") from None
    raise InputError(f"{flag}: expected a JSON object or a .json file, found {text!r} (no such file)")


def _config_get(config, *names, default=None):
    """config.a.b... from a ConfigDict, a dict or an object; `default` when any part is missing."""
    node = config
    for name in names:
        if node is None:
            return default
        if isinstance(node, dict) or hasattr(node, "keys"):
            try:
                node = node[name] if name in node else None
            except TypeError:
                node = None
        else:
            node = getattr(node, name, None)
    return default if node is None else node


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Loads the model named by --checkpoint (official weights or a training checkpoint)."""
    path = Path(args.checkpoint)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    official = path.is_file() and path.suffix.lower() in (".npz", ".pth", ".pt")
    if official:
        from vrtspike_jax.convert import load_official_vrt
        from vrtspike_jax.models.vrt.config import PRESETS, preset

        if args.vrt_preset and args.official_config:
            raise InputError("give either --vrt_preset or --official_config for official weights, not both")
        source = None
        if args.vrt_preset:
            if args.vrt_preset not in PRESETS:
                raise InputError(f"--vrt_preset {args.vrt_preset!r}: unknown; known: {', '.join(sorted(PRESETS))}")
            model = load_official_vrt(path, config=preset(args.vrt_preset))
            source = f"preset {args.vrt_preset}"
        else:
            if args.official_config:
                kwargs = _read_json_arg(args.official_config, "--official_config")
                source = "--official_config"
            else:
                kwargs = None
                if path.suffix.lower() == ".npz":
                    with np.load(path, allow_pickle=False) as archive:
                        if "config_json" in archive.files:
                            kwargs = json.loads(str(archive["config_json"]))
                            source = f"{path.name}:config_json"
                if kwargs is None:
                    raise InputError(f"{path}: official VRT weights need the architecture: give --vrt_preset (e.g. "
                                     "deblur for the GoPro/DVD/REDS deblurring models) or --official_config JSON")
            try:
                model = load_official_vrt(path, **kwargs)
            except TypeError as err:
                raise InputError(f"{source}: {err}") from None
        description = {"checkpoint": str(path), "kind": "official_vrt", "architecture_from": source,
                       "config": model.config.official_kwargs()}
        return LoadedModel(model, "official_vrt", description)
    if args.vrt_preset or args.official_config:
        raise InputError(f"{path}: --vrt_preset/--official_config apply to official weights (.npz/.pth files); a "
                         "training checkpoint carries its own configuration")
    try:
        from vrtspike_jax.train.checkpointing import load_model_from_checkpoint
    except ImportError as err:
        raise InputError(f"{path}: reading a training checkpoint needs vrtspike_jax.train.checkpointing."
                         f"load_model_from_checkpoint, which this installation lacks ({err})") from None
    # Orbax wants absolute paths (a relative one fails deep inside tensorstore).
    model, config = load_model_from_checkpoint(str(path.resolve()), step=args.step, which=args.which)
    from vrtspike_jax.train.train_lib import enable_compilation_cache

    enable_compilation_cache(config)   # the run's persistent XLA cache: a second restoration skips compiling
    model_config = getattr(model, "config", None)
    description = {"checkpoint": str(path), "kind": "training_checkpoint", "which": args.which, "step": args.step,
                   "config": _jsonable(dataclasses.asdict(model_config)) if dataclasses.is_dataclass(model_config)
                   else repr(model_config)}
    return LoadedModel(model, "training_checkpoint", description, config)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# ----------------------------------------------------------------------------------------------------------------
# Spikes


def _find_upwards(start: Path, name: str, levels: int = 4) -> Optional[Path]:
    folder = start.resolve()
    for _ in range(levels + 1):
        candidate = folder / name
        if candidate.is_file():
            return candidate
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def _match_stems(blur_stems: Sequence[str], files: Dict[str, Path], folder: Path, suffix: str, blur_dir: Path):
    missing = [s for s in blur_stems if s not in files]
    extra = [s for s in files if s not in set(blur_stems)]
    if missing or extra:
        parts = [f"frame-count mismatch: {blur_dir} has {len(blur_stems)} frames, {folder} has {len(files)} "
                 f"{suffix} files"]
        if missing:
            parts.append(f"missing spike file(s) {', '.join(str(folder / (s + suffix)) for s in missing[:5])}"
                         + (f" ... ({len(missing)} in all)" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"spike file(s) without a frame: {', '.join(s + suffix for s in extra[:5])}"
                         + (f" ... ({len(extra)} in all)" if len(extra) > 5 else ""))
        raise InputError(f"{folder}: " + "; ".join(parts))


def _stats_path(args, loaded: LoadedModel, spike_dir: Path, name: str) -> Path:
    """The statistics file `name` (the representation's) of the run: --voxel_stats, the config, else upwards."""
    if args.voxel_stats:
        return Path(args.voxel_stats)
    for candidate in (_config_get(loaded.config, "data", "stats_file"),
                      (Path(_config_get(loaded.config, "data", "root")) / name)
                      if _config_get(loaded.config, "data", "root") else None):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    found = _find_upwards(spike_dir, name)
    if found is None:
        raise InputError(f"{spike_dir}: the spike input is normalised with the train-split statistics, but no "
                         f"{name} was found beside or above it (nor in the training config): give "
                         "--voxel_stats FILE (written by scripts/prepare_data.py)")
    return found


def spike_representation(loaded: LoadedModel, bins: int):
    """The run's spike representation (config.data; voxel for configs older than the switch), with the model's K."""
    from data_pipelines import spike_input
    from data_pipelines.errors import DataError

    try:
        representation = spike_input.Representation.from_config(_config_get(loaded.config, "data", default={}))
        return dataclasses.replace(representation, num_bins=int(bins))
    except DataError as err:
        raise InputError(f"{loaded.description['checkpoint']}: run config: {err}") from None


def _seq_for(args, rows, spike_dir: Path, alignment: Path) -> str:
    if args.seq:
        return args.seq
    seqs = sorted({seq for seq, _ in rows})
    if len(seqs) == 1:
        return seqs[0]
    seq_dir = spike_dir.resolve().parent
    guess = f"{seq_dir.parent.name}/{seq_dir.name}"
    if guess in seqs:
        return guess
    shown = ", ".join(seqs[:5]) + (f" ... ({len(seqs)} in all)" if len(seqs) > 5 else "")
    raise InputError(f"{alignment}: holds several sequences ({shown}) and none is {guess!r} (from the folder "
                     "names): give --seq")


def build_spike_source(args, loaded: LoadedModel, stems: List[str], blur_dir: Path, height: int, width: int):
    """Validates the spike inputs against the model (before any compute) and returns (source, info) or (None, info)."""
    from data_pipelines import layout, spike_dat, voxelize
    from data_pipelines.errors import DataError

    spike_arg = args.input_spike or args.input_spike_vox
    uses = inference.model_uses_spikes(loaded.model)
    if not uses:
        info = {"used": False}
        if spike_arg:
            info["note"] = f"{spike_arg}: ignored (the model takes no spikes)"
        return None, info
    if not spike_arg:
        raise InputError(f"{args.checkpoint}: this model fuses spike features (use_spike=True): give --input_spike "
                         "(.dat + alignment) or --input_spike_vox (.npy counts)")
    f, bins = inference.model_spike_spec(loaded.model)
    if height % f or width % f:
        raise InputError(f"{blur_dir}: frames are {height}x{width} (HxW), not a multiple of the model's spike_scale "
                         f"{f}: the spike frames would be {height / f:g}x{width / f:g}")
    hs, ws = height // f, width // f
    spike_dir = Path(spike_arg)
    representation = spike_representation(loaded, bins)
    if args.input_spike_vox and not representation.is_voxel:
        raise InputError(f"{spike_dir}: --input_spike_vox holds voxel counts, but this run was trained on the "
                         f"{representation.kind} representation (config data.spike_representation): give "
                         "--input_spike (.dat + alignment)")
    stats_path = _stats_path(args, loaded, spike_dir, representation.stats_name)
    try:
        mean, std = representation.load_stats(stats_path)
    except DataError as err:
        raise InputError(str(err)) from None
    info = {"used": True, "spike_scale": f, "spike_bins": bins, "spike_size_hw": [hs, ws],
            "spike_representation": representation.tag,
            "voxel_stats" if representation.is_voxel else "spike_stats": {"path": str(stats_path), "mean": mean,
                                                                          "std": std}}

    if args.input_spike:
        files, _ = list_files(spike_dir, (".dat",), ".dat spike")
        _match_stems(stems, files, spike_dir, ".dat", blur_dir)
        bad = [s for s in stems if not s.isdigit()]
        if bad:
            raise InputError(f"{blur_dir / bad[0]}: with --input_spike frames are matched to alignment lines by frame "
                             f"number, so names must be numbers (e.g. 000012.png), found {bad[0]!r}")
        alignment = Path(args.alignment) if args.alignment else _find_upwards(spike_dir, "alignment.csv")
        if alignment is None:
            raise InputError(f"{spike_dir}: no alignment.csv beside or above it: give --alignment FILE (one line per "
                             "frame: frame_idx,t0,t1,event_count,seq,spike_t0; docs/DATA.md)")
        try:
            rows, problems, _ = layout.read_alignment(alignment)
        except DataError as err:
            raise InputError(str(err)) from None
        seq = _seq_for(args, rows, spike_dir, alignment)
        plan = []  # (path, start, stop, row)
        for stem in stems:
            row = rows.get((seq, int(stem)))
            if row is None:
                why = "; ".join(str(p) for p in problems[:3])
                raise InputError(f"{alignment}: no line for seq={seq} frame_idx={int(stem)} (frame {stem}, "
                                 f"{files[stem]})" + (f"; problems in the log: {why}" if why else ""))
            try:
                n = spike_dat.count_frames(files[stem], hs, ws)
            except DataError as err:
                raise InputError(str(err)) from None
            if not row.covers(n):
                raise InputError(f"{files[stem]}: spike frames span ticks [{row.spike_t0:g}, {row.spike_t0 + n - 1:g}] "
                                 f"({n} frames of {ws}x{hs} (WxH) from spike_t0={row.spike_t0:g}), which does not "
                                 f"cover the exposure window [{row.t0:g}, {row.t1:g}] ({alignment}:{row.line})")
            if not representation.is_voxel:   # its window rules on an empty 1x1 stream: a raw window too long
                try:                           # for the exposure is found before any compute
                    representation.compute(np.zeros((n, 1, 1), np.uint8), row.frame_times(n), row.t0, row.t1,
                                           where=files[stem])
                except DataError as err:
                    raise InputError(str(err)) from None
            # Only the frames inside the window matter (every representation drops the others); one extra each side.
            start = max(0, int(math.floor(row.t0 - row.spike_t0)) - 1)
            stop = min(n, int(math.ceil(row.t1 - row.spike_t0)) + 2)
            plan.append((files[stem], start, stop, row))

        def load(t):
            path, start, stop, row = plan[t]
            spikes = spike_dat.read_dat(path, hs, ws, start, stop)
            times = row.spike_t0 + np.arange(start, stop, dtype=np.float64)
            if not representation.is_voxel:   # float16, as the training cache holds it
                return np.transpose(representation.cached(spikes, times, row.t0, row.t1, where=path), (1, 2, 0))
            counts = voxelize.count_spikes(spikes, times, row.t0, row.t1, bins)
            return _compact_counts(np.transpose(counts, (1, 2, 0)))

        info.update(format="dat", folder=str(spike_dir), alignment=str(alignment), seq=seq)
    else:
        files, _ = list_files(spike_dir, (".npy",), ".npy spike voxel")
        _match_stems(stems, files, spike_dir, ".npy", blur_dir)
        for stem in stems:
            try:
                shape, dtype, _ = layout.voxel_header(files[stem])
            except DataError as err:
                raise InputError(str(err)) from None
            if shape != (bins, hs, ws):
                raise InputError(f"{files[stem]}: voxel counts of shape {shape}, expected (K, H/f, W/f) = "
                                 f"{(bins, hs, ws)} for {height}x{width} frames, spike_scale={f}, spike_bins={bins}")
            if dtype.kind not in "ui":
                raise InputError(f"{files[stem]}: voxel counts of dtype {dtype}, expected integer spike counts "
                                 "(log1p and the normalisation are applied here, as in training)")

        def load(t):
            try:
                counts = layout.load_voxel_counts(files[stems[t]], bins, hs, ws)
            except DataError as err:
                raise InputError(str(err)) from None
            return _compact_counts(np.transpose(counts, (1, 2, 0)))

        info.update(format="npy", folder=str(spike_dir))

    def convert(values):
        return representation.normalize(values, mean, std)

    return FrameSource(stems, load, (hs, ws, bins), convert), info


# ----------------------------------------------------------------------------------------------------------------
# Output folder


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{output}: --output exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise InputError(f"{output}: output folder exists and is not empty: choose another or pass --overwrite "
                             "(its content is replaced only when the new run succeeds)")


def remove_stale_staging(output: Path) -> None:
    """Removes staging folders of earlier runs for `output` whose process is gone (killed with SIGKILL, say)."""
    if not output.parent.is_dir():
        return
    for entry in output.parent.glob(f".{output.name}.partial-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # alive (or not ours): leave it
            pass


def commit_output(staging: Path, output: Path) -> None:
    """Moves the finished staging folder to `output` (replacing an existing one only now)."""
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


# ----------------------------------------------------------------------------------------------------------------
# Metrics and memory


def _finite_or_none(value: float):
    value = float(value)
    return value if math.isfinite(value) else None


def frame_metrics(restored_u8: np.ndarray, gt_u8: np.ndarray, blur_u8: Optional[np.ndarray]) -> Dict[str, Any]:
    """PSNR/SSIM on RGB and Y of an 8-bit restored frame against its ground truth (KAIR/BasicSR conventions).

    A frame equal to its ground truth has an infinite PSNR: JSON has no infinity, so the value is null and the
    metric's name is listed under "infinite" (the averages then say how many frames they exclude)."""
    from vrtspike_jax import metrics

    out = {"psnr_rgb": metrics.psnr(restored_u8, gt_u8), "ssim_rgb": metrics.ssim(restored_u8, gt_u8),
           "psnr_y": metrics.psnr(restored_u8, gt_u8, y_channel=True),
           "ssim_y": metrics.ssim(restored_u8, gt_u8, y_channel=True)}
    if blur_u8 is not None and blur_u8.shape == gt_u8.shape:
        out["input_psnr_rgb"] = metrics.psnr(blur_u8, gt_u8)
        out["input_psnr_y"] = metrics.psnr(blur_u8, gt_u8, y_channel=True)
    infinite = sorted(k for k, v in out.items() if math.isinf(float(v)))
    result: Dict[str, Any] = {k: _finite_or_none(v) for k, v in out.items()}
    if infinite:
        result["infinite"] = infinite
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_memory() -> Dict[str, Any]:
    """Peak RSS of this process (bytes) and, on accelerators, the device's memory statistics."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scale = 1 if sys.platform == "darwin" else 1024
    report: Dict[str, Any] = {"peak_rss_bytes": int(rss_kib * scale),
                              "peak_rss_gib": round(rss_kib * scale / 2 ** 30, 3)}
    try:
        import jax

        device = jax.local_devices()[0]
        stats = device.memory_stats() if device.platform != "cpu" else None
    except Exception:  # memory_stats is optional per backend
        stats = None
    if stats:
        keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
        report["device"] = {k: int(stats[k]) for k in keep if k in stats}
        if "peak_bytes_in_use" in stats:
            report["device_peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 3)
    return report


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 as main_test_vrt / metrics(quantize=True): clamp, round(x * 255) (half to even)."""
    return np.round(np.clip(frame.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


class _Writer:
    """Writes PNGs (and computes metrics) on a background thread, so the model keeps running meanwhile."""

    def __init__(self, folder: Path, names: List[str], gt_paths: Optional[List[Path]], blur_paths: List[Path]):
        self.folder, self.names, self.gt_paths, self.blur_paths = folder, names, gt_paths, blur_paths
        self.queue: "queue.Queue" = queue.Queue(maxsize=4)
        self.results: Dict[int, Dict[str, Any]] = {}
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="png-writer", daemon=True)
        self.thread.start()

    def _run(self):
        from PIL import Image

        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            t, frame = item
            try:
                start = time.perf_counter()
                image = to_uint8(frame)
                Image.fromarray(image).save(self.folder / f"{self.names[t]}.png")
                if self.gt_paths is not None:
                    self.results[t] = frame_metrics(image, load_image(self.gt_paths[t]),
                                                    load_image(self.blur_paths[t]))
                self.seconds += time.perf_counter() - start
            except BaseException as err:  # reported by the main thread
                self.error = err

    def put(self, t: int, frame: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((t, frame))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def _average(per_frame: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean of each metric over the frames where it is finite; frames with an infinite PSNR (restored exactly)
    are not averaged but counted: `<metric>_infinite_frames` lists them by name."""
    keys = sorted({k for row in per_frame for k in row if k not in ("name", "infinite")})
    out: Dict[str, Any] = {}
    for key in keys:
        values = [row[key] for row in per_frame if row.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
        infinite = [row["name"] for row in per_frame if key in row.get("infinite", ())]
        if infinite:
            out[f"{key}_infinite_frames"] = infinite
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Prepared:
    """Everything checked and ready before any compute (`warnings` are printed before the run starts)."""

    loaded: LoadedModel
    names: List[str]
    blur_paths: List[Path]
    height: int
    width: int
    frames: FrameSource
    spikes: Optional[FrameSource]
    spike_info: Dict[str, Any]
    gt_paths: Optional[List[Path]]
    tile: TileSpec
    plan: inference.TilePlan
    notes: List[str]
    warnings: List[str] = dataclasses.field(default_factory=list)


def trained_clip_length(loaded: LoadedModel) -> Optional[int]:
    """T, the frames per clip the checkpoint's model was trained on (its config's data.clip_length), or None."""
    value = _config_get(loaded.config, "data", "clip_length")
    return int(value) if value else None


def _tile_from(args, loaded: LoadedModel, notes: List[str], warnings: List[str]) -> TileSpec:
    """The tiles of the run. A training checkpoint is restored by default in temporal chunks of its training clip
    length T without temporal overlap: its temporal attention (and the spike branch's, over the whole chunk) then
    sees the context it was trained with, and the frames equal training's validation of the same sequence when T
    divides its length (docs/INFERENCE.md). Official weights keep VRT's test setting (DEFAULT_TILE)."""
    trained = trained_clip_length(loaded)
    tile = list(args.tile if args.tile is not None else DEFAULT_TILE)
    overlap = list(args.tile_overlap if args.tile_overlap is not None else DEFAULT_TILE_OVERLAP)
    if trained and args.tile_overlap is None:
        overlap[0] = 0   # chunks side by side, as validation's clips (also for an explicit --tile)
    if trained and args.tile is None:
        tile[0] = trained
        notes.append(f"temporal chunks of {trained} frames: the clip length T={trained} this checkpoint was trained "
                     "with (--tile sets another)")
    elif trained and (tile[0] == 0 or tile[0] > trained):
        chunk = "one chunk of the whole clip is" if tile[0] == 0 else f"{tile[0]}-frame chunks are"
        warnings.append(f"--tile {tile[0]}: {chunk} longer than the {trained}-frame clips this model was trained "
                        "with; its temporal attention then sees a context it never saw in training, which can cost "
                        f"PSNR (docs/INFERENCE.md section 3); the default is --tile {trained} {tile[1]}")
    return TileSpec(temporal=tile[0], temporal_overlap=overlap[0] if tile[0] else 0,
                    spatial=tile[1], spatial_overlap=overlap[1] if tile[1] else 0)


def _frame_number_gaps(names: Sequence[str]) -> List[str]:
    """'a -> b' for each place where numbered frame names (e.g. 000012) skip numbers."""
    if len(names) < 2 or not all(n.isdigit() for n in names):
        return []
    return [f"{a} -> {b}" for a, b in zip(names, names[1:]) if int(b) != int(a) + 1]


def prepare(args: argparse.Namespace) -> Prepared:
    """Checks every input against the model; raises InputError (nothing computed, nothing written)."""
    notes: List[str] = []
    output = Path(args.output)
    check_output(output, args.overwrite)
    blur_dir = Path(args.input_blur)
    blur_files, ignored = list_files(blur_dir, IMAGE_SUFFIXES, "image")
    if ignored:
        notes.append(f"{blur_dir}: ignored {len(ignored)} non-image entr{'y' if len(ignored) == 1 else 'ies'} "
                     f"({', '.join(ignored[:5])})")
    names = list(blur_files)
    blur_paths = [blur_files[n] for n in names]
    height, width = check_images(blur_paths, "blurry")
    gt_paths = None
    if args.gt:
        gt_dir = Path(args.gt)
        gt_files, _ = list_files(gt_dir, IMAGE_SUFFIXES, "ground-truth image")
        missing = [n for n in names if n not in gt_files]
        if missing:
            raise InputError(f"{gt_dir}: no ground truth for {len(missing)} of {len(names)} frames (e.g. "
                             f"{missing[0]}, expected {gt_dir / (missing[0] + '.png')})")
        gt_paths = [gt_files[n] for n in names]
    if args.input_spike or args.input_spike_vox:  # the file sets, before the (slower) model load
        folder = Path(args.input_spike or args.input_spike_vox)
        suffix = ".dat" if args.input_spike else ".npy"
        files, _ = list_files(folder, (suffix,), f"{suffix} spike")
        _match_stems(names, files, folder, suffix, blur_dir)

    loaded = load_model(args)
    scale = inference.model_upscale(loaded.model)
    if gt_paths is not None:
        check_images(gt_paths, "ground-truth", (height * scale, width * scale))
    spikes, spike_info = build_spike_source(args, loaded, names, blur_dir, height, width)
    if spike_info.get("note"):
        notes.append(spike_info["note"])
    warnings: List[str] = []
    gaps = _frame_number_gaps(names)
    if gaps:
        warnings.append(f"{blur_dir}: the frame numbers skip ({', '.join(gaps[:3])}{' ...' if len(gaps) > 3 else ''}): "
                        "the frames are restored as one clip, so chunks span the gap; restore each run of "
                        "consecutive frames as its own folder to keep the model's context in time")
    try:
        tile = _tile_from(args, loaded, notes, warnings)
        plan = inference.plan_tiles(len(names), height, width, tile, spike_info.get("spike_scale", 1))
    except ValueError as err:
        raise InputError(f"tiling of {blur_dir} ({len(names)} frames of {height}x{width}): {err}") from None
    cache = plan.time.window + 2
    frames = FrameSource(names, lambda t: load_image(blur_paths[t]), (height, width, 3), _to_unit_float, cache)
    if spikes is not None:
        spikes.cache_frames = cache
    return Prepared(loaded, names, blur_paths, height, width, frames, spikes, spike_info, gt_paths, tile, plan,
                    notes, warnings)


def _device_description() -> Dict[str, Any]:
    import jax

    device = jax.local_devices()[0]
    return {"platform": device.platform, "device_kind": getattr(device, "device_kind", ""),
            "num_devices": jax.local_device_count(), "jax": jax.__version__}


def _progress_bar(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the accelerator image may lack tqdm
        return None
    return tqdm(total=total, unit="tile", desc="restoring", disable=disable, file=sys.stderr, dynamic_ncols=True)


def _available_memory() -> Optional[Tuple[int, str]]:
    """(bytes, what) a window may use: free device memory on an accelerator, available RAM on CPU."""
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"free on {device.device_kind}"
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available RAM"
        except OSError:
            pass
    return None


def compile_model(args: argparse.Namespace, prep: Prepared) -> Tuple[inference.ApplyFn, float]:
    """Compiles the model for the plan's one window shape and checks that a window fits in memory (before any
    compute). Raises InputError with the sizes when it cannot fit."""
    options = {k: v for k, v in (("attention_chunk_windows", args.attention_chunk_windows),
                                 ("attention_per_head", args.attention_per_head or None)) if v}
    model = prep.loaded.model
    if options:
        model = inference.with_execution_options(model, **options)
        prep.loaded.description["execution_options"] = options
    apply_fn = inference.make_apply_fn(model)
    seconds = apply_fn.compile_for(prep.plan)
    need = apply_fn.window_memory
    available = _available_memory()
    if need and available and not args.skip_memory_check and need["temp_bytes"] > available[0]:
        t, h, w = prep.plan.tile_shape
        smaller = f"--tile {t} {h // 2 // 8 * 8}" if h // 2 >= 64 else f"--tile {max(2, t // 2)} {h}"
        raise InputError(f"--tile: one {t}x{h}x{w} window of this model needs {need['temp_bytes'] / 2 ** 30:.1f} GiB of "
                         f"working memory (XLA's estimate), {available[0] / 2 ** 30:.1f} GiB are {available[1]}: use "
                         f"smaller windows (e.g. {smaller}), or --skip_memory_check")
    return apply_fn, seconds


def run(args: argparse.Namespace, prep: Prepared, staging: Path, apply_fn: inference.ApplyFn,
        compile_seconds: float) -> Dict[str, Any]:
    """Restores (or times --estimate_tiles windows) and writes into `staging`; returns the metrics."""
    started = time.perf_counter() - compile_seconds
    plan = prep.plan
    report: Dict[str, Any] = {
        "model": prep.loaded.description,
        "device": _device_description(),
        "input": {"blur": str(Path(args.input_blur)), "num_frames": len(prep.names),
                  "height": prep.height, "width": prep.width, "spikes": prep.spike_info,
                  "gt": None if args.gt is None else str(Path(args.gt))},
        "tile": prep.tile.to_dict(),
        "tiling": plan.describe(),
        "trained_clip_length": trained_clip_length(prep.loaded),
        "notes": prep.notes,
        "warnings": prep.warnings,
    }
    if args.estimate_tiles:
        report["estimate"] = estimate(apply_fn, prep, args.estimate_tiles)
        report["timing"] = {"compile_seconds": compile_seconds,
                            "seconds_per_frame": report["estimate"]["estimated_seconds_per_frame"],
                            "measured": False}
        report["memory"] = peak_memory()
        report["memory"]["window_xla_bytes"] = apply_fn.window_memory
        return report

    bar = _progress_bar(plan.num_tiles, args.noprogress)
    writer = _Writer(staging, prep.names, prep.gt_paths, prep.blur_paths)
    restore_start = time.perf_counter()
    cpu_start = _cpu_seconds()
    try:
        for t, frame in inference.iter_restored_frames(apply_fn, prep.frames, prep.spikes, tile=prep.tile,
                                                       spike_scale=plan.spike_scale, plan=plan,
                                                       progress=None if bar is None else bar.update):
            writer.put(t, frame)
            if bar is not None:
                bar.set_postfix(frames=f"{t + 1}/{len(prep.names)}", refresh=False)
        restore_seconds = time.perf_counter() - restore_start
        writer.close()
        cpu_seconds = _cpu_seconds() - cpu_start
    finally:
        if bar is not None:
            bar.close()
    report["timing"] = {
        "seconds_per_frame": restore_seconds / len(prep.names),
        "restore_seconds": restore_seconds,
        "compile_seconds": compile_seconds,
        "read_seconds": prep.frames.load_seconds + (prep.spikes.load_seconds if prep.spikes is not None else 0.0),
        "write_and_metrics_seconds": writer.seconds,
        "total_seconds": time.perf_counter() - started,
        "cpu_seconds_per_frame": cpu_seconds / len(prep.names),
        "measured": True,
        "definition": "seconds_per_frame = restore_seconds / frames: wall time of the tiled restoration (reading "
                      "inputs, the model, blending), after compilation; PNG writing and metrics run alongside on "
                      "another thread. cpu_seconds_per_frame: CPU time of the process (all threads) over the same "
                      "span, per frame (less sensitive to other load on a shared machine)",
    }
    report["memory"] = peak_memory()
    report["memory"]["window_xla_bytes"] = apply_fn.window_memory
    report["outputs"] = [f"{n}.png" for n in prep.names]
    if prep.gt_paths is not None:
        per_frame = [{"name": f"{n}.png", **writer.results[t]} for t, n in enumerate(prep.names)]
        average = _average(per_frame)
        for key in [k for k in average if k.endswith("_infinite_frames")]:
            frames = average[key]
            metric = key[:-len("_infinite_frames")]
            report["notes"].append(f"{metric}: {len(frames)} frame(s) equal their ground truth (infinite PSNR: "
                                   f"{', '.join(frames[:3])}{' ...' if len(frames) > 3 else ''}); the average is over "
                                   f"the other {len(per_frame) - len(frames)}")
            print(f"note: {report['notes'][-1]}", file=sys.stderr)
        report["metrics"] = {"per_frame": per_frame, "average": average,
                             "conventions": "KAIR/BasicSR: 8-bit restored frames, PSNR over all pixels and "
                                            "channels, SSIM with an 11x11 Gaussian window (sigma 1.5), Y = BT.601 "
                                            "luma (16-235), crop_border 0"}
    return report


def estimate(apply_fn: inference.ApplyFn, prep: Prepared, num_windows: int) -> Dict[str, Any]:
    """Times the first `num_windows` windows of the plan (compiled beforehand) and extrapolates to the clip."""
    plan = prep.plan
    seconds = []
    done = 0
    for ci, t0 in enumerate(plan.time.starts):
        t1 = min(t0 + plan.time.window, plan.time.size)
        frames_chunk = prep.frames[t0:t1]
        spikes_chunk = None if prep.spikes is None else prep.spikes[t0:t1]
        for y0 in plan.height.starts:
            for x0 in plan.width.starts:
                if done >= num_windows:
                    break
                start = time.perf_counter()
                x = inference.read_window(frames_chunk, plan, y0, x0)[None]
                s = None if spikes_chunk is None else inference.read_window(spikes_chunk, plan, y0, x0,
                                                                            plan.spike_scale)[None]
                np.asarray(apply_fn(x, s))
                seconds.append(time.perf_counter() - start)
                done += 1
        if done >= num_windows:
            break
    per_window = float(np.median(seconds))
    total = per_window * plan.num_tiles
    return {"windows_timed": len(seconds), "seconds_per_window": seconds, "median_seconds_per_window": per_window,
            "num_windows": plan.num_tiles, "estimated_restore_seconds": total,
            "estimated_seconds_per_frame": total / plan.time.size,
            "definition": "median wall time of one window (reading, the model) x windows in the clip / frames; "
                          "blending and PNG writing not included"}


def _summary(report: Dict[str, Any], output: Path) -> str:
    timing, memory = report["timing"], report["memory"]
    n = report["input"]["num_frames"]
    text = (f"{'estimated' if report.get('estimate') else 'restored'} {n} frames of "
            f"{report['input']['height']}x{report['input']['width']}: {timing['seconds_per_frame']:.3f} s/frame "
            f"(compile {timing['compile_seconds']:.1f} s), peak RSS {memory['peak_rss_gib']:.2f} GiB")
    if "device_peak_gib" in memory:
        text += f", device peak {memory['device_peak_gib']:.2f} GiB"
    if "metrics" in report:
        avg = report["metrics"]["average"]
        text += (f"; PSNR {avg.get('psnr_rgb') or float('nan'):.2f} dB (Y {avg.get('psnr_y') or float('nan'):.2f}), "
                 f"SSIM {avg.get('ssim_rgb') or float('nan'):.4f} (Y {avg.get('ssim_y') or float('nan'):.4f})")
    return text + f"; wrote {output}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_pipelines.errors import DataError

    try:
        prep = prepare(args)
    except (InputError, DataError, ValueError, OSError) as err:  # CheckpointError is a ValueError
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for note in prep.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in prep.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        apply_fn, compile_seconds = compile_model(args, prep)
    except (InputError, ValueError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        report = run(args, prep, staging, apply_fn, compile_seconds)
        with open(staging / args.metrics_name, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        commit_output(staging, output)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or args.debug:
            raise
        kind = "bad input" if isinstance(err, (InputError, DataError)) else type(err).__name__
        print(f"error: restoration failed ({kind}): {err}; nothing was written to {output}", file=sys.stderr)
        return EXIT_FAILED
    print(_summary(report, output))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
