"""Converters from the public spike deblurring datasets' layouts into ours (see docs/DATA.md for the sources).

Spk-X4K1000FPS, as hnmizuho/SpkDeblurNet reads it (`codes/dataset/x4k1000fps_sequence.py`):
```
SRC/{train,val}_fullRGB/<sub>/<scene>/0000.png 0000_000.png 0000_001.png 0000_002.png 0001.png ...
SRC/{train,val}_blurry_{33,65}/<sub>/<scene>/<name>.png     named after its centre frame
SRC/{train,val}_spike_2xds/<sub>/<scene>/spike.dat          one stream per scene, half resolution
```
The x4-interpolated frames count ticks: `NNNN.png` is tick 4*NNNN, `NNNN_JJJ.png` is tick 4*NNNN + JJJ + 1;
spike frame i of spike.dat is tick i (one spike frame per interpolated frame, 257 for a 65-frame clip).
A blurry frame centred on tick c averages ticks [c - L//2, c + L//2] (L = 33 or 65); its ground truth is
fullRGB's frame c. 1000 fps x 4 = 4000 ticks per second (the original baseline divided these ticks by 1000).

Spk-GoPro as chenkang455/S-SDM builds it (`scripts/GOPRO_dataset.md`, `blur_syn.py`, `spike_simulate.py`,
`sharp_extract.py`):
```
SRC/{train,test}/blur_data/<seq>/<raw index>.png      mean of 97 x8-interpolated frames (13 raw frames)
SRC/{train,test}/sharp_data/<seq>/<raw index>.png     the centre raw frame
SRC/{train,test}/spike_data/<seq>/<raw index>.dat     1/4 resolution (180x320); spike_full/: 720x1280
```
Each .dat holds 20 + 97 + 20 spike frames (20 outside the exposure on each side); the blurry frame named
r is centred on interpolated tick 8r; 240 fps x 8 = 1920 ticks per second. S-SDM simulates no spikes for a
sequence's first blurry frame.

Spk-GoPro as hnmizuho/SpkDeblurNet reads it (`codes/dataset/gopro_sequence.py`):
```
SRC/GOPRO_Large/{train,test}/<seq>/blur_gamma/<name>.png, sharp/<name>.png
SRC/GOPRO_Large_spike_seq/{train,test}/<seq>/spike/<name>.dat   360x640 (half resolution)
```
SpkDeblurNet uses the central 56 spike frames of each file ([n//2 - 28, n//2 + 28)); the files share no
clock, so ticks here are local to each frame's file.

Our splits: X4K train -> train, val -> val (its test split has no spike streams). GoPro (both layouts): test ->
test, and val is carved from the train sequences, by whole sequence (`ConvertOptions.val_from_train`, `carve_val`),
so that checkpoints are selected on data that is neither trained on nor reported.

Frame numbers: a converted frame keeps its position in the source sequence's time order (0, 1, 2, ... over the
source's blurry frames, dropped ones included), so a frame dropped mid-sequence leaves a gap in the numbers and
the input pipeline never builds a clip across it. Every dropped frame is logged (python logging: WARNING for
problems, INFO for drops by the source layout's design) and listed in the ConvertReport.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from data_pipelines import layout, spike_dat
from data_pipelines.errors import DataError
from data_pipelines.fileio import atomic_copy, atomic_write_bytes

LAYOUT_NAMES = {
    "vrtspike": "vrtspike (ours)",
    "spk_x4k1000fps": "Spk-X4K1000FPS (hnmizuho/SpkDeblurNet)",
    "spk_gopro_ssdm": "Spk-GoPro (chenkang455/S-SDM)",
    "spk_gopro_spkdeblurnet": "Spk-GoPro (hnmizuho/SpkDeblurNet)",
}
# 2: frames keep their position in the source sequence (gaps stay), GoPro test -> test and val carved from train.
# (1, unrecorded: frames renumbered consecutively, GoPro test -> val.)
CONVERTER_VERSION = 2
X4K_TICK_RATE_HZ = 4000.0
SSDM_TICK_RATE_HZ = 1920.0
_X4K_NAME = re.compile(r"^(\d+)(?:_(\d+))?$")
_log = logging.getLogger(__name__)


def _dirs(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")) if path.is_dir() else []


def _pngs(path: Path) -> List[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")) \
        if path.is_dir() else []


def detect_layout(root) -> str:
    """Which layout ROOT is in: one of LAYOUT_NAMES' keys. Raises DataError("unknown_layout") naming what it saw."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "root folder not found", "missing_root")
    if (root / layout.DATASET_JSON).exists():
        return "vrtspike"
    names = {p.name for p in root.iterdir()}
    if any(re.fullmatch(r"(train|val|test)_blurry_(33|65)", n) for n in names) and \
            any(re.fullmatch(r"(train|val|test)_spike_2xds", n) for n in names):
        return "spk_x4k1000fps"
    if "GOPRO_Large" in names and "GOPRO_Large_spike_seq" in names:
        return "spk_gopro_spkdeblurnet"
    for split in ("train", "test"):
        sub = root / split
        if (sub / "blur_data").is_dir() and ((sub / "spike_data").is_dir() or (sub / "spike_full").is_dir()):
            return "spk_gopro_ssdm"
    if (root / "train").is_dir() and any((s / layout.BLUR).is_dir() for s in _dirs(root / "train")):
        raise DataError(root, f"looks like our layout but has no {layout.DATASET_JSON} (and "
                              f"{layout.ALIGNMENT_CSV}): write them as docs/DATA.md describes", "unknown_layout")
    shown = ", ".join(sorted(names)[:12]) or "nothing"
    raise DataError(root, "unknown layout: expected ours (dataset.json), Spk-X4K1000FPS ({split}_blurry_33|65 + "
                          "{split}_spike_2xds), Spk-GoPro of S-SDM ({train,test}/blur_data + spike_data) or of "
                          f"SpkDeblurNet (GOPRO_Large + GOPRO_Large_spike_seq); found {shown}", "unknown_layout")


@dataclasses.dataclass
class ConvertOptions:
    """Options of the converters (flags of prepare_data.py with --convert_from).

    layout: "auto" or a key of LAYOUT_NAMES.
    spike_scale: RGB/spike size ratio; None = the layout's (X4K 2, S-SDM spike_data 4 / spike_full 1,
      SpkDeblurNet GoPro 2).
    x4k_blur_frames: 33 or 65 (None: the only one present, else 33).
    spike_margin: X4K: spike frames kept outside the exposure on each side (dropped again by the voxeliser).
    ssdm_exposure_frames, ssdm_margin, ssdm_interp: S-SDM's 97 frames per exposure, 20 extra frames on each
      side, x8 interpolation.
    ssdm_spikes: "auto" (spike_data if present), "data" or "full".
    gopro_window: SpkDeblurNet GoPro: spike frames of the exposure window (the central 56).
    gopro_blur: SpkDeblurNet GoPro: blur folder name ("blur_gamma" as SpkDeblurNet, or "blur").
    val_from_train: GoPro layouts: the train sequences moved (whole) to our val split: a fraction in (0, 1)
      (rounded, at least one), a whole number of sequences (>= 1), or 0 for none; see `carve_val`. At least
      one sequence always stays in train.
    """

    layout: str = "auto"
    spike_scale: Optional[int] = None
    x4k_blur_frames: Optional[int] = None
    spike_margin: int = 0
    ssdm_exposure_frames: int = 97
    ssdm_margin: int = 20
    ssdm_interp: int = 8
    ssdm_spikes: str = "auto"
    gopro_window: int = 56
    gopro_blur: str = "blur_gamma"
    val_from_train: float = 0.1
    progress: bool = True


@dataclasses.dataclass
class ConvertReport:
    layout: str
    problems: List[DataError] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    frames: int = 0
    sequences: int = 0
    val_sequences: List[str] = dataclasses.field(default_factory=list)   # carved from train (GoPro)

    def problem(self, err: DataError) -> None:
        """Records (and logs, once) a problem: a frame or sequence dropped because its files are bad or missing."""
        self.problems.append(err)
        _log.warning("%s", err.message)

    def note(self, text: str) -> None:
        """Records (and logs, once) a note: e.g. a frame the source layout leaves without spikes by design."""
        self.notes.append(text)
        _log.info("%s", text)


class _Writer:
    """Writes frames into our layout; skips outputs that already exist with the expected size (resume)."""

    def __init__(self, dst: Path, info: layout.DatasetInfo):
        info = dataclasses.replace(info, converter_version=CONVERTER_VERSION)
        self.dst = dst
        self.info = info
        self.rows: List[layout.AlignmentRow] = []
        existing = dst / layout.DATASET_JSON
        if existing.exists():
            old = layout.read_dataset_info(dst)
            if old.source_layout != info.source_layout or old.spike_scale != info.spike_scale:
                raise DataError(existing, f"the destination holds a {old.source_layout} conversion with spike_scale "
                                          f"{old.spike_scale}; this run makes {info.source_layout} with spike_scale "
                                          f"{info.spike_scale}: use an empty --root", "bad_manifest")
            if old.converter_version != CONVERTER_VERSION:
                raise DataError(existing, f"the destination was written by converter version "
                                          f"{old.converter_version or 1}, this is version {CONVERTER_VERSION} (other "
                                          "frame numbers and splits): use an empty --root", "bad_manifest")

    def _copy(self, src: Path, dst: Path) -> None:
        if dst.exists() and dst.stat().st_size == src.stat().st_size:
            return
        atomic_copy(src, dst)

    def add(self, split: str, seq: str, frame_idx: int, blur: Path, sharp: Path, t0: float, t1: float,
            spike_t0: float, source: str, spike_src: Optional[Path] = None, spike_bytes=None) -> None:
        seq_dir = self.dst / split / seq
        stem = layout.frame_stem(frame_idx)
        self._copy(blur, seq_dir / layout.BLUR / f"{stem}.png")
        self._copy(sharp, seq_dir / layout.SHARP / f"{stem}.png")
        out = seq_dir / layout.SPIKE / f"{stem}.dat"
        if spike_src is not None:
            self._copy(spike_src, out)
        elif not (out.exists() and out.stat().st_size == len(spike_bytes)):
            atomic_write_bytes(out, bytes(spike_bytes))
        self.rows.append(layout.AlignmentRow(f"{split}/{seq}", frame_idx, t0, t1, spike_t0, None, source))

    def finish(self) -> None:
        layout.write_dataset_info(self.dst, self.info)
        layout.write_alignment(self.dst / layout.ALIGNMENT_CSV, self.rows)


def carve_val(names: List[str], amount: float) -> List[str]:
    """The train sequences that become our val split: deterministic, by whole sequence.

    `amount`: a fraction in (0, 1) of the sequences (rounded half up, at least one), a whole number >= 1 of
    sequences, or 0 (none). At most len(names) - 1 are taken, so train keeps one. The sequences are ranked by
    the SHA-256 of their names and the first ones taken: the choice depends on the names only (not on the
    listing order, the machine or a seed), and adding or removing a sequence moves no other one.

    Raises:
      DataError("config"): a negative amount, or one >= 1 that is not a whole number.
    """
    amount = float(amount)
    if not math.isfinite(amount) or amount < 0 or (amount >= 1 and not amount.is_integer()):
        raise DataError(None, f"val_from_train must be 0, a fraction in (0, 1) or a whole number of sequences, "
                              f"found {amount:g}", "config")
    if amount == 0 or not names:
        return []
    count = int(amount) if amount >= 1 else max(1, int(math.floor(amount * len(names) + 0.5)))
    count = min(count, len(names) - 1)
    ranked = sorted(names, key=lambda name: (hashlib.sha256(name.encode("utf-8")).hexdigest(), name))
    return sorted(ranked[:count])


def _gopro_splits(split_src: str, seq_names: List[str], opt: ConvertOptions, report: ConvertReport,
                  where: Path) -> Dict[str, str]:
    """Our split of each source sequence of a GoPro split folder: test -> test; train -> train or carved val."""
    if split_src != "train":
        return {name: "test" for name in seq_names}
    val = carve_val(seq_names, opt.val_from_train)
    report.val_sequences = val
    if val:
        report.note(f"{where}: val = {len(val)} of the {len(seq_names)} train sequences ({', '.join(val)}; "
            f"val_from_train={opt.val_from_train:g}, chosen by the SHA-256 of their names)")
    else:
        report.note(f"{where}: no val split carved from the {len(seq_names)} train sequence(s) "
            f"(val_from_train={opt.val_from_train:g})")
    return {name: "val" if name in val else "train" for name in seq_names}


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="seq", file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------- Spk-X4K1000FPS


def x4k_tick(name: str) -> int:
    """Tick of an x4-interpolated X4K frame name: `0001` -> 4, `0001_002` -> 7 (SpkDeblurNet's rule)."""
    match = _X4K_NAME.match(name)
    if not match:
        raise ValueError(name)
    base = int(match.group(1)) * 4
    return base if match.group(2) is None else base + int(match.group(2)) + 1


def _convert_x4k(src: Path, dst: Path, opt: ConvertOptions, report: ConvertReport) -> None:
    names = {p.name for p in src.iterdir()}
    lengths = sorted({int(m.group(2)) for n in names for m in [re.fullmatch(r"(train|val|test)_blurry_(\d+)", n)] if m})
    if opt.x4k_blur_frames is not None:
        length = int(opt.x4k_blur_frames)
    elif len(lengths) == 1:
        length = lengths[0]
    else:
        length = 33
        report.note(f"{src}: blurry_{lengths} present, converting blurry_33 (choose with --x4k_blur_frames)")
    if length % 2 == 0:
        raise DataError(src, f"exposure length must be odd (a centre frame), found {length}", "config")
    scale = opt.spike_scale or 2
    writer = _Writer(dst, layout.DatasetInfo(scale, X4K_TICK_RATE_HZ, "spk_x4k1000fps",
                                             f"converted from {src} (blurry_{length})"))
    half = length // 2
    if "test_blurry_%d" % length in names:
        report.note(f"{src / ('test_blurry_%d' % length)}: the X4K test split has no spike streams "
                    "in SpkDeblurNet's layout; not converted")
    for split_src, split in (("train", "train"), ("val", "val")):
        blur_root = src / f"{split_src}_blurry_{length}"
        if not blur_root.is_dir():
            report.problem(DataError(blur_root, f"no {split_src} split (expected {blur_root.name}/)",
                                     "missing_folder"))
            continue
        scenes = [(sub, scene) for sub in _dirs(blur_root) for scene in _dirs(sub)]
        for sub, scene in _progress(scenes, opt.progress, f"convert {split_src}"):
            rel = Path(sub.name) / scene.name
            seq = f"{sub.name}_{scene.name}"
            sharp_dir = src / f"{split_src}_fullRGB" / rel
            spike_path = src / f"{split_src}_spike_2xds" / rel / "spike.dat"
            blurs = []
            for png in _pngs(scene):
                try:
                    blurs.append((x4k_tick(png.stem), png))
                except ValueError:
                    report.problem(DataError(png, "X4K frame names are NNNN or NNNN_JJJ, found "
                                                  f"{png.name!r}", "bad_name"))
            if not blurs:
                report.problem(DataError(scene, "empty sequence: no blurry frames", "empty_sequence"))
                continue
            if not sharp_dir.is_dir():
                report.problem(DataError(sharp_dir, "no fullRGB folder for this scene: ground truth is "
                                                    "required and never fabricated; scene skipped",
                                         "missing_sharp"))
                continue
            blurs.sort()
            try:
                height, width = layout.png_size(blurs[0][1])
                if height % scale or width % scale:
                    raise DataError(blurs[0][1], f"frame {height}x{width} (HxW) is not divisible by spike_scale "
                                                 f"{scale}", "frame_size")
                reader = spike_dat.SpikeDatReader(spike_path, height // scale, width // scale)
            except DataError as err:
                report.problem(err)
                continue
            with reader:
                full_ticks = [x4k_tick(p.stem) for p in _pngs(sharp_dir) if _X4K_NAME.match(p.stem)]
                if full_ticks and max(full_ticks) + 1 != reader.num_frames:
                    report.problem(DataError(
                        spike_path, f"frame-count mismatch: {reader.num_frames} spike frames of "
                                    f"{reader.width}x{reader.height} (WxH) but {max(full_ticks) + 1} interpolated "
                                    f"frames in {sharp_dir.relative_to(src)} (one spike frame per interpolated "
                                    "frame expected); scene skipped", "frame_count"))
                    continue
                kept = 0
                for frame_idx, (centre, png) in enumerate(blurs):     # position in time order: gaps stay
                    t0, t1 = centre - half, centre + half
                    sharp = sharp_dir / png.name
                    if not sharp.exists():
                        report.problem(DataError(sharp, "missing ground truth for blurry frame "
                                                        f"{png.relative_to(src)}; frame skipped",
                                                 "missing_sharp"))
                        continue
                    if t0 < 0 or t1 > reader.num_frames - 1:
                        report.note(f"{png}: exposure ticks [{t0}, {t1}] run past the spike stream's "
                                    f"{reader.num_frames} frames; frame skipped (SpkDeblurNet pads "
                                    "with ones there; we never pad)")
                        continue
                    first = max(0, t0 - int(opt.spike_margin))
                    last = min(reader.num_frames - 1, t1 + int(opt.spike_margin))
                    writer.add(split, seq, frame_idx, png, sharp, t0, t1, first,
                               f"{blur_root.name}/{rel}/{png.name}",
                               spike_bytes=reader.read_bytes(first, last + 1))
                    kept += 1
                    report.frames += 1
                if kept:
                    report.sequences += 1
    writer.finish()


# ------------------------------------------------------------------------------------- Spk-GoPro (S-SDM)


def _convert_ssdm(src: Path, dst: Path, opt: ConvertOptions, report: ConvertReport) -> None:
    exposure, margin, interp = int(opt.ssdm_exposure_frames), int(opt.ssdm_margin), int(opt.ssdm_interp)
    if exposure % 2 == 0:
        raise DataError(src, f"ssdm_exposure_frames must be odd (a centre frame), found {exposure}", "config")
    choice = opt.ssdm_spikes
    if choice == "auto":
        choice = "data" if any((src / s / "spike_data").is_dir() for s in ("train", "test")) else "full"
    spike_folder = {"data": "spike_data", "full": "spike_full"}[choice]
    scale = opt.spike_scale or (4 if choice == "data" else 1)
    writer = _Writer(dst, layout.DatasetInfo(scale, SSDM_TICK_RATE_HZ, "spk_gopro_ssdm",
                                             f"converted from {src} ({spike_folder})"))
    expected_frames = exposure + 2 * margin
    half = exposure // 2
    for split_src in ("train", "test"):
        blur_root = src / split_src / "blur_data"
        if not blur_root.is_dir():
            report.problem(DataError(blur_root, f"no {split_src} split", "missing_folder"))
            continue
        seq_dirs = _dirs(blur_root)
        splits = _gopro_splits(split_src, [d.name for d in seq_dirs], opt, report, blur_root)
        for seq_dir in _progress(seq_dirs, opt.progress, f"convert {split_src}"):
            split = splits[seq_dir.name]
            sharp_dir = src / split_src / "sharp_data" / seq_dir.name
            spike_dir = src / split_src / spike_folder / seq_dir.name
            if not sharp_dir.is_dir():
                report.problem(DataError(sharp_dir, "no sharp_data folder for this sequence: ground truth "
                                                    "is required and never fabricated; skipped",
                                         "missing_sharp"))
                continue
            blurs = []
            for png in _pngs(seq_dir):
                if png.stem.isdigit():
                    blurs.append((int(png.stem), png))
                else:
                    report.problem(DataError(png, f"frame names are numbers, found {png.name!r}", "bad_name"))
            blurs.sort()
            if not blurs:
                report.problem(DataError(seq_dir, "empty sequence: no blurry frames", "empty_sequence"))
                continue
            kept = 0
            for frame_idx, (raw_index, png) in enumerate(blurs):    # position in time order: gaps stay
                spike = spike_dir / f"{png.stem}.dat"
                sharp = sharp_dir / png.name
                if not spike.exists():
                    if frame_idx == 0:
                        report.note(f"{png}: no spikes (S-SDM simulates none for a sequence's first "
                                    "blurry frame); skipped")
                    else:
                        report.problem(DataError(spike, f"frame-count mismatch: no spike file for blurry "
                                                        f"frame {png.relative_to(src)}; skipped",
                                                 "frame_count"))
                    continue
                if not sharp.exists():
                    report.problem(DataError(sharp, f"missing ground truth for {png.relative_to(src)}; "
                                                    "skipped (never fabricated)", "missing_sharp"))
                    continue
                try:
                    height, width = layout.png_size(png)
                    if height % scale or width % scale:
                        raise DataError(png, f"frame {height}x{width} (HxW) is not divisible by spike_scale "
                                             f"{scale}", "frame_size")
                    n = spike_dat.count_frames(spike, height // scale, width // scale)
                except DataError as err:
                    report.problem(err)
                    continue
                if n != expected_frames:
                    report.problem(DataError(spike, f"frame-count mismatch: {n} spike frames of "
                                                    f"{width // scale}x{height // scale} (WxH), expected "
                                                    f"{expected_frames} ({margin} + {exposure} + {margin}); "
                                                    "skipped", "frame_count"))
                    continue
                centre = interp * raw_index
                writer.add(split, seq_dir.name, frame_idx, png, sharp, centre - half, centre + half,
                           centre - half - margin, f"{split_src}/blur_data/{seq_dir.name}/{png.name}",
                           spike_src=spike)
                kept += 1
                report.frames += 1
            if kept:
                report.sequences += 1
    writer.finish()


# ------------------------------------------------------------------------------ Spk-GoPro (SpkDeblurNet)


def _convert_spkdeblurnet_gopro(src: Path, dst: Path, opt: ConvertOptions, report: ConvertReport) -> None:
    scale = opt.spike_scale or 2
    window = int(opt.gopro_window)
    writer = _Writer(dst, layout.DatasetInfo(scale, None, "spk_gopro_spkdeblurnet",
                                             f"converted from {src}; ticks are local to each frame's spike file",
                                             shared_clock=False))
    for split_src in ("train", "test"):
        rgb_root = src / "GOPRO_Large" / split_src
        if not rgb_root.is_dir():
            report.problem(DataError(rgb_root, f"no {split_src} split", "missing_folder"))
            continue
        seq_dirs = _dirs(rgb_root)
        splits = _gopro_splits(split_src, [d.name for d in seq_dirs], opt, report, rgb_root)
        for seq_dir in _progress(seq_dirs, opt.progress, f"convert {split_src}"):
            split = splits[seq_dir.name]
            blur_dir, sharp_dir = seq_dir / opt.gopro_blur, seq_dir / "sharp"
            spike_dir = src / "GOPRO_Large_spike_seq" / split_src / seq_dir.name / "spike"
            if not blur_dir.is_dir():
                report.problem(DataError(blur_dir, f"no {opt.gopro_blur} folder; skipped", "missing_folder"))
                continue
            if not sharp_dir.is_dir():
                report.problem(DataError(sharp_dir, "no sharp folder: ground truth is required and never "
                                                    "fabricated; skipped", "missing_sharp"))
                continue
            pngs = _pngs(blur_dir)
            if not pngs:
                report.problem(DataError(blur_dir, "empty sequence: no blurry frames", "empty_sequence"))
                continue
            kept = 0
            # position in name order (SpkDeblurNet's order): a dropped frame leaves a gap in the numbers
            for frame_idx, png in enumerate(sorted(pngs, key=lambda p: (len(p.stem), p.stem))):
                spike, sharp = spike_dir / f"{png.stem}.dat", sharp_dir / png.name
                if not sharp.exists():
                    report.problem(DataError(sharp, f"missing ground truth for {png.relative_to(src)}; "
                                                    "skipped (never fabricated)", "missing_sharp"))
                    continue
                if not spike.exists():
                    report.problem(DataError(spike, f"frame-count mismatch: no spike file for "
                                                    f"{png.relative_to(src)}; skipped", "frame_count"))
                    continue
                try:
                    height, width = layout.png_size(png)
                    if height % scale or width % scale:
                        raise DataError(png, f"frame {height}x{width} (HxW) is not divisible by spike_scale "
                                             f"{scale}", "frame_size")
                    n = spike_dat.count_frames(spike, height // scale, width // scale)
                except DataError as err:
                    report.problem(err)
                    continue
                if n < window:
                    report.problem(DataError(spike, f"{n} spike frames, fewer than the {window}-frame "
                                                    "exposure window; skipped", "spike_window"))
                    continue
                t0 = n // 2 - window // 2
                writer.add(split, seq_dir.name, frame_idx, png, sharp, t0, t0 + window - 1, 0,
                           f"GOPRO_Large/{split_src}/{seq_dir.name}/{opt.gopro_blur}/{png.name}", spike_src=spike)
                kept += 1
                report.frames += 1
            if kept:
                report.sequences += 1
    writer.finish()


_CONVERTERS = {
    "spk_x4k1000fps": _convert_x4k,
    "spk_gopro_ssdm": _convert_ssdm,
    "spk_gopro_spkdeblurnet": _convert_spkdeblurnet_gopro,
}


def convert(src, dst, options: Optional[ConvertOptions] = None) -> ConvertReport:
    """Converts the dataset at `src` into our layout at `dst` (resumable; files are copied, never re-encoded).

    Problems (missing ground truth, truncated or mis-sized spike files, ...) are collected in the report and
    the affected frames skipped; frames skipped by the source layout's own design are notes.

    Raises:
      DataError: unknown layout, or `dst` holds a different conversion.
    """
    options = options or ConvertOptions()
    src, dst = Path(src), Path(dst)
    kind = detect_layout(src) if options.layout == "auto" else options.layout
    if kind == "vrtspike":
        raise DataError(src, "already in our layout: prepare it directly with --root", "config")
    if kind not in _CONVERTERS:
        raise DataError(src, f"unknown source layout {kind!r}; known: {', '.join(_CONVERTERS)}", "unknown_layout")
    if src.resolve() == dst.resolve():
        raise DataError(dst, "the converted root must differ from the source folder", "config")
    carve_val([], options.val_from_train)          # a bad value fails before anything is written
    report = ConvertReport(kind)
    dst.mkdir(parents=True, exist_ok=True)
    _CONVERTERS[kind](src, dst, options, report)
    return report
