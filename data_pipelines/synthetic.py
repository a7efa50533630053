"""The embedded dataset: real photographs (shipped with scikit-image) filmed by a simulated shaking camera.

For every sequence a photograph is viewed through a camera that moves smoothly and randomly (translation as a
sum of a few sinusoids with periods of a few exposures, like a hand-held camera's shake and pan, plus small
rotation and zoom). Sub-frames are rendered at the spike camera's frame rate (one per tick). A blurry frame
is the mean of the `subframes` sub-frames of its exposure, its ground truth the centre sub-frame
(`simulate.synthesize_blur`), and the spike stream is simulated (integrate-and-fire) from the very same
sub-frames, continuously over the sequence. Everything is a pure function of the spec and the seed.

Output: our layout (docs/DATA.md), ready for `prepare.prepare_root`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_pipelines import layout, simulate, spike_dat
from data_pipelines.fileio import atomic_path, atomic_write_json, file_lock

GENERATOR_VERSION = 2
# Real photographs bundled in scikit-image (no download). Train: colour photos. The held-out photos are never used
# in train, and val and test share none (nor the same scene: motorcycle_left's stereo twin motorcycle_right is
# used nowhere). Of the colour photos scikit-image ships, only the motorcycle is left for held-out use (`cat` is
# `chelsea`, `colorwheel` and `logo` are drawings), so the further held-out photos are real grey photographs (the
# camera man, a brick wall, coins, gravel, a scanned page; rendered as R = G = B), the ones whose 128 px views hold
# detail (the moon, cell and text views are nearly flat: 29-51 dB blurry-vs-sharp at 6-24 px blur). VAL_PHOTOS[0]
# is the detailed motorcycle, so the default single val sequence is unchanged.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina")
VAL_PHOTOS = ("motorcycle_left", "camera", "brick")
TEST_PHOTOS = ("coins", "gravel", "page")
PHOTOS = {"train": TRAIN_PHOTOS, "val": VAL_PHOTOS, "test": TEST_PHOTOS}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}     # the split's entry in each sequence's random seed


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and physics of the embedded dataset (flags of scripts/make_synthetic_dataset.py).

    height, width: RGB frame size (multiples of 8 and of spike_scale; the model needs >= 64).
    train_sequences, val_sequences, test_sequences: number of sequences per split (test: 0 = no test split).
        Sequence i of a split films photo i of its list (TRAIN_PHOTOS, VAL_PHOTOS, TEST_PHOTOS), cycling.
    train_frames, val_frames, test_frames: blurry frames per sequence.
    subframes: spike frames (= rendered sub-frames) per exposure; K = 32 bins get subframes / 32 each.
    gap: spike frames between two exposures (0: the shutter is open all the time).
    blur_px: mean camera motion during one exposure, in pixels at 128 px frame size (scaled with the size).
    blur_px_max: 0 (default): every sequence's blur level is blur_px. Else blur levels from mild to severe:
        sequence i of the n of a split gets blur_px + (blur_px_max - blur_px) * i / (n - 1) (evenly spread,
        deterministic; blur_px for a split of one sequence). Each sequence's speed keeps its random 0.6-1.4x.
    threshold: integrate-and-fire threshold (grey levels in [0, 1] per spike frame).
    spike_scale: RGB/spike size ratio.
    spike_margin: spike frames stored beyond each side of the exposure (the voxeliser drops them).
    noise_std: Gaussian noise on each spike frame's charge increment (read / photon noise).
    dark_current: dark spikes per pixel per spike frame (random, Bernoulli; `simulate.IntegrateAndFire`'s
        dark_rate): the rate a black scene fires at.
    threshold_std: relative per-pixel threshold variation (fixed-pattern noise, one pattern per sequence).
    tick_rate_hz: nominal spike frame rate recorded in dataset.json (20 kHz, the first-generation camera).
    seed: everything random derives from it.

    The fields after `seed` came later: at their defaults they are left out of the key and of synthetic.json,
    so a spec that leaves them there keeps its folder name and its files byte for byte.
    """

    height: int = 128
    width: int = 128
    train_sequences: int = 6
    val_sequences: int = 1
    train_frames: int = 16
    val_frames: int = 10
    subframes: int = 64
    gap: int = 0
    blur_px: float = 14.0
    threshold: float = 1.0
    spike_scale: int = 1
    spike_margin: int = 0
    noise_std: float = 0.0
    tick_rate_hz: float = 20000.0
    seed: int = 0
    test_sequences: int = 0
    test_frames: int = 10
    blur_px_max: float = 0.0
    dark_current: float = 0.0
    threshold_std: float = 0.0

    def validate(self) -> None:
        f = self.spike_scale
        if self.height < 8 or self.width < 8 or self.height % 8 or self.width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        if f < 1 or self.height % f or self.width % f:
            raise ValueError(f"spike_scale {f} must divide the frame size {self.height}x{self.width}")
        if ((self.height // f) * (self.width // f)) % 8:
            raise ValueError("spike frames must hold a multiple of 8 pixels (.dat format)")
        if self.subframes < 2 or self.gap < 0 or self.spike_margin < 0:
            raise ValueError("need subframes >= 2, gap >= 0, spike_margin >= 0")
        if self.train_sequences < 1 or self.train_frames < 1 or self.val_sequences < 0 or self.val_frames < 1:
            raise ValueError("need at least one train sequence with one frame")
        if self.test_sequences < 0 or self.test_frames < 1:
            raise ValueError("need test_sequences >= 0 and test_frames >= 1")
        if self.blur_px < 0 or self.blur_px_max < 0:
            raise ValueError(f"blur_px and blur_px_max must be >= 0, got {self.blur_px}, {self.blur_px_max}")
        if not 0.0 <= self.dark_current <= 1.0:
            raise ValueError(f"dark_current must be in [0, 1] spikes per pixel per tick, got {self.dark_current}")
        if self.threshold_std < 0 or self.noise_std < 0:
            raise ValueError("noise_std and threshold_std must be >= 0")

    def identity(self) -> Dict[str, object]:
        """The fields that define the data (written to synthetic.json and hashed into the key).

        The fields added after generator version 2's first release are left out while at their defaults, so
        that every dataset built before them keeps its key and its files. Likewise the held-out photo list is
        added once a split films more than its first photo (before it, VAL_PHOTOS held one photo).
        """
        fields = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if fields[name] == _DEFAULTS[name]:
                del fields[name]
        if self.val_sequences > 1:
            fields["val_photos"] = list(VAL_PHOTOS[:self.val_sequences])
        if self.test_sequences > 0:
            fields["test_photos"] = list(TEST_PHOTOS[:self.test_sequences])
        return fields

    def key(self) -> str:
        """Short hash of the spec and the generator version: the embedded dataset's folder name."""
        text = json.dumps({"v": GENERATOR_VERSION, **self.identity()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def blur_level(self, split: str, index: int) -> float:
        """The blur level (px per exposure at 128 px) of sequence `index` of `split` (see blur_px_max)."""
        if self.blur_px_max <= 0:
            return self.blur_px
        n = {"train": self.train_sequences, "val": self.val_sequences, "test": self.test_sequences}[split]
        if n <= 1:
            return self.blur_px
        return self.blur_px + (self.blur_px_max - self.blur_px) * index / (n - 1)


_LATER_FIELDS = ("test_sequences", "test_frames", "blur_px_max", "dark_current", "threshold_std")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SyntheticSpec)}


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as float32 `[H, W, 3]` in [0, 1]."""
    import skimage.data

    if name == "motorcycle_left":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.float32) / 255.0


@dataclasses.dataclass
class _Motion:
    """Smooth random camera motion; `at(ticks)` gives centre offsets (px), rotation (rad) and zoom."""

    periods: np.ndarray      # [3, C] in ticks, C = 3 components
    amplitudes: np.ndarray   # [3, C]   (dx, dy in px; rotation in rad)
    phases: np.ndarray       # [3, C]
    zoom_amplitude: float
    zoom_period: float
    zoom_phase: float

    @classmethod
    def random(cls, rng: np.random.Generator, speed_px_per_tick: float, subframes: int,
               radius_px: float) -> "_Motion":
        comps = 3
        periods = rng.uniform(3.0, 12.0, size=(3, comps)) * subframes
        weights = rng.dirichlet(np.ones(comps), size=2)              # share of the speed per component
        direction_bias = rng.uniform(0.4, 1.0, size=(2, 1))          # some sequences move more along one axis
        amplitudes = np.zeros((3, comps))
        amplitudes[:2] = speed_px_per_tick * direction_bias * weights * periods[:2] / (2 * np.pi) * 1.6
        # Rotation moves a point at `radius_px` from the centre by up to 0.2-0.7x the translation speed.
        max_rotation_per_tick = rng.uniform(0.2, 0.7) * speed_px_per_tick / radius_px
        amplitudes[2] = max_rotation_per_tick * periods[2] / (2 * np.pi) * weights[0]
        phases = rng.uniform(0, 2 * np.pi, size=(3, comps))
        return cls(periods, amplitudes, phases, float(rng.uniform(0.0, 0.06)),
                   float(rng.uniform(6.0, 16.0) * subframes), float(rng.uniform(0, 2 * np.pi)))

    def at(self, ticks: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        t = np.asarray(ticks, np.float64)[:, None]
        motion = [(a * np.sin(2 * np.pi * t / p + ph)).sum(-1)
                  for a, p, ph in zip(self.amplitudes, self.periods, self.phases)]
        zoom = 1.0 + self.zoom_amplitude * np.sin(2 * np.pi * t[:, 0] / self.zoom_period + self.zoom_phase)
        return motion[0], motion[1], motion[2], zoom


def _prepare_photo(photo: np.ndarray, motion: _Motion, ticks: int, height: int, width: int) -> np.ndarray:
    """Rescales the photo so that the whole camera path stays inside it."""
    from skimage.transform import resize

    dx, dy, _, zoom = motion.at(np.arange(ticks))
    half_diag = 0.5 * np.hypot(height, width) * float(zoom.max())
    need_h = 2 * (np.abs(dy).max() + half_diag) + 4
    need_w = 2 * (np.abs(dx).max() + half_diag) + 4
    # At least native view size per photo pixel (no upscaling blur beyond what is needed).
    scale = max(need_h / photo.shape[0], need_w / photo.shape[1], max(height, width) * 2.0 / min(photo.shape[:2]))
    shape = (int(np.ceil(photo.shape[0] * scale)), int(np.ceil(photo.shape[1] * scale)))
    return resize(photo, shape, order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)


def _render(photo: np.ndarray, motion: _Motion, ticks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sub-frames at `ticks`: float32 `[n, H, W, 3]` in [0, 1] (bilinear sampling of the photo)."""
    from scipy import ndimage

    dx, dy, rot, zoom = motion.at(ticks)
    ys = np.arange(height, dtype=np.float64) - height / 2 + 0.5
    xs = np.arange(width, dtype=np.float64) - width / 2 + 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    cos, sin = (np.cos(rot) * zoom)[:, None, None], (np.sin(rot) * zoom)[:, None, None]
    cy, cx = photo.shape[0] / 2 + dy[:, None, None], photo.shape[1] / 2 + dx[:, None, None]
    src_y = cy + sin * xx + cos * yy - 0.5
    src_x = cx + cos * xx - sin * yy - 0.5
    coords = np.stack([src_y, src_x]).astype(np.float32)
    out = np.empty((len(ticks), height, width, 3), np.float32)
    for c in range(3):
        out[..., c] = ndimage.map_coordinates(photo[..., c], coords, order=1, mode="reflect")
    return np.clip(out, 0.0, 1.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(_to_uint8(image), mode="RGB").save(tmp, format="PNG", compress_level=1)


def _write_sequence(root: Path, spec: SyntheticSpec, split: str, index: int, photo_name: str,
                    frames: int, rng: np.random.Generator) -> List[layout.AlignmentRow]:
    scale = min(spec.height, spec.width) / 128.0
    speed = spec.blur_level(split, index) * scale * rng.uniform(0.6, 1.4) / spec.subframes
    motion = _Motion.random(rng, speed, spec.subframes, radius_px=min(spec.height, spec.width) / 2)
    period = spec.subframes + spec.gap
    margin = spec.spike_margin
    total = margin + frames * period - spec.gap + margin
    photo = _prepare_photo(load_photo(photo_name), motion, total, spec.height, spec.width)
    seq_name = f"{index:02d}_{photo_name}"
    seq_dir = root / split / seq_name
    hs, ws = spec.height // spec.spike_scale, spec.width // spec.spike_scale
    camera = simulate.IntegrateAndFire(hs, ws, spec.threshold, seed=int(rng.integers(2 ** 31)),
                                       noise_std=spec.noise_std, dark_rate=spec.dark_current,
                                       threshold_std=spec.threshold_std)
    spikes = np.zeros((total, hs, ws), np.bool_)
    rows = []
    chunk = spec.subframes
    exposure_of_tick = {}
    for i in range(frames):
        exposure_of_tick[margin + i * period] = i
    tick = 0
    while tick < total:
        if tick in exposure_of_tick:
            n = spec.subframes
        else:
            next_start = min([s for s in exposure_of_tick if s > tick], default=total)
            n = min(chunk, next_start - tick)
        ticks = np.arange(tick, tick + n)
        sub = _render(photo, motion, ticks, spec.height, spec.width)
        grey = simulate.downscale(simulate.rgb_to_grey(sub), spec.spike_scale)
        spikes[tick:tick + n] = camera(grey)
        if tick in exposure_of_tick:
            i = exposure_of_tick[tick]
            blur, sharp = simulate.synthesize_blur(sub)
            stem = layout.frame_stem(i)
            _save_png(seq_dir / layout.BLUR / f"{stem}.png", blur)
            _save_png(seq_dir / layout.SHARP / f"{stem}.png", sharp)
            t0, t1 = tick, tick + spec.subframes - 1
            rows.append(layout.AlignmentRow(f"{split}/{seq_name}", i, float(t0), float(t1), float(t0 - margin),
                                            None, f"synthetic:{photo_name}"))
        tick += n
    for row in rows:
        first = int(row.spike_t0)
        last = int(row.t1) + margin
        spike_dat.write_dat(seq_dir / layout.SPIKE / f"{layout.frame_stem(row.frame_idx)}.dat",
                            spikes[first:last + 1])
    return rows


def make_dataset(out, spec: SyntheticSpec = SyntheticSpec(), progress: bool = False) -> Path:
    """Renders the dataset described by `spec` into `out` (our layout, not yet prepared). Returns `out`."""
    spec.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[layout.AlignmentRow] = []
    sizes = {"train": (spec.train_sequences, spec.train_frames), "val": (spec.val_sequences, spec.val_frames),
             "test": (spec.test_sequences, spec.test_frames)}
    plan = [(split, i, PHOTOS[split][i % len(PHOTOS[split])], frames)
            for split, (count, frames) in sizes.items() for i in range(count)]
    iterator = plan
    if progress:
        from tqdm import tqdm
        iterator = tqdm(plan, desc="render", unit="seq")
    for split, i, photo, frames in iterator:
        rng = np.random.default_rng([spec.seed, _SPLIT_STREAM[split], i])
        rows += _write_sequence(out, spec, split, i, photo, frames, rng)
    if spec.val_sequences == 0:
        (out / "val").mkdir(exist_ok=True)
    layout.write_dataset_info(out, layout.DatasetInfo(
        spike_scale=spec.spike_scale, tick_rate_hz=spec.tick_rate_hz, source_layout="synthetic",
        description="scikit-image photographs filmed by a simulated shaking camera (data_pipelines/synthetic.py)"))
    layout.write_alignment(out / layout.ALIGNMENT_CSV, rows)
    atomic_write_json(out / "synthetic.json", {"generator_version": GENERATOR_VERSION, **spec.identity()})
    return out


def ensure_dataset(parent_dir, spec: SyntheticSpec = SyntheticSpec(), num_bins: int = 32,
                   log=None) -> Path:
    """Builds (once) and prepares the synthetic dataset of `spec` under `parent_dir`; returns its root.

    Safe when several processes start at once: one builds under a file lock into a temporary folder that is
    renamed into place when complete (readers only ever see a finished root); the others wait and reuse it.
    """
    from data_pipelines import prepare

    parent = Path(os.path.expanduser(str(parent_dir)))
    final = parent / f"embedded-{spec.key()}-k{int(num_bins)}"
    ready = final / "READY"
    if ready.exists():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f".{final.name}.lock"):
        if ready.exists():
            return final
        start = time.time()
        for stale in parent.glob(f".{final.name}.tmp-*"):  # left by a crashed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".{final.name}.tmp-{os.getpid()}"
        make_dataset(tmp, spec)
        result = prepare.prepare_root(prepare.PrepareOptions(root=tmp, num_bins=num_bins, workers=1,
                                                             progress=False), log=lambda line: None)
        if result.exit_code != 0:
            problems = "; ".join(p.message for p in result.problems[:3])
            raise RuntimeError(f"the embedded dataset failed its own checks: {problems}")
        (tmp / "READY").write_text(f"built in {time.time() - start:.1f} s\n")
        if final.exists():  # a stale, unfinished copy from a crashed run (no READY)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if log is not None:
            log(f"built the embedded dataset in {final} ({time.time() - start:.1f} s)")
    return final
