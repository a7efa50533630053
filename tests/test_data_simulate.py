"""Spike simulator: rate I / threshold, determinism by seed, down-scaling, blur synthesis."""
import numpy as np
import pytest

from data_pipelines import simulate


@pytest.mark.parametrize("intensity,threshold", [(0.3, 1.0), (0.9, 2.0), (0.05, 0.5)])
def test_rate_is_intensity_over_threshold(intensity, threshold):
    n = 400
    spikes = simulate.simulate_spikes(np.full((n, 32, 32), intensity, np.float32), threshold=threshold, seed=0)
    rate = spikes.mean()
    assert rate == pytest.approx(intensity / threshold, abs=0.01)
    per_pixel = spikes.sum(0)
    expected = n * intensity / threshold
    # Integrate-and-fire with a charge that starts in [0, threshold): floor or ceil of the expectation.
    assert per_pixel.min() >= np.floor(expected) and per_pixel.max() <= np.ceil(expected)


def test_exact_counts_given_initial_charge():
    camera = simulate.IntegrateAndFire(1, 3, threshold=2.0, random_initial_charge=False)
    grey = np.tile(np.array([[0.0, 0.5, 1.0]], np.float32), (7, 1, 1))
    spikes = camera(grey)
    np.testing.assert_array_equal(spikes.sum(0)[0], [0, 1, 3])     # floor(7 * I / 2)
    # Reset by subtraction: the 1.0 pixel fires every other frame, starting at frame index 1.
    np.testing.assert_array_equal(spikes[:, 0, 2], [0, 1, 0, 1, 0, 1, 0])
    assert simulate.expected_count(1.0, 7, 2.0, initial_charge=0.0) == 3


def test_saturation_one_spike_per_frame():
    spikes = simulate.simulate_spikes(np.full((10, 4, 4), 1.0, np.float32), threshold=0.5, seed=0)
    assert spikes.all()
    dark_after = simulate.IntegrateAndFire(1, 1, threshold=0.5, random_initial_charge=False)
    out = dark_after(np.array([1.0] * 5 + [0.0] * 3, np.float32).reshape(8, 1, 1))
    assert out[:5].all() and not out[6:].any()      # charge does not pile up while saturated


def test_same_seed_same_stream_other_seed_other_stream():
    rng = np.random.default_rng(5)
    frames = rng.random((50, 8, 8, 3)).astype(np.float32)
    a = simulate.simulate_spikes(frames, threshold=1.0, seed=11, noise_std=0.05)
    b = simulate.simulate_spikes(frames, threshold=1.0, seed=11, noise_std=0.05)
    c = simulate.simulate_spikes(frames, threshold=1.0, seed=12, noise_std=0.05)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_chunked_equals_whole_stream():
    rng = np.random.default_rng(6)
    grey = rng.random((30, 6, 6)).astype(np.float32)
    whole = simulate.IntegrateAndFire(6, 6, 1.0, seed=4)(grey)
    cam = simulate.IntegrateAndFire(6, 6, 1.0, seed=4)
    parts = np.concatenate([cam(grey[:7]), cam(grey[7:19]), cam(grey[19:])])
    np.testing.assert_array_equal(whole, parts)


def test_grey_downscale_and_uint8_input():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[..., 0] = 255
    grey = simulate.rgb_to_grey(frames.astype(np.float32) / 255)
    np.testing.assert_allclose(grey, 0.299, rtol=1e-6)
    small = simulate.downscale(np.arange(16, dtype=np.float32).reshape(1, 4, 4), 2)
    np.testing.assert_allclose(small[0], [[2.5, 4.5], [10.5, 12.5]])
    spikes = simulate.simulate_spikes(frames, threshold=1.0, scale=2, seed=0)
    assert spikes.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        simulate.downscale(np.zeros((1, 5, 4)), 2)


def test_blur_is_mean_and_sharp_is_centre():
    sub = np.stack([np.full((2, 2, 3), v, np.float32) for v in [0.0, 0.25, 0.5, 0.75, 1.0]])
    blur, sharp = simulate.synthesize_blur(sub)
    np.testing.assert_allclose(blur, 0.5)
    np.testing.assert_allclose(sharp, 0.5)
    blur4, sharp4 = simulate.synthesize_blur(sub[:4])
    np.testing.assert_allclose(blur4, 0.375)
    np.testing.assert_allclose(sharp4, 0.5)          # even L: the later of the two middle sub-frames
