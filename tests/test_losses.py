"""Charbonnier and VGG perceptual losses: parity with S-VRT (fixtures/losses.npz), config fields, errors,
the weights converter script."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from vrtspike_jax.losses import (
    RestorationLoss,
    charbonnier_loss,
    load_vgg_params,
    vgg_features,
    vgg_layer_indices,
    vgg_params_from_state,
    vgg_perceptual_loss,
    vgg_perceptual_terms,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_PREFIX = "param/vgg_loss/vgg."  # S-VRT VGGPerceptualLoss state_dict keys are vgg.features.N.*
LAYER_SETS = [["relu3_3"], ["relu1_2"], ["relu2_2"], ["relu1_2", "relu2_2", "relu3_3"]]


def rel(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference) / np.abs(reference)))


@pytest.fixture(scope="module")
def fixture(load_fixture):
    z = load_fixture("losses.npz")
    # Fixture images are NCHW RGB in [0, 1]; ours are channels-last.
    pred = jnp.asarray(z["input/img_input"].transpose(0, 2, 3, 1))
    target = jnp.asarray(z["input/img_target"].transpose(0, 2, 3, 1))
    params = vgg_params_from_state(z, "vgg16", ["relu3_3"], prefix=FIXTURE_PREFIX, source="losses.npz")
    return z, pred, target, params


@pytest.mark.parametrize("delta", ["0.001", "0.05"])
def test_charbonnier_matches_svrt(fixture, delta):
    z, pred, target, _ = fixture
    value = charbonnier_loss(pred, target, delta=float(delta))
    assert rel(value, z[f"f64/charbonnier/delta_{delta}"]) <= 1e-5
    assert rel(value, z[f"output/charbonnier/delta_{delta}"]) <= 1e-5


def test_charbonnier_squares_delta_and_keeps_it():
    # One element with no error: sqrt(0 + delta^2) = delta (not 0, not sqrt(delta)).
    assert float(charbonnier_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), delta=1e-3)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"\(2, 3\) != target shape \(3, 2\)"):
        charbonnier_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))


@pytest.mark.parametrize("layers", LAYER_SETS, ids=["_".join(s) for s in LAYER_SETS])
def test_vgg_loss_matches_svrt(fixture, layers):
    z, pred, target, params = fixture
    name = "_".join(layers)
    value = vgg_perceptual_loss(params, pred, target, layers=layers)
    assert rel(value, z[f"f64/vgg_loss/{name}"]) <= 1e-5
    assert rel(value, z[f"output/vgg_loss/{name}"]) <= 1e-5
    terms = vgg_perceptual_terms(params, pred, target, layers=layers)
    assert rel(terms, z[f"output/vgg_loss/{name}_per_layer_l1"]) <= 1e-5


def test_vgg_features_match_svrt(fixture):
    z, pred, _, params = fixture
    (features,) = vgg_features(params, pred, layers=["relu3_3"])
    reference = z["debug/vgg_loss/feat_relu3_3_input"].transpose(0, 2, 3, 1)
    assert np.linalg.norm(np.asarray(features) - reference) / np.linalg.norm(reference) <= 1e-5


def test_frames_fold_into_the_batch(fixture):
    z, pred, target, params = fixture
    clip_pred, clip_target = pred[None], target[None]  # [B=1, T=2, H, W, 3]
    assert float(vgg_perceptual_loss(params, clip_pred, clip_target)) == pytest.approx(
        float(vgg_perceptual_loss(params, pred, target)), rel=1e-6)


def test_mse_distance_and_loss_of_identical_images(fixture):
    _, pred, target, params = fixture
    (fp,), (ft,) = vgg_features(params, pred), vgg_features(params, target)
    expected = float(jnp.mean((fp - ft) ** 2))
    assert float(vgg_perceptual_loss(params, pred, target, distance="mse")) == pytest.approx(expected, rel=1e-5)
    assert float(vgg_perceptual_loss(params, pred, pred)) == 0.0


def test_total_loss_matches_svrt_baseline(fixture):
    z, pred, target, params = fixture
    loss = RestorationLoss(charbonnier_delta=1e-3, perceptual_weight=0.1, vgg_params=params)
    total, terms = loss(pred, target)
    assert rel(total, z["output/total_loss_baseline_cfg"]) <= 1e-5
    assert rel(terms["perceptual"], z["output/vgg_loss/relu3_3"]) <= 1e-5
    # Inside jit with the weights passed as an argument.
    jitted = jax.jit(lambda p, t, w: loss(p, t, w)[0])
    assert rel(jitted(pred, target, loss.vgg_params), z["output/total_loss_baseline_cfg"]) <= 1e-5


def test_total_loss_needs_weights_only_when_weighted(fixture, tmp_path):
    z, pred, target, _ = fixture
    with pytest.raises(ValueError, match="perceptual loss weight is 0.1 but no VGG weights file"):
        RestorationLoss(perceptual_weight=0.1)
    missing = tmp_path / "nowhere" / "vgg16_features.npz"
    with pytest.raises(FileNotFoundError, match=f"VGG weights file {missing} not found"):
        RestorationLoss(perceptual_weight=0.1, vgg_weights=missing)
    charbonnier_only = RestorationLoss(perceptual_weight=0.0)
    total, terms = charbonnier_only(pred, target)
    assert rel(total, z["output/charbonnier/delta_0.001"]) <= 1e-5
    assert float(terms["perceptual"]) == 0.0


def test_layer_names_and_networks():
    vgg16, vgg19 = vgg_layer_indices("vgg16"), vgg_layer_indices("vgg19")
    assert {k: vgg16[k] for k in ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")} == {
        "relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
    assert (vgg19["relu3_4"], vgg19["relu4_4"], vgg19["relu5_4"]) == (17, 26, 35)
    with pytest.raises(ValueError, match=r"unknown vgg16 layer\(s\) \['relu3_4'\]"):
        vgg_params_from_state({}, "vgg16", ["relu3_4"])
    with pytest.raises(ValueError, match="unknown VGG network 'vgg11'"):
        vgg_layer_indices("vgg11")
    with pytest.raises(ValueError, match="unknown perceptual distance 'l2'"):
        RestorationLoss(perceptual_weight=0.0, vgg_distance="l2")


def test_vgg19_runs_with_its_own_layout():
    rng = np.random.default_rng(0)
    state, channels, index = {}, 3, 0
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, 256):
        if width == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = rng.normal(0, 0.05, (width, channels, 3, 3)).astype(np.float32)
        state[f"features.{index}.bias"] = np.zeros(width, np.float32)
        channels, index = width, index + 2
    params = vgg_params_from_state(state, "vgg19", ["relu3_4"])
    assert sorted(params, key=lambda k: int(k.split(".")[1]))[-1] == "features.16"
    (features,) = vgg_features(params, jnp.full((1, 8, 8, 3), 0.5), network="vgg19", layers=["relu3_4"])
    assert features.shape == (1, 2, 2, 256)


def test_bad_weights_are_named(fixture):
    z, *_ = fixture
    state = {k[len(FIXTURE_PREFIX):]: z[k] for k in z.files if k.startswith(FIXTURE_PREFIX)}
    del state["features.12.bias"]
    state["features.5.weight"] = state["features.5.weight"][:, :32]
    with pytest.raises(ValueError) as err:
        vgg_params_from_state(state, "vgg16", ["relu3_3"], source="my_vgg.npz")
    assert "my_vgg.npz" in str(err.value)
    assert "missing features.12.bias" in str(err.value)
    assert "features.5.weight: expected shape (128, 64, 3, 3), found (128, 32, 3, 3)" in str(err.value)


def _run_script(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "convert_vgg_weights.py"), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT)


def test_convert_script_round_trip(fixture, tmp_path):
    z, pred, target, _ = fixture
    source = tmp_path / "svrt_vgg_loss.npz"
    np.savez(source, **{k[len("param/vgg_loss/"):]: z[k] for k in z.files if k.startswith("param/vgg_loss/")})
    output = tmp_path / "vgg16_features.npz"
    done = _run_script("--input", str(source), "--prefix", "vgg.", "--up-to", "relu3_3", "--output", str(output))
    assert done.returncode == 0, done.stderr
    with np.load(output) as archive:
        assert sorted(archive.files) == sorted(f"features.{i}.{s}" for i in (0, 2, 5, 7, 10, 12, 14)
                                               for s in ("weight", "bias"))
    loss = RestorationLoss(perceptual_weight=0.1, vgg_weights=output)
    assert rel(loss(pred, target)[0], z["output/total_loss_baseline_cfg"]) <= 1e-5
    assert rel(vgg_perceptual_loss(load_vgg_params(output), pred, target), z["output/vgg_loss/relu3_3"]) <= 1e-5
    # The default keeps every layer of the network, so a relu3_3-only file is refused.
    refused = _run_script("--input", str(source), "--prefix", "vgg.", "--output", str(tmp_path / "all.npz"))
    assert refused.returncode != 0 and "missing vgg.features.17.weight" in refused.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_convert_script_says_pth_needs_torch(tmp_path):
    fake = tmp_path / "vgg16.pth"
    fake.write_bytes(b"not really")
    done = _run_script("--input", str(fake), "--output", str(tmp_path / "out.npz"))
    assert done.returncode != 0 and f"{fake}: reading a PyTorch checkpoint needs torch" in done.stderr
