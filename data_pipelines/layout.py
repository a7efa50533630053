"""Our dataset layout: folders, the dataset manifest, the alignment log, and file readers with clear errors.

```
ROOT/
  dataset.json                      {"format": "vrtspike-layout", "version": 1, "spike_scale": f, "tick_rate_hz": ...}
  alignment.csv                     one line per blurry frame: frame_idx,t0,t1,event_count,seq,spike_t0[,source]
  train/<sequence>/blur/000000.png  blurry RGB frame, 8-bit PNG, H x W
  train/<sequence>/sharp/000000.png its ground truth, same size (required: never fabricated)
  train/<sequence>/spike/000000.dat spike frames (SpikeCV .dat) of size (H/f) x (W/f) covering the exposure
  train/<sequence>/spike_vox/000000.npy  written by prepare_data: integer spike counts [K, H/f, W/f]
  val/<sequence>/...
  voxel_stats.json, prepared.json, prepare_log.txt   written by prepare_data
```

Time base (the fix for the original's mixed-up clocks): all times are in *ticks* of the sequence's spike
clock, one tick per spike frame. `t0`, `t1` (closed exposure window of the blurry frame) and `spike_t0` (the
tick of frame 0 of `spike/<frame>.dat`; frame j has tick `spike_t0 + j`) are ticks; `dataset.json`
optionally says how many ticks make a second (`tick_rate_hz`). `seq` is `<split>/<sequence>`; `frame_idx`
is the number in the frame's file name. Frames of a sequence are consecutive in time when their numbers are
consecutive and, where the sequence's ticks share one clock (`shared_clock` in dataset.json), their exposure
windows advance by one frame period (see `input_pipeline.split_runs`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.fileio import atomic_write_json, atomic_write_text

PathLike = Union[str, os.PathLike]

FORMAT = "vrtspike-layout"
VERSION = 1
SPLITS = ("train", "val", "test")
OPTIONAL_SPLITS = ("test",)     # a root without test/ is complete; train/ and val/ are required
DATASET_JSON = "dataset.json"
ALIGNMENT_CSV = "alignment.csv"
PREPARED_JSON = "prepared.json"
STATS_JSON = "voxel_stats.json"
PREPARE_LOG = "prepare_log.txt"
BLUR, SHARP, SPIKE, SPIKE_VOX = "blur", "sharp", "spike", "spike_vox"
ALIGNMENT_COLUMNS = ("frame_idx", "t0", "t1", "event_count", "seq", "spike_t0", "source")
REQUIRED_ALIGNMENT_COLUMNS = ALIGNMENT_COLUMNS[:6]
_STEM = re.compile(r"^[0-9]+$")


def frame_stem(frame_idx: int) -> str:
    """File stem of a frame number: 6 digits (`000012`)."""
    return f"{int(frame_idx):06d}"


# ----------------------------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class DatasetInfo:
    """dataset.json: the facts about a root that no file states by itself.

    spike_scale: integer ratio RGB size / spike size (spike frames are (H / f) x (W / f)).
    tick_rate_hz: spike frames per second (None when unknown); informative, the data path uses ticks.
    source_layout: where the data came from (`synthetic`, `spk_x4k1000fps`, ...).
    description: free text.
    shared_clock: whether the ticks of all frames of a sequence are on one clock, so that exposure windows
      of successive frames can be compared (True for ours, the synthetic data, Spk-X4K1000FPS and S-SDM's
      Spk-GoPro; False for SpkDeblurNet's Spk-GoPro, whose ticks are local to each frame's spike file).
    converter_version: for a root written by `converters`, the version of their frame numbering and split rules
      (None otherwise); a resumed conversion refuses a destination written by another version.
    """

    spike_scale: int = 1
    tick_rate_hz: Optional[float] = None
    source_layout: str = "vrtspike"
    description: str = ""
    shared_clock: bool = True
    converter_version: Optional[int] = None

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "spike_scale": int(self.spike_scale),
            "tick_rate_hz": self.tick_rate_hz,
            "time_unit": "tick = one spike frame; t0, t1, spike_t0 in alignment.csv are ticks",
            "source_layout": self.source_layout,
            "description": self.description,
            "shared_clock": bool(self.shared_clock),
            **({} if self.converter_version is None else {"converter_version": int(self.converter_version)}),
        }


def read_dataset_info(root: PathLike) -> DatasetInfo:
    """Reads ROOT/dataset.json. Raises DataError ("unknown_layout" if absent, "bad_manifest" if invalid)."""
    path = Path(root) / DATASET_JSON
    if not path.exists():
        raise DataError(path, "not found: a root in our layout has a dataset.json (see docs/DATA.md); "
                              "other layouts are converted with `prepare_data.py --convert_from`", "unknown_layout")
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable JSON ({err})", "bad_manifest") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(path, f"expected format {FORMAT!r}, found {found!r}", "bad_manifest")
    if int(raw.get("version", -1)) != VERSION:
        raise DataError(path, f"expected version {VERSION}, found {raw.get('version')!r}", "bad_manifest")
    scale = raw.get("spike_scale", 1)
    if not isinstance(scale, int) or scale < 1:
        raise DataError(path, f"spike_scale must be a positive integer, found {scale!r}", "bad_manifest")
    rate = raw.get("tick_rate_hz")
    if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
        raise DataError(path, f"tick_rate_hz must be a positive number or null, found {rate!r}", "bad_manifest")
    source_layout = str(raw.get("source_layout", "vrtspike"))
    shared = raw.get("shared_clock", default_shared_clock(source_layout))
    if not isinstance(shared, bool):
        raise DataError(path, f"shared_clock must be true or false, found {shared!r}", "bad_manifest")
    return DatasetInfo(spike_scale=scale, tick_rate_hz=None if rate is None else float(rate),
                       source_layout=source_layout, description=str(raw.get("description", "")),
                       shared_clock=shared, converter_version=raw.get("converter_version"))


def default_shared_clock(source_layout: str) -> bool:
    """`shared_clock` of a manifest that does not state it: False only for SpkDeblurNet's Spk-GoPro conversion
    (written before the field existed), whose ticks are local to each frame's spike file."""
    return source_layout != "spk_gopro_spkdeblurnet"


def write_dataset_info(root: PathLike, info: DatasetInfo) -> None:
    """Writes ROOT/dataset.json atomically."""
    atomic_write_json(Path(root) / DATASET_JSON, info.to_json())


# ------------------------------------------------------------------------------------------ alignment log


@dataclasses.dataclass(frozen=True)
class AlignmentRow:
    """One line of alignment.csv: the exposure window of one blurry frame and the time base of its spikes."""

    seq: str
    frame_idx: int
    t0: float
    t1: float
    spike_t0: float
    event_count: Optional[int] = None
    source: str = ""
    line: int = 0

    def frame_times(self, num_frames: int) -> np.ndarray:
        """Tick of each frame of the frame's spike file: `spike_t0 + arange(num_frames)`, float64."""
        return self.spike_t0 + np.arange(num_frames, dtype=np.float64)

    def covers(self, num_frames: int) -> bool:
        """Whether spike frames spike_t0 .. spike_t0 + num_frames - 1 span the window [t0, t1]."""
        return num_frames > 0 and self.spike_t0 <= self.t0 and self.spike_t0 + num_frames - 1 >= self.t1


def format_number(value: float) -> str:
    """Shortest text that reads back to the same float; integers without a decimal point."""
    value = float(value)
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def _parse_float(text: str, name: str, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(where, f"{name} must be a number, found {text!r}", "bad_alignment") from None
    if not math.isfinite(value):
        raise DataError(where, f"{name} must be finite, found {text!r}", "bad_alignment")
    return value


def read_alignment(path: PathLike) -> Tuple[Dict[Tuple[str, int], AlignmentRow], List[DataError], set]:
    """Reads alignment.csv.

    Returns:
      (rows by (seq, frame_idx), problems, rejected keys). A row that cannot be parsed, has t1 <= t0, or is
      duplicated is left out and reported once (a duplicated key is removed entirely: which of the two is
      right is unknown); `rejected keys` are the (seq, frame_idx) of such rows where they could be read.

    Raises:
      DataError: the file is missing or its header lacks a required column (nothing can be aligned).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "alignment log not found: every blurry frame needs a line "
                              f"{','.join(REQUIRED_ALIGNMENT_COLUMNS)}", "missing_alignment")
    with open(path, "r", encoding="utf-8", newline="") as f:
        text = f.read()
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(path, "empty alignment log (expected a header line "
                              f"{','.join(ALIGNMENT_COLUMNS)})", "bad_alignment") from None
    missing = [c for c in REQUIRED_ALIGNMENT_COLUMNS if c not in header]
    if missing:
        hint = " (spike_t0 gives the tick of each spike file's first frame: without it the time base of the " \
               "spikes is unknown)" if "spike_t0" in missing else ""
        raise DataError(path, f"header lacks column(s) {', '.join(missing)}: expected "
                              f"{','.join(ALIGNMENT_COLUMNS)}, found {','.join(header)}{hint}", "bad_alignment")
    col = {name: header.index(name) for name in ALIGNMENT_COLUMNS if name in header}
    rows: Dict[Tuple[str, int], AlignmentRow] = {}
    problems: List[DataError] = []
    duplicated = set()
    rejected = set()
    for line_no, fields in enumerate(reader, start=2):
        if not fields or all(not x.strip() for x in fields):
            continue
        where = f"{path}:{line_no}"
        try:
            if len(fields) < len(header):
                raise DataError(where, f"expected {len(header)} fields, found {len(fields)}", "bad_alignment")
            get = lambda name: fields[col[name]].strip()  # noqa: E731
            seq = get("seq")
            if not seq or "/" not in seq or seq.split("/", 1)[0] not in SPLITS:
                raise DataError(where, f"seq must be '<split>/<sequence>' with split in {SPLITS}, found {seq!r}",
                                "bad_alignment")
            try:
                frame_idx = int(get("frame_idx"))
            except ValueError:
                raise DataError(where, f"frame_idx must be an integer, found {get('frame_idx')!r}",
                                "bad_alignment") from None
            t0 = _parse_float(get("t0"), "t0", where)
            t1 = _parse_float(get("t1"), "t1", where)
            spike_t0 = _parse_float(get("spike_t0"), "spike_t0", where)
            if not t1 > t0:
                rejected.add((seq, frame_idx))
                raise DataError(where, f"{seq} frame {frame_idx}: exposure window needs t1 > t0, found "
                                       f"t0={format_number(t0)}, t1={format_number(t1)}", "bad_alignment")
            count_text = get("event_count")
            event_count = int(count_text) if count_text not in ("", "-1") else None
            source = get("source") if "source" in col else ""
        except DataError as err:
            problems.append(err)
            continue
        except ValueError:
            problems.append(DataError(where, f"event_count must be an integer or empty, found "
                                             f"{fields[col['event_count']]!r}", "bad_alignment"))
            continue
        key = (seq, frame_idx)
        if key in rows or key in duplicated:
            if key in rows:
                first = rows.pop(key)
                problems.append(DataError(where, f"{seq} frame {frame_idx} has two alignment lines "
                                                 f"({first.line} and {line_no}); the frame is dropped",
                                          "bad_alignment"))
            duplicated.add(key)
            continue
        rows[key] = AlignmentRow(seq, frame_idx, t0, t1, spike_t0, event_count, source, line_no)
    return rows, problems, rejected | duplicated


def write_alignment(path: PathLike, rows: Iterable[AlignmentRow]) -> None:
    """Writes alignment.csv atomically, sorted by (seq, frame_idx); event_count empty where unknown."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ALIGNMENT_COLUMNS)
    for r in sorted(rows, key=lambda r: (r.seq, r.frame_idx)):
        writer.writerow([r.frame_idx, format_number(r.t0), format_number(r.t1),
                         "" if r.event_count is None else int(r.event_count), r.seq,
                         format_number(r.spike_t0), r.source])
    atomic_write_text(path, out.getvalue())


# ------------------------------------------------------------------------------------------ file listing


@dataclasses.dataclass
class FrameFiles:
    """The files of one blurry frame (paths may be None when absent)."""

    seq: str
    stem: str
    frame_idx: int
    blur: Path
    sharp: Optional[Path]
    spike: Optional[Path]
    vox: Optional[Path]

    @property
    def key(self) -> str:
        return f"{self.seq}/{self.stem}"


@dataclasses.dataclass
class SequenceListing:
    """The frames found in one sequence folder, and what is wrong with the folder."""

    split: str
    name: str          # "<split>/<sequence>"
    path: Path
    frames: List[FrameFiles]
    problems: List[DataError]
    dropped: List[int] = dataclasses.field(default_factory=list)  # frame numbers left out (already reported)


def _files_by_stem(folder: Path, suffix: str, problems: List[DataError]) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.suffix.lower() != suffix:
            continue
        if not _STEM.match(entry.stem):
            problems.append(DataError(entry, f"frame files are named by frame number (e.g. 000012{suffix}), "
                                             f"found {entry.name!r}; the file is ignored", "bad_name"))
            continue
        found[entry.stem] = entry
    return found


def _stems_text(stems: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(stems[:limit])
    return shown + (f", ... ({len(stems)} in all)" if len(stems) > limit else "")


def list_sequence(split: str, seq_dir: PathLike) -> SequenceListing:
    """Lists the frames of one sequence folder and the folder-level problems.

    A missing blur/ or sharp/ folder, or a sequence without frames, drops the whole sequence. Frames whose
    partners are missing (sharp, or both spike and spike_vox) are reported and left out.
    """
    seq_dir = Path(seq_dir)
    name = f"{split}/{seq_dir.name}"
    problems: List[DataError] = []
    listing = SequenceListing(split, name, seq_dir, [], problems)
    blur_dir, sharp_dir = seq_dir / BLUR, seq_dir / SHARP
    spike_dir, vox_dir = seq_dir / SPIKE, seq_dir / SPIKE_VOX
    if not blur_dir.is_dir():
        problems.append(DataError(blur_dir, "no blur/ folder: the sequence is dropped", "missing_folder"))
        return listing
    if not sharp_dir.is_dir():
        problems.append(DataError(sharp_dir, "no sharp/ folder: ground truth is required and is never filled in "
                                             "from blur/; the sequence is dropped", "missing_sharp"))
        return listing
    if not spike_dir.is_dir() and not vox_dir.is_dir():
        problems.append(DataError(spike_dir, "no spike/ folder (nor spike_vox/): the sequence is dropped",
                                  "missing_folder"))
        return listing
    blurs = _files_by_stem(blur_dir, ".png", problems)
    sharps = _files_by_stem(sharp_dir, ".png", problems)
    spikes = _files_by_stem(spike_dir, ".dat", problems)
    voxes = _files_by_stem(vox_dir, ".npy", problems)
    if not blurs:
        problems.append(DataError(blur_dir, "empty sequence: no frames (expected 000000.png, ...)",
                                  "empty_sequence"))
        return listing
    no_sharp = [s for s in blurs if s not in sharps]
    if no_sharp:
        problems.append(DataError(sharp_dir, f"{len(no_sharp)} blurry frame(s) without ground truth "
                                             f"({_stems_text(no_sharp)}): dropped, never filled in",
                                  "missing_sharp"))
    extra_sharp = [s for s in sharps if s not in blurs]
    if extra_sharp:
        problems.append(DataError(sharp_dir, f"{len(extra_sharp)} sharp frame(s) without a blurry frame "
                                             f"({_stems_text(extra_sharp)})", "frame_count"))
    no_spike = [s for s in blurs if s not in spikes and s not in voxes]
    if no_spike:
        problems.append(DataError(spike_dir, f"frame-count mismatch: blur/ has {len(blurs)} frames, spike/ has "
                                             f"{len(spikes)}; no spikes for {_stems_text(no_spike)} (dropped)",
                                  "frame_count"))
    extra_spike = [s for s in spikes if s not in blurs]
    if extra_spike:
        problems.append(DataError(spike_dir, f"frame-count mismatch: {len(extra_spike)} spike file(s) without a "
                                             f"blurry frame ({_stems_text(extra_spike)})", "frame_count"))
    for stem in sorted(blurs, key=int):
        if stem in no_sharp or stem in no_spike:
            listing.dropped.append(int(stem))
            continue
        listing.frames.append(FrameFiles(name, stem, int(stem), blurs[stem], sharps[stem], spikes.get(stem),
                                         voxes.get(stem) if stem in voxes else None))
    return listing


def list_root(root: PathLike) -> Tuple[List[SequenceListing], List[DataError]]:
    """Lists every sequence of ROOT/{train,val,test} (test/ is optional). Returns (listings, root problems)."""
    root = Path(root)
    listings: List[SequenceListing] = []
    problems: List[DataError] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split in OPTIONAL_SPLITS:
                continue
            problems.append(DataError(split_dir, f"no {split}/ folder", "missing_folder"))
            continue
        seq_dirs = [p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if not seq_dirs:
            problems.append(DataError(split_dir, f"no sequences in {split}/", "empty_sequence"))
        for seq_dir in seq_dirs:
            listings.append(list_sequence(split, seq_dir))
    return listings, problems


# --------------------------------------------------------------------------------------------- file reads

# What Pillow raises for a corrupt or unreadable image (UnidentifiedImageError and "broken data stream" are
# OSErrors; truncated or malformed chunks give SyntaxError, EOFError, struct.error or ValueError). Anything
# else (TypeError, AttributeError, ...) is a bug in our code and propagates.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error)
# What numpy raises for an unreadable or malformed .npy file.
NPY_DECODE_ERRORS = (OSError, EOFError, ValueError)


def _image_decode_errors():
    from PIL import Image

    return IMAGE_DECODE_ERRORS + (Image.DecompressionBombError,)


def png_size(path: PathLike) -> Tuple[int, int]:
    """(H, W) of an 8-bit RGB PNG from its header (no decode). Raises DataError("bad_image")."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
    except FileNotFoundError:
        raise DataError(path, "file not found", "missing_folder") from None
    except _image_decode_errors() as err:
        raise DataError(path, f"unreadable image ({type(err).__name__}: {err})", "bad_image") from None
    if fmt != "PNG":
        raise DataError(path, f"expected a PNG file, found {fmt}", "bad_image")
    if mode != "RGB":
        raise DataError(path, f"expected an 8-bit RGB PNG, found mode {mode!r}", "bad_image")
    return height, width


def load_png(path: PathLike) -> np.ndarray:
    """Decodes an 8-bit RGB PNG fully: uint8 `[H, W, 3]`. Raises DataError("bad_image") if corrupt."""
    from PIL import Image

    png_size(path)
    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img, dtype=np.uint8)
    except _image_decode_errors() as err:
        raise DataError(path, f"corrupt PNG ({type(err).__name__}: {err})", "bad_image") from None
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(path, f"expected [H, W, 3] pixels, found shape {array.shape}", "bad_image")
    return array


def voxel_header(path: PathLike) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy voxel cache. Raises DataError("bad_voxels")."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(path, "file not found", "missing_folder") from None
    except NPY_DECODE_ERRORS as err:
        raise DataError(path, f"unreadable .npy ({type(err).__name__}: {err})", "bad_voxels") from None
    if fortran:
        raise DataError(path, "voxel cache must be C-ordered, found Fortran order", "bad_voxels")
    return tuple(int(s) for s in shape), np.dtype(dtype), offset


def load_voxel_counts(path: PathLike, num_bins: int, height: int, width: int) -> np.ndarray:
    """Loads and checks a voxel cache: integer spike counts `[num_bins, height, width]`.

    Raises:
      DataError("bad_voxels"): wrong shape, a float array (with the number of non-finite values if any),
        negative counts, or an unreadable file.
    """
    shape, dtype, _ = voxel_header(path)
    expected = (int(num_bins), int(height), int(width))
    if shape != expected:
        raise DataError(path, f"voxel cache shape {shape}, expected {expected} (K, H/f, W/f)", "bad_voxels")
    try:
        array = np.load(path, allow_pickle=False)
    except NPY_DECODE_ERRORS as err:
        raise DataError(path, f"unreadable .npy ({type(err).__name__}: {err})", "bad_voxels") from None
    if array.dtype.kind == "f":
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(path, f"non-finite voxels: {bad} of {array.size} values are NaN or Inf",
                            "bad_voxels")
        raise DataError(path, f"voxel cache has dtype {array.dtype}, expected integer spike counts "
                              "(log1p and normalisation are applied when loading)", "bad_voxels")
    if array.dtype.kind not in "ui":
        raise DataError(path, f"voxel cache has dtype {array.dtype}, expected integer spike counts", "bad_voxels")
    if array.dtype.kind == "i" and array.size and array.min() < 0:
        raise DataError(path, f"negative spike counts (min {array.min()})", "bad_voxels")
    return array
