"""Tiled restoration of whole videos: any length and resolution in bounded memory (used by scripts/test.py and by
the validation in training).

Layout (channels-last throughout): frames `[T, H, W, C]` float32 in [0, 1]; spike voxels `[T, H/f, W/f, K]`
(f = the model's `spike_scale`, K its `spike_bins`); restored frames `[T, H*s, W*s, C_out]` float32
(s = the model's upscale, 1 for deblurring).

The scheme is VRT's own test script (`main_test_vrt.py`: `test_video` for time, `test_clip` for space):

* Time: chunks of `tile.temporal` frames starting at `0, stride, 2*stride, ...` (stride = temporal - overlap), the
  last chunk aligned to the end of the clip (start `T - temporal`); the outputs of overlapping chunks are averaged
  frame by frame (VRT's `not_overlap_border=False`).
* Space: square tiles of `tile.spatial` pixels on the same start rule per axis (the last tile aligned to the image
  end, so every tile has one shape and one compilation serves the whole video). On every side of a tile that is not
  an image border, `spatial_overlap // 2` pixels of the output and of the weight are zeroed before accumulation
  (VRT's `not_overlap_border=True`); the result is the weighted average. Interior tiles thus abut in the middle of
  their overlap and only the end-aligned tile, whose overlap with its neighbour is larger, averages over a band.
* Padding: an axis covered by a single window (tile 0, or an image not larger than the tile) is padded at its end
  to the model's size rule (H, W multiples of 8 and of f, at least 64; T at least 2) by symmetric reflection
  (VRT's `torch.cat([x, torch.flip(x[-pad:])])`, repeated when the pad is longer than the axis) and the output is
  cropped back. Spike voxels are padded the same way at their own resolution, which, with nearest upsampling,
  gives exactly the spikes of the padded RGB pixels. Differences from VRT's script: VRT does not pad inside the
  tiled path (it requires the image itself to fit the model), and it pads the time axis of an untiled clip to a
  multiple of the attention window; here T is padded only to the model's minimum of 2, so one tile covering the
  clip is exactly the model's own output.
* Spikes are cut with the RGB tiles: the spike tile of RGB rows [y0, y0 + h) is [y0/f, (y0 + h)/f), which needs
  the tile, the overlap and the frame size to be multiples of f (checked, with the reason in the error).

Memory: the model sees one tile at a time; the clip is read one temporal chunk at a time (`frames[t0:t1]`, so
inputs may be lazy readers, see `restore_video`), and `iter_restored_frames` hands out every frame as soon as all
chunks containing it are done, keeping accumulators only for the frames of the current chunk. The model's input is
never materialised for the whole clip.

`load_model` gives the model to restore with: official VRT weights (built by the model factory, the weights loaded
into it) or a training checkpoint. The restorer around these (folders, spike input, outputs, report) is
`vrtspike_jax.restore`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax import runtime

# The model's input size rule (vrtspike_jax.models.vrt.config.check_input_shape).
MIN_FRAMES = 2
MIN_SIZE = 64
SIZE_MULTIPLE = 8


# ----------------------------------------------------------------------------------------------------------------
# Tile settings and the tiling plan


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """How a clip is cut for the model.

    temporal: frames per chunk (0 = the whole clip in one chunk); otherwise at least 2.
    temporal_overlap: frames shared by consecutive chunks (averaged); less than `temporal`.
    spatial: tile edge in pixels (0 = the whole frame); a multiple of 8 and at least 64 (the model's size rule).
    spatial_overlap: pixels shared by neighbouring tiles; less than `spatial`. `spatial_overlap // 2` pixels are
      trimmed from the interior sides of every tile before blending.

    VRT's test settings for deblurring: GoPro `TileSpec(18, 2, 192, 20)`, DVD and REDS `TileSpec(12, 2, 256, 20)`.
    """

    temporal: int = 0
    temporal_overlap: int = 0
    spatial: int = 0
    spatial_overlap: int = 0

    def __post_init__(self):
        for name in ("temporal", "temporal_overlap", "spatial", "spatial_overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"TileSpec.{name} must be a non-negative integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.temporal and self.temporal < MIN_FRAMES:
            raise ValueError(f"TileSpec.temporal must be 0 (whole clip) or at least {MIN_FRAMES} frames (the model "
                             f"needs T >= {MIN_FRAMES}), got {self.temporal}")
        if self.temporal and self.temporal_overlap >= self.temporal:
            raise ValueError(f"TileSpec.temporal_overlap must be smaller than temporal={self.temporal}, got "
                             f"{self.temporal_overlap}")
        if self.spatial:
            if self.spatial % SIZE_MULTIPLE or self.spatial < MIN_SIZE:
                raise ValueError(f"TileSpec.spatial must be 0 (whole frame) or a multiple of {SIZE_MULTIPLE} that is "
                                 f"at least {MIN_SIZE} (the model's size rule), got {self.spatial}")
            if self.spatial_overlap >= self.spatial:
                raise ValueError(f"TileSpec.spatial_overlap must be smaller than spatial={self.spatial}, got "
                                 f"{self.spatial_overlap}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TileSpec":
        """From a mapping with (a subset of) the field names; unknown keys are an error."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TileSpec field(s) {unknown}; known: temporal, temporal_overlap, spatial, "
                             "spatial_overlap")
        return cls(**values)

    def to_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class AxisTiling:
    """Windows along one axis (time, height or width), in input samples.

    size: the axis length of the clip. padded: the length of the canvas the windows cover (> size only when a
    single window covers the axis and the model needs a longer one). window: the window length. starts: window
    starts, increasing, the last one `padded - window`. trim: samples zeroed on the interior sides of a window.
    """

    size: int
    padded: int
    window: int
    starts: Tuple[int, ...]
    trim: int

    @property
    def count(self) -> int:
        return len(self.starts)

    def mask(self, index: int, scale: int = 1) -> np.ndarray:
        """Weight of window `index` over its `window * scale` output samples (0 on trimmed interior sides)."""
        mask = np.ones(self.window * scale, np.float32)
        cut = self.trim * scale
        if cut:
            if index > 0:
                mask[:cut] = 0
            if index < self.count - 1:
                mask[-cut:] = 0
        return mask

    def coverage(self, scale: int = 1) -> np.ndarray:
        """Sum of the window weights over the `size * scale` output samples of the clip (all > 0)."""
        total = np.zeros(self.padded * scale, np.float32)
        for i, start in enumerate(self.starts):
            total[start * scale:(start + self.window) * scale] += self.mask(i, scale)
        return total[:self.size * scale]


def _plan_axis(size: int, tile: int, overlap: int, multiple: int, minimum: int, trim: int) -> AxisTiling:
    if tile == 0 or size <= tile:
        padded = max(_ceil_to(size, multiple), _ceil_to(minimum, multiple))
        return AxisTiling(size, padded, padded, (0,), 0)
    stride = tile - overlap
    starts = tuple(range(0, size - tile, stride)) + (size - tile,)
    return AxisTiling(size, size, tile, starts, trim)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """The windows of a clip: a temporal chunk list times a grid of spatial tiles (one tile shape per clip)."""

    time: AxisTiling
    height: AxisTiling
    width: AxisTiling
    spike_scale: int = 1

    @property
    def num_chunks(self) -> int:
        return self.time.count

    @property
    def tiles_per_chunk(self) -> int:
        return self.height.count * self.width.count

    @property
    def num_tiles(self) -> int:
        """Model calls needed for the clip."""
        return self.num_chunks * self.tiles_per_chunk

    @property
    def tile_shape(self) -> Tuple[int, int, int]:
        """(t, h, w) of every model input (the model is compiled for this one shape)."""
        return (self.time.window, self.height.window, self.width.window)

    @property
    def spike_tile_shape(self) -> Tuple[int, int, int]:
        """(t, h/f, w/f) of every spike input."""
        f = self.spike_scale
        return (self.time.window, self.height.window // f, self.width.window // f)

    def describe(self) -> Dict[str, Any]:
        """A JSON-able summary: tile shape, counts and starts per axis, padding."""
        return {
            "tile_shape_thw": list(self.tile_shape),
            "num_tiles": self.num_tiles,
            "num_chunks": self.num_chunks,
            "tiles_per_chunk": self.tiles_per_chunk,
            "chunk_starts": list(self.time.starts),
            "row_starts": list(self.height.starts),
            "col_starts": list(self.width.starts),
            "padded_thw": [self.time.padded, self.height.padded, self.width.padded],
            "trim_px": self.height.trim,
        }


def plan_tiles(num_frames: int, height: int, width: int, tile: TileSpec, spike_scale: int = 1) -> TilePlan:
    """Plans the windows for a `[num_frames, height, width]` clip (see the module docstring for the rule).

    Raises ValueError, with the reason, when the spikes cannot be cut consistently with the RGB tiles: the frame
    size, the tile and the overlap must be multiples of `spike_scale`.
    """
    if not isinstance(tile, TileSpec):
        raise TypeError(f"tile must be a TileSpec, got {type(tile).__name__}")
    f = int(spike_scale)
    if f != spike_scale or f < 1:
        raise ValueError(f"spike_scale must be a positive integer (the RGB/spike resolution ratio), got {spike_scale}")
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"empty clip: {num_frames} frames of {height}x{width} (HxW)")
    if f > 1:
        if height % f or width % f:
            raise ValueError(f"frame size {height}x{width} (HxW) is not a multiple of spike_scale={f}: the spike "
                             f"frames are (H/{f})x(W/{f}), so H and W must divide by {f}")
        if tile.spatial and (tile.spatial % f or tile.spatial_overlap % f):
            raise ValueError(
                f"spatial tile {tile.spatial} and overlap {tile.spatial_overlap} must be multiples of spike_scale="
                f"{f}: an RGB tile [y0, y0 + {tile.spatial}) is cut from the spikes as [y0/{f}, (y0 + "
                f"{tile.spatial})/{f}), and tiles start at multiples of tile - overlap = "
                f"{tile.spatial - tile.spatial_overlap}")
    spatial_multiple = math.lcm(SIZE_MULTIPLE, f)
    trim = tile.spatial_overlap // 2
    return TilePlan(
        time=_plan_axis(num_frames, tile.temporal, tile.temporal_overlap, 1, MIN_FRAMES, 0),
        height=_plan_axis(height, tile.spatial, tile.spatial_overlap, spatial_multiple, MIN_SIZE, trim),
        width=_plan_axis(width, tile.spatial, tile.spatial_overlap, spatial_multiple, MIN_SIZE, trim),
        spike_scale=f)


# ----------------------------------------------------------------------------------------------------------------
# Reading windows


def _pad_end(array: np.ndarray, target: Sequence[Optional[int]]) -> np.ndarray:
    """Symmetric padding at the end of the leading axes up to `target` lengths (None: unchanged)."""
    widths = [(0, 0 if t is None else t - n) for n, t in zip(array.shape, target)]
    widths += [(0, 0)] * (array.ndim - len(widths))
    if not any(w for _, w in widths):
        return array
    return np.pad(array, widths, mode="symmetric")


def read_window(chunk, plan: TilePlan, y0: int, x0: int, scale: int = 1) -> np.ndarray:
    """The model input cut from one temporal chunk: float32 `[t, h, w, C]` for the window at (y0, x0) of `plan`,
    padded symmetrically where the plan's canvas is longer than the clip.

    `scale` is 1 for RGB frames and `plan.spike_scale` for spike voxels (the window is then [y0/f, (y0+h)/f)).
    `chunk` is `source[t0:t1]` (an array, or an object whose basic slicing gives one).
    """
    t_axis, h_axis, w_axis = plan.time, plan.height, plan.width
    ys, ye = y0 // scale, min(y0 + h_axis.window, h_axis.size) // scale
    xs, xe = x0 // scale, min(x0 + w_axis.window, w_axis.size) // scale
    window = np.asarray(chunk[:, ys:ye, xs:xe], dtype=np.float32)
    return _pad_end(window, (t_axis.window, h_axis.window // scale, w_axis.window // scale))


def _shape_of(source) -> Tuple[int, ...]:
    shape = getattr(source, "shape", None)
    if shape is None:
        raise TypeError(f"expected an array or an array-like with .shape, got {type(source).__name__}")
    return tuple(int(s) for s in shape)


def check_clip(frames_shape: Sequence[int], spikes_shape: Optional[Sequence[int]], spike_scale: int = 1) -> None:
    """Raises ValueError (naming both shapes) unless frames are `[T, H, W, C]` and spikes `[T, H/f, W/f, K]`."""
    frames_shape = tuple(frames_shape)
    if len(frames_shape) != 4:
        raise ValueError(f"frames must be [T, H, W, C] (channels-last), got shape {frames_shape}")
    if spikes_shape is None:
        return
    spikes_shape = tuple(spikes_shape)
    t, h, w, _ = frames_shape
    f = int(spike_scale)
    if len(spikes_shape) != 4:
        raise ValueError(f"spike voxels must be [T, H/f, W/f, K] (bins last), got shape {spikes_shape}")
    if h % f or w % f:
        raise ValueError(f"frames {frames_shape}: H and W must be multiples of spike_scale={f}")
    expected = (t, h // f, w // f)
    if spikes_shape[:3] != expected:
        raise ValueError(f"spike voxels have shape {spikes_shape} but frames {frames_shape} with spike_scale={f} "
                         f"need [T, H/f, W/f, K] = [{t}, {h // f}, {w // f}, K]")


# ----------------------------------------------------------------------------------------------------------------
# The restorer

ApplyFnType = Callable[[Any, Optional[Any]], Any]


def _block_until_ready(value) -> None:
    wait = getattr(value, "block_until_ready", None)
    if wait is not None:
        wait()


def _plan_for_clip(frames_shape, spikes_shape, tile: TileSpec, spike_scale: int,
                   plan: Optional[TilePlan]) -> TilePlan:
    """The plan of a clip (checked against the clip when given)."""
    check_clip(frames_shape, spikes_shape, spike_scale)
    num_frames, height, width, _ = frames_shape
    if plan is None:
        return plan_tiles(num_frames, height, width, tile, spike_scale)
    if (plan.time.size, plan.height.size, plan.width.size, plan.spike_scale) != (num_frames, height, width,
                                                                                int(spike_scale)):
        raise ValueError(f"the plan is for a {plan.time.size}x{plan.height.size}x{plan.width.size} clip with "
                         f"spike_scale={plan.spike_scale}, not for frames {frames_shape}")
    return plan


class _FrameBlender:
    """Accumulates the weighted window outputs of a plan into output frames and hands each frame out, normalised,
    once every chunk containing it is done. Holds accumulators only for the frames of the current chunks."""

    def __init__(self, plan: TilePlan):
        self.plan = plan
        self.num_frames, self.height, self.width = plan.time.size, plan.height.size, plan.width.size
        self.scale: Optional[int] = None       # s, set by the first output
        self.acc: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self.hits = np.zeros(self.num_frames, np.int32)   # chunks accumulated into each frame (temporal weight)
        self.emitted = 0

    def _set_scale(self, out_shape, in_shape) -> None:
        th, tw = in_shape[1], in_shape[2]
        oh, ow = out_shape[2], out_shape[3]
        if out_shape[0] != 1 or out_shape[1] != in_shape[0] or oh % th or ow % tw or oh // th != ow // tw:
            raise ValueError(f"apply_fn returned shape {tuple(out_shape)} for an input window of shape "
                             f"(1, {in_shape[0]}, {th}, {tw}, C): expected (1, {in_shape[0]}, {th}*s, {tw}*s, C_out)")
        s = self.scale = oh // th
        h_axis, w_axis = self.plan.height, self.plan.width
        self.masks_h = [h_axis.mask(i, s) for i in range(h_axis.count)]
        self.masks_w = [w_axis.mask(i, s) for i in range(w_axis.count)]
        self.norm_hw = np.outer(h_axis.coverage(s), w_axis.coverage(s))[..., None]
        self.channels = out_shape[4]

    def add(self, out, t0: int, hi: int, wi: int, in_shape) -> None:
        """Adds one window's output (weighted) into the frame accumulators."""
        out = np.asarray(out)
        if self.scale is None:
            self._set_scale(out.shape, in_shape)
        elif out.shape[1:4] != (in_shape[0], in_shape[1] * self.scale, in_shape[2] * self.scale):
            raise ValueError(f"apply_fn returned shape {out.shape} for an input window {in_shape}")
        s = self.scale
        out = out[0].astype(np.float32, copy=False)
        y0, x0 = self.plan.height.starts[hi] * s, self.plan.width.starts[wi] * s
        weight = self.masks_h[hi][:, None, None] * self.masks_w[wi][None, :, None]
        ye = min(y0 + out.shape[1], self.height * s)
        xe = min(x0 + out.shape[2], self.width * s)
        weighted = out[:, :ye - y0, :xe - x0] * weight[:ye - y0, :xe - x0]
        for i in range(min(out.shape[0], self.num_frames - t0)):
            t = t0 + i
            if t not in self.acc:
                self.acc[t] = np.zeros((self.height * s, self.width * s, self.channels), np.float32)
            self.acc[t][y0:ye, x0:xe] += weighted[i]

    def finish_chunk(self, ci: int) -> list:
        """Marks chunk `ci` complete; returns the frames now final, [(t, frame)] in order."""
        t_axis = self.plan.time
        t0 = t_axis.starts[ci]
        self.hits[t0:t0 + t_axis.window] += 1
        done_upto = t_axis.starts[ci + 1] if ci + 1 < t_axis.count else self.num_frames
        ready = []
        while self.emitted < done_upto:
            frame = self.acc.pop(self.emitted)
            ready.append((self.emitted, frame / (self.norm_hw * np.float32(self.hits[self.emitted]))))
            self.emitted += 1
        return ready


def iter_restored_frames(apply_fn: ApplyFnType, frames, spike_voxels=None, *, tile: TileSpec, spike_scale: int = 1,
                         progress: Optional[Callable[[int], Any]] = None,
                         plan: Optional[TilePlan] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Restores a clip tile by tile and yields `(t, frame)` in order, each frame as soon as it is final.

    Args and layout as `restore_video`; each yielded frame is float32 `[H*s, W*s, C_out]`. Only the accumulators of
    the current temporal chunk are held, so the memory does not grow with the clip length. One window computes at a
    time (its memory is the bound), but JAX dispatches asynchronously, so reading the next window and blending the
    previous one overlap the computation.
    `plan` may be given if already computed with `plan_tiles` (it must match the clip).
    """
    num_frames = _shape_of(frames)[0]
    plan = _plan_for_clip(_shape_of(frames), None if spike_voxels is None else _shape_of(spike_voxels), tile,
                          spike_scale, plan)
    t_axis, h_axis, w_axis = plan.time, plan.height, plan.width
    blender = _FrameBlender(plan)
    last = (h_axis.count - 1, w_axis.count - 1)

    def finish(item):
        out, ci, hi, wi, in_shape = item
        blender.add(out, t_axis.starts[ci], hi, wi, in_shape)
        if progress is not None:
            progress(1)
        return blender.finish_chunk(ci) if (hi, wi) == last else []

    pending = None  # (output, chunk index, row index, col index, input shape)
    for ci, t0 in enumerate(t_axis.starts):
        t1 = min(t0 + t_axis.window, num_frames)
        frame_chunk = frames[t0:t1]
        spike_chunk = None if spike_voxels is None else spike_voxels[t0:t1]
        for hi, y0 in enumerate(h_axis.starts):
            for wi, x0 in enumerate(w_axis.starts):
                frames_in = read_window(frame_chunk, plan, y0, x0)
                spikes_in = None if spike_chunk is None else read_window(spike_chunk, plan, y0, x0,
                                                                         plan.spike_scale)
                if pending is not None:  # one window in flight at a time: its memory is the bound
                    _block_until_ready(pending[0])
                out = apply_fn(frames_in[None], None if spikes_in is None else spikes_in[None])
                item = (out, ci, hi, wi, frames_in.shape)
                if pending is not None:  # blend the previous window while this one computes
                    yield from finish(pending)
                pending = item
        del frame_chunk, spike_chunk
    if pending is not None:
        yield from finish(pending)


def restore_video(apply_fn: ApplyFnType, frames, spike_voxels=None, *, tile: TileSpec, spike_scale: int = 1,
                  progress: Optional[Callable[[int], Any]] = None) -> np.ndarray:
    """Restores a whole clip with temporal chunks and spatial tiles (see the module docstring).

    Args:
      apply_fn: `apply_fn(frames [1, t, h, w, C], spikes [1, t, h/f, w/f, K] or None) -> [1, t, h*s, w*s, C_out]`
        (e.g. `make_apply_fn(model)`); it is called once per window, always with the plan's one window shape.
      frames: `[T, H, W, C]` float32 in [0, 1] (any T >= 1, H, W >= 1), or a lazy array-like: anything with
        `.shape` whose `frames[t0:t1]` gives an array (or an object whose `[:, y0:y1, x0:x1]` does); it is read
        one temporal chunk at a time.
      spike_voxels: `[T, H/f, W/f, K]` (same rules), or None for models without spikes.
      tile: the TileSpec.
      spike_scale: f, the RGB/spike resolution ratio (`model.config.spike_scale`).
      progress: called with 1 after every window (e.g. `tqdm(total=plan_tiles(...).num_tiles).update`).

    Returns:
      float32 `[T, H*s, W*s, C_out]`; with one window covering a clip the model accepts, exactly the model's output.
    """
    frames_shape = _shape_of(frames)
    check_clip(frames_shape, None if spike_voxels is None else _shape_of(spike_voxels), spike_scale)
    result = None
    for t, frame in iter_restored_frames(apply_fn, frames, spike_voxels, tile=tile, spike_scale=spike_scale,
                                         progress=progress):
        if result is None:
            result = np.empty((frames_shape[0],) + frame.shape, np.float32)
        result[t] = frame
    return result


# ----------------------------------------------------------------------------------------------------------------
# The jitted model function

_JIT_LOCK = threading.Lock()
_JITTED: "collections.OrderedDict[Any, Tuple[Callable, list]]" = collections.OrderedDict()
_MAX_JITTED = 8


def _jitted_for(graphdef) -> Tuple[Callable, list]:
    """One jitted forward per model structure, shared by every ApplyFn of that structure (so a validation loop
    that calls make_apply_fn after every training phase compiles once per window shape, not once per call)."""
    with _JIT_LOCK:
        entry = _JITTED.get(graphdef)
        if entry is None:
            traces = [0]

            def forward(state, frames, spike_voxels):
                traces[0] += 1  # runs once per trace, i.e. per compilation
                model = nnx.merge(graphdef, state)
                if spike_voxels is None:
                    return model(frames)
                return model(frames, spike_voxels)

            entry = (jax.jit(forward), traces)
            _JITTED[graphdef] = entry
            while len(_JITTED) > _MAX_JITTED:
                _JITTED.popitem(last=False)
        else:
            _JITTED.move_to_end(graphdef)
        return entry


def model_uses_spikes(model) -> bool:
    """Whether the model takes spike voxels (a VRTWithSpike with use_spike=True)."""
    return bool(getattr(getattr(model, "config", None), "use_spike", False))


def model_spike_spec(model) -> Tuple[int, int]:
    """(spike_scale f, spike_bins K) of a model that takes spikes; (1, 0) otherwise."""
    if not model_uses_spikes(model):
        return 1, 0
    return int(model.config.spike_scale), int(model.config.spike_bins)


def model_upscale(model) -> int:
    """s, the output/input size ratio (1 for deblurring)."""
    config = getattr(model, "config", None)
    vrt_config = getattr(config, "vrt", config)
    return int(getattr(vrt_config, "upscale", 1))


class ApplyFn:
    """A jitted `apply_fn(frames [1,t,h,w,3], spikes [1,t,h/f,w/f,K] or None) -> [1,t,h*s,w*s,3]` of one model.

    The model is split once (a snapshot of its state at construction, placed on the first local device: a state
    sharded over several local devices is gathered there) and merged inside jit. Compilations happen once per
    input shape and are shared by all ApplyFns of models with the same structure. For a model without spikes
    (plain VRT, or use_spike=False) the spike argument is ignored.

    Attributes:
      uses_spikes, spike_scale, spike_bins, upscale: what the model takes and gives.
      compiles: compilations triggered by this ApplyFn's calls (and `compile`).
      compile_seconds: wall time spent in `compile`.
      window_memory: XLA's memory analysis of the last `compile` (runtime.compiled_memory: 'temp_bytes',
        'argument_bytes', 'output_bytes', 'total_bytes', ...: the working memory one window needs besides the
        runtime), or None.
    """

    def __init__(self, model):
        self.graphdef, state = nnx.split(model)
        # Commit the state to one device: jit's cache keys include argument placements, so a freshly built model
        # (uncommitted arrays) and one restored from a checkpoint (committed) would otherwise compile twice.
        device = jax.local_devices()[0]
        self.state = jax.tree.map(
            lambda x: jax.device_put(x, device) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
            state)
        self.uses_spikes = model_uses_spikes(model)
        self.spike_scale, self.spike_bins = model_spike_spec(model)
        self.upscale = model_upscale(model)
        self._jitted, self._traces = _jitted_for(self.graphdef)
        self.compiles = 0
        self.compile_seconds = 0.0
        self.window_memory: Optional[Dict[str, int]] = None

    def _spikes(self, spike_voxels):
        if not self.uses_spikes:
            return None
        if spike_voxels is None:
            raise ValueError("this model fuses spike features (use_spike=True): spike voxels are required")
        return spike_voxels

    def __call__(self, frames, spike_voxels=None):
        spikes = self._spikes(spike_voxels)
        before = self._traces[0]
        frames = jnp.asarray(frames, jnp.float32)
        spikes = None if spikes is None else jnp.asarray(spikes, jnp.float32)
        out = self._jitted(self.state, frames, spikes)
        self.compiles += self._traces[0] - before
        return out

    def compile(self, frames_shape: Sequence[int], spikes_shape: Optional[Sequence[int]] = None) -> float:
        """Compiles ahead of time for `[1, t, h, w, C]` frames (and `[1, t, h/f, w/f, K]` spikes); returns seconds.

        Later calls of that shape run without compiling, so timings of the restoration exclude compilation.
        """
        frames_spec = jax.ShapeDtypeStruct(tuple(frames_shape), jnp.float32)
        spikes_spec = None
        if self.uses_spikes:
            if spikes_shape is None:
                raise ValueError("this model fuses spike features: give the spike input shape")
            spikes_spec = jax.ShapeDtypeStruct(tuple(spikes_shape), jnp.float32)
        start = time.perf_counter()
        before = self._traces[0]
        compiled = self._jitted.lower(self.state, frames_spec, spikes_spec).compile()
        self.compiles += self._traces[0] - before
        seconds = time.perf_counter() - start
        self.compile_seconds += seconds
        self.window_memory = runtime.compiled_memory(compiled)
        return seconds

    def compile_for(self, plan: TilePlan, channels: int = 3) -> float:
        """Compiles for the window shape of `plan` (see `compile`)."""
        t, h, w = plan.tile_shape
        spikes = None
        if self.uses_spikes:
            st, sh, sw = plan.spike_tile_shape
            spikes = (1, st, sh, sw, self.spike_bins)
        return self.compile((1, t, h, w, channels), spikes)


# VRTConfig fields that change how the model computes, not what (see vrtspike_jax.models.vrt.config.VRTConfig).
EXECUTION_OPTIONS = ("attention_chunk_windows", "attention_per_head", "alignment_chunk", "scan_blocks")


def with_execution_options(model, **options):
    """The same model (the very same parameters) with other VRT execution options, e.g.
    `attention_chunk_windows=256` or `attention_per_head=True` to bound the attention memory of large tiles at
    inference. These options change how the model is computed, not the function; only they are accepted.
    """
    from vrtspike_jax.models import VRT, VRTWithSpike

    unknown = sorted(set(options) - set(EXECUTION_OPTIONS))
    if unknown:
        raise ValueError(f"not execution options: {unknown}; known: {list(EXECUTION_OPTIONS)}")
    if not options:
        return model
    config = model.config
    if isinstance(model, VRTWithSpike):
        new_config = config.replace(vrt=config.vrt.replace(**options))
        abstract = nnx.eval_shape(lambda: VRTWithSpike(new_config, rngs=nnx.Rngs(0)))
    elif isinstance(model, VRT):
        new_config = config.replace(**options)
        abstract = nnx.eval_shape(lambda: VRT(new_config, rngs=nnx.Rngs(0)))
    else:
        raise TypeError(f"expected a VRTWithSpike or a VRT, got {type(model).__name__}")
    graphdef, abstract_state = nnx.split(abstract)
    _, state = nnx.split(model)
    if jax.tree.structure(abstract_state) != jax.tree.structure(state):
        raise ValueError(f"execution options {options} changed the model's variables; they must not")
    return nnx.merge(graphdef, state)


def make_apply_fn(model) -> ApplyFn:
    """The jitted apply function of a VRTWithSpike or VRT (see `ApplyFn`) for `restore_video`."""
    return ApplyFn(model)


# ----------------------------------------------------------------------------------------------------------------
# Loading a model to restore with (scripts/test.py's --checkpoint)

OFFICIAL_SUFFIXES = (".npz", ".pth", ".pt")


class InputError(ValueError):
    """Bad input or flags of a restoration, found before any compute: the message names the file (or flag), the
    expected and the found value (scripts/test.py prints it as one line)."""


@dataclasses.dataclass
class LoadedModel:
    """The model to run and what it needs."""

    model: Any
    kind: str                 # "official_vrt" or "training_checkpoint"
    description: Dict[str, Any]
    config: Any = None        # the training config, when there is one
    trained_clip_length: Optional[int] = None   # T of the run's training, when its saved config says


def load_model(checkpoint, *, which: str = "best", step: Optional[int] = None, vrt_preset: Optional[str] = None,
               official_config=None) -> LoadedModel:
    """The model of `checkpoint`: official VRT weights (`.npz` of state_dict names, or `.pth` with torch), or a
    training checkpoint (a workdir, its checkpoints/ folder, a manager or step folder, or what
    scripts/convert_vrt_checkpoint.py writes; `which` / `step` pick the step).

    Official weights need their architecture: `vrt_preset` (a name of vrtspike_jax.models.vrt.PRESETS), or
    `official_config` (the official VRT(...) keyword arguments: a mapping, JSON text or a .json file), or a
    `config_json` entry in the .npz. The model is built by the model factory (a VRTWithSpike with use_spike=False,
    the plain VRT) and the weights are loaded into it, as training's `init.vrt_from` does.
    Raises InputError (one line naming the file or flag and the value) for what the caller can fix.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise InputError(f"{path}: checkpoint not found")
    if path.is_file() and path.suffix.lower() in OFFICIAL_SUFFIXES:
        return _load_official(path, vrt_preset, official_config)
    if vrt_preset or official_config:
        raise InputError(f"{path}: --vrt_preset/--official_config apply to official weights (.npz/.pth files); a "
                         "training checkpoint carries its own configuration")
    return _load_training_checkpoint(path, which, step)


def _read_json_arg(value, flag: str) -> Dict[str, Any]:
    """A JSON object given as a mapping, as text or as a .json file."""
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value)
    path = Path(text)
    try:
        if text.strip().startswith("{"):
            return json.loads(text)
        if path.is_file():
            return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{flag}: not valid JSON ({err})") from None
    raise InputError(f"{flag}: expected a JSON object or a .json file, found {text!r} (no such file)")


def _official_section(path: Path, vrt_preset: Optional[str], official_config) -> Tuple[Dict[str, Any], str]:
    """The `model` section of the plain VRT official weights `path` are for, and where its architecture came from."""
    from vrtspike_jax.models.vrt.config import PRESETS, config_from_official_kwargs

    if vrt_preset and official_config:
        raise InputError("give either --vrt_preset or --official_config for official weights, not both")
    if vrt_preset:
        if vrt_preset not in PRESETS:
            raise InputError(f"--vrt_preset {vrt_preset!r}: unknown; known: {', '.join(sorted(PRESETS))}")
        return {"vrt_preset": vrt_preset, "vrt_overrides": {}, "use_spike": False}, f"preset {vrt_preset}"
    kwargs, source = None, None
    if official_config:
        kwargs, source = _read_json_arg(official_config, "--official_config"), "--official_config"
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "config_json" in archive.files:
                kwargs, source = json.loads(str(archive["config_json"])), f"{path.name}:config_json"
    if kwargs is None:
        raise InputError(f"{path}: official VRT weights need the architecture: give --vrt_preset (e.g. "
                         "deblur for the GoPro/DVD/REDS deblurring models) or --official_config JSON")
    try:
        architecture = config_from_official_kwargs(**kwargs).official_kwargs()
    except TypeError as err:
        raise InputError(f"{source}: {err}") from None
    return {"vrt_preset": "deblur", "vrt_overrides": architecture, "use_spike": False}, source


def _load_official(path: Path, vrt_preset: Optional[str], official_config) -> LoadedModel:
    from vrtspike_jax import factory

    section, source = _official_section(path, vrt_preset, official_config)
    model = factory.with_official_weights(section, path)
    description = {"checkpoint": str(path), "kind": "official_vrt", "architecture_from": source,
                   "config": model.config.vrt.official_kwargs()}
    return LoadedModel(model, "official_vrt", description)


def _load_training_checkpoint(path: Path, which: str, step: Optional[int]) -> LoadedModel:
    try:
        from vrtspike_jax.train.checkpointing import load_model_from_checkpoint, resolve_checkpoint_dir
    except ImportError as err:
        raise InputError(f"{path}: reading a training checkpoint needs vrtspike_jax.train.checkpointing."
                         f"load_model_from_checkpoint, which this installation lacks ({err})") from None
    # Orbax wants absolute paths (a relative one fails deep inside tensorstore).
    step_dir = resolve_checkpoint_dir(str(path.resolve()), step, which)
    model, config = load_model_from_checkpoint(str(step_dir))
    from vrtspike_jax.train.train_lib import enable_compilation_cache

    enable_compilation_cache(config)   # the run's persistent XLA cache: a second restoration skips compiling
    model_config = getattr(model, "config", None)
    description = {"checkpoint": str(path), "kind": "training_checkpoint", "which": which, "step": step,
                   "config": _jsonable(dataclasses.asdict(model_config)) if dataclasses.is_dataclass(model_config)
                   else repr(model_config)}
    return LoadedModel(model, "training_checkpoint", description, config, _saved_clip_length(step_dir))


def _saved_clip_length(step_dir: Path) -> Optional[int]:
    """data.clip_length as the checkpoint saved it: the loaded config fills keys an older or a converted checkpoint
    lacks with today's defaults, which say nothing about how the model was trained."""
    try:
        saved = json.loads((step_dir / "config" / "metadata").read_text())
        value = (saved.get("data") or {}).get("clip_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


__all__ = ["EXECUTION_OPTIONS", "ApplyFn", "AxisTiling", "InputError", "LoadedModel", "TilePlan", "TileSpec",
           "check_clip", "iter_restored_frames", "load_model", "make_apply_fn", "model_spike_spec", "model_upscale",
           "model_uses_spikes", "plan_tiles", "read_window", "restore_video", "with_execution_options"]
