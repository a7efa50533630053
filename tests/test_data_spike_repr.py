"""TFP / TFI / raw windows (data_pipelines/spike_repr.py) against hand-computed values on a small stream."""
import numpy as np
import pytest

from data_pipelines import spike_repr, voxelize

# Two pixels over ticks 100..111; the exposure window is [101, 110], so ticks 100 and 111 are outside.
TIMES = np.arange(100, 112, dtype=np.float64)
A_SPIKES = (100, 102, 105, 106, 110, 111)
B_SPIKES = (101, 104)
T0, T1 = 101.0, 110.0


def _stream():
    spikes = np.zeros((TIMES.size, 1, 2), np.uint8)
    for tick in A_SPIKES:
        spikes[tick - 100, 0, 0] = 1
    for tick in B_SPIKES:
        spikes[tick - 100, 0, 1] = 1
    return spikes


def test_instants_are_the_voxel_bin_centres_and_ties_go_to_the_later_frame():
    np.testing.assert_allclose(spike_repr.instants(T0, T1, 2), [103.25, 107.75])
    # K = 2 keys: 103.25 -> 103, 107.75 -> 108.
    np.testing.assert_array_equal(spike_repr.key_positions(TIMES[1:11], spike_repr.instants(T0, T1, 2)), [2, 7])
    # 10 frames 0..9, one instant at 4.5: frame 5 = L // 2 (the synthesised ground truth's index).
    assert spike_repr.key_positions(np.arange(10.0), spike_repr.instants(0, 9, 1))[0] == 5


def test_tfp_counts_a_centred_window_clipped_by_the_exposure():
    spikes = _stream()
    # h = 1: key 103 -> ticks 102..104 (A: 102; B: 104); key 108 -> 107..109 (none).
    np.testing.assert_allclose(spike_repr.tfp(spikes, TIMES, T0, T1, 2, 1)[:, 0],
                               [[1 / 3, 1 / 3], [0.0, 0.0]])
    # h = 3: key 103 -> 100..106 clipped to 101..106 (6 frames; A's spike at 100 is outside and dropped):
    # A 102, 105, 106 -> 3/6; B 101, 104 -> 2/6. Key 108 -> 105..111 clipped to 105..110: A 105, 106, 110 -> 3/6.
    np.testing.assert_allclose(spike_repr.tfp(spikes, TIMES, T0, T1, 2, 3)[:, 0],
                               [[3 / 6, 2 / 6], [3 / 6, 0.0]])


def test_tfi_is_one_over_the_interval_around_the_key_frame():
    spikes = _stream()
    # m = 20: key 103: A 102 -> 105 (3), B 101 -> 104 (3). Key 108: A 106 -> 110 (4; 111 is outside the
    # exposure), B 104 -> none (fallback 2m = 40).
    np.testing.assert_allclose(spike_repr.tfi(spikes, TIMES, T0, T1, 2, 20)[:, 0],
                               [[1 / 3, 1 / 3], [1 / 4, 1 / 40]])
    # m = 2 searches ticks 102..103 back and 104..105 ahead of key 103: A 102 -> 105 (3), B none back (2m = 4);
    # key 108: back 107..108 has no spike for either pixel (2m = 4).
    np.testing.assert_allclose(spike_repr.tfi(spikes, TIMES, T0, T1, 2, 2)[:, 0],
                               [[1 / 3, 1 / 4], [1 / 4, 1 / 4]])


def test_a_spike_outside_the_window_never_counts():
    spikes = _stream()
    moved = spikes.copy()
    moved[0] = 1     # tick 100 (outside) fires everywhere
    moved[11] = 1    # tick 111 (outside) fires everywhere
    for fn, arg in ((spike_repr.tfp, 3), (spike_repr.tfi, 20)):
        np.testing.assert_array_equal(fn(moved, TIMES, T0, T1, 2, arg), fn(spikes, TIMES, T0, T1, 2, arg))


def test_tfp_equals_spikecv_playback_where_the_window_fits():
    rng = np.random.default_rng(0)
    spikes = (rng.random((64, 3, 4)) < 0.3).astype(np.uint8)
    times = np.arange(64.0)
    keys = spike_repr.key_positions(times, spike_repr.instants(0, 63, 4))
    out = spike_repr.tfp(spikes, times, 0, 63, 4, 5)
    for k, key in enumerate(keys):
        # SpikeCV's TFP.spikes2frame before its uint8 conversion: mean of spikes[key - h : key + h + 1].
        np.testing.assert_allclose(out[k], spikes[key - 5:key + 6].mean(axis=0), rtol=1e-6)


def test_raw_window_and_the_switch():
    spikes = _stream()
    # Centre instant 105.5 -> key 106 (tie, later frame); length 3 -> ticks 105..107.
    np.testing.assert_array_equal(spike_repr.raw_window(spikes, TIMES, T0, T1, 3)[:, 0], [[1, 0], [1, 0], [0, 0]])
    with pytest.raises(ValueError, match="does not fit"):
        spike_repr.raw_window(spikes, TIMES, T0, T1, 12)
    np.testing.assert_array_equal(spike_repr.represent("voxel", spikes, TIMES, T0, T1, 2),
                                  voxelize.voxelize(spikes, TIMES, T0, T1, 2))
    with pytest.raises(ValueError, match="unknown spike representation 'tfx'"):
        spike_repr.represent("tfx", spikes, TIMES, T0, T1, 2)
    with pytest.raises(ValueError, match="no spike frame inside"):
        spike_repr.tfp(spikes, TIMES, 200, 210, 2, 1)
