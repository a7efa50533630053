"""Spike voxelisation: counts of spikes in K equal time bins of a closed exposure window, and their statistics.

The exposure window of a blurry frame is the closed interval `[t0, t1]` in the time base of its spike
stream (see docs/DATA.md, "Time base"): `frame_times[i]` is the time of spike frame `i`. A spike frame at
time `t` with `t0 <= t <= t1` falls in bin

    b = floor((t - t0) * K / (t1 - t0)),   except t == t1, which goes to the last bin (K - 1),

so bin b covers `[t0 + b*(t1-t0)/K, t0 + (b+1)*(t1-t0)/K)` and the last bin is closed at t1. Spike frames
outside `[t0, t1]` are dropped; they are never moved into the edge bins (the original baseline clipped the
bin index to [0, K-1], which piled every out-of-window spike into bins 0 and K-1).

After counting: `log1p`, then normalisation `(x - mean) / std` with statistics of the train split only
(`VoxelStats`, written by scripts/prepare_data.py to `voxel_stats.json`).
"""
from __future__ import annotations

import json
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from data_pipelines.errors import DataError


def check_window(t0: float, t1: float, where: Optional[str] = None) -> Tuple[float, float]:
    """Validates an exposure window; returns (t0, t1) as floats. Raises DataError(kind="bad_alignment")."""
    try:
        t0, t1 = float(t0), float(t1)
    except (TypeError, ValueError):
        raise DataError(where, f"exposure window times must be numbers, found t0={t0!r}, t1={t1!r}",
                        "bad_alignment") from None
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise DataError(where, f"exposure window must be finite, found t0={t0}, t1={t1}", "bad_alignment")
    if not t1 > t0:
        raise DataError(where, f"exposure window needs t1 > t0, found t0={t0:g}, t1={t1:g}", "bad_alignment")
    return t0, t1


def bin_indices(frame_times, t0: float, t1: float, num_bins: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """Bin of every spike frame.

    Args:
      frame_times: `[n]` times of the spike frames.
      t0, t1: closed exposure window, t1 > t0.
      num_bins: K.

    Returns:
      (bins int64 `[n]`, inside bool `[n]`): `bins[i]` is meaningful only where `inside[i]`.
    """
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    num_bins = int(num_bins)
    t0, t1 = check_window(t0, t1)
    times = np.asarray(frame_times, dtype=np.float64).reshape(-1)
    inside = (times >= t0) & (times <= t1)
    with np.errstate(invalid="ignore"):
        # Multiply before dividing: when (t - t0) * K is a multiple of (t1 - t0) the division is exact,
        # so a frame on a bin edge always opens the bin that starts there.
        scaled = np.floor((times - t0) * num_bins / (t1 - t0))
    scaled = np.where(inside, scaled, 0)
    # t == t1 gives K; rounding may also give K for t a hair below t1: both belong to the last bin.
    bins = np.minimum(scaled.astype(np.int64), num_bins - 1)
    return bins, inside


def count_spikes(spikes, frame_times, t0: float, t1: float, num_bins: int = 32) -> np.ndarray:
    """Integer spike counts per bin, int32 `[num_bins, H, W]` (see `voxelize`)."""
    spikes = np.asarray(spikes)
    if spikes.ndim != 3:
        raise ValueError(f"spikes must be [n, H, W], got shape {spikes.shape}")
    times = np.asarray(frame_times).reshape(-1)
    if times.shape[0] != spikes.shape[0]:
        raise ValueError(f"frame_times has {times.shape[0]} entries for {spikes.shape[0]} spike frames")
    bins, inside = bin_indices(times, t0, t1, num_bins)
    counts = np.zeros((int(num_bins),) + spikes.shape[1:], dtype=np.int32)
    frames = np.flatnonzero(inside)
    if frames.size == 0:
        return counts
    frame_bins = bins[frames]
    order = np.argsort(frame_bins, kind="stable")
    frames, frame_bins = frames[order], frame_bins[order]
    # Runs of equal bins: sum each run's frames at once.
    starts = np.flatnonzero(np.r_[True, frame_bins[1:] != frame_bins[:-1]])
    ends = np.r_[starts[1:], frames.size]
    contiguous = np.all(np.diff(frames) == 1) if frames.size > 1 else True
    for s, e in zip(starts, ends):
        if contiguous:
            chunk = spikes[frames[s]: frames[e - 1] + 1]
        else:
            chunk = spikes[frames[s:e]]
        counts[frame_bins[s]] += chunk.sum(axis=0, dtype=np.int32)
    return counts


def voxelize(spikes, frame_times, t0: float, t1: float, num_bins: int = 32) -> np.ndarray:
    """Counts the spikes of each pixel in `num_bins` equal bins of the closed window [t0, t1].

    Args:
      spikes: `[n, H, W]` bool or 0/1 integers, spike frame i at time `frame_times[i]`.
      frame_times: `[n]` times in the time base of t0 and t1 (any order, need not be integers).
      t0, t1: the exposure window, t1 > t0 (closed: a frame exactly at t1 counts in the last bin).
      num_bins: K (32 in the baseline).

    Returns:
      float32 `[num_bins, H, W]` spike counts (before log1p). Frames outside [t0, t1] are dropped.
    """
    return count_spikes(spikes, frame_times, t0, t1, num_bins).astype(np.float32)


def frames_per_bin(frame_times, t0: float, t1: float, num_bins: int = 32) -> np.ndarray:
    """Number of spike frames in each bin, int64 `[num_bins]` (a pixel's count in a bin is at most this)."""
    bins, inside = bin_indices(frame_times, t0, t1, num_bins)
    return np.bincount(bins[inside], minlength=int(num_bins)).astype(np.int64)


def log_counts(counts) -> np.ndarray:
    """`log1p` of counts, float32."""
    return np.log1p(np.asarray(counts, dtype=np.float32))


def normalize(counts, mean: float, std: float) -> np.ndarray:
    """`(log1p(counts) - mean) / std`, float32: the network's spike input."""
    return ((log_counts(counts) - np.float32(mean)) / np.float32(std)).astype(np.float32)


class VoxelStats:
    """Exact mean / std of `log1p(count)` over many voxel grids, from a histogram of the integer counts.

    Counts are small integers, so the histogram is exact, tiny, mergeable and independent of the order in
    which samples are added (a resumed run gives the same numbers as an uninterrupted one).
    """

    def __init__(self, num_bins: int, histogram: Optional[Sequence[int]] = None, num_frames: int = 0):
        self.num_bins = int(num_bins)
        self.histogram = np.zeros(0, np.int64) if histogram is None else np.asarray(histogram, np.int64)
        self.num_frames = int(num_frames)

    @staticmethod
    def histogram_of(counts) -> np.ndarray:
        """Histogram (int64 `[max+1]`) of a non-negative integer count array."""
        counts = np.asarray(counts)
        if counts.size == 0:
            return np.zeros(0, np.int64)
        return np.bincount(counts.reshape(-1).astype(np.int64, copy=False)).astype(np.int64)

    def add_histogram(self, hist, num_frames: int = 1) -> None:
        """Adds one sample's histogram (as from `histogram_of`)."""
        hist = np.asarray(hist, np.int64)
        if hist.size > self.histogram.size:
            self.histogram = np.pad(self.histogram, (0, hist.size - self.histogram.size))
        self.histogram[: hist.size] += hist
        self.num_frames += int(num_frames)

    def add(self, counts) -> None:
        """Adds one voxel grid of integer counts `[K, H, W]`."""
        self.add_histogram(self.histogram_of(counts))

    @property
    def num_values(self) -> int:
        return int(self.histogram.sum())

    def mean_std(self) -> Tuple[float, float]:
        """(mean, std) of log1p(count); population std."""
        n = self.num_values
        if n == 0:
            raise DataError(None, "no voxel values to compute statistics from (empty train split)", "bad_voxels")
        values = np.log1p(np.arange(self.histogram.size, dtype=np.float64))
        weights = self.histogram.astype(np.float64)
        mean = float((weights * values).sum() / n)
        var = float((weights * (values - mean) ** 2).sum() / n)
        return mean, math.sqrt(max(var, 0.0))

    def to_json(self) -> dict:
        mean, std = self.mean_std()
        return {
            "mean": mean,
            "std": std,
            "num_bins": self.num_bins,
            "transform": "log1p(count)",
            "split": "train",
            "num_frames": self.num_frames,
            "num_values": self.num_values,
            "count_histogram": [int(v) for v in self.histogram],
        }


def load_stats(path, num_bins: Optional[int] = None) -> Tuple[float, float]:
    """Reads (mean, std) from a voxel_stats.json written by prepare_data; checks K and the values.

    Raises:
      DataError: missing or unreadable file ("bad_manifest"), other K ("config"), std not > 0 or values not
        finite ("bad_voxels").
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            stats = json.load(f)
    except FileNotFoundError:
        raise DataError(path, "voxel statistics file not found: run `python scripts/prepare_data.py --root "
                              "<root>` first", "bad_manifest") from None
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable voxel statistics ({err})", "bad_manifest") from None
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (KeyError, TypeError, ValueError):
        raise DataError(path, "voxel statistics need numeric 'mean' and 'std'", "bad_manifest") from None
    if num_bins is not None and int(stats.get("num_bins", -1)) != int(num_bins):
        raise DataError(path, f"statistics were computed for num_bins={stats.get('num_bins')}, the config "
                              f"asks for num_bins={num_bins}: rerun prepare_data with --num_bins", "config")
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        raise DataError(path, f"voxel statistics must be finite with std > 0, found mean={mean}, std={std}",
                        "bad_voxels")
    return mean, std


def shift_timeline(voxels, bins: int, fill: float) -> np.ndarray:
    """Voxels of T consecutive gap-free exposures moved along their common time axis by `bins` bins.

    Args:
      voxels: `[..., T, h, w, K]` (the input pipeline's channels-last `spike_vox` of a clip): exposure t's K bins
        are bins t*K .. t*K + K - 1 of one timeline (exact when the exposures chain without a gap, as in the
        embedded dataset).
      bins: > 0: every bin's spikes appear `bins` bins later (the spike clock lags the RGB clock); < 0: earlier.
      fill: the value of the `|bins|` bins at the clip's start (bins > 0) or end (bins < 0) that the shift leaves
        without recorded spikes (pass the normalised value of a zero count: `-mean / std`).
    Returns:
      float32 array of the same shape.
    """
    voxels = np.asarray(voxels, np.float32)
    if voxels.ndim < 4:
        raise ValueError(f"voxels must be [..., T, h, w, K], got shape {voxels.shape}")
    x = np.moveaxis(voxels, -4, -2)                                   # [..., h, w, T, K]
    shape = x.shape
    flat = x.reshape(shape[:-2] + (shape[-2] * shape[-1],))
    bins = int(bins)
    if abs(bins) >= flat.shape[-1]:
        raise ValueError(f"a shift of {bins} bins leaves nothing of a clip of {flat.shape[-1]} bins")
    out = np.full_like(flat, np.float32(fill))
    if bins > 0:
        out[..., bins:] = flat[..., :-bins]
    elif bins < 0:
        out[..., :bins] = flat[..., -bins:]
    else:
        out[...] = flat
    return np.moveaxis(out.reshape(shape), -2, -4)
