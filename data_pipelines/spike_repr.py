"""Spike representations at K instants of an exposure: TFP and TFI (SpikeCV's reconstructions), and raw windows.

Every representation follows the voxeliser's window rules (data_pipelines/voxelize.py): the exposure window
`[t0, t1]` is closed, spike frames outside it are dropped (never moved inside), and times are in the stream's
time base (`frame_times[i]` is the tick of spike frame i). The K instants are the centres of the voxeliser's K
bins, `c_k = t0 + (k + 1/2) (t1 - t0) / K`, so every representation looks at the same moments. An instant's
*key frame* is the spike frame inside the window nearest to it; an exact tie goes to the later frame (so for an
even number of frames the centre instant's key frame is frame L // 2, the index of the ground truth of a
synthesised blurry frame: simulate.synthesize_blur, Spk-X4K1000FPS, Spk-GoPro).

TFP (texture from playback; SpikeCV `spkProc.reconstruction.tfp.TFP.spikes2frame(spikes, key_ts, h)`): the mean
of the 2h + 1 spike frames centred on the key frame, i.e. the pixel's firing rate in that window (spikes per
frame, in [0, 1]). A window that reaches past the exposure is clipped to it: the mean is over the frames it keeps.

TFI (texture from interval; SpikeCV `spkProc.reconstruction.tfi.TFI.spikes2frame(spikes, key_ts, m)`): 1 over the
inter-spike interval around the key frame, in frames: the last spike at or before the key frame, searched back
over at most m frames (the key frame and m - 1 before it), and the first spike after it, searched over at most m
frames. A pixel with no spike on one side (inside the search and the exposure) gets SpikeCV's fallback interval
2m.

Where we differ from SpikeCV, on purpose:
- values are float32 rates (spikes per frame), not `uint8(255 * rate)`: no truncation to 8 bits; multiply by 255
  for SpikeCV's grey levels (before its truncation);
- a window clipped by the exposure (or by the ends of the stream) averages or searches over the frames it keeps,
  where SpikeCV raises an error (TFP) or reads past the array (TFI);
- SpikeCV's TFI takes frame index 0 for "no spike found" (a spike in the stream's first frame is ignored); here
  every frame counts.

The raw window is the `length` consecutive spike frames centred on the exposure's centre instant (frames key - L//2
.. key - L//2 + L - 1), 0/1 as float32; a window that does not fit inside the exposure is an error.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from data_pipelines import voxelize

REPRESENTATIONS = ("voxel", "tfp", "tfi", "raw")


def instants(t0: float, t1: float, num_instants: int) -> np.ndarray:
    """The K instants `t0 + (k + 1/2) (t1 - t0) / K` (the voxeliser's bin centres), float64 `[K]`."""
    if int(num_instants) < 1:
        raise ValueError(f"num_instants must be >= 1, got {num_instants}")
    t0, t1 = voxelize.check_window(t0, t1)
    k = np.arange(int(num_instants), dtype=np.float64)
    return t0 + (k + 0.5) * (t1 - t0) / int(num_instants)


def frames_inside(spikes, frame_times, t0: float, t1: float) -> Tuple[np.ndarray, np.ndarray]:
    """The spike frames inside the closed window, in time order: (frames `[n, H, W]`, times float64 `[n]`)."""
    spikes = np.asarray(spikes)
    if spikes.ndim != 3:
        raise ValueError(f"spikes must be [n, H, W], got shape {spikes.shape}")
    times = np.asarray(frame_times, dtype=np.float64).reshape(-1)
    if times.shape[0] != spikes.shape[0]:
        raise ValueError(f"frame_times has {times.shape[0]} entries for {spikes.shape[0]} spike frames")
    t0, t1 = voxelize.check_window(t0, t1)
    inside = np.flatnonzero((times >= t0) & (times <= t1))
    order = inside[np.argsort(times[inside], kind="stable")]
    if order.size == 0:
        raise ValueError(f"no spike frame inside the exposure window [{t0:g}, {t1:g}]")
    return spikes[order], times[order]


def key_positions(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Position in sorted `times` of the frame nearest each target time; exact ties go to the later frame."""
    times = np.asarray(times, np.float64)
    targets = np.asarray(targets, np.float64)
    after = np.searchsorted(times, targets, side="left")          # first frame at or after the target
    before = np.maximum(after - 1, 0)
    after_c = np.minimum(after, times.size - 1)
    take_after = (after < times.size) & ((after == 0) | (times[after_c] - targets <= targets - times[before]))
    return np.where(take_after, after_c, before).astype(np.int64)


def tfp(spikes, frame_times, t0: float, t1: float, num_instants: int, half_window: int) -> np.ndarray:
    """TFP at the K instants: float32 `[K, H, W]` firing rates over 2 * half_window + 1 frames (see module doc)."""
    if int(half_window) < 0:
        raise ValueError(f"half_window must be >= 0, got {half_window}")
    h = int(half_window)
    frames, times = frames_inside(spikes, frame_times, t0, t1)
    keys = key_positions(times, instants(t0, t1, num_instants))
    out = np.empty((keys.size,) + frames.shape[1:], np.float32)
    for k, p in enumerate(keys):
        lo, hi = max(p - h, 0), min(p + h, frames.shape[0] - 1)
        out[k] = frames[lo:hi + 1].sum(axis=0, dtype=np.float32) / np.float32(hi - lo + 1)
    return out


def tfi(spikes, frame_times, t0: float, t1: float, num_instants: int, max_search: int = 20) -> np.ndarray:
    """TFI at the K instants: float32 `[K, H, W]`, 1 / inter-spike interval in frames (see module doc)."""
    if int(max_search) < 1:
        raise ValueError(f"max_search must be >= 1, got {max_search}")
    m = int(max_search)
    frames, times = frames_inside(spikes, frame_times, t0, t1)
    frames = frames.astype(bool)
    n = frames.shape[0]
    keys = key_positions(times, instants(t0, t1, num_instants))
    out = np.empty((keys.size,) + frames.shape[1:], np.float32)
    for k, p in enumerate(keys):
        back = frames[max(p - m + 1, 0):p + 1][::-1]               # key frame first, then earlier
        ahead = frames[p + 1:min(p + m, n - 1) + 1]                # the frames after the key frame
        has_back, has_ahead = back.any(axis=0), ahead.any(axis=0)
        former = p - np.argmax(back, axis=0)
        latter = p + 1 + np.argmax(ahead, axis=0) if ahead.shape[0] else np.zeros_like(former)
        interval = np.where(has_back & has_ahead, latter - former, 2 * m)
        out[k] = 1.0 / interval.astype(np.float32)
    return out


def raw_window(spikes, frame_times, t0: float, t1: float, length: int) -> np.ndarray:
    """The `length` spike frames centred on the exposure's centre instant, float32 0/1 `[length, H, W]`."""
    if int(length) < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    length = int(length)
    frames, times = frames_inside(spikes, frame_times, t0, t1)
    p = int(key_positions(times, instants(t0, t1, 1))[0])
    start = p - length // 2
    if start < 0 or start + length > frames.shape[0]:
        raise ValueError(f"a raw window of {length} frames centred on frame {p} does not fit the {frames.shape[0]} "
                         f"spike frames inside the exposure window [{t0:g}, {t1:g}]")
    return (frames[start:start + length] != 0).astype(np.float32)


def represent(kind: str, spikes, frame_times, t0: float, t1: float, num_instants: int, *, half_window: int = 0,
              max_search: int = 20, length: int = 0) -> np.ndarray:
    """One switch over the representations: 'voxel' (counts, voxelize.voxelize), 'tfp', 'tfi', 'raw'."""
    if kind == "voxel":
        return voxelize.voxelize(spikes, frame_times, t0, t1, num_instants)
    if kind == "tfp":
        return tfp(spikes, frame_times, t0, t1, num_instants, half_window)
    if kind == "tfi":
        return tfi(spikes, frame_times, t0, t1, num_instants, max_search)
    if kind == "raw":
        return raw_window(spikes, frame_times, t0, t1, length or num_instants)
    raise ValueError(f"unknown spike representation {kind!r}; known: {', '.join(REPRESENTATIONS)}")
