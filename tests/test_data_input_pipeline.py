"""Input pipeline: deterministic batches, exact process shards, resume at step s, TF == numpy loading, eval
coverage, config checks, embedded dataset on first use."""
import dataclasses
import logging

import numpy as np
import pytest

from data_pipelines import input_pipeline as ip
from data_pipelines import layout, prepare
from data_pipelines.errors import DataError
from helpers import TINY_SPEC, make_tiny_root

KEYS = ("blur", "sharp", "spike_vox", "sample_id", "frame_idx", "t0", "t1")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    return {1: make_tiny_root(base / "f1"), 2: make_tiny_root(base / "f2", spike_scale=2)}


def _config(root, spike_scale=1, crop=16, **kw):
    cfg = ip.default_data_config()
    cfg.root = str(root)
    cfg.spike_scale = spike_scale
    cfg.crop_size = crop
    cfg.vflip = True
    cfg.num_parallel_calls = 2
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    for key in KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_default_config_fields():
    cfg = ip.default_data_config()
    assert cfg.root is None and cfg.clip_length == 5 and cfg.crop_size == 256 and cfg.num_bins == 32
    assert cfg.spike_scale == 1 and cfg.hflip is True and cfg.stats_file is None
    assert cfg.embedded_dir.endswith("vrtspike_jax") and cfg.embedded.height == 128
    assert {"num_parallel_calls", "prefetch", "embedded_dir"} <= set(cfg.keys())
    # None-valued fields are typed, so command-line overrides (--config.data.root=DIR) can set them.
    assert cfg.get_type("root") is str and cfg.get_type("stats_file") is str and cfg.get_type("crop_size") is int


def test_batch_layout_and_values(roots):
    it = ip.create_train_iterator(_config(roots[2], spike_scale=2), global_batch_size=3, seed=0,
                                  process_index=0, process_count=1)
    batch = next(it)
    assert batch["blur"].shape == (3, 5, 16, 16, 3) and batch["blur"].dtype == np.float32
    assert batch["sharp"].shape == (3, 5, 16, 16, 3)
    assert batch["spike_vox"].shape == (3, 5, 8, 8, 32) and batch["spike_vox"].dtype == np.float32
    assert batch["sample_id"].shape == (3,) and batch["sample_id"].dtype == np.int32
    assert batch["frame_idx"].shape == (3, 5) and batch["frame_idx"].dtype == np.int32
    assert 0.0 <= batch["blur"].min() and batch["blur"].max() <= 1.0
    assert np.isfinite(batch["spike_vox"]).all()
    np.testing.assert_array_equal(np.diff(batch["frame_idx"], axis=1), 1)       # consecutive frames
    name = it.sample_name(batch["sample_id"][0])
    assert name.startswith("train/") and name.endswith(f"@{batch['frame_idx'][0, 0]}")
    assert it.num_samples == 9 and len(ip.train_sample_names(_config(roots[2], spike_scale=2))) == 9
    assert it.exclusion_counts() == {"excluded_runs": 0, "excluded_frames": 0, "window_breaks": 0,
                                     "prepare_problems": 0, "num_frames": 21, "num_clips": 9}


def test_same_seed_same_batches_other_seed_other_batches(roots):
    cfg = _config(roots[1])
    a = _take(ip.create_train_iterator(cfg, global_batch_size=4, seed=5, process_index=0, process_count=1), 3)
    b = _take(ip.create_train_iterator(cfg, global_batch_size=4, seed=5, process_index=0, process_count=1), 3)
    c = _take(ip.create_train_iterator(cfg, global_batch_size=4, seed=6, process_index=0, process_count=1), 3)
    for x, y in zip(a, b):
        _assert_batches_equal(x, y)
    assert any((x["sample_id"] != z["sample_id"]).any() or (x["blur"] != z["blur"]).any() for x, z in zip(a, c))


@pytest.mark.parametrize("scale", [1, 2])
def test_process_shards_partition_each_global_batch_exactly(roots, scale):
    cfg = _config(roots[scale], spike_scale=scale)
    whole = _take(ip.create_train_iterator(cfg, global_batch_size=4, seed=1, process_index=0, process_count=1), 4)
    parts = [_take(ip.create_train_iterator(cfg, global_batch_size=4, seed=1, process_index=p, process_count=2), 4)
             for p in range(2)]
    for step in range(4):
        for key in KEYS:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]),
                                          whole[step][key], err_msg=f"step {step} {key}")


def test_resume_at_step_s_gives_step_s_batch(roots):
    cfg = _config(roots[1])
    run = _take(ip.create_train_iterator(cfg, global_batch_size=4, seed=2, process_index=0, process_count=1), 6)
    for s in (1, 2, 5):        # 9 clips, 4 per step: steps 2 and 5 straddle epoch boundaries
        resumed = ip.create_train_iterator(cfg, global_batch_size=4, seed=2, start_step=s, process_index=0,
                                           process_count=1)
        _assert_batches_equal(next(resumed), run[s])
        assert resumed.step == s + 1


def test_each_epoch_is_a_permutation_and_epochs_differ(roots):
    index = ip.build_index(roots[1], "train", 5, 32, 1)
    planner = ip.SamplePlanner(index, seed=3, crop_size=16, hflip=True, vflip=True)
    n = index.num_clips
    e0 = [planner.plan(g)[0] for g in range(n)]
    e1 = [planner.plan(g)[0] for g in range(n, 2 * n)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1
    np.testing.assert_array_equal(ip.epoch_permutation(3, 0, n), e0)
    # The order is fixed by our own hash (no library RNG), checked against a plain-Python reference.
    np.testing.assert_array_equal(ip.epoch_permutation(123, 7, 50), _reference_permutation(123, 7, 50))
    crops = {planner.plan(g)[1:3] for g in range(200)}
    assert all(0 <= y <= 16 and 0 <= x <= 16 for y, x in crops) and len(crops) > 50
    flips = [planner.plan(g)[3:] for g in range(200)]
    assert 60 < sum(h for h, _ in flips) < 140 and 60 < sum(v for _, v in flips) < 140


_MASK = (1 << 64) - 1


def _reference_splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _reference_permutation(seed, epoch, n):
    def key(i):
        h = 0
        for part in (seed, 0x5EED, epoch, i):
            h = _reference_splitmix64(h ^ (part & _MASK))
        return h
    return sorted(range(n), key=key)


def test_splitmix64_known_value():
    # First output of the SplitMix64 generator seeded with 0 (Steele, Lea, Flood 2014; Vigna's reference code).
    assert int(ip.splitmix64(0)[0]) == 0xE220A8397B1DCDAF == _reference_splitmix64(0)


@pytest.mark.parametrize("scale", [1, 2])
def test_tensorflow_loading_equals_numpy_loading(roots, scale):
    cfg = _config(roots[scale], spike_scale=scale)
    it = ip.create_train_iterator(cfg, global_batch_size=3, seed=4, start_step=2, process_index=0, process_count=1)
    batch = next(it)
    mean, std = it.stats
    for j in range(3):
        clip, y, x, hf, vf = it.planner.plan(2 * 3 + j)
        assert y % scale == 0 and x % scale == 0
        ref = ip.load_clip(it.index, clip, mean, std, y=y, x=x, crop_size=16, hflip=hf, vflip=vf)
        for key in KEYS:
            np.testing.assert_array_equal(batch[key][j], ref[key], err_msg=key)   # one definition: exactly equal
        # The spike crop is the RGB crop scaled by f.
        full = ip.load_clip(it.index, clip, mean, std)
        np.testing.assert_array_equal(ip.load_clip(it.index, clip, mean, std, y=y, x=x, crop_size=16)["spike_vox"],
                                      full["spike_vox"][:, y // scale:(y + 16) // scale, x // scale:(x + 16) // scale])


def test_open_train_iterators_are_closed_at_exit(roots):
    # tf.data's threads run Python (the plan, finish_sample): an iterator left open for the interpreter's final
    # clean-up could wait there forever, so an atexit function closes every open one first.
    it = ip.create_train_iterator(_config(roots[1]), global_batch_size=2, seed=0, process_index=0, process_count=1)
    next(it)
    assert it in ip._OPEN_TRAIN_ITERATORS
    ip._close_train_iterators()
    with pytest.raises(StopIteration):
        next(it)
    assert it.step == 1


def test_eval_clips_cover_every_frame_once(roots):
    assert [(s, m.tolist()) for s, m in ip.eval_clips(12, 5)] == [
        (0, [True] * 5), (5, [True] * 5), (7, [False, False, False, True, True])]
    assert ip.eval_clips(4, 5) == [] and len(ip.eval_clips(10, 5)) == 2
    cfg = _config(roots[2], spike_scale=2)
    batches = list(ip.create_eval_iterator(cfg, process_index=0, process_count=1))
    counted = []
    for b in batches:
        assert b["blur"].shape == (1, 5, 32, 32, 3) and b["spike_vox"].shape == (1, 5, 16, 16, 32)
        assert isinstance(b["seq"], str) and b["seq"].startswith("val/")
        counted += b["frame_idx"][0][b["eval_mask"][0]].tolist()
    assert sorted(counted) == list(range(6))           # val has 6 frames: clips [0..4] and [1..5] (mask: 5)
    shards = [list(ip.create_eval_iterator(cfg, process_index=p, process_count=3)) for p in range(3)]
    assert len({len(s) for s in shards}) == 1           # padded to the same length
    counted = [i for s in shards for b in s for i in b["frame_idx"][0][b["eval_mask"][0]].tolist()]
    assert sorted(counted) == list(range(6))


def test_config_disagreements_are_clear_errors(roots, tmp_path):
    with pytest.raises(DataError, match="num_bins=32, the config asks for 16"):
        ip.create_train_iterator(_config(roots[1], num_bins=16), global_batch_size=2, seed=0, process_index=0,
                                 process_count=1)
    with pytest.raises(DataError, match="spike_scale=2 .* the config says spike_scale=1"):
        ip.create_eval_iterator(_config(roots[2], spike_scale=1), process_index=0, process_count=1)
    with pytest.raises(DataError, match="crop_size 64 is larger than the frames"):
        ip.create_train_iterator(_config(roots[1], crop=64), global_batch_size=2, seed=0, process_index=0,
                                 process_count=1)
    with pytest.raises(DataError, match="not a multiple of spike_scale 2"):
        ip.create_train_iterator(_config(roots[2], spike_scale=2, crop=15), global_batch_size=2, seed=0,
                                 process_index=0, process_count=1)
    with pytest.raises(DataError, match="voxel statistics file not found"):
        ip.create_train_iterator(_config(roots[1], stats_file=str(tmp_path / "none.json")), global_batch_size=2,
                                 seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not a multiple of process_count 3"):
        ip.create_train_iterator(_config(roots[1]), global_batch_size=4, seed=0, process_index=0, process_count=3)
    with pytest.raises(DataError, match="prepare_data"):
        ip.create_train_iterator(_config(tmp_path), global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_embedded_dataset_on_first_use(tmp_path):
    cfg = ip.default_data_config()
    cfg.embedded_dir = str(tmp_path / "cache")
    for key, value in dataclasses.asdict(TINY_SPEC).items():
        cfg.embedded[key] = value
    cfg.crop_size = None
    root = ip.ensure_embedded_dataset(cfg, log=lambda s: None)
    assert root.parent == tmp_path / "cache" and (root / "READY").exists()
    it = ip.create_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
    assert it.root == root and next(it)["blur"].shape == (2, 5, 32, 32, 3)
    assert ip.ensure_embedded_dataset(cfg, log=lambda s: None) == root     # reused, not rebuilt


# ------------------------------------------------------------------- runs: frames consecutive in time only


def test_split_runs_needs_consecutive_numbers_and_chaining_windows():
    idx = np.arange(6)
    # Spk-X4K1000FPS: 33-tick windows whose centres are 15 ticks apart (overlapping windows) form one run.
    t0 = 15.0 * idx
    assert ip.split_runs(idx, t0, t0 + 32) == ([(0, 6)], [])
    # A window that jumps by two periods (a frame missing in between) or goes backwards starts a new run.
    jump = t0.copy()
    jump[3:] += 15
    runs, breaks = ip.split_runs(idx, jump, jump + 32)
    assert runs == [(0, 3), (3, 6)] and [i for i, _ in breaks] == [3]
    assert "2 and 3: exposure window [60, 92] does not follow [30, 62] by one frame period (15 ticks)" in breaks[0][1]
    back = t0.copy()
    back[4:] -= 100
    assert ip.split_runs(idx, back, back + 32)[0] == [(0, 4), (4, 6)]
    # A window that stays (same t0) or changes length by more than a quarter period also breaks the run.
    assert ip.split_runs(np.arange(3), np.array([0.0, 64, 64]), np.array([63.0, 127, 127]))[0] == [(0, 2), (2, 3)]
    assert ip.split_runs(np.arange(3), np.array([0.0, 64, 128]), np.array([63.0, 127, 160]))[0] == [(0, 2), (2, 3)]
    # Windows with a gap between exposures (S-SDM: 97-tick windows every 104 ticks) chain, jitter within P/4 too.
    ssdm = np.array([104.0, 208, 312, 419])
    assert ip.split_runs(np.arange(4), ssdm, ssdm + 96)[0] == [(0, 4)]
    # A gap in the frame numbers always splits; without a shared clock only the numbers count.
    assert ip.split_runs(np.array([0, 1, 3, 4]), 15.0 * np.arange(4), 15.0 * np.arange(4) + 32)[0] == [(0, 2), (2, 4)]
    local = np.full(4, 7.0)
    assert ip.split_runs(np.arange(4), local, local + 55, shared_clock=False) == ([(0, 4)], [])
    assert ip.split_runs(np.arange(4), local, local + 55)[0] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _shift_windows(root, seq: str, first_frame: int, ticks: float) -> None:
    """Moves the windows (and spike time bases) of frames >= first_frame of `seq` by `ticks` in alignment.csv."""
    rows, problems, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    assert not problems
    moved = [dataclasses.replace(r, t0=r.t0 + ticks, t1=r.t1 + ticks, spike_t0=r.spike_t0 + ticks)
             if r.seq == seq and r.frame_idx >= first_frame else r for r in rows.values()]
    layout.write_alignment(root / layout.ALIGNMENT_CSV, moved)


@pytest.mark.parametrize("ticks", [64.0, -320.0])      # a jump of 2 periods (32 ticks each); backwards
def test_no_clip_across_a_time_gap_and_exclusions_are_logged_and_counted(tmp_path, caplog, ticks):
    root = make_tiny_root(tmp_path / "root", prepare_it=False)
    seq = sorted(f"train/{p.name}" for p in (root / "train").iterdir())[0]
    _shift_windows(root, seq, 4, ticks)                 # frames 0..3, then 4..6 after a time gap
    result = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert result.exit_code == 0                        # every frame is sound on its own
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        index = ip.build_index(root, "train", 3, 32, 1)
    for c in range(index.num_clips):
        rows = index.clip_rows(c)
        np.testing.assert_array_equal(np.diff(index.row_t0[rows]), 32.0)      # windows chain inside every clip
    ours = sorted(int(index.row_frame_idx[s]) for s in index.clip_start if index.seq_names[index.row_seq[s]] == seq)
    assert ours == [0, 1, 4]                            # runs 0..3 and 4..6: nothing starts at 2 or 3
    assert index.num_clips == 3 + 2 * 5 and index.window_breaks == 1 and index.excluded_runs == 0
    breaks = [r.getMessage() for r in caplog.records if "clips are not built across" in r.getMessage()]
    assert len(breaks) == 1 and seq in breaks[0] and "3 and 4" in breaks[0]
    # With T = 5 both runs are too short: each is logged once (naming the frames) and counted.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        index = ip.build_index(root, "train", 5, 32, 1)
        again = ip.build_index(root, "train", 5, 32, 1)
    short = [r.getMessage() for r in caplog.records if "shorter than the clip length" in r.getMessage()]
    assert len(short) == 2                              # once per exclusion, not once per index build
    assert any(f"{seq} frames 0..3: run of 4 frame(s)" in m for m in short)
    assert any(f"{seq} frames 4..6: run of 3 frame(s)" in m for m in short)
    counts = index.exclusion_counts()
    assert counts == again.exclusion_counts()
    assert counts["excluded_runs"] == 2 and counts["excluded_frames"] == 7 and counts["window_breaks"] == 1
    assert counts["prepare_problems"] == 0 and counts["num_frames"] == 21 and counts["num_clips"] == 2 * 3


def test_eval_iterator_reports_exclusions_and_missing_splits(roots):
    it = ip.create_eval_iterator(_config(roots[1], clip_length=4), process_index=0, process_count=1)
    assert it.exclusion_counts() == it.index.exclusion_counts()
    assert it.exclusion_counts()["excluded_runs"] == 0 and it.exclusion_counts()["num_frames"] == 6
    with pytest.raises(DataError, match="no clip of T=7 consecutive frames .*run of 6 frame"):
        ip.create_eval_iterator(_config(roots[1], clip_length=7), process_index=0, process_count=1)
    with pytest.raises(DataError, match="no split 'holdout': the prepared splits are test, train, val"):
        ip.build_index(roots[1], "holdout", 5, 32, 1)
