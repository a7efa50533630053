"""The spike-only reference's grey map and scoring (vrtspike_jax/spike_reference.py)."""
import numpy as np

from vrtspike_jax import spike_reference


def _items(rng, a, b, n=3):
    items = []
    for i in range(n):
        grey = rng.integers(20, 230, size=(16, 16)).astype(np.uint8)
        sharp = np.repeat(grey[..., None], 3, axis=-1)           # R = G = B: its Y is 16 + 219 * grey
        rate = ((grey / 255.0) - b) / a                          # an exact affine rate
        items.append({"seq": f"val/{i % 2:02d}", "frame_idx": i, "rate": rate.astype(np.float64), "sharp": sharp})
    return items


def test_the_grey_map_is_the_least_squares_affine_fit_and_scores_on_y():
    rng = np.random.default_rng(0)
    items = _items(rng, a=1.25, b=0.05)
    a, b = spike_reference.fit_grey_map(items)
    np.testing.assert_allclose([a, b], [1.25, 0.05], rtol=1e-6, atol=1e-7)
    exact = spike_reference.score(items, a, b)
    assert exact["psnr_y"] == np.inf and exact["num_frames"] == 3 and set(exact["per_sequence"]) == {"val/00",
                                                                                                   "val/01"}
    # A wrong map costs PSNR: grey off by 8/255 everywhere -> Y off by 219 * 8 / 255 grey levels.
    off = spike_reference.score(items, a, b + 8 / 255)
    expected = 10 * np.log10(255.0 ** 2 / (219 * 8 / 255) ** 2)
    assert abs(off["psnr_y"] - expected) < 0.2
    assert off["per_sequence"]["val/00"]["num_frames"] == 2
