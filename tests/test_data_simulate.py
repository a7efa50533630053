"""Spike simulator: rate I / threshold, determinism by seed, down-scaling, blur synthesis, dark spikes, threshold
mismatch."""
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


def test_options_off_give_the_stream_of_before():
    # Digest of this stream computed with simulate.py before dark_rate / threshold_std existed.
    import hashlib
    frames = np.random.default_rng(5).random((40, 8, 8, 3)).astype(np.float32)
    spikes = simulate.simulate_spikes(frames, threshold=1.0, seed=11, noise_std=0.05, scale=2)
    assert hashlib.sha256(np.packbits(spikes).tobytes()).hexdigest() == \
        "f9a9c89ef2d8160a3a1cb790192f3b09424e7c2ab2b7a43f941d8a0a2ea89cb3"
    explicit = simulate.simulate_spikes(frames, threshold=1.0, seed=11, noise_std=0.05, scale=2, dark_rate=0.0,
                                        threshold_std=0.0)
    np.testing.assert_array_equal(spikes, explicit)


@pytest.mark.parametrize("rate", [0.002, 0.02, 0.2])
def test_dark_current_alone_on_a_black_scene_fires_at_the_requested_rate(rate):
    n, side = 2000, 32
    spikes = simulate.simulate_spikes(np.zeros((n, side, side), np.float32), threshold=1.0, seed=3, dark_rate=rate)
    samples = spikes.size
    assert spikes.mean() == pytest.approx(rate, abs=4 * np.sqrt(rate * (1 - rate) / samples))
    # Random (Bernoulli), not a regular clock: per-pixel counts spread as a binomial's, frames are independent.
    counts = spikes.sum(0)
    assert counts.var() == pytest.approx(n * rate * (1 - rate), rel=0.2)
    assert (spikes[1:] & spikes[:-1]).mean() == pytest.approx(rate ** 2, abs=4 * rate / np.sqrt(samples) + 1e-5)
    # No dark current, no spikes on a black scene.
    assert not simulate.simulate_spikes(np.zeros((50, 8, 8), np.float32), threshold=1.0, seed=3).any()


def test_dark_current_adds_its_rate_to_a_lit_pixel_and_keeps_the_other_draws():
    n = 1000
    grey = np.full((n, 16, 16), 0.3, np.float32)
    clean = simulate.simulate_spikes(grey, threshold=1.0, seed=4)
    dark = simulate.simulate_spikes(grey, threshold=1.0, seed=4, dark_rate=0.05)
    assert dark.mean() - clean.mean() == pytest.approx(0.05, abs=0.005)
    # Its own random stream: the initial charge and the Gaussian noise draws are those of the camera without it.
    a = simulate.IntegrateAndFire(4, 4, 1.0, seed=9, noise_std=0.1)
    b = simulate.IntegrateAndFire(4, 4, 1.0, seed=9, noise_std=0.1, dark_rate=0.3)
    np.testing.assert_array_equal(a.charge, b.charge)
    np.testing.assert_array_equal(a._rng.standard_normal(5), b._rng.standard_normal(5))
    with pytest.raises(ValueError, match="dark_rate"):
        simulate.IntegrateAndFire(2, 2, 1.0, dark_rate=1.5)


def test_threshold_variation_gives_rates_that_vary_as_one_over_threshold():
    n, intensity, std = 1000, 0.3, 0.1
    camera = simulate.IntegrateAndFire(32, 32, 1.0, seed=7, threshold_std=std)
    thresholds = camera.threshold
    assert thresholds.shape == (32, 32) and thresholds.dtype == np.float32
    assert thresholds.std() / thresholds.mean() == pytest.approx(std, rel=0.15)
    assert thresholds.mean() == pytest.approx(1.0, abs=0.02)
    counts = camera(np.full((n, 32, 32), intensity, np.float32)).sum(0)
    expected = n * intensity / thresholds
    # Each pixel: integrate-and-fire at its own threshold, floor or ceil of n * I / threshold_p (float32 slack).
    assert np.abs(counts - expected).max() <= 1.0 + 1e-3
    assert np.corrcoef(counts.ravel(), 1.0 / thresholds.ravel())[0, 1] > 0.99
    # A fixed pattern: the same seed gives the same thresholds, another seed others; the noise stream is untouched.
    same = simulate.IntegrateAndFire(32, 32, 1.0, seed=7, threshold_std=std)
    other = simulate.IntegrateAndFire(32, 32, 1.0, seed=8, threshold_std=std)
    np.testing.assert_array_equal(same.threshold, thresholds)
    assert (other.threshold != thresholds).any()
    plain = simulate.IntegrateAndFire(32, 32, 1.0, seed=7)
    np.testing.assert_array_equal(plain._rng.standard_normal(5), same._rng.standard_normal(5))
