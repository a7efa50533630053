"""Voxeliser: in-window spikes all kept, out-of-window dropped, exact bin edges, closed window, statistics."""
import json

import numpy as np
import pytest

from data_pipelines import simulate, voxelize
from data_pipelines.errors import DataError


def test_in_window_kept_out_of_window_dropped_never_clipped():
    rng = np.random.default_rng(0)
    spikes = rng.random((60, 5, 7)) < 0.4
    times = np.arange(60) - 10.0          # frames at -10 .. 49
    t0, t1 = 0.0, 32.0
    counts = voxelize.voxelize(spikes, times, t0, t1, num_bins=8)
    assert counts.dtype == np.float32 and counts.shape == (8, 5, 7)
    inside = (times >= t0) & (times <= t1)
    np.testing.assert_array_equal(counts.sum(0), spikes[inside].sum(0))
    # The edge bins hold exactly their own frames, nothing from outside the window.
    np.testing.assert_array_equal(counts[0], spikes[10:14].sum(0))            # t = 0..3
    np.testing.assert_array_equal(counts[7], spikes[38:43].sum(0))            # t = 28..32 (32 = t1)


def test_bin_edges_exact_and_t1_in_last_bin():
    k = 32
    t0, t1 = 100.0, 164.0              # bin width 2
    times = np.array([100, 101.999, 102, 103, 162, 163.9999, 164, 99.999, 164.001])
    bins, inside = voxelize.bin_indices(times, t0, t1, k)
    np.testing.assert_array_equal(inside, [1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(bins[inside], [0, 0, 1, 1, 31, 31, 31])
    # Every representable edge t0 + b*(t1-t0)/K opens bin b.
    for t0, t1, k in [(0.0, 33.0, 32), (0.0, 33.0, 3), (-7.5, 58.0, 32), (0.0, 96.0, 32)]:
        edges = [t0 + b * (t1 - t0) / k for b in range(k)]
        got, ok = voxelize.bin_indices(edges, t0, t1, k)
        assert ok.all()
        np.testing.assert_array_equal(got, np.arange(k))
    # Integer ticks against exact integer arithmetic, also where K does not divide the window length.
    for t0, t1, k in [(0, 63, 32), (17, 113, 32), (0, 32, 32), (4, 140, 7)]:
        ticks = np.arange(t0, t1 + 1)
        got, ok = voxelize.bin_indices(ticks, t0, t1, k)
        want = np.minimum((ticks - t0) * k // (t1 - t0), k - 1)
        assert ok.all()
        np.testing.assert_array_equal(got, want)


def test_integer_ticks_33_frames_32_bins():
    # Spk-X4K1000FPS: 33 spike frames per exposure, K = 32: one frame per bin, the closing frame in the last.
    per_bin = voxelize.frames_per_bin(np.arange(33), 0, 32, 32)
    np.testing.assert_array_equal(per_bin, [1] * 31 + [2])
    assert per_bin.sum() == 33


def test_unsorted_frame_times_and_agreement_with_a_plain_loop():
    rng = np.random.default_rng(1)
    spikes = rng.random((25, 3, 4)) < 0.5
    times = rng.uniform(-3, 15, size=25)
    counts = voxelize.voxelize(spikes, times, 0.0, 12.0, num_bins=5)
    ref = np.zeros((5, 3, 4), np.float32)
    for s, t in zip(spikes, times):
        if 0.0 <= t <= 12.0:
            ref[min(int(np.floor(t * 5 / 12.0)), 4)] += s
    np.testing.assert_array_equal(counts, ref)


@pytest.mark.parametrize("intensity,threshold", [(0.5, 1.0), (0.8, 2.0), (0.25, 1.0)])
def test_static_scene_count_per_bin_is_intensity_times_frames_over_threshold(intensity, threshold):
    frames_total, k = 640, 32        # 20 frames per bin
    grey = np.full((frames_total, 40, 40), intensity, np.float32)
    spikes = simulate.simulate_spikes(grey, threshold=threshold, seed=3)
    times = np.arange(frames_total, dtype=np.float64)
    t1 = frames_total - 1
    counts = voxelize.voxelize(spikes, times, 0.0, t1, k)
    per_bin = voxelize.frames_per_bin(times, 0.0, t1, k)
    expected = intensity * per_bin / threshold                    # [K]
    # Mean over 1600 pixels (random initial phase) matches I * frames / threshold closely ...
    np.testing.assert_allclose(counts.mean(axis=(1, 2)), expected, atol=0.05)
    # ... and every pixel's count over a bin is floor or ceil of it (deterministic integrate-and-fire).
    assert (counts >= np.floor(expected)[:, None, None]).all()
    assert (counts <= np.ceil(expected)[:, None, None]).all()
    np.testing.assert_allclose(counts.sum() / (40 * 40), intensity * frames_total / threshold, atol=1.0)


def test_window_errors():
    spikes = np.zeros((4, 2, 2), bool)
    with pytest.raises(DataError) as err:
        voxelize.voxelize(spikes, np.arange(4), 3.0, 3.0)
    assert err.value.kind == "bad_alignment" and "t1 > t0" in str(err.value)
    with pytest.raises(DataError):
        voxelize.voxelize(spikes, np.arange(4), 0.0, float("nan"))
    with pytest.raises(ValueError):
        voxelize.voxelize(spikes, np.arange(3), 0.0, 3.0)


def test_stats_exact_from_histograms_and_order_independent(tmp_path):
    rng = np.random.default_rng(2)
    grids = [rng.integers(0, 5, size=(4, 3, 3)) for _ in range(5)]
    a = voxelize.VoxelStats(4)
    for g in grids:
        a.add(g)
    b = voxelize.VoxelStats(4)
    for g in reversed(grids):
        b.add_histogram(voxelize.VoxelStats.histogram_of(g))
    values = np.log1p(np.stack(grids).astype(np.float64))
    mean, std = a.mean_std()
    assert mean == pytest.approx(values.mean(), rel=1e-12) and std == pytest.approx(values.std(), rel=1e-12)
    assert b.mean_std() == a.mean_std()
    path = tmp_path / "voxel_stats.json"
    path.write_text(json.dumps(a.to_json()))
    assert voxelize.load_stats(path, num_bins=4) == pytest.approx((mean, std))
    with pytest.raises(DataError) as err:
        voxelize.load_stats(path, num_bins=32)
    assert err.value.kind == "config"
    norm = voxelize.normalize(grids[0], mean, std)
    np.testing.assert_allclose(norm, (np.log1p(grids[0]) - mean) / std, rtol=1e-6)


def test_shift_timeline_moves_bins_across_exposures_and_fills_the_vacated_end():
    # 2 exposures x K = 3 bins of a 1x1 spike image: timeline [1 2 3 | 4 5 6].
    vox = np.arange(1, 7, dtype=np.float32).reshape(2, 3)[:, None, None, :]       # [T, h, w, K]
    later = voxelize.shift_timeline(vox, 2, fill=-9.0)
    np.testing.assert_array_equal(later[:, 0, 0], [[-9, -9, 1], [2, 3, 4]])
    earlier = voxelize.shift_timeline(vox[None], -1, fill=0.5)[0]                  # a batch axis in front
    np.testing.assert_array_equal(earlier[:, 0, 0], [[2, 3, 4], [5, 6, 0.5]])
    np.testing.assert_array_equal(voxelize.shift_timeline(vox, 0, fill=0.0), vox)
    with pytest.raises(ValueError, match="leaves nothing"):
        voxelize.shift_timeline(vox, 6, fill=0.0)
