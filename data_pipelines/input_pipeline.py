"""Training and evaluation input for vrtspike-jax: clips of T frames with their spike voxels.

Public API (the training system calls these):

  default_data_config() -> ml_collections.ConfigDict
  ensure_embedded_dataset(data_config=None) -> Path of the prepared embedded dataset (built on first use)
  create_train_iterator(data_config, *, global_batch_size, seed, start_step=0, process_index=None,
                        process_count=None) -> TrainIterator (infinite; numpy batches)
  create_eval_iterator(data_config, *, process_index=None, process_count=None) -> EvalIterator (finite)
  TrainIterator.exclusion_counts(), EvalIterator.exclusion_counts() -> {excluded_runs, excluded_frames,
    window_breaks, prepare_problems, num_frames, num_clips}: what the split leaves out (see `build_index`)

Clips never span a time gap: they lie inside runs of frames with consecutive numbers whose exposure windows
chain (`split_runs`); every run too short for a clip is logged (python logging, WARNING) and counted.

A batch (numpy, channels-last, b = global_batch_size // process_count samples of this process):
  blur       float32 [b, T, H, W, 3] in [0, 1]
  sharp      float32 [b, T, H, W, 3] in [0, 1]
  spike_vox  float32 [b, T, H/f, W/f, K]  the spike input of data.spike_representation, normalised with the
                                          train-split statistics (voxel: (log1p(counts) - mean) / std)
  sample_id  int32   [b]                  index of the clip (TrainIterator.sample_name(id) names it)
  frame_idx  int32   [b, T]               frame numbers of the clip's frames
  t0, t1     float32 [b, T]               exposure windows (ticks)
Evaluation batches have b = 1, full frames, no augmentation, and also `seq` (str) and `eval_mask` bool [1, T]
(which frames of the clip count in the metrics; see `eval_clips`).

Determinism: the sample at global position g = step * global_batch_size + j (j < global_batch_size) is
a pure function of (seed, g): the clip is `permutation(seed, epoch)[g % N]` with epoch = g // N, and its crop
and flips are drawn from a hash of (seed, g). Process p takes positions j in [p * b, (p + 1) * b) of every
global batch, so the processes' shards partition each global batch exactly, and an iterator started at
`start_step = s` yields exactly the batches an uninterrupted run yields from step s. The hash
(splitmix64) and the permutation (argsort of hashed keys) are our own code, so the order does not change
with numpy or TensorFlow versions.

TensorFlow is imported only inside `create_train_iterator` (with GPUs hidden from it); evaluation and
everything else need only numpy and Pillow. The two loaders (tf.data for training, `load_clip` for evaluation)
differ only in how they read and crop; both end with `finish_sample`, so they give the same arrays bit for bit.

Every function reads the data section's fields directly: give it `default_data_config()` or a config derived
from it (training's is, and preflight.check_known_keys refuses keys it does not have).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from data_pipelines import layout, prepare, spike_input
from data_pipelines.errors import DataError

DEFAULT_CACHE_DIR = "~/.cache/vrtspike_jax"
_U64 = np.uint64
_log = logging.getLogger(__name__)
_LOGGED_EXCLUSIONS: set = set()      # (root, split, message) already logged in this process


# ----------------------------------------------------------------------------------------------- config


def default_data_config():
    """The data section of a config (ml_collections.ConfigDict) with its defaults.

    Fields:
      root: prepared dataset root (str), or None for the embedded synthetic dataset.
      embedded_dir: where the embedded dataset is built on first use (a subfolder per spec).
      embedded: the embedded dataset's spec (fields of data_pipelines.synthetic.SyntheticSpec).
      clip_length: T, frames per clip (5).
      crop_size: square training crop in RGB pixels (256); None or 0 trains on full frames. A multiple of
        spike_scale (and of 8 for the model).
      num_bins: K, voxel bins per exposure (32); must match the prepared data.
      spike_scale: f, RGB/spike resolution ratio; must match the prepared data (dataset.json).
      hflip, vflip: random horizontal / vertical flips in training (same for all frames and spikes).
      stats_file: statistics of the spike input; None means the root's (train split only): <root>/voxel_stats.json
        for voxels, <root>/spike_stats_<tag>.json for the other representations.
      spike_representation: the spike input, K = num_bins channels per frame in every case (docs/DATA.md section 2):
        "voxel" (default): spike counts in K bins, (log1p(count) - mean) / std.
        "tfp": SpikeCV's TFP (firing rate over 2 * tfp_half_window + 1 frames) at the K bin-centre instants;
        "tfi": SpikeCV's TFI (1 / inter-spike interval) at the K instants; "raw": the K spike frames centred on the
        exposure's centre instant (0/1; the exposure must hold at least K spike frames). These three are rates in
        [0, 1], normalised as (x - mean) / std with the train split's mean and std (data_pipelines/spike_input.py).
        A prepared root builds them with `prepare_data.py --spike_representation ...`; the embedded dataset on
        first use.
      tfp_half_window: h of TFP (default 8: 17 frames, the window the spike-only TFP reference chose on val among
        h = 0..32 for the bench data, docs/RESULTS.md; 2 frames per bin at K = 32 and 64 frames per exposure, so
        neighbouring instants share most of their frames: less noise, less time resolution).
      tfi_max_search: m of TFI, the search length in frames each way (default 20, SpikeCV's).
      spike_dropout: probability that a training sample's spikes are replaced by zero counts (a capture without
        spikes), drawn per sample and step in the train step from the run's rng (train_lib.make_train_step);
        0 (default) never. Validation always sees the recorded spikes.
      train_split, eval_split: split folders ("val" selects checkpoints; "test" is for reporting only and
        must not be the eval_split of a run whose test number is reported; see docs/DATA.md section 5).
      num_parallel_calls: parallel sample loads in tf.data (-1 or None = AUTOTUNE).
      prefetch: batches prefetched (-1 or None = AUTOTUNE, 0 = none).
      eval_pad_to_equal: with several processes, pad every process to the same number of eval clips
        (padding clips have eval_mask all False).
    """
    import ml_collections

    from data_pipelines.synthetic import SyntheticSpec

    placeholder = ml_collections.config_dict.placeholder
    config = ml_collections.ConfigDict()
    config.root = placeholder(str)             # None-valued but typed: `--config.data.root=DIR` works
    config.embedded_dir = DEFAULT_CACHE_DIR
    config.embedded = ml_collections.ConfigDict(dataclasses.asdict(SyntheticSpec()))
    config.clip_length = 5
    config.crop_size = ml_collections.FieldReference(256, field_type=int)   # None or 0: full frames
    config.num_bins = 32
    config.spike_scale = 1
    config.hflip = True
    config.vflip = False
    config.stats_file = placeholder(str)
    config.spike_representation = "voxel"
    config.tfp_half_window = spike_input.DEFAULT_TFP_HALF_WINDOW
    config.tfi_max_search = spike_input.DEFAULT_TFI_MAX_SEARCH
    config.spike_dropout = 0.0
    config.train_split = "train"
    config.eval_split = "val"
    config.num_parallel_calls = -1
    config.prefetch = 2
    config.eval_pad_to_equal = True
    return config


def ensure_embedded_dataset(data_config=None, log=print) -> Path:
    """Builds (on first use) and prepares the embedded synthetic dataset; returns its prepared root.

    The folder is `<embedded_dir>/embedded-<spec hash>-k<K>`; building is safe with several processes
    starting at once (file lock + atomic rename), and takes ~10 s at the default size. A non-voxel
    `spike_representation` is built into it on its first use (prepare.ensure_representation).
    """
    from data_pipelines import synthetic

    data_config = data_config if data_config is not None else default_data_config()
    spec = synthetic.SyntheticSpec(**dict(data_config.embedded))
    spec_scale = int(data_config.spike_scale)
    if spec.spike_scale != spec_scale:
        spec = dataclasses.replace(spec, spike_scale=spec_scale)
    parent = os.path.expanduser(str(data_config.embedded_dir))
    representation = spike_input.Representation.from_config(data_config)
    root = synthetic.ensure_dataset(parent, spec, num_bins=representation.num_bins, log=log)
    prepare.ensure_representation(root, representation)
    return root


def resolve_root(data_config) -> Path:
    """The prepared root of a config: `root`, or the embedded dataset when root is None."""
    root = data_config.root
    if root in (None, ""):
        return ensure_embedded_dataset(data_config)
    return Path(os.path.expanduser(str(root)))


# ------------------------------------------------------------------------------------------ the index


@dataclasses.dataclass
class SplitIndex:
    """Frames and clips of one split of a prepared root (numpy tables; row = one frame)."""

    root: Path
    split: str
    clip_length: int
    num_bins: int
    spike_scale: int
    voxel_dtype: str
    seq_names: List[str]
    seq_hw: np.ndarray        # int64 [S, 2]
    row_seq: np.ndarray       # int64 [R]
    row_frame_idx: np.ndarray  # int64 [R]
    row_t0: np.ndarray        # float64 [R]
    row_t1: np.ndarray        # float64 [R]
    row_vox_offset: np.ndarray  # int64 [R]
    blur_paths: List[str]
    sharp_paths: List[str]
    vox_paths: List[str]
    clip_start: np.ndarray    # int64 [N] first row of each clip
    clip_mask: np.ndarray     # bool [N, T] frames of the clip that count (eval); all True for train
    skipped: List[str]        # runs shorter than T, one line each (sequence, frames, reason)
    excluded_runs: int = 0    # runs shorter than T (no clip can be built from them)
    excluded_frames: int = 0  # frames in those runs (never seen by training / evaluation)
    window_breaks: int = 0    # places where consecutive frame numbers were split because the windows do not chain
    prepare_problems: int = 0  # problems prepare_data reported for the root (dropped frames and sequences)
    representation: spike_input.Representation = spike_input.Representation()   # what vox_paths hold

    @property
    def num_clips(self) -> int:
        return int(self.clip_start.shape[0])

    def exclusion_counts(self) -> Dict[str, int]:
        """What this split leaves out, for the run's metrics: {excluded_runs, excluded_frames, window_breaks,
        prepare_problems, num_frames, num_clips} (see `build_index`)."""
        return {"excluded_runs": int(self.excluded_runs), "excluded_frames": int(self.excluded_frames),
                "window_breaks": int(self.window_breaks), "prepare_problems": int(self.prepare_problems),
                "num_frames": int(self.row_seq.shape[0]), "num_clips": self.num_clips}

    def clip_rows(self, clip: int) -> np.ndarray:
        return self.clip_start[clip] + np.arange(self.clip_length)

    def clip_name(self, clip: int) -> str:
        """`<split>/<sequence>@<first frame_idx>` of a clip."""
        row = int(self.clip_start[clip])
        return f"{self.seq_names[self.row_seq[row]]}@{int(self.row_frame_idx[row])}"


def split_runs(frame_idx: np.ndarray, t0: np.ndarray, t1: np.ndarray,
               shared_clock: bool = True) -> Tuple[List[Tuple[int, int]], List[Tuple[int, str]]]:
    """Runs of frames that are consecutive in time, in a sequence's rows sorted by frame number.

    Rows i and i + 1 are consecutive when
      * their frame numbers are consecutive (frame_idx[i + 1] == frame_idx[i] + 1), and,
      * with a shared clock, their exposure windows chain: both t0 and t1 advance by the sequence's frame period
        P, within P / 4. P is the smallest positive t0 step between rows with consecutive frame numbers (the
        converters and the synthetic data write windows that advance by exactly P: P = exposure + gap ticks for
        the synthetic data, 15 ticks with overlapping 33-tick windows for Spk-X4K1000FPS, 104 ticks for S-SDM's
        Spk-GoPro). A window that stays, goes backwards, or jumps by about 2P or more (a frame missing in
        between) ends the run.
    Without a shared clock (ticks local to each frame's spike file), only the frame numbers count.

    Returns:
      ([(start, stop)] of each run, [(i, reason)] for each row i that starts a new run although its frame number
      follows row i - 1's, i.e. each break made by the windows).
    """
    frame_idx = np.asarray(frame_idx, np.int64)
    n = frame_idx.size
    if n == 0:
        return [], []
    t0, t1 = np.asarray(t0, np.float64), np.asarray(t1, np.float64)
    numbered = np.diff(frame_idx) == 1
    chained = numbered.copy()
    window_breaks: List[Tuple[int, str]] = []
    if shared_clock and numbered.any():
        d0, d1 = np.diff(t0), np.diff(t1)
        steps = d0[numbered & (d0 > 0)]
        period = float(steps.min()) if steps.size else 0.0
        tolerance = period / 4
        ok = (np.abs(d0 - period) <= tolerance) & (np.abs(d1 - period) <= tolerance) & (period > 0)
        chained = numbered & ok
        fmt = layout.format_number
        for i in np.flatnonzero(numbered & ~ok).tolist():
            window_breaks.append((i + 1, f"{frame_idx[i]} and {frame_idx[i + 1]}: exposure window "
                                         f"[{fmt(t0[i + 1])}, {fmt(t1[i + 1])}] does not follow "
                                         f"[{fmt(t0[i])}, {fmt(t1[i])}] by one frame period ({fmt(period)} ticks)"))
    breaks = np.flatnonzero(~chained) + 1
    starts = np.r_[0, breaks]
    stops = np.r_[breaks, n]
    return list(zip(starts.tolist(), stops.tolist())), window_breaks


def _log_exclusion(root: Path, split: str, message: str) -> None:
    key = (str(root), split, message)
    if key not in _LOGGED_EXCLUSIONS:
        _LOGGED_EXCLUSIONS.add(key)
        _log.warning("%s: %s", root / split, message)


def eval_clips(run_length: int, clip_length: int) -> List[Tuple[int, np.ndarray]]:
    """Clips covering every frame of a run once: starts 0, T, 2T, ...; if T does not divide the run, one last
    clip of its final T frames whose mask marks only the frames no earlier clip covered.

    Returns [(start, mask bool [T])]; [] if the run is shorter than T (it cannot be evaluated).
    """
    t = clip_length
    if run_length < t:
        return []
    clips = [(s, np.ones(t, bool)) for s in range(0, run_length - t + 1, t)]
    covered = clips[-1][0] + t
    if covered < run_length:
        mask = np.zeros(t, bool)
        mask[t - (run_length - covered):] = True
        clips.append((run_length - t, mask))
    return clips


def build_index(root, split: str, clip_length: int, num_bins: int, spike_scale: int,
                for_eval: bool = False, representation: Optional[spike_input.Representation] = None) -> SplitIndex:
    """Reads prepared.json and lists the clips of `split` (train: every start; eval: `eval_clips`).

    The spike paths and byte offsets are those of `representation`'s cache (default voxel: prepared.json's); a
    non-voxel one needs its current statistics file (spike_input.read_stats: the offsets and the index digest).

    Clips lie inside runs of frames consecutive in time (`split_runs`). Every run shorter than T and every
    break made by non-chaining windows is logged once per process (python logging, WARNING, naming the
    sequence, its frames and the reason); their numbers are in the index (`exclusion_counts()`).
    """
    root = Path(root)
    prepared = prepare.read_prepared(root, num_bins=num_bins, spike_scale=spike_scale)
    if split not in prepared["splits"]:
        raise DataError(root / layout.PREPARED_JSON, f"no split {split!r}: the prepared splits are "
                                                     f"{', '.join(sorted(prepared['splits']))}", "config")
    shared_clock = bool(prepared.get("shared_clock", layout.default_shared_clock(
        str(prepared.get("source_layout", "vrtspike")))))
    seqs = prepared["splits"][split]
    representation = representation or spike_input.Representation(num_bins=int(num_bins))
    offsets = None
    if not representation.is_voxel:
        offsets = spike_input.read_stats(root / representation.stats_name, representation,
                                         prepared["splits"])["offsets"]
    excluded_runs = excluded_frames = window_breaks = 0
    seq_names, seq_hw = [], []
    row_seq, row_idx, row_t0, row_t1, row_off = [], [], [], [], []
    blur_paths, sharp_paths, vox_paths = [], [], []
    clip_start, clip_mask, skipped = [], [], []
    for s, seq in enumerate(seqs):
        seq_names.append(seq["name"])
        seq_hw.append((seq["height"], seq["width"]))
        seq_dir = root / seq["name"]
        base = len(row_seq)
        idx = np.array([fr[0] for fr in seq["frames"]], np.int64)
        seq_t0 = np.array([fr[2] for fr in seq["frames"]], np.float64)
        seq_t1 = np.array([fr[3] for fr in seq["frames"]], np.float64)
        for frame_idx, stem, t0, t1, _, offset in seq["frames"]:
            row_seq.append(s)
            row_idx.append(frame_idx)
            row_t0.append(t0)
            row_t1.append(t1)
            row_off.append(offset if offsets is None else offsets[f"{seq['name']}/{stem}"])
            blur_paths.append(str(seq_dir / layout.BLUR / f"{stem}.png"))
            sharp_paths.append(str(seq_dir / layout.SHARP / f"{stem}.png"))
            vox_paths.append(str(seq_dir / representation.cache_dir / f"{stem}.npy"))
        runs, breaks = split_runs(idx, seq_t0, seq_t1, shared_clock)
        window_breaks += len(breaks)
        for _, reason in breaks:
            _log_exclusion(root, split, f"{seq['name']}: clips are not built across frames {reason}")
        for start, stop in runs:
            n = stop - start
            if n < clip_length:
                line = (f"{seq['name']} frames {idx[start]}..{idx[stop - 1]}: run of {n} frame(s) consecutive in "
                        f"time, shorter than the clip length T={clip_length}; excluded")
                skipped.append(line)
                excluded_runs += 1
                excluded_frames += n
                _log_exclusion(root, split, line)
                continue
            if for_eval:
                for offset, mask in eval_clips(n, clip_length):
                    clip_start.append(base + start + offset)
                    clip_mask.append(mask)
            else:
                for offset in range(n - clip_length + 1):
                    clip_start.append(base + start + offset)
                    clip_mask.append(np.ones(clip_length, bool))
    return SplitIndex(
        root=root, split=split, clip_length=clip_length, num_bins=num_bins, spike_scale=spike_scale,
        voxel_dtype=prepared["voxel_dtype"] if offsets is None else spike_input.CACHE_DTYPE.name, seq_names=seq_names,
        seq_hw=np.array(seq_hw, np.int64).reshape(-1, 2), row_seq=np.array(row_seq, np.int64),
        row_frame_idx=np.array(row_idx, np.int64), row_t0=np.array(row_t0, np.float64),
        row_t1=np.array(row_t1, np.float64), row_vox_offset=np.array(row_off, np.int64),
        blur_paths=blur_paths, sharp_paths=sharp_paths, vox_paths=vox_paths,
        clip_start=np.array(clip_start, np.int64), clip_mask=np.array(clip_mask, bool).reshape(-1, clip_length),
        skipped=skipped, excluded_runs=excluded_runs, excluded_frames=excluded_frames, window_breaks=window_breaks,
        prepare_problems=int(prepared.get("num_problems", 0)), representation=representation)


# ------------------------------------------------------------------------------------- sample order


def splitmix64(x) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, well-mixed hash."""
    z = np.atleast_1d(np.asarray(x, dtype=_U64))
    with np.errstate(over="ignore"):
        z = z + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def hash_ints(*parts) -> np.ndarray:
    """Hash of a tuple of integers / integer arrays (broadcast), uint64."""
    h = np.zeros(1, _U64)
    for part in parts:
        part = np.asarray(part).astype(np.int64).astype(_U64)
        h = splitmix64(h ^ part)
    return np.atleast_1d(h)


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order of the samples in `epoch`: a pure function of (seed, epoch, num_samples), int64 [N]."""
    keys = hash_ints(seed, 0x5EED, epoch, np.arange(num_samples))
    return np.argsort(keys, kind="stable").astype(np.int64)


class SamplePlanner:
    """Maps global sample positions to (clip, crop offset, flips): pure functions of (seed, position)."""

    def __init__(self, index: SplitIndex, seed: int, crop_size: Optional[int], hflip: bool, vflip: bool):
        self.index, self.seed = index, int(seed)
        self.crop_size, self.hflip, self.vflip = crop_size, bool(hflip), bool(vflip)
        self._perms: Dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = epoch_permutation(self.seed, epoch, self.index.num_clips)
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def plan(self, position: int) -> Tuple[int, int, int, bool, bool]:
        """(clip, y, x, hflip, vflip) of the sample at global position `position`."""
        n = self.index.num_clips
        epoch, pos = divmod(int(position), n)
        clip = int(self._perm(epoch)[pos])
        u = int(hash_ints(self.seed, 0xC0FFEE, position)[0])
        y = x = 0
        if self.crop_size:
            f = self.index.spike_scale
            h, w = (int(v) for v in self.index.seq_hw[self.index.row_seq[self.index.clip_start[clip]]])
            y = f * (u % ((h - self.crop_size) // f + 1))
            x = f * ((u >> 21) % ((w - self.crop_size) // f + 1))
        return clip, int(y), int(x), bool(self.hflip and (u >> 42) & 1), bool(self.vflip and (u >> 43) & 1)


# --------------------------------------------------------------------------- one sample, for both loaders
#
# A sample is made in two stages. Reading (file I/O, PNG decode, the crop, spikes to channels-last) differs
# between the loaders: tf.data reads in its parallel map (create_train_iterator), load_clip with Pillow and numpy.
# Both crop with crop_rgb / crop_spikes and hand the cropped uint8 frames and stored spike values to
# finish_sample, the one definition of everything after reading: the flips, the spike representation's
# normalisation (spike_input.Representation.normalize), the dtypes and the sample's metadata. tf.data calls it
# through tf.numpy_function in its map, so the two loaders give the same arrays bit for bit.


def crop_rgb(frame, y, x, height, width):
    """Rows [y, y + height) and columns [x, x + width) of an RGB frame [H, W, 3] (numpy array or tf.Tensor)."""
    return frame[y:y + height, x:x + width]


def crop_spikes(values, y, x, height, width, spike_scale: int):
    """The same crop (in RGB pixels, multiples of f = spike_scale) of a spike cache [K, H/f, W/f] (numpy array or
    tf.Tensor)."""
    f = spike_scale
    return values[:, y // f:(y + height) // f, x // f:(x + width) // f]


def _flipped(frames: np.ndarray, hflip, vflip) -> np.ndarray:
    """frames [T, H, W, C] reversed along W (hflip) and H (vflip): a view."""
    if hflip:
        frames = frames[:, :, ::-1]
    if vflip:
        frames = frames[:, ::-1]
    return frames


def _unit(frames: np.ndarray) -> np.ndarray:
    """uint8 frames as float32 in [0, 1], contiguous."""
    out = np.ascontiguousarray(frames, np.float32)
    out /= 255.0
    return out


def finish_sample(index: SplitIndex, clip, blur, sharp, values, hflip, vflip, mean: float,
                  std: float) -> Dict[str, np.ndarray]:
    """The sample of `clip` (the unbatched dict of the module docstring) from its cropped frames.

    blur, sharp: uint8 [T, h, w, 3]; values: the cropped spike caches, channels-last [T, h/f, w/f, K], as stored
    (voxel counts, float16 rates); hflip, vflip: flip every frame and its spikes left-right / upside down. The
    spike input is `index.representation.normalize(values, mean, std)`.
    """
    rows = index.clip_rows(int(clip))
    spikes = np.ascontiguousarray(_flipped(np.asarray(values), hflip, vflip))
    return {
        "blur": _unit(_flipped(np.asarray(blur, np.uint8), hflip, vflip)),
        "sharp": _unit(_flipped(np.asarray(sharp, np.uint8), hflip, vflip)),
        "spike_vox": np.ascontiguousarray(index.representation.normalize(spikes, mean, std), np.float32),
        "sample_id": np.int32(clip),
        "frame_idx": index.row_frame_idx[rows].astype(np.int32),
        "t0": index.row_t0[rows].astype(np.float32),
        "t1": index.row_t1[rows].astype(np.float32),
    }


def load_clip(index: SplitIndex, clip: int, mean: float, std: float, y: int = 0, x: int = 0,
              crop_size: Optional[int] = None, hflip: bool = False, vflip: bool = False) -> Dict[str, np.ndarray]:
    """Loads one clip with numpy/Pillow (no TensorFlow): the unbatched sample dict (see module docstring)."""
    f = index.spike_scale
    rows = index.clip_rows(clip)
    seq_h, seq_w = (int(v) for v in index.seq_hw[index.row_seq[rows[0]]])
    c_h, c_w = (crop_size, crop_size) if crop_size else (seq_h, seq_w)

    def spikes(row):      # channels-last [h/f, w/f, K]
        values = index.representation.load(index.vox_paths[row], seq_h // f, seq_w // f)
        return np.transpose(crop_spikes(values, y, x, c_h, c_w, f), (1, 2, 0))

    blur = np.stack([crop_rgb(layout.load_png(index.blur_paths[row]), y, x, c_h, c_w) for row in rows])
    sharp = np.stack([crop_rgb(layout.load_png(index.sharp_paths[row]), y, x, c_h, c_w) for row in rows])
    values = np.stack([spikes(row) for row in rows])
    return finish_sample(index, clip, blur, sharp, values, hflip, vflip, mean, std)


# --------------------------------------------------------------------------------------------- train


def _process_info(process_index, process_count) -> Tuple[int, int]:
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _stats(data_config, root: Path, representation: spike_input.Representation) -> Tuple[float, float]:
    stats_file = data_config.stats_file
    path = Path(os.path.expanduser(str(stats_file))) if stats_file else root / representation.stats_name
    return representation.load_stats(path)


def _check_crop(index: SplitIndex, crop_size: Optional[int]) -> None:
    f = index.spike_scale
    if index.num_clips == 0:
        detail = f"; runs shorter than T: {'; '.join(index.skipped[:3])}" if index.skipped else ""
        raise DataError(index.root / index.split, f"no clip of T={index.clip_length} consecutive frames in the "
                                                  f"{index.split} split{detail}", "config")
    if crop_size:
        if crop_size % f:
            raise DataError(None, f"crop_size {crop_size} is not a multiple of spike_scale {f}", "config")
        small = [f"{name} ({h}x{w})" for name, (h, w) in zip(index.seq_names, index.seq_hw)
                 if h < crop_size or w < crop_size]
        if small:
            raise DataError(index.root, f"crop_size {crop_size} is larger than the frames of "
                                        f"{', '.join(small[:4])}{' ...' if len(small) > 4 else ''}: lower "
                                        "data.crop_size (or, for the embedded dataset, raise data.embedded.height/"
                                        "width)", "config")
    else:
        sizes = {tuple(hw) for hw in index.seq_hw.tolist()}
        if len(sizes) > 1:
            raise DataError(index.root, f"crop_size None needs frames of one size to batch, found sizes "
                                        f"{sorted(sizes)}", "config")


def _hide_gpus_from_tf(tf) -> None:
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised: nothing more to do
        pass


_OPEN_TRAIN_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _close_train_iterators() -> None:
    """Closes the train iterators still open when the interpreter exits, while Python can still run their threads.

    tf.data's threads run Python (the plan and finish_sample, tf.numpy_function); an iterator left for the
    interpreter's final clean-up waits there for a sample whose thread can no longer run Python: a hang at exit.
    atexit functions run before that clean-up.
    """
    for iterator in list(_OPEN_TRAIN_ITERATORS):
        iterator.close()


class TrainIterator:
    """Infinite iterator of per-process training batches (numpy dicts); see the module docstring.

    Attributes: root, index (SplitIndex), local_batch_size, global_batch_size, start_step, step (next step),
    stats (mean, std), representation (spike_input.Representation: `representation.no_spike_input(*stats)` is the
    input of an exposure without spikes). `sample_name(sample_id)` names a clip (`train/<seq>@<first frame_idx>`);
    `exclusion_counts()` says what the split leaves out.
    """

    def __init__(self, dataset, index: SplitIndex, *, global_batch_size: int, local_batch_size: int,
                 start_step: int, stats: Tuple[float, float], planner: SamplePlanner):
        self._dataset = dataset
        self._iterator = iter(dataset.as_numpy_iterator())
        _OPEN_TRAIN_ITERATORS.add(self)
        self.index = index
        self.root = index.root
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.start_step = start_step
        self.step = start_step
        self.stats = stats
        self.planner = planner

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        batch = next(self._iterator)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the tf.data pipeline (the samples in flight finish first); the iterator is then exhausted."""
        self._iterator = None

    @property
    def num_samples(self) -> int:
        return self.index.num_clips

    @property
    def representation(self) -> spike_input.Representation:
        return self.index.representation

    def sample_name(self, sample_id: int) -> str:
        return self.index.clip_name(int(sample_id))

    def exclusion_counts(self) -> Dict[str, int]:
        """What the train split leaves out (SplitIndex.exclusion_counts), for the run's metrics."""
        return self.index.exclusion_counts()

    @property
    def element_spec(self):
        return self._dataset.element_spec


def _tf_read_clip(tf, index: SplitIndex, crop: Optional[int]):
    """A TF function (clip, y, x) -> (blur, sharp, values): the clip's frames read, decoded and cropped in the
    tf.data map (uint8 [T, h, w, 3] twice and the stored spike values, channels-last [T, h/f, w/f, K]), for
    finish_sample."""
    t, k, f = index.clip_length, index.num_bins, index.spike_scale
    blur_table, sharp_table = tf.constant(index.blur_paths), tf.constant(index.sharp_paths)
    vox_table, offset_table = tf.constant(index.vox_paths), tf.constant(index.row_vox_offset)
    start_table, row_seq, seq_hw = tf.constant(index.clip_start), tf.constant(index.row_seq), tf.constant(index.seq_hw)
    vox_dtype = tf.as_dtype(index.voxel_dtype)
    itemsize = np.dtype(index.voxel_dtype).itemsize

    def read(path_table, row):
        return tf.io.read_file(tf.gather(path_table, row))

    def read_clip(clip, y, x):
        rows = tf.gather(start_table, clip) + tf.range(t, dtype=tf.int64)
        hw = tf.gather(seq_hw, tf.gather(row_seq, rows[0]))
        ch, cw = (crop, crop) if crop else (hw[0], hw[1])
        blurs, sharps, spikes = [], [], []
        for i in range(t):
            row = rows[i]
            blurs.append(crop_rgb(tf.io.decode_png(read(blur_table, row), channels=3), y, x, ch, cw))
            sharps.append(crop_rgb(tf.io.decode_png(read(sharp_table, row), channels=3), y, x, ch, cw))
            raw = tf.io.decode_raw(read(vox_table, row), vox_dtype, little_endian=True)
            values = tf.reshape(raw[tf.gather(offset_table, row) // itemsize:], (k, hw[0] // f, hw[1] // f))
            spikes.append(tf.transpose(crop_spikes(values, y, x, ch, cw, f), (1, 2, 0)))
        return tf.stack(blurs), tf.stack(sharps), tf.stack(spikes)

    return read_clip


def _tf_load_fn(tf, index: SplitIndex, planner: SamplePlanner, crop: Optional[int], stats: Tuple[float, float],
                local: int, global_batch_size: int, p_index: int):
    """The tf.data map: this process's local sample position -> the sample (finish_sample's dict, static shapes).

    The plan (SamplePlanner) and finish_sample run as tf.numpy_function in tf.data's threads; reading runs in TF.
    """
    t, k, f = index.clip_length, index.num_bins, index.spike_scale
    read_clip = _tf_read_clip(tf, index, crop)
    hh, ww = (crop, crop) if crop else (int(v) for v in index.seq_hw[0])
    shapes = {"blur": (t, hh, ww, 3), "sharp": (t, hh, ww, 3), "spike_vox": (t, hh // f, ww // f, k),
              "sample_id": (), "frame_idx": (t,), "t0": (t,), "t1": (t,)}
    dtypes = {"blur": tf.float32, "sharp": tf.float32, "spike_vox": tf.float32, "sample_id": tf.int32,
              "frame_idx": tf.int32, "t0": tf.float32, "t1": tf.float32}

    def plan_fn(local_position):
        step, j = divmod(int(local_position), local)
        clip, y, x, hf, vf = planner.plan(step * global_batch_size + p_index * local + j)
        return np.int64(clip), np.int64(y), np.int64(x), np.bool_(hf), np.bool_(vf)

    def finish_fn(clip, blur, sharp, values, hf, vf):
        sample = finish_sample(index, clip, blur, sharp, values, hf, vf, *stats)
        return [sample[key] for key in shapes]

    def load_fn(local_position):
        clip, y, x, hf, vf = tf.numpy_function(plan_fn, [local_position],
                                               [tf.int64, tf.int64, tf.int64, tf.bool, tf.bool], stateful=False)
        blur, sharp, values = read_clip(clip, y, x)
        arrays = tf.numpy_function(finish_fn, [clip, blur, sharp, values, hf, vf], list(dtypes.values()),
                                   stateful=False)
        out = {}
        for key, value in zip(shapes, arrays):
            value.set_shape(shapes[key])
            out[key] = value
        return out

    return load_fn


def create_train_iterator(data_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                          process_index: Optional[int] = None, process_count: Optional[int] = None) -> TrainIterator:
    """Infinite iterator of this process's training batches (see the module docstring for keys and shapes).

    Args:
      data_config: `default_data_config()` or a config derived from it (every key present).
      global_batch_size: samples per step over all processes (a multiple of process_count).
      seed: the data seed; the batch at step s is a pure function of (seed, s, process shard).
      start_step: first step to produce (resume).
      process_index, process_count: this process's shard (default: jax.process_index() / process_count()).
    """
    p_index, p_count = _process_info(process_index, process_count)
    if global_batch_size % p_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of process_count {p_count}")
    local = global_batch_size // p_count
    root = resolve_root(data_config)
    representation = spike_input.Representation.from_config(data_config)
    crop = int(data_config.crop_size) if data_config.crop_size else None
    index = build_index(root, data_config.train_split, int(data_config.clip_length), representation.num_bins,
                        int(data_config.spike_scale), representation=representation)
    _check_crop(index, crop)
    stats = _stats(data_config, root, representation)
    planner = SamplePlanner(index, seed, crop, bool(data_config.hflip), bool(data_config.vflip))

    import tensorflow as tf
    _hide_gpus_from_tf(tf)

    load_fn = _tf_load_fn(tf, index, planner, crop, stats, local, global_batch_size, p_index)
    parallel, prefetch = data_config.num_parallel_calls, data_config.prefetch
    parallel = tf.data.AUTOTUNE if parallel is None or int(parallel) < 0 else max(1, int(parallel))
    prefetch = tf.data.AUTOTUNE if prefetch is None or int(prefetch) < 0 else int(prefetch)
    ds = tf.data.Dataset.range(int(start_step) * local, np.iinfo(np.int64).max)
    ds = ds.map(load_fn, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(local, drop_remainder=True)
    if prefetch:
        ds = ds.prefetch(prefetch)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    ds = ds.with_options(options)
    return TrainIterator(ds, index, global_batch_size=global_batch_size, local_batch_size=local,
                         start_step=int(start_step), stats=stats, planner=planner)


# ---------------------------------------------------------------------------------------------- eval


class EvalIterator:
    """Finite iterator over full-size evaluation clips (batch 1, no augmentation), numpy only.

    Every frame of every evaluation run of >= T consecutive frames is in exactly one clip's `eval_mask`
    (`eval_clips`). With several processes, clip c goes to process c % process_count; with
    eval_pad_to_equal every process yields the same number of clips (padding: eval_mask all False).
    """

    def __init__(self, index: SplitIndex, clips: Sequence[int], padding: int, stats: Tuple[float, float]):
        self.index = index
        self.clips = list(clips)
        self.padding = padding
        self.stats = stats

    def __len__(self) -> int:
        return len(self.clips) + self.padding

    @property
    def representation(self) -> spike_input.Representation:
        return self.index.representation

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        mean, std = self.stats
        order = self.clips + [self.clips[-1] if self.clips else 0] * self.padding
        for i, clip in enumerate(order):
            sample = load_clip(self.index, clip, mean, std)
            batch = {key: value[None] for key, value in sample.items()}
            batch["sample_id"] = batch["sample_id"].reshape(1)
            batch["seq"] = self.index.seq_names[self.index.row_seq[self.index.clip_start[clip]]]
            mask = self.index.clip_mask[clip] if i < len(self.clips) else np.zeros(self.index.clip_length, bool)
            batch["eval_mask"] = mask[None].copy()
            yield batch

    def sample_name(self, sample_id: int) -> str:
        return self.index.clip_name(int(sample_id))

    def exclusion_counts(self) -> Dict[str, int]:
        """What the evaluation split leaves out (SplitIndex.exclusion_counts; the whole split, not this
        process's share), for the run's metrics."""
        return self.index.exclusion_counts()


def create_eval_iterator(data_config, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> EvalIterator:
    """Finite iterator of full-size validation clips (batch 1): the train keys plus `seq` and `eval_mask`."""
    p_index, p_count = _process_info(process_index, process_count)
    root = resolve_root(data_config)
    representation = spike_input.Representation.from_config(data_config)
    t, k, f = int(data_config.clip_length), representation.num_bins, int(data_config.spike_scale)
    index = build_index(root, data_config.eval_split, t, k, f, for_eval=True,
                        representation=representation)
    if index.num_clips == 0:
        detail = f" (runs shorter than T: {'; '.join(index.skipped[:3])})" if index.skipped else ""
        raise DataError(root / index.split, f"no clip of T={t} consecutive frames to evaluate in the {index.split} "
                                            f"split{detail}", "config")
    stats = _stats(data_config, root, representation)
    mine = list(range(p_index, index.num_clips, p_count))
    padding = 0
    if p_count > 1 and bool(data_config.eval_pad_to_equal):
        per_process = -(-index.num_clips // p_count)
        padding = per_process - len(mine)
    return EvalIterator(index, mine, padding, stats)


def train_sample_names(data_config) -> List[str]:
    """Names of the training clips by sample_id (for logging bad samples)."""
    root = resolve_root(data_config)
    index = build_index(root, data_config.train_split, int(data_config.clip_length),
                        int(data_config.num_bins), int(data_config.spike_scale))
    return [index.clip_name(i) for i in range(index.num_clips)]
