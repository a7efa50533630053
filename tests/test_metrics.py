"""PSNR / SSIM (KAIR, BasicSR, skimage conventions), S-VRT's legacy logged metrics and LPIPS-alex:
parity with fixtures/metrics.npz, input conventions, errors, the LPIPS weights converter."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from vrtspike_jax.metrics import (
    LPIPS,
    legacy_svrt_psnr,
    legacy_svrt_psnr_y,
    legacy_svrt_rgb_to_y,
    legacy_svrt_ssim_y,
    load_lpips,
    load_lpips_state,
    psnr,
    rgb_to_y,
    ssim,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LPIPS_PREFIX = "param/lpips_alex/"
PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-5


@pytest.fixture(scope="module")
def images(load_fixture):
    z = load_fixture("metrics.npz")
    return z, z["input/img_b_rgb"], z["input/img_a_rgb"]  # (test, reference), [4, 64, 80, 3] uint8 RGB


def assert_psnr_close(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert np.array_equal(np.isinf(ours), np.isinf(reference)), (ours, reference)
    finite = np.isfinite(reference)
    assert np.abs(ours[finite] - reference[finite]).max() <= PSNR_TOL_DB, (ours, reference)


@pytest.mark.parametrize("library", ["kair", "basicsr", "skimage"])
def test_psnr_matches_references(images, library):
    z, test, ref = images
    assert_psnr_close(psnr(test, ref), z[f"output/{library}/psnr_rgb"])
    assert_psnr_close(psnr(test, ref, y_channel=True), z[f"output/{library}/psnr_y"])


def test_psnr_with_basicsr_pt_epsilon(images):
    z, test, ref = images
    assert_psnr_close(psnr(test, ref, mse_epsilon=1e-8), z["output/basicsr_pt/psnr_rgb"])
    assert_psnr_close(psnr(test, ref, y_channel=True, mse_epsilon=1e-8), z["output/basicsr_pt/psnr_y"])
    assert psnr(test[3], ref[3], mse_epsilon=1e-8) == pytest.approx(80.0)


@pytest.mark.parametrize("library", ["kair", "basicsr", "basicsr_pt"])
def test_ssim_matches_references(images, library):
    z, test, ref = images
    np.testing.assert_allclose(ssim(test, ref), z[f"output/{library}/ssim_rgb"], rtol=0, atol=SSIM_TOL)
    np.testing.assert_allclose(ssim(test, ref, y_channel=True), z[f"output/{library}/ssim_y"], rtol=0, atol=SSIM_TOL)


def test_ssim_skimage_variants(images):
    z, test, ref = images
    np.testing.assert_allclose(ssim(test, ref), z["output/skimage/ssim_rgb_gauss"], rtol=0, atol=SSIM_TOL)
    np.testing.assert_allclose(ssim(test, ref, y_channel=True), z["output/skimage/ssim_y_gauss"], rtol=0, atol=SSIM_TOL)
    skimage_default = dict(window="uniform", win_size=7, sample_covariance=True)
    np.testing.assert_allclose(ssim(test, ref, **skimage_default), z["output/skimage/ssim_rgb_default"],
                               rtol=0, atol=SSIM_TOL)
    np.testing.assert_allclose(ssim(test, ref, y_channel=True, **skimage_default), z["output/skimage/ssim_y_default"],
                               rtol=0, atol=SSIM_TOL)


def test_y_channel_is_bt601_studio_swing(images):
    z, test, ref = images
    # KAIR/BasicSR compute Y partly in float32; ours is float64, so they agree to float32 rounding.
    np.testing.assert_allclose(rgb_to_y(ref)[..., 0], z["debug/kair_y_a"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(rgb_to_y(test)[..., 0], z["debug/basicsr_y_b"], rtol=0, atol=1e-4)
    corners = np.array([[[[0, 0, 0], [255, 255, 255]]]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(corners)[..., 0], [[[16.0, 235.0]]], atol=1e-12)


def test_float_inputs_and_quantisation(images):
    z, test, ref = images
    test01, ref01 = test.astype(np.float32) / 255, ref.astype(np.float32) / 255
    assert_psnr_close(psnr(test01, ref01), z["output/kair/psnr_rgb"])
    np.testing.assert_allclose(ssim(test01, ref01, y_channel=True), z["output/kair/ssim_y"], rtol=0, atol=SSIM_TOL)
    # main_test_vrt: clamp, x255, round -> the uint8 image. Noise below half a level and overshoot vanish.
    rng = np.random.default_rng(0)
    noisy = test01 + rng.uniform(-0.45, 0.45, test01.shape).astype(np.float32) / 255
    noisy[0, 0, 0] = [1.2, -0.3, 0.5]
    expected = test.copy()
    expected[0, 0, 0] = [255, 0, np.round(np.float32(0.5) * np.float32(255))]
    np.testing.assert_array_equal(psnr(noisy, ref01, quantize=True), psnr(expected, ref))
    np.testing.assert_array_equal(ssim(noisy, ref01, y_channel=True, quantize=True), ssim(expected, ref, y_channel=True))
    assert not np.array_equal(psnr(noisy, ref01), psnr(expected, ref))
    # Model outputs may arrive as bf16 device arrays; 8-bit levels survive bf16 rounding only roughly.
    assert abs(psnr(jnp.asarray(test01[0], jnp.bfloat16), ref01[0], quantize=True) - psnr(test[0], ref[0])) < 0.5


def test_batch_shapes(images):
    _, test, ref = images
    single = psnr(test[0], ref[0])
    assert isinstance(single, float)
    clips = psnr(test.reshape(2, 2, 64, 80, 3), ref.reshape(2, 2, 64, 80, 3), y_channel=True)
    assert clips.shape == (2, 2)
    np.testing.assert_array_equal(clips.ravel(), psnr(test, ref, y_channel=True))
    cropped = ssim(test, ref, crop_border=4)
    np.testing.assert_allclose(cropped, ssim(test[:, 4:-4, 4:-4], ref[:, 4:-4, 4:-4]), rtol=1e-15)


def test_metric_errors():
    rgb, gray = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 1), np.uint8)
    with pytest.raises(ValueError, match=r"image shape \(16, 16, 3\) != reference shape \(16, 16, 1\)"):
        psnr(rgb, gray)
    with pytest.raises(ValueError, match="y_channel=True needs RGB images"):
        ssim(gray, gray, y_channel=True)
    with pytest.raises(ValueError, match=r"smaller than the 11x11 window"):
        ssim(np.zeros((8, 20, 3), np.uint8), np.zeros((8, 20, 3), np.uint8))
    with pytest.raises(ValueError, match=r"channels-last images .* found shape \(3, 16, 16\)"):
        psnr(np.zeros((3, 16, 16)), np.zeros((3, 16, 16)))
    with pytest.raises(ValueError, match="found dtype int32"):
        psnr(rgb.astype(np.int32), rgb.astype(np.int32))


def test_legacy_svrt_metrics_match_its_logs(images):
    z, test, ref = images
    pred, gt = test.astype(np.float32) / 255, ref.astype(np.float32) / 255
    np.testing.assert_array_equal(legacy_svrt_rgb_to_y(gt), z["debug/svrt_y_a"])
    for i in range(4):  # the fixture called S-VRT's functions on (1, 1, 3, H, W) per pair
        assert abs(legacy_svrt_psnr(pred[i], gt[i]) - z["output/svrt/psnr_rgb"][i]) <= PSNR_TOL_DB
        assert abs(legacy_svrt_psnr_y(pred[i], gt[i]) - z["output/svrt/psnr_y"][i]) <= PSNR_TOL_DB
        assert abs(legacy_svrt_ssim_y(pred[i], gt[i]) - z["output/svrt/ssim_y"][i]) <= SSIM_TOL
    assert legacy_svrt_psnr(pred[3], gt[3]) == 99.0
    # Its Y is not BT.601's: pair 2 reads 0.0013 dB lower than KAIR's.
    assert legacy_svrt_psnr_y(pred[2], gt[2]) == pytest.approx(z["output/kair/psnr_y"][2] - 0.0013, abs=2e-4)
    # One value pooled over every frame of a batch, not a mean of per-frame values.
    pooled = legacy_svrt_psnr(pred[None, :3], gt[None, :3])
    mse = np.mean((pred[:3].astype(np.float64) - gt[:3]) ** 2)
    assert pooled == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)
    assert pooled != pytest.approx(np.mean([legacy_svrt_psnr(pred[i], gt[i]) for i in range(3)]), abs=1e-3)


@pytest.fixture(scope="module")
def lpips_state(images):
    z, _, _ = images
    return {k[len(LPIPS_PREFIX):]: z[k] for k in z.files if k.startswith(LPIPS_PREFIX)}


@pytest.mark.parametrize("convention, key", [("standard", "normalize_true"), ("svrt_legacy", "svrt_convention")])
def test_lpips_matches_lpips_package(images, lpips_state, convention, key):
    z, test, ref = images
    model = load_lpips_state(nnx.eval_shape(lambda: LPIPS(convention, rngs=nnx.Rngs(0))), lpips_state,
                             source="metrics.npz")
    img, reference = jnp.asarray(test / 255.0, jnp.float32), jnp.asarray(ref / 255.0, jnp.float32)
    values = np.asarray(model(img, reference))
    per_layer = np.asarray(model(img, reference, per_layer=True))
    np.testing.assert_allclose(values, z[f"f64/lpips/{key}"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(values, z[f"output/lpips/{key}"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(per_layer, z[f"output/lpips/{key}_per_layer"], rtol=1e-5, atol=1e-9)
    assert values[3] == 0.0
    # [B, T, H, W, 3] clips give one value per frame.
    clips = np.asarray(model(img.reshape(2, 2, 64, 80, 3), reference.reshape(2, 2, 64, 80, 3)))
    np.testing.assert_allclose(clips.ravel(), values, rtol=1e-6, atol=1e-12)


def test_lpips_default_is_the_standard_convention():
    assert nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0))).convention == "standard"
    with pytest.raises(ValueError, match="unknown convention 'unit'"):
        LPIPS("unit", rngs=nnx.Rngs(0))


def test_lpips_weight_errors(lpips_state, tmp_path):
    broken = dict(lpips_state)
    del broken["lin2.model.1.weight"]
    broken["net.slice4.8.bias"] = np.zeros(128, np.float32)
    broken["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as err:
        load_lpips_state(nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0))), broken, source="broken.npz")
    message = str(err.value)
    assert "broken.npz" in message and "missing lin2.model.1.weight" in message
    assert "unexpected extra.weight" in message
    assert "net.slice4.8.bias: expected shape (256,), found (128,)" in message
    missing = tmp_path / "lpips_alex.npz"
    with pytest.raises(FileNotFoundError, match=f"LPIPS weights file {missing} not found"):
        load_lpips(missing)


def test_lpips_convert_script(images, lpips_state, tmp_path):
    """torchvision AlexNet features + lpips lin heads -> our .npz -> same LPIPS values."""
    z, test, ref = images
    to_alexnet = {"net.slice1.0": 0, "net.slice2.3": 3, "net.slice3.6": 6, "net.slice4.8": 8, "net.slice5.10": 10}
    alexnet = {f"features.{i}.{s}": lpips_state[f"{name}.{s}"] for name, i in to_alexnet.items() for s in ("weight", "bias")}
    alexnet["classifier.1.weight"] = np.zeros((4, 4), np.float32)  # the rest of torchvision's AlexNet is ignored
    lin = {f"lin{k}.model.1.weight": lpips_state[f"lin{k}.model.1.weight"] for k in range(5)}
    np.savez(tmp_path / "alexnet.npz", **alexnet)
    np.savez(tmp_path / "alex_lin.npz", **lin)
    output = tmp_path / "lpips_alex.npz"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_lpips_weights.py"), "--alexnet",
         str(tmp_path / "alexnet.npz"), "--lin", str(tmp_path / "alex_lin.npz"), "--output", str(output)],
        capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    model = load_lpips(output)
    values = np.asarray(model(jnp.asarray(test / 255.0, jnp.float32), jnp.asarray(ref / 255.0, jnp.float32)))
    np.testing.assert_allclose(values, z["f64/lpips/normalize_true"], rtol=1e-5, atol=1e-9)
    del lin["lin4.model.1.weight"]
    np.savez(tmp_path / "alex_lin.npz", **lin)
    refused = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_lpips_weights.py"), "--alexnet",
         str(tmp_path / "alexnet.npz"), "--lin", str(tmp_path / "alex_lin.npz"), "--output", str(tmp_path / "x.npz")],
        capture_output=True, text=True, cwd=REPO_ROOT)
    assert refused.returncode != 0 and "missing lin4.model.1.weight" in refused.stderr
