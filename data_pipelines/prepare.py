"""prepare_data's engine: validate a root in our layout, build the voxel cache, the train-only statistics, the
alignment log with event counts and the index (`prepared.json`) that the input pipeline reads.

Rules:
- Every problem is one line naming the file, what was expected and what was found (`DataError`).
- Only bad files count as bad data: DataErrors from the readers, which turn decoding errors (Pillow's, numpy's
  .npy errors, malformed .dat sizes) into one line naming the file. Any other exception is a bug, not data,
  and propagates.
- A bad frame is dropped and logged; the run goes on. Whole sequences are dropped for folder-level
  problems (e.g. no sharp/: ground truth is never fabricated). Only a root that cannot be read at all
  (missing, unknown layout, no alignment log) or that leaves no train frame stops the run.
- Resumable: every finished frame is recorded in `.prepare_journal.jsonl` with the size and mtime of its
  inputs; a rerun skips frames whose inputs and cache are unchanged. Every output is written atomically.
- Voxel caches hold integer spike counts (`uint8`, or `uint16` where a bin can exceed 255); log1p and the
  normalisation happen when loading, so the cache never depends on the statistics.
- Another spike representation (`spike_representation` tfp, tfi or raw; data_pipelines/spike_input.py) is built
  after the voxel pass, for the frames of the index just written: its float16 cache in `spike_<tag>/`, its own
  journal `.prepare_journal_<tag>.jsonl` and `spike_stats_<tag>.json` (train-split mean / std of the cached values,
  byte offsets, the index digest). The voxel outputs are the same as without it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from data_pipelines import layout, spike_dat, spike_input, voxelize
from data_pipelines.errors import DataError
from data_pipelines.fileio import atomic_save_npy, atomic_write_json, atomic_write_text, file_lock

PREPARED_FORMAT = "vrtspike-prepared"
PREPARED_VERSION = 1
JOURNAL = ".prepare_journal.jsonl"
LOCK = ".prepare.lock"


@dataclasses.dataclass
class PrepareOptions:
    """Options of `prepare_root` (the flags of scripts/prepare_data.py)."""

    root: Path
    num_bins: int = 32
    check_only: bool = False
    workers: int = 1
    overwrite: bool = False
    decode_images: bool = True
    progress: bool = True
    spike_representation: str = "voxel"
    tfp_half_window: int = spike_input.DEFAULT_TFP_HALF_WINDOW
    tfi_max_search: int = spike_input.DEFAULT_TFI_MAX_SEARCH

    def representation(self) -> spike_input.Representation:
        return spike_input.Representation(self.spike_representation, self.num_bins, self.tfp_half_window,
                                          self.tfi_max_search)


@dataclasses.dataclass
class PrepareResult:
    """What `prepare_root` found and did."""

    problems: List[DataError]
    notes: List[str]
    fatal: bool = False
    kept_frames: Dict[str, int] = dataclasses.field(default_factory=dict)
    kept_sequences: Dict[str, int] = dataclasses.field(default_factory=dict)
    stats: Optional[Tuple[float, float]] = None
    seconds: float = 0.0
    representation_stats: Optional[Tuple[str, float, float]] = None   # (tag, mean, std) of a non-voxel one
    stats_written: bool = False   # the voxel outputs (statistics, index) were written

    @property
    def exit_code(self) -> int:
        """0: sound; 1: problems found (listed; bad samples dropped, outputs usable); 2: nothing usable."""
        if self.fatal:
            return 2
        return 1 if self.problems else 0


# ------------------------------------------------------------------------------------------ per frame


@dataclasses.dataclass
class FrameTask:
    key: str
    split: str
    blur: str
    sharp: str
    spike: Optional[str]
    vox: str
    vox_exists: bool
    t0: float
    t1: float
    spike_t0: float
    num_bins: int
    spike_scale: int
    voxel_dtype: str
    check_only: bool
    overwrite: bool
    decode_images: bool
    fingerprint: list


@dataclasses.dataclass
class FrameResult:
    key: str
    ok: bool
    problem: Optional[DataError] = None
    height: int = 0
    width: int = 0
    event_count: int = 0
    histogram: Optional[list] = None
    vox_offset: int = 0
    vox_stat: Optional[list] = None
    note: str = ""


def _stat(path: Optional[str]):
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _fmt(x: float) -> str:
    return layout.format_number(x)


def _cache_usable(task: FrameTask, hs: int, ws: int) -> Tuple[bool, str]:
    """Whether the existing cache can be reused as is; else the reason."""
    if not task.vox_exists:
        return False, "missing"
    try:
        shape, dtype, _ = layout.voxel_header(task.vox)
    except DataError as err:
        return False, err.reason
    if shape != (task.num_bins, hs, ws):
        return False, f"shape {shape}, expected {(task.num_bins, hs, ws)}"
    if dtype != np.dtype(task.voxel_dtype):
        return False, f"dtype {dtype}, expected {task.voxel_dtype}"
    if task.spike is not None and os.stat(task.vox).st_mtime_ns < os.stat(task.spike).st_mtime_ns:
        return False, "older than its spike file"
    return True, ""


def exposure_frames(t0: float, t1: float, spike_t0: float, num_frames: int) -> Tuple[int, int]:
    """The frames [start, stop) of a spike file (`num_frames` frames from tick `spike_t0`) that can lie inside the
    exposure window [t0, t1], with one spare on each side; every representation drops the others."""
    start = min(max(0, int(math.floor(t0 - spike_t0)) - 1), num_frames)
    stop = max(min(num_frames, int(math.ceil(t1 - spike_t0)) + 2), start)
    return start, stop


def exposure_input(spike_path, t0: float, t1: float, spike_t0: float, height: int, width: int,
                   representation: spike_input.Representation) -> np.ndarray:
    """One exposure's spike input as its cache holds it, `[K, height, width]`: int32 spike counts for voxels
    (voxelize.count_spikes), else the representation's float16 values (spike_input.Representation.cached).

    The one exposure -> spike input function: prepare_data's caches and scripts/test.py's --input_spike use it.
    Only the frames of `exposure_frames` are read. DataError for an unreadable file or a window the
    representation cannot take (e.g. a raw window longer than the exposure)."""
    with spike_dat.SpikeDatReader(spike_path, height, width) as reader:
        start, stop = exposure_frames(t0, t1, spike_t0, len(reader))
        spikes = reader.read(start, stop)
    times = spike_t0 + np.arange(start, stop, dtype=np.float64)
    if representation.is_voxel:
        return voxelize.count_spikes(spikes, times, t0, t1, representation.num_bins)
    return representation.cached(spikes, times, t0, t1, where=spike_path)


def process_frame(task: FrameTask) -> FrameResult:
    """Validates one frame and (unless check_only) writes its voxel cache.

    Bad data (a DataError from the file readers) is returned as the result's problem; any other exception
    propagates.
    """
    try:
        height, width = layout.png_size(task.blur)
        sh, sw = layout.png_size(task.sharp)
        if (sh, sw) != (height, width):
            raise DataError(task.sharp, f"frame of another size: sharp is {sh}x{sw} (HxW), its blurry frame "
                                        f"{Path(task.blur).name} is {height}x{width}", "frame_size")
        if task.decode_images:
            layout.load_png(task.blur)
            layout.load_png(task.sharp)
        f = task.spike_scale
        if height % f or width % f:
            raise DataError(task.blur, f"frame {height}x{width} (HxW) is not divisible by spike_scale {f} "
                                       "(dataset.json)", "frame_size")
        hs, ws = height // f, width // f
        note = ""
        counts = None
        if task.spike is not None:
            n = spike_dat.count_frames(task.spike, hs, ws)
            row = layout.AlignmentRow("", 0, task.t0, task.t1, task.spike_t0)
            if not row.covers(n):
                raise DataError(task.spike, f"spike frames span ticks [{_fmt(task.spike_t0)}, "
                                            f"{_fmt(task.spike_t0 + n - 1)}] ({n} frames of {ws}x{hs} (WxH) from "
                                            f"spike_t0={_fmt(task.spike_t0)}), which does not cover the exposure "
                                            f"window [{_fmt(task.t0)}, {_fmt(task.t1)}]", "spike_window")
            usable, why = _cache_usable(task, hs, ws)
            if task.check_only:
                if task.vox_exists:
                    counts = layout.load_voxel_counts(task.vox, task.num_bins, hs, ws)  # bad values raise
                    if not usable:
                        raise DataError(task.vox, f"stale voxel cache ({why}); prepare_data rebuilds it",
                                        "bad_voxels")
            else:
                if usable and not task.overwrite:
                    try:
                        counts = layout.load_voxel_counts(task.vox, task.num_bins, hs, ws)
                    except DataError as err:
                        note = f"{task.vox}: rebuilt ({err.reason})"
                        counts = None
                elif task.vox_exists:
                    note = f"{task.vox}: rebuilt ({'--overwrite' if usable else why})"
                if counts is None:
                    counts = exposure_input(task.spike, task.t0, task.t1, task.spike_t0, hs, ws,
                                            spike_input.Representation("voxel", task.num_bins))
                    if counts.max(initial=0) > np.iinfo(task.voxel_dtype).max:
                        raise DataError(task.spike, f"a bin holds {counts.max()} spikes, more than "
                                                    f"{task.voxel_dtype} can store", "bad_voxels")
                    atomic_save_npy(task.vox, counts.astype(task.voxel_dtype))
        else:
            counts = layout.load_voxel_counts(task.vox, task.num_bins, hs, ws)
            if not task.check_only and counts.dtype != np.dtype(task.voxel_dtype):
                if counts.max(initial=0) > np.iinfo(task.voxel_dtype).max:
                    raise DataError(task.vox, f"counts up to {counts.max()} do not fit {task.voxel_dtype}",
                                    "bad_voxels")
                atomic_save_npy(task.vox, counts.astype(task.voxel_dtype))
                note = f"{task.vox}: converted from {counts.dtype} to {task.voxel_dtype}"
        result = FrameResult(task.key, True, height=height, width=width, note=note)
        if counts is not None:
            result.event_count = int(counts.sum(dtype=np.int64))
            result.histogram = voxelize.VoxelStats.histogram_of(counts).tolist()
        if not task.check_only:
            result.vox_offset = layout.voxel_header(task.vox)[2]
            result.vox_stat = _stat(task.vox)
        return result
    except DataError as err:
        # Bad input only: the readers (layout.png_size / load_png / load_voxel_counts, spike_dat) turn decoding
        # errors of the files they read into DataErrors naming the file. Anything else (a TypeError, a failed
        # cache write, ...) is not a property of the data and propagates: prepare_data then stops with
        # "internal error" (exit 3) instead of blaming a PNG.
        return FrameResult(task.key, False, problem=err)


# -------------------------------------------------------------------------------------------- journal


def _read_journal(root: Path, name: str = JOURNAL) -> Dict[str, dict]:
    path = root / name
    records: Dict[str, dict] = {}
    if not path.exists():
        return records
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                records[rec["key"]] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    return records


def _result_to_record(result: FrameResult, fingerprint: list) -> dict:
    rec = {"key": result.key, "fp": fingerprint, "ok": result.ok}
    if result.ok:
        rec.update(height=result.height, width=result.width, event_count=result.event_count,
                   hist=result.histogram, vox_offset=result.vox_offset, vox_stat=result.vox_stat)
    else:
        rec.update(problem=[result.problem.path, result.problem.reason, result.problem.kind])
    return rec


def _record_to_result(rec: dict) -> FrameResult:
    if rec["ok"]:
        return FrameResult(rec["key"], True, height=rec["height"], width=rec["width"],
                           event_count=rec["event_count"], histogram=rec["hist"], vox_offset=rec["vox_offset"],
                           vox_stat=rec["vox_stat"])
    path, reason, kind = rec["problem"]
    return FrameResult(rec["key"], False, problem=DataError(path, reason, kind))


# --------------------------------------------------------------------------------------------- driver


def voxel_dtype_for(rows: List[layout.AlignmentRow], num_bins: int) -> str:
    """uint8 unless some bin can hold more than 255 spike frames (spike frames are one tick apart)."""
    widest = max((r.t1 - r.t0 for r in rows), default=0.0)
    bound = int(np.floor(widest / num_bins)) + 2
    return "uint8" if bound <= 255 else "uint16"


def _open_journal(path: Path):
    """The journal opened for appending, on a fresh line if a crash cut its last record."""
    cut_line = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    journal_file = open(path, "a", encoding="utf-8")
    if cut_line:  # a crash cut the last record: start a fresh line so the next record is whole
        journal_file.write("\n")
    return journal_file


def _run_tasks(tasks: list, workers: int, on_result: Callable, progress: bool,
               process: Callable = process_frame) -> None:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="prepare", unit="frame", file=sys.stderr, dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                on_result(task, process(task))
                if bar:
                    bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # safe even when the caller has started threads
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                chunk = max(1, min(64, len(tasks) // (workers * 8) or 1))
                for task, result in zip(tasks, pool.map(process, tasks, chunksize=chunk)):
                    on_result(task, result)
                    if bar:
                        bar.update(1)
    finally:
        if bar:
            bar.close()


def _emit(log: Callable[[str], None], problems: List[DataError], err: DataError) -> None:
    problems.append(err)
    log(f"problem: {err.message}")


def prepare_root(options: PrepareOptions, log: Optional[Callable[[str], None]] = None) -> PrepareResult:
    """Validates (and unless `check_only` prepares) the root `options.root` in our layout.

    Writes (atomically, not in check_only mode): `spike_vox/*.npy` caches, `alignment.csv` (event counts
    filled in), `voxel_stats.json` (train split only), `prepared.json` (the pipeline's index) and
    `prepare_log.txt` (every problem and note).
    """
    start = time.time()
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    root = Path(options.root)
    options.representation()   # a bad representation or parameter: one-line DataError before any work
    result = PrepareResult(problems=[], notes=[])
    if not root.is_dir():
        _emit(log, result.problems, DataError(root, "root folder not found", "missing_root"))
        result.fatal = True
        return result
    lock = file_lock(root / LOCK) if not options.check_only else _null_context()
    with lock:
        return _prepare_locked(options, root, result, log, start)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _prepare_locked(options: PrepareOptions, root: Path, result: PrepareResult,
                    log: Callable[[str], None], start: float) -> PrepareResult:
    problems = result.problems
    try:
        info = layout.read_dataset_info(root)
    except DataError as err:
        if err.kind == "unknown_layout":
            from data_pipelines import converters
            try:
                foreign = converters.detect_layout(root)
            except DataError as unknown:
                err = unknown
            else:
                err = DataError(root, f"this is the {converters.LAYOUT_NAMES[foreign]} layout, not ours: convert it "
                                      f"with `python scripts/prepare_data.py --convert_from {root} --root NEW_ROOT`",
                                "unknown_layout")
        _emit(log, problems, err)
        result.fatal = True
        return result
    try:
        rows, row_problems, rejected = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    except DataError as err:
        _emit(log, problems, err)
        result.fatal = True
        return result
    for err in row_problems:
        _emit(log, problems, err)

    listings, root_problems = layout.list_root(root)
    for err in root_problems:
        _emit(log, problems, err)
    for listing in listings:
        for err in listing.problems:
            _emit(log, problems, err)

    # Pair frames with alignment rows.
    frames: List[Tuple[layout.FrameFiles, layout.AlignmentRow]] = []
    listed_seqs = {lst.name for lst in listings}
    usable_seqs = {lst.name for lst in listings if lst.frames}
    seen_keys = set()
    for listing in listings:
        seen_keys.update((listing.name, idx) for idx in listing.dropped)
        for fr in listing.frames:
            row = rows.get((fr.seq, fr.frame_idx))
            seen_keys.add((fr.seq, fr.frame_idx))
            if row is None and (fr.seq, fr.frame_idx) in rejected:
                continue  # its alignment line was already reported
            if row is None:
                _emit(log, problems, DataError(fr.blur, f"missing alignment entry: no line for seq={fr.seq} "
                                                        f"frame_idx={fr.frame_idx} in {layout.ALIGNMENT_CSV}; "
                                                        "the frame is dropped", "missing_alignment"))
                continue
            frames.append((fr, row))
    orphans = collections.defaultdict(list)
    for (seq, idx), row in rows.items():
        if (seq, idx) not in seen_keys and (seq in usable_seqs or seq not in listed_seqs):
            orphans[seq].append(row)
    for seq, seq_rows in sorted(orphans.items()):
        seq_rows.sort(key=lambda r: r.frame_idx)
        where = f"{root / layout.ALIGNMENT_CSV}:{seq_rows[0].line}"
        if seq not in listed_seqs:
            reason = f"{len(seq_rows)} alignment line(s) for {seq}, which has no folder"
        else:
            missing = ", ".join(str(r.frame_idx) for r in seq_rows[:5])
            more = f", ... ({len(seq_rows)} in all)" if len(seq_rows) > 5 else ""
            reason = f"alignment entries for {seq} frame(s) {missing}{more} that have no usable files"
        _emit(log, problems, DataError(where, reason, "missing_alignment"))

    dtype = voxel_dtype_for([row for _, row in frames], options.num_bins)
    journal = {} if (options.check_only or options.overwrite) else _read_journal(root)
    tasks: List[FrameTask] = []
    results: Dict[str, FrameResult] = {}
    for fr, row in frames:
        vox = fr.vox or (fr.blur.parent.parent / layout.SPIKE_VOX / f"{fr.stem}.npy")
        fingerprint = [_stat(str(fr.blur)), _stat(str(fr.sharp)), _stat(None if fr.spike is None else str(fr.spike)),
                       row.t0, row.t1, row.spike_t0, options.num_bins, info.spike_scale, dtype,
                       options.decode_images]
        if fr.spike is None:
            fingerprint.append(_stat(str(vox)))
        task = FrameTask(fr.key, fr.seq.split("/")[0], str(fr.blur), str(fr.sharp),
                         None if fr.spike is None else str(fr.spike), str(vox), vox.exists(), row.t0, row.t1,
                         row.spike_t0, options.num_bins, info.spike_scale, dtype, options.check_only,
                         options.overwrite, options.decode_images, fingerprint)
        rec = journal.get(fr.key)
        if rec is not None and rec.get("fp") == fingerprint and (not rec["ok"] or rec.get("vox_stat") == _stat(str(vox))):
            results[fr.key] = _record_to_result(rec)
            if not rec["ok"]:
                _emit(log, problems, results[fr.key].problem)
            continue
        tasks.append(task)
    reused = len(results)
    if reused:
        result.notes.append(f"{reused} frame(s) unchanged since the last run: reused")

    journal_file = None if options.check_only else _open_journal(root / JOURNAL)

    def on_result(task: FrameTask, res: FrameResult) -> None:
        results[task.key] = res
        if not res.ok:
            _emit(log, problems, res.problem)
        elif res.note:
            result.notes.append(res.note)
        if journal_file is not None:
            journal_file.write(json.dumps(_result_to_record(res, task.fingerprint)) + "\n")
            journal_file.flush()

    try:
        _run_tasks(tasks, options.workers, on_result, options.progress)
    finally:
        if journal_file is not None:
            journal_file.close()

    # Sequence-level size consistency and the index.
    index: Dict[str, list] = {split: [] for split in layout.SPLITS}
    stats = voxelize.VoxelStats(options.num_bins)
    new_rows = dict(rows)
    by_seq: Dict[str, List[Tuple[layout.FrameFiles, layout.AlignmentRow, FrameResult]]] = collections.defaultdict(list)
    for fr, row in frames:
        res = results.get(fr.key)
        if res is not None and res.ok:
            by_seq[fr.seq].append((fr, row, res))
    for seq in sorted(by_seq):
        items = sorted(by_seq[seq], key=lambda x: x[0].frame_idx)
        sizes = collections.Counter((res.height, res.width) for _, _, res in items)
        top = max(sizes.values())
        ref_size = next((res.height, res.width) for _, _, res in items if sizes[(res.height, res.width)] == top)
        ref_frame = next(fr for fr, _, res in items if (res.height, res.width) == ref_size)
        kept = []
        for fr, row, res in items:
            if (res.height, res.width) != ref_size:
                _emit(log, problems, DataError(fr.blur, f"frame of another size: {res.height}x{res.width} (HxW), "
                                                        f"expected {ref_size[0]}x{ref_size[1]} like "
                                                        f"{ref_frame.blur.name} and most of {seq}; the frame is "
                                                        "dropped", "frame_size"))
                continue
            kept.append((fr, row, res))
            if res.histogram is not None:
                new_rows[(fr.seq, fr.frame_idx)] = dataclasses.replace(row, event_count=res.event_count)
        if not kept:
            continue
        split = seq.split("/")[0]
        if split == "train":
            for _, _, res in kept:
                if res.histogram is not None:
                    stats.add_histogram(res.histogram)
        index[split].append({
            "name": seq, "height": ref_size[0], "width": ref_size[1],
            "frames": [[fr.frame_idx, fr.stem, row.t0, row.t1, res.event_count, res.vox_offset]
                       for fr, row, res in kept],
        })
    for split in layout.SPLITS:
        result.kept_sequences[split] = len(index[split])
        result.kept_frames[split] = sum(len(s["frames"]) for s in index[split])
    if not result.kept_frames["train"]:
        _emit(log, problems, DataError(root / "train", "no usable train frame is left", "empty_sequence"))
        result.fatal = True
    if stats.num_values:
        try:
            result.stats = stats.mean_std()
        except DataError:
            result.stats = None
    if not options.check_only and not result.fatal:
        if result.stats is None or not result.stats[1] > 0:
            _emit(log, problems, DataError(root / layout.STATS_JSON, "the train split has no spikes at all "
                                                                     "(std of log1p counts is 0)", "bad_voxels"))
            result.fatal = True
        else:
            stats_json = stats.to_json()
            stats_json["num_frames"] = result.kept_frames["train"]
            atomic_write_json(root / layout.STATS_JSON, stats_json)
            result.stats_written = True
            layout.write_alignment(root / layout.ALIGNMENT_CSV, new_rows.values())
            atomic_write_json(root / layout.PREPARED_JSON, {
                "format": PREPARED_FORMAT, "version": PREPARED_VERSION, "num_bins": options.num_bins,
                "spike_scale": info.spike_scale, "voxel_dtype": dtype, "tick_rate_hz": info.tick_rate_hz,
                "source_layout": info.source_layout, "shared_clock": bool(info.shared_clock),
                "converter_version": info.converter_version, "splits": index,
                "num_problems": len(problems),
            }, compact=True)
    representation = options.representation()
    if not representation.is_voxel and not options.check_only and not result.fatal:
        rep_problems, rep_stats = _prepare_representation(root, representation, options.workers,
                                                          options.overwrite, options.progress)
        for err in rep_problems:
            _emit(log, problems, err)
        if rep_stats is None:
            result.fatal = True
        else:
            result.representation_stats = (representation.tag,) + rep_stats
    result.seconds = time.time() - start
    if not options.check_only:
        lines = [f"prepare_data on {root} ({time.strftime('%Y-%m-%d %H:%M:%S')}), {result.seconds:.1f} s"]
        lines += [f"problem: {p.message}" for p in problems]
        lines += [f"note: {n}" for n in result.notes]
        lines.append(summary_line(result))
        atomic_write_text(root / layout.PREPARE_LOG, "\n".join(lines) + "\n")
    return result


def summary_line(result: PrepareResult) -> str:
    splits = [split for split in layout.SPLITS
              if split not in layout.OPTIONAL_SPLITS or result.kept_sequences.get(split, 0)]
    kept = ", ".join(f"{split}: {result.kept_frames.get(split, 0)} frames in {result.kept_sequences.get(split, 0)} "
                     f"sequences" for split in splits)
    stats = "" if result.stats is None else f"; voxel log1p mean {result.stats[0]:.6g}, std {result.stats[1]:.6g}"
    if result.representation_stats is not None:
        stats += "; {} mean {:.6g}, std {:.6g}".format(*result.representation_stats)
    return f"kept {kept}; {len(result.problems)} problem(s){stats}"


# ------------------------------------------------------------------------------ other representations


@dataclasses.dataclass
class RepresentationTask:
    """One frame's cache of a non-voxel representation: read its .dat, compute, write float16 (spike_input)."""

    key: str
    spike: str
    out: str
    t0: float
    t1: float
    spike_t0: float
    height: int        # of the spike frames
    width: int
    representation: spike_input.Representation
    fingerprint: list


@dataclasses.dataclass
class RepresentationResult:
    key: str
    ok: bool
    problem: Optional[DataError] = None
    sums: Optional[list] = None        # spike_input.ValueStats.sums_of the cached values
    offset: int = 0
    stat: Optional[list] = None        # size and mtime of the cache file

    def record(self, fingerprint: list) -> dict:
        if self.ok:
            return {"key": self.key, "fp": fingerprint, "ok": True, "sums": self.sums, "offset": self.offset,
                    "stat": self.stat}
        return {"key": self.key, "fp": fingerprint, "ok": False,
                "problem": [self.problem.path, self.problem.reason, self.problem.kind]}

    @classmethod
    def from_record(cls, rec: dict) -> "RepresentationResult":
        if rec["ok"]:
            return cls(rec["key"], True, sums=rec["sums"], offset=rec["offset"], stat=rec["stat"])
        return cls(rec["key"], False, problem=DataError(*rec["problem"]))


def process_representation(task: RepresentationTask) -> RepresentationResult:
    """Computes and writes one frame's cache; bad data (a DataError) is the result's problem."""
    try:
        values = exposure_input(task.spike, task.t0, task.t1, task.spike_t0, task.height, task.width,
                                task.representation)
    except DataError as err:
        return RepresentationResult(task.key, False, problem=err)
    atomic_save_npy(task.out, values)
    return RepresentationResult(task.key, True, sums=spike_input.ValueStats.sums_of(values),
                                offset=layout.voxel_header(task.out)[2], stat=_stat(task.out))


def _representation_tasks(root: Path, representation: spike_input.Representation, prepared: dict,
                          journal: Dict[str, dict], results: Dict[str, RepresentationResult]):
    """The frames of the index to (re)build, and their order [(split, key)]; journaled ones go to `results`."""
    rows, _, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    f = int(prepared["spike_scale"])
    tasks, order = [], []
    for split, seqs in prepared["splits"].items():
        for seq in seqs:
            hs, ws = int(seq["height"]) // f, int(seq["width"]) // f
            for frame_idx, stem, *_ in seq["frames"]:
                key = f"{seq['name']}/{stem}"
                order.append((split, key))
                spike = root / seq["name"] / layout.SPIKE / f"{stem}.dat"
                out = root / seq["name"] / representation.cache_dir / f"{stem}.npy"
                if not spike.is_file():
                    results[key] = RepresentationResult(key, False, problem=DataError(
                        spike, f"not found: the {representation.kind} representation is computed from the spike "
                               "frames (this frame has only spike_vox/ counts)", "missing_folder"))
                    continue
                row = rows[(seq["name"], int(frame_idx))]
                fingerprint = [_stat(str(spike)), row.t0, row.t1, row.spike_t0, hs, ws, representation.tag,
                               spike_input.CACHE_DTYPE.str]
                rec = journal.get(key)
                if rec is not None and rec.get("fp") == fingerprint and (not rec["ok"] or
                                                                         rec.get("stat") == _stat(str(out))):
                    results[key] = RepresentationResult.from_record(rec)
                    continue
                tasks.append(RepresentationTask(key, str(spike), str(out), row.t0, row.t1, row.spike_t0, hs, ws,
                                                representation, fingerprint))
    return tasks, order


def _prepare_representation(root: Path, representation: spike_input.Representation, workers: int = 1,
                            overwrite: bool = False, progress: bool = False
                            ) -> Tuple[List[DataError], Optional[Tuple[float, float]]]:
    """Builds a non-voxel representation's caches and `spike_stats_<tag>.json` for the frames of prepared.json
    (the caller holds the root's lock). A cache is reused only when its journal record matches its inputs and the
    file is unchanged. Returns (problems, (mean, std)); with any problem nothing vouches for the caches: the
    statistics file is not written (an older one is removed) and the stats are None."""
    prepared = read_prepared(root, num_bins=representation.num_bins)
    journal_name = f".prepare_journal_{representation.tag}.jsonl"
    results: Dict[str, RepresentationResult] = {}
    tasks, order = _representation_tasks(root, representation, prepared,
                                         {} if overwrite else _read_journal(root, journal_name), results)
    with _open_journal(root / journal_name) as journal_file:
        def on_result(task: RepresentationTask, res: RepresentationResult) -> None:
            results[task.key] = res
            journal_file.write(json.dumps(res.record(task.fingerprint)) + "\n")
            journal_file.flush()

        _run_tasks(tasks, workers, on_result, progress, process_representation)
    stats_path = root / representation.stats_name
    problems = [results[key].problem for _, key in order if not results[key].ok]
    stats = spike_input.ValueStats()
    for split, key in order:
        if split == "train" and results[key].ok:
            stats.add_sums(results[key].sums)
    mean, std = stats.mean_std()
    if not problems and not std > 0:
        problems.append(DataError(stats_path, f"the train split has no {representation.kind} values to normalise "
                                              f"with (std of {stats.count} values is 0)", "bad_voxels"))
    if problems:
        stats_path.unlink(missing_ok=True)
        return problems, None
    atomic_write_json(stats_path, {
        "format": spike_input.STATS_FORMAT, "version": spike_input.STATS_VERSION, "tag": representation.tag,
        "representation": representation.kind, "num_bins": representation.num_bins, **representation.params(),
        "cache_dir": representation.cache_dir, "dtype": spike_input.CACHE_DTYPE.name,
        "transform": "(x - mean) / std", "split": "train", "mean": mean, "std": std,
        "num_frames": sum(split == "train" for split, _ in order), "num_values": stats.count,
        "index_digest": spike_input.index_digest(prepared["splits"]),
        "offsets": {key: results[key].offset for _, key in order},
    })
    return [], (mean, std)


def ensure_representation(root, representation: spike_input.Representation) -> None:
    """Builds `representation` on a prepared root unless its statistics file is current (the embedded dataset's
    first use of a representation). Safe with several processes (the root's lock). Raises the first DataError."""
    root = Path(root)
    if representation.is_voxel or _representation_current(root, representation):
        return
    with file_lock(root / LOCK):
        if _representation_current(root, representation):
            return
        problems, _ = _prepare_representation(root, representation)
        if problems:
            raise problems[0]


def _representation_current(root: Path, representation: spike_input.Representation) -> bool:
    try:
        spike_input.read_stats(root / representation.stats_name, representation, read_prepared(root)["splits"])
    except DataError:
        return False
    return True


# ------------------------------------------------------------------------------------------- reading


# Source layouts whose earlier conversions (no converter_version) put the official test split into val.
GOPRO_LAYOUTS = ("spk_gopro_ssdm", "spk_gopro_spkdeblurnet")


def read_prepared(root, num_bins: Optional[int] = None, spike_scale: Optional[int] = None) -> dict:
    """Reads ROOT/prepared.json and checks it against the config. Raises DataError with the fix in the message."""
    path = Path(root) / layout.PREPARED_JSON
    if not path.exists():
        raise DataError(path, f"not found: run `python scripts/prepare_data.py --root {root}` first", "bad_manifest")
    try:
        with open(path, "r", encoding="utf-8") as f:
            prepared = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(path, f"unreadable JSON ({err})", "bad_manifest") from None
    if prepared.get("format") != PREPARED_FORMAT or prepared.get("version") != PREPARED_VERSION:
        raise DataError(path, f"expected format {PREPARED_FORMAT} v{PREPARED_VERSION}, found "
                              f"{prepared.get('format')} v{prepared.get('version')}: rerun prepare_data", "bad_manifest")
    if prepared.get("source_layout") in GOPRO_LAYOUTS and not prepared.get("converter_version"):
        raise DataError(path, f"converted from {prepared['source_layout']} by a converter before version 2, which stored "
                              "GoPro's test split as val (so `best` was selected on the test set) and renumbered frames "
                              "across gaps: convert the source again into an empty --root (scripts/prepare_data.py "
                              "--convert_from ...)", "bad_manifest")
    if num_bins is not None and prepared["num_bins"] != int(num_bins):
        raise DataError(path, f"prepared with num_bins={prepared['num_bins']}, the config asks for {num_bins}: rerun "
                              f"`prepare_data.py --root {root} --num_bins {num_bins}`", "config")
    if spike_scale is not None and prepared["spike_scale"] != int(spike_scale):
        raise DataError(path, f"the data has spike_scale={prepared['spike_scale']} (RGB/spike size ratio in "
                              f"dataset.json), the config says spike_scale={spike_scale}", "config")
    return prepared
