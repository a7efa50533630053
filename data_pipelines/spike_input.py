"""The network's spike input of one frame, one switch over the representations: `data.spike_representation`.

Every representation gives K = `num_bins` channels per frame `[K, H/f, W/f]`, so the model's spike input
(`model.spike_bins`, which follows `data.num_bins`) is the same for all of them:

  voxel (default): spike counts in K bins (voxelize), cached as integers in `spike_vox/`, fed as
      `(log1p(count) - mean) / std` with `voxel_stats.json`: unchanged, older roots and runs keep working.
  tfp, tfi: spike_repr's TFP / TFI at the K bin-centre instants; raw: the K spike frames centred on the
      exposure's centre instant. Values are rates in [0, 1]; they are cached as float16 in `spike_<tag>/` (half
      the bytes of float32; rounding <= 2^-11 relative, far below the 1 / (2h + 1) steps of a rate) and fed as
      `(x - mean) / std`, with the mean and std of the cached values of the train split, stored in
      `spike_stats_<tag>.json`. No log1p: rates are bounded, and a plain standardisation gives the network an
      input of zero mean and unit variance, as the voxels' does, so the encoder's initialisation and learning
      rate see the same scale whatever the representation.

`tag` names the representation and every parameter that changes its values (`tfp_k32_h8`, `tfi_k32_m20`,
`raw_k32`), so a cache or statistics file is never read for another representation or other parameters. The
statistics file also holds the byte offset of each cached array (for tf.data's raw reads) and a digest of the
prepared index (prepared.json's splits) it was built for: a root prepared again with other frames makes it stale.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from data_pipelines import layout, spike_repr, voxelize
from data_pipelines.errors import DataError

REPRESENTATIONS = spike_repr.REPRESENTATIONS
DEFAULT_TFP_HALF_WINDOW = 8     # 17 frames: best of h = 0..32 for the spike-only TFP reference on val (RESULTS.md)
DEFAULT_TFI_MAX_SEARCH = 20     # SpikeCV's default search length
CACHE_DTYPE = np.dtype("float16")
STATS_FORMAT = "vrtspike-spike-representation"
STATS_VERSION = 1


def _config_value(config, name: str, default):
    try:
        value = config[name]
    except (KeyError, AttributeError, TypeError):
        return default
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class Representation:
    """A spike representation and its parameters (see the module docstring). Bad values raise a one-line
    DataError(kind="config") naming the config key."""

    kind: str = "voxel"
    num_bins: int = 32
    tfp_half_window: int = DEFAULT_TFP_HALF_WINDOW
    tfi_max_search: int = DEFAULT_TFI_MAX_SEARCH

    def __post_init__(self):
        if self.kind not in REPRESENTATIONS:
            raise DataError(None, f"data.spike_representation={self.kind!r}: expected one of "
                                  f"{', '.join(REPRESENTATIONS)}", "config")
        for key, value, low in (("num_bins", self.num_bins, 1), ("tfp_half_window", self.tfp_half_window, 0),
                                ("tfi_max_search", self.tfi_max_search, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise DataError(None, f"data.{key}={value!r}: expected an integer >= {low}", "config")

    @classmethod
    def from_config(cls, data_config) -> "Representation":
        """From a data config (a ConfigDict or dict); keys it lacks (configs of older runs) take the defaults."""
        return cls(str(_config_value(data_config, "spike_representation", "voxel")),
                   _config_value(data_config, "num_bins", 32),
                   _config_value(data_config, "tfp_half_window", DEFAULT_TFP_HALF_WINDOW),
                   _config_value(data_config, "tfi_max_search", DEFAULT_TFI_MAX_SEARCH))

    @property
    def is_voxel(self) -> bool:
        return self.kind == "voxel"

    def params(self) -> Dict[str, int]:
        """The parameters that change this representation's values (besides K)."""
        return {"tfp": {"tfp_half_window": self.tfp_half_window},
                "tfi": {"tfi_max_search": self.tfi_max_search}}.get(self.kind, {})

    @property
    def tag(self) -> str:
        """`vox_k32`, `tfp_k32_h8`, `tfi_k32_m20`, `raw_k32`."""
        suffix = {"tfp": f"_h{self.tfp_half_window}", "tfi": f"_m{self.tfi_max_search}"}.get(self.kind, "")
        return f"{'vox' if self.is_voxel else self.kind}_k{self.num_bins}{suffix}"

    @property
    def cache_dir(self) -> str:
        """The per-sequence cache folder: `spike_vox` (voxel) or `spike_<tag>`."""
        return layout.SPIKE_VOX if self.is_voxel else f"spike_{self.tag}"

    @property
    def stats_name(self) -> str:
        """The statistics file of a prepared root: `voxel_stats.json` or `spike_stats_<tag>.json`."""
        return layout.STATS_JSON if self.is_voxel else f"spike_stats_{self.tag}.json"

    def prepare_command(self, root) -> str:
        flags = "".join(f" --{key} {value}" for key, value in self.params().items())
        return (f"python scripts/prepare_data.py --root {root} --num_bins {self.num_bins} "
                f"--spike_representation {self.kind}{flags}")

    def compute(self, spikes, frame_times, t0: float, t1: float, where=None) -> np.ndarray:
        """The representation of one exposure, float32 `[K, H, W]` (voxel: counts). A raw window that does not
        fit the exposure is a DataError naming `where` (the spike file)."""
        try:
            return spike_repr.represent(self.kind, spikes, frame_times, t0, t1, self.num_bins,
                                        half_window=self.tfp_half_window, max_search=self.tfi_max_search,
                                        length=self.num_bins)
        except DataError:
            raise
        except ValueError as err:   # spike_repr's checks of the window (e.g. a raw window longer than it)
            raise DataError(where, f"{self.kind} representation: {err}", "spike_window") from None

    def cached(self, spikes, frame_times, t0: float, t1: float, where=None) -> np.ndarray:
        """What the cache holds for one exposure (non-voxel kinds): `compute` rounded to float16."""
        return self.compute(spikes, frame_times, t0, t1, where).astype(CACHE_DTYPE)

    def load(self, path, height: int, width: int) -> np.ndarray:
        """One frame's cache `[K, height, width]`: voxel integer counts (layout.load_voxel_counts), else float16
        values. Raises DataError("bad_voxels") for another shape or dtype, or an unreadable file."""
        if self.is_voxel:
            return layout.load_voxel_counts(path, self.num_bins, height, width)
        shape, dtype, _ = layout.voxel_header(path)
        expected = (self.num_bins, int(height), int(width))
        if shape != expected or dtype != CACHE_DTYPE:
            raise DataError(path, f"{self.kind} cache of shape {shape} and dtype {dtype}, expected {expected} "
                                  f"(K, H/f, W/f) and {CACHE_DTYPE.name}", "bad_voxels")
        try:
            return np.load(path, allow_pickle=False)
        except layout.NPY_DECODE_ERRORS as err:
            raise DataError(path, f"unreadable .npy ({type(err).__name__}: {err})", "bad_voxels") from None

    def normalize(self, values, mean: float, std: float) -> np.ndarray:
        """The network's input, a new float32 array of the shape of `values` (the stored values: voxel counts,
        float16 rates): voxel `(log1p(counts) - mean) / std`, else `(values - mean) / std`, in float32.

        Both loaders of data_pipelines/input_pipeline.py call this (through its finish_sample). The same float32
        operations as voxelize.normalize, in place: one new array instead of four (a training sample's spikes
        are 42 MB at a 256 x 256 crop, T = 5, K = 32).
        """
        out = np.array(values, dtype=np.float32)
        if self.is_voxel:
            np.log1p(out, out=out)
        out -= np.float32(mean)
        out /= np.float32(std)
        return out

    def no_spike_input(self, mean: float, std: float) -> float:
        """The network's input for an exposure without any spike: the normalised representation of an empty
        stream (0 for voxel, TFP and raw; TFI's fallback 1 / (2 m) for TFI), as the cache would hold it."""
        empty = np.zeros((self.num_bins, 1, 1), np.uint8)
        values = self.compute(empty, np.arange(self.num_bins, dtype=np.float64), 0.0, max(self.num_bins - 1, 1))
        if not self.is_voxel:
            values = values.astype(CACHE_DTYPE)
        return float(self.normalize(values, mean, std)[0, 0, 0])

    def load_stats(self, path) -> Tuple[float, float]:
        """(mean, std) from this representation's statistics file; another representation's file is an error."""
        if self.is_voxel:
            return voxelize.load_stats(path, num_bins=self.num_bins)
        saved = read_stats(path, self)
        return float(saved["mean"]), float(saved["std"])


def check_config(data_config) -> Representation:
    """The preflight check of `data.spike_representation` and its parameters (one-line DataError)."""
    return Representation.from_config(data_config if data_config is not None else {})


def index_digest(splits) -> str:
    """A digest of prepared.json's `splits` (the frames a statistics file was built for)."""
    text = json.dumps(splits, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_stats(path, representation: Representation, splits=None) -> dict:
    """Reads a `spike_stats_<tag>.json` and checks it is `representation`'s (and, given prepared.json's
    `splits`, that it was built for them). Raises DataError with the command that (re)builds it."""
    path = Path(path)
    command = representation.prepare_command(path.parent)
    try:
        with open(path, "r", encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise DataError(path, f"{representation.kind} statistics not found: run `{command}`", "bad_manifest") from None
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable statistics ({err})", "bad_manifest") from None
    if not isinstance(saved, dict) or saved.get("format") != STATS_FORMAT or saved.get("version") != STATS_VERSION:
        raise DataError(path, f"expected {STATS_FORMAT} v{STATS_VERSION} statistics", "bad_manifest")
    if saved.get("tag") != representation.tag:
        raise DataError(path, f"statistics of the {saved.get('tag')} representation, the config asks for "
                              f"{representation.tag}", "config")
    mean, std = saved.get("mean"), saved.get("std")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (mean, std))
    if not (numbers and math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise DataError(path, f"statistics must be finite with std > 0, found mean={mean}, std={std}", "bad_voxels")
    if splits is not None and saved.get("index_digest") != index_digest(splits):
        raise DataError(path, f"stale: built for another prepared.json (frames added, removed or re-prepared "
                              f"since): run `{command}`", "bad_manifest")
    return saved


class ValueStats:
    """Mean / std of many arrays from per-array (count, sum, sum of squares) in float64, merged in a fixed order
    (so a resumed prepare gives the same numbers as an uninterrupted one)."""

    def __init__(self):
        self.count, self.total, self.total_sq = 0, 0.0, 0.0

    @staticmethod
    def sums_of(values) -> list:
        """[count, sum, sum of squares] of one array (what the journal records per frame)."""
        values = np.asarray(values, np.float64)
        return [int(values.size), float(values.sum()), float(np.square(values).sum())]

    def add_sums(self, sums) -> None:
        count, total, total_sq = sums
        self.count += int(count)
        self.total += float(total)
        self.total_sq += float(total_sq)

    def mean_std(self) -> Tuple[float, float]:
        """(mean, population std); (nan, 0) without values."""
        if not self.count:
            return float("nan"), 0.0
        mean = self.total / self.count
        return mean, math.sqrt(max(self.total_sq / self.count - mean * mean, 0.0))


__all__ = ["CACHE_DTYPE", "DEFAULT_TFI_MAX_SEARCH", "DEFAULT_TFP_HALF_WINDOW", "REPRESENTATIONS", "Representation",
           "ValueStats", "check_config", "index_digest", "read_stats"]
