"""Restoring a folder of blurry frames (and their spikes) with a model: the library behind scripts/test.py.

  prepare(args)                    every input checked against the model before any compute (InputError, one line
                                   naming the file and the value, otherwise): frames, ground truth, the spike input
                                   in the run's representation, the tiles. Nothing is computed or written.
  compile_model(args, prep)        the model compiled for the plan's one window shape; a window that cannot fit in
                                   memory is an InputError
  restore_into(folder, prep, ...)  the tiled restoration (inference.iter_restored_frames): PNGs, and metrics against
                                   the ground truth, written on a second thread while the model runs
  estimate(apply_fn, prep, n)      the time of the first n windows, extrapolated to the clip
  report_header, metrics_section, memory_report, summary_line   the parts of metrics.json and the closing line

The pieces are the library's own: the model from `inference.load_model`, the spike input from
`data_pipelines.prepare.exposure_input` (what prepare_data caches), the metrics and the 8-bit quantiser of
training's validation (`vrtspike_jax.metrics.frame_metrics`: one key schema), and the output folder from
`data_pipelines.fileio.atomic_folder` (the caller's). `args` is the restorer's parsed flags (scripts/test.py; any
object with those attributes).
"""
from __future__ import annotations

import dataclasses
import math
import queue
import re
import resource
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vrtspike_jax import inference
from vrtspike_jax.inference import InputError, LoadedModel, TileSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_TILE = (12, 256)          # VRT's DVD/REDS deblurring test setting (frames, pixels)
DEFAULT_TILE_OVERLAP = (2, 20)


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


def match_stems(blur_stems: Sequence[str], files: Dict[str, Path], folder: Path, suffix: str, blur_dir: Path):
    """InputError unless `files` has exactly one file per frame name."""
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


def frame_number_gaps(names: Sequence[str]) -> List[str]:
    """'a -> b' for each place where numbered frame names (e.g. 000012) skip numbers."""
    if len(names) < 2 or not all(n.isdigit() for n in names):
        return []
    return [f"{a} -> {b}" for a, b in zip(names, names[1:]) if int(b) != int(a) + 1]


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


def to_unit_float(data: np.ndarray) -> np.ndarray:
    return data.astype(np.float32) / np.float32(255.0)


def compact_counts(counts: np.ndarray) -> np.ndarray:
    """Integer spike counts in the smallest unsigned type that holds them (uint8 / uint16 / uint32)."""
    counts = np.asarray(counts)
    top = int(counts.max(initial=0))
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32
    return counts.astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Spikes: the run's representation, computed as prepare_data does


def _data_section(loaded: LoadedModel):
    """The run's `data` section (a training checkpoint's typed config), None for official weights."""
    return None if loaded.config is None else loaded.config.data


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


def _stats_path(args, loaded: LoadedModel, spike_dir: Path, name: str) -> Path:
    """The statistics file `name` (the representation's) of the run: --spike_stats, the config, else upwards."""
    if args.spike_stats:
        return Path(args.spike_stats)
    data = _data_section(loaded)
    for candidate in (data and data.stats_file, data and data.root and Path(data.root) / name):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    found = _find_upwards(spike_dir, name)
    if found is None:
        raise InputError(f"{spike_dir}: the spike input is normalised with the train-split statistics, but no "
                         f"{name} was found beside or above it (nor in the training config): give "
                         "--spike_stats FILE (or its older name --voxel_stats; written by scripts/prepare_data.py)")
    return found


def spike_representation(loaded: LoadedModel, bins: int):
    """The run's spike representation (config.data; voxel for configs older than the switch), with the model's K."""
    from data_pipelines import spike_input
    from data_pipelines.errors import DataError

    try:
        representation = spike_input.Representation.from_config(_data_section(loaded) or {})
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
    from data_pipelines.errors import DataError

    spike_arg = args.input_spike or args.input_spike_vox
    if not inference.model_uses_spikes(loaded.model):
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
        load, more = _dat_loader(args, representation, stems, spike_dir, blur_dir, hs, ws)
    else:
        load, more = _npy_loader(bins, stems, spike_dir, blur_dir, height, width, f)
    info.update(more)

    def convert(values):
        return representation.normalize(values, mean, std)

    return FrameSource(stems, load, (hs, ws, bins), convert), info


def _alignment_rows(args, spike_dir: Path):
    """(alignment path, the clip's seq, {(seq, frame_idx): row}, problems) of --input_spike."""
    from data_pipelines import layout
    from data_pipelines.errors import DataError

    alignment = Path(args.alignment) if args.alignment else _find_upwards(spike_dir, "alignment.csv")
    if alignment is None:
        raise InputError(f"{spike_dir}: no alignment.csv beside or above it: give --alignment FILE (one line per "
                         "frame: frame_idx,t0,t1,event_count,seq,spike_t0; docs/DATA.md)")
    try:
        rows, problems, _ = layout.read_alignment(alignment)
    except DataError as err:
        raise InputError(str(err)) from None
    return alignment, _seq_for(args, rows, spike_dir, alignment), rows, problems


def _check_exposure(path: Path, row, alignment: Path, representation, hs: int, ws: int) -> None:
    """InputError unless the .dat at `path` covers the row's exposure window (and, for a non-voxel representation,
    the window suits it: its rules run on an empty 1x1 stream, so e.g. a raw window too long is found now)."""
    from data_pipelines import spike_dat
    from data_pipelines.errors import DataError

    try:
        n = spike_dat.count_frames(path, hs, ws)
        if not row.covers(n):
            raise InputError(f"{path}: spike frames span ticks [{row.spike_t0:g}, {row.spike_t0 + n - 1:g}] "
                             f"({n} frames of {ws}x{hs} (WxH) from spike_t0={row.spike_t0:g}), which does not "
                             f"cover the exposure window [{row.t0:g}, {row.t1:g}] ({alignment}:{row.line})")
        if not representation.is_voxel:
            representation.compute(np.zeros((n, 1, 1), np.uint8), row.frame_times(n), row.t0, row.t1, where=path)
    except DataError as err:
        raise InputError(str(err)) from None


def _dat_loader(args, representation, stems: List[str], spike_dir: Path, blur_dir: Path, hs: int, ws: int):
    """(load(t) -> [H/f, W/f, K], info) of --input_spike: each frame's exposure (from the alignment log) through
    prepare_data's own `exposure_input`, so the input is what the run's cache holds."""
    from data_pipelines import prepare

    files, _ = list_files(spike_dir, (".dat",), ".dat spike")
    match_stems(stems, files, spike_dir, ".dat", blur_dir)
    bad = [s for s in stems if not s.isdigit()]
    if bad:
        raise InputError(f"{blur_dir / bad[0]}: with --input_spike frames are matched to alignment lines by frame "
                         f"number, so names must be numbers (e.g. 000012.png), found {bad[0]!r}")
    alignment, seq, rows, problems = _alignment_rows(args, spike_dir)
    exposures = []
    for stem in stems:
        row = rows.get((seq, int(stem)))
        if row is None:
            why = "; ".join(str(p) for p in problems[:3])
            raise InputError(f"{alignment}: no line for seq={seq} frame_idx={int(stem)} (frame {stem}, "
                             f"{files[stem]})" + (f"; problems in the log: {why}" if why else ""))
        _check_exposure(files[stem], row, alignment, representation, hs, ws)
        exposures.append((files[stem], row))

    def load(t):
        path, row = exposures[t]
        values = prepare.exposure_input(path, row.t0, row.t1, row.spike_t0, hs, ws, representation)
        if representation.is_voxel:   # counts in uint8/uint16; other representations float16, as cached
            values = compact_counts(values)
        return np.transpose(values, (1, 2, 0))

    return load, {"format": "dat", "folder": str(spike_dir), "alignment": str(alignment), "seq": seq}


def _npy_loader(bins: int, stems: List[str], spike_dir: Path, blur_dir: Path, height: int, width: int, f: int):
    """(load(t) -> [H/f, W/f, K], info) of --input_spike_vox: prepare_data's voxel counts, headers checked now."""
    from data_pipelines import layout
    from data_pipelines.errors import DataError

    hs, ws = height // f, width // f
    files, _ = list_files(spike_dir, (".npy",), ".npy spike voxel")
    match_stems(stems, files, spike_dir, ".npy", blur_dir)
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
        return compact_counts(np.transpose(counts, (1, 2, 0)))

    return load, {"format": "npy", "folder": str(spike_dir)}


# ----------------------------------------------------------------------------------------------------------------
# Checking everything before any compute


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
    """T, the frames per clip the checkpoint's model was trained on (the data.clip_length its config saved), or None
    (official weights, a converted VRT, a config that does not say)."""
    return loaded.trained_clip_length


def tile_from(args, loaded: LoadedModel, num_frames: int, notes: List[str], warnings: List[str]) -> TileSpec:
    """The tiles of the run. A training checkpoint is restored by default in temporal chunks of its training clip
    length T without temporal overlap: its temporal attention (and the spike branch's, over the whole chunk) then
    sees the context it was trained with, and the frames equal training's validation of the same sequence when T
    divides its length (docs/INFERENCE.md). Official weights keep VRT's test setting (DEFAULT_TILE). A chunk
    longer than T (the clip of `num_frames` frames permitting) is a warning."""
    trained = trained_clip_length(loaded)
    tile = list(args.tile if args.tile is not None else DEFAULT_TILE)
    overlap = list(args.tile_overlap if args.tile_overlap is not None else DEFAULT_TILE_OVERLAP)
    if trained and args.tile_overlap is None:
        overlap[0] = 0   # chunks side by side, as validation's clips (also for an explicit --tile)
    if trained and args.tile is None:
        tile[0] = trained
        notes.append(f"temporal chunks of {trained} frames: the clip length T={trained} this checkpoint was trained "
                     "with (--tile sets another)")
    elif trained and min(tile[0] or num_frames, num_frames) > trained:
        chunk = "one chunk of the whole clip is" if tile[0] == 0 else f"{tile[0]}-frame chunks are"
        warnings.append(f"--tile {tile[0]}: {chunk} longer than the {trained}-frame clips this model was trained "
                        "with; its temporal attention then sees a context it never saw in training, which can cost "
                        f"PSNR (docs/INFERENCE.md section 3); the default is --tile {trained} {tile[1]}")
    return TileSpec(temporal=tile[0], temporal_overlap=overlap[0] if tile[0] else 0,
                    spatial=tile[1], spatial_overlap=overlap[1] if tile[1] else 0)


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{output}: --output exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise InputError(f"{output}: output folder exists and is not empty: choose another or pass --overwrite "
                             "(its content is replaced only when the new run succeeds)")


def _check_file_sets(args, blur_dir: Path, names: List[str]) -> Optional[List[Path]]:
    """The ground-truth paths (None without --gt); InputError when --gt or the spike folder lacks a frame."""
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
        match_stems(names, files, folder, suffix, blur_dir)
    return gt_paths


def prepare(args) -> Prepared:
    """Checks every input against the model; raises InputError (nothing computed, nothing written)."""
    notes: List[str] = []
    check_output(Path(args.output), args.overwrite)
    blur_dir = Path(args.input_blur)
    blur_files, ignored = list_files(blur_dir, IMAGE_SUFFIXES, "image")
    if ignored:
        notes.append(f"{blur_dir}: ignored {len(ignored)} non-image entr{'y' if len(ignored) == 1 else 'ies'} "
                     f"({', '.join(ignored[:5])})")
    names = list(blur_files)
    blur_paths = [blur_files[n] for n in names]
    height, width = check_images(blur_paths, "blurry")
    gt_paths = _check_file_sets(args, blur_dir, names)

    loaded = inference.load_model(args.checkpoint, which=args.which, step=args.step, vrt_preset=args.vrt_preset,
                                  official_config=args.official_config)
    scale = inference.model_upscale(loaded.model)
    if gt_paths is not None:
        check_images(gt_paths, "ground-truth", (height * scale, width * scale))
    spikes, spike_info = build_spike_source(args, loaded, names, blur_dir, height, width)
    if spike_info.get("note"):
        notes.append(spike_info["note"])
    warnings: List[str] = []
    gaps = frame_number_gaps(names)
    if gaps:
        warnings.append(f"{blur_dir}: the frame numbers skip ({', '.join(gaps[:3])}{' ...' if len(gaps) > 3 else ''}): "
                        "the frames are restored as one clip, so chunks span the gap; restore each run of "
                        "consecutive frames as its own folder to keep the model's context in time")
    try:
        tile = tile_from(args, loaded, len(names), notes, warnings)
        plan = inference.plan_tiles(len(names), height, width, tile, spike_info.get("spike_scale", 1))
    except ValueError as err:
        raise InputError(f"tiling of {blur_dir} ({len(names)} frames of {height}x{width}): {err}") from None
    cache = plan.time.window + 2
    frames = FrameSource(names, lambda t: load_image(blur_paths[t]), (height, width, 3), to_unit_float, cache)
    if spikes is not None:
        spikes.cache_frames = cache
    return Prepared(loaded, names, blur_paths, height, width, frames, spikes, spike_info, gt_paths, tile, plan,
                    notes, warnings)


# ----------------------------------------------------------------------------------------------------------------
# Compiling, with the memory check


def available_memory() -> Optional[Tuple[int, str]]:
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


def compile_model(args, prep: Prepared) -> Tuple[inference.ApplyFn, float]:
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
    available = available_memory()
    if need and available and not args.skip_memory_check and need["temp_bytes"] > available[0]:
        t, h, w = prep.plan.tile_shape
        smaller = f"--tile {t} {h // 2 // 8 * 8}" if h // 2 >= 64 else f"--tile {max(2, t // 2)} {h}"
        raise InputError(f"--tile: one {t}x{h}x{w} window of this model needs {need['temp_bytes'] / 2 ** 30:.1f} GiB of "
                         f"working memory (XLA's estimate), {available[0] / 2 ** 30:.1f} GiB are {available[1]}: use "
                         f"smaller windows (e.g. {smaller}), or --skip_memory_check")
    return apply_fn, seconds


# ----------------------------------------------------------------------------------------------------------------
# Metrics (training validation's schema) and the PNG writer


def frame_metrics(restored_u8: np.ndarray, gt_u8: np.ndarray, blur_u8: Optional[np.ndarray]) -> Dict[str, Any]:
    """Training validation's metrics of one 8-bit restored frame against its ground truth, under its names
    (`metrics.frame_metrics`: psnr, psnr_y, ssim, ssim_y), and those of the blurry frame as `input_*`.

    A frame equal to its ground truth has an infinite PSNR: JSON has no infinity, so the value is null and the
    metric's name is listed under "infinite" (the averages then say how many frames they exclude)."""
    from vrtspike_jax import metrics

    values = metrics.frame_metrics(restored_u8[None], gt_u8[None])
    if blur_u8 is not None and blur_u8.shape == gt_u8.shape:
        values.update({f"input_{k}": v for k, v in metrics.frame_metrics(blur_u8[None], gt_u8[None]).items()})
    out = {k: float(v[0]) for k, v in values.items()}
    result: Dict[str, Any] = {k: v if math.isfinite(v) else None for k, v in out.items()}
    infinite = sorted(k for k, v in out.items() if math.isinf(v))
    if infinite:
        result["infinite"] = infinite
    return result


def average_metrics(per_frame: List[Dict[str, Any]]) -> Dict[str, Any]:
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


def metrics_section(per_frame: List[Dict[str, Any]]) -> Tuple[Dict[str, Any], List[str]]:
    """metrics.json's `metrics` (per frame, average, conventions) and the notes on frames left out of averages."""
    from vrtspike_jax import metrics

    average = average_metrics(per_frame)
    notes = []
    for key in [k for k in average if k.endswith("_infinite_frames")]:
        frames = average[key]
        notes.append(f"{key[:-len('_infinite_frames')]}: {len(frames)} frame(s) equal their ground truth (infinite "
                     f"PSNR: {', '.join(frames[:3])}{' ...' if len(frames) > 3 else ''}); the average is over the "
                     f"other {len(per_frame) - len(frames)}")
    section = {"per_frame": per_frame, "average": average,
               "conventions": f"{metrics.CONVENTIONS}; crop_border 0 (vrtspike_jax.metrics)"}
    return section, notes


class PngWriter:
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

        from vrtspike_jax.metrics import quantize_uint8

        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            t, frame = item
            try:
                start = time.perf_counter()
                image = quantize_uint8(frame)
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


# ----------------------------------------------------------------------------------------------------------------
# Restoring, timing, the report


def _progress_bar(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the accelerator image may lack tqdm
        return None
    return tqdm(total=total, unit="tile", desc="restoring", disable=disable, file=sys.stderr, dynamic_ncols=True)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


TIMING_DEFINITION = ("seconds_per_frame = restore_seconds / frames: wall time of the tiled restoration (reading "
                     "inputs, the model, blending), after compilation; PNG writing and metrics run alongside on "
                     "another thread. cpu_seconds_per_frame: CPU time of the process (all threads) over the same "
                     "span, per frame (less sensitive to other load on a shared machine)")


def restore_into(folder: Path, prep: Prepared, apply_fn: inference.ApplyFn, compile_seconds: float,
                 progress: bool = True) -> Tuple[Dict[str, Any], Optional[List[Dict[str, Any]]]]:
    """Restores the clip into `folder` (`<name>.png` per frame; metrics against the ground truth alongside).
    Returns metrics.json's `timing` and the per-frame metrics (None without ground truth)."""
    started = time.perf_counter() - compile_seconds
    plan = prep.plan
    bar = _progress_bar(plan.num_tiles, not progress)
    writer = PngWriter(folder, prep.names, prep.gt_paths, prep.blur_paths)
    restore_start, cpu_start = time.perf_counter(), cpu_seconds()
    try:
        for t, frame in inference.iter_restored_frames(apply_fn, prep.frames, prep.spikes, tile=prep.tile,
                                                       spike_scale=plan.spike_scale, plan=plan,
                                                       progress=None if bar is None else bar.update):
            writer.put(t, frame)
            if bar is not None:
                bar.set_postfix(frames=f"{t + 1}/{len(prep.names)}", refresh=False)
        restore_seconds = time.perf_counter() - restore_start
        writer.close()
        cpu = cpu_seconds() - cpu_start
    finally:
        if bar is not None:
            bar.close()
    n = len(prep.names)
    timing = {"seconds_per_frame": restore_seconds / n, "restore_seconds": restore_seconds,
              "compile_seconds": compile_seconds,
              "read_seconds": prep.frames.load_seconds + (prep.spikes.load_seconds if prep.spikes is not None else 0.0),
              "write_and_metrics_seconds": writer.seconds, "total_seconds": time.perf_counter() - started,
              "cpu_seconds_per_frame": cpu / n, "measured": True, "definition": TIMING_DEFINITION}
    per_frame = None
    if prep.gt_paths is not None:
        per_frame = [{"name": f"{name}.png", **writer.results[t]} for t, name in enumerate(prep.names)]
    return timing, per_frame


def estimate(apply_fn: inference.ApplyFn, prep: Prepared, num_windows: int) -> Dict[str, Any]:
    """Times the first `num_windows` windows of the plan (compiled beforehand) and extrapolates to the clip."""
    plan = prep.plan
    seconds = []
    for t0 in plan.time.starts:
        t1 = min(t0 + plan.time.window, plan.time.size)
        frames_chunk = prep.frames[t0:t1]
        spikes_chunk = None if prep.spikes is None else prep.spikes[t0:t1]
        for y0 in plan.height.starts:
            for x0 in plan.width.starts:
                if len(seconds) >= num_windows:
                    break
                start = time.perf_counter()
                x = inference.read_window(frames_chunk, plan, y0, x0)[None]
                s = None if spikes_chunk is None else inference.read_window(spikes_chunk, plan, y0, x0,
                                                                            plan.spike_scale)[None]
                np.asarray(apply_fn(x, s))
                seconds.append(time.perf_counter() - start)
        if len(seconds) >= num_windows:
            break
    per_window = float(np.median(seconds))
    total = per_window * plan.num_tiles
    return {"windows_timed": len(seconds), "seconds_per_window": seconds, "median_seconds_per_window": per_window,
            "num_windows": plan.num_tiles, "estimated_restore_seconds": total,
            "estimated_seconds_per_frame": total / plan.time.size,
            "definition": "median wall time of one window (reading, the model) x windows in the clip / frames; "
                          "blending and PNG writing not included"}


def device_description() -> Dict[str, Any]:
    import jax

    device = jax.local_devices()[0]
    return {"platform": device.platform, "device_kind": getattr(device, "device_kind", ""),
            "num_devices": jax.local_device_count(), "jax": jax.__version__}


def report_header(args, prep: Prepared) -> Dict[str, Any]:
    """metrics.json's description of the run: model, device, input, tiles, notes and warnings."""
    return {
        "model": prep.loaded.description,
        "device": device_description(),
        "input": {"blur": str(Path(args.input_blur)), "num_frames": len(prep.names),
                  "height": prep.height, "width": prep.width, "spikes": prep.spike_info,
                  "gt": None if args.gt is None else str(Path(args.gt))},
        "tile": prep.tile.to_dict(),
        "tiling": prep.plan.describe(),
        "trained_clip_length": trained_clip_length(prep.loaded),
        "notes": prep.notes,
        "warnings": prep.warnings,
    }


def memory_report(apply_fn: inference.ApplyFn) -> Dict[str, Any]:
    """Peak RSS of this process (bytes), on accelerators the device's memory statistics, and XLA's memory analysis
    of the compiled window."""
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
    report["window_xla_bytes"] = apply_fn.window_memory
    return report


def summary_line(report: Dict[str, Any], output: Path) -> str:
    timing, memory = report["timing"], report["memory"]
    n = report["input"]["num_frames"]
    text = (f"{'estimated' if report.get('estimate') else 'restored'} {n} frames of "
            f"{report['input']['height']}x{report['input']['width']}: {timing['seconds_per_frame']:.3f} s/frame "
            f"(compile {timing['compile_seconds']:.1f} s), peak RSS {memory['peak_rss_gib']:.2f} GiB")
    if "device_peak_gib" in memory:
        text += f", device peak {memory['device_peak_gib']:.2f} GiB"
    if "metrics" in report:
        avg = report["metrics"]["average"]
        text += (f"; PSNR {avg.get('psnr') or float('nan'):.2f} dB (Y {avg.get('psnr_y') or float('nan'):.2f}), "
                 f"SSIM {avg.get('ssim') or float('nan'):.4f} (Y {avg.get('ssim_y') or float('nan'):.4f})")
    return text + f"; wrote {output}"


__all__ = ["DEFAULT_TILE", "DEFAULT_TILE_OVERLAP", "IMAGE_SUFFIXES", "FrameSource", "InputError", "PngWriter",
           "Prepared", "available_memory", "build_spike_source", "check_images", "compile_model", "estimate",
           "frame_metrics", "list_files", "load_image", "memory_report", "metrics_section", "prepare",
           "report_header", "restore_into", "summary_line", "tile_from", "trained_clip_length"]
