"""Evaluation metrics: PSNR and SSIM (RGB and Y) with the KAIR/BasicSR conventions, LPIPS-alex, and the
S-VRT training script's own (non-standard) logged metrics as clearly named legacy functions.

PSNR / SSIM run on the host in NumPy float64. Conventions (KAIR `utils_image.py` = BasicSR
`calculate_psnr/ssim`, as used by VRT's `main_test_vrt.py`):
  * Images are channels-last RGB `[..., H, W, 3]` (or single-channel `[..., H, W, 1]`); leading axes
    are a batch and each image gets its own value. uint8 images are on the 0-255 scale, floating-point
    images in [0, 1] (multiplied by 255).
  * `quantize=True` follows `main_test_vrt.py`: clamp to [0, 1], `round(x * 255)` in float32 (half to
    even), as if the frame were written to an 8-bit PNG first. uint8 inputs are already quantised.
  * Y (ITU-R BT.601 studio swing, MATLAB `rgb2ycbcr`): Y = 16 + 65.481 R + 128.553 G + 24.966 B
    with R, G, B in [0, 1], giving [16, 235] on the 0-255 scale, not rounded.
  * PSNR = 10 log10(255^2 / MSE) over all pixels and channels of an image; identical images give inf.
  * SSIM: 11x11 Gaussian window (sigma 1.5, normalised), 'valid' filtering (no border handling),
    population variances, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2 on the 0-255 scale, the mean of the
    SSIM map; for 3 channels the mean of the per-channel values.
  * `crop_border` pixels are removed on each side first (0 for deblurring).

LPIPS (`LPIPS`, AlexNet v0.1) is an NNX module; weights come from a local `.npz` of the `lpips`
package's state_dict (`scripts/convert_lpips_weights.py`).
"""
from __future__ import annotations

import math
import os
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # for R, G, B in [0, 1]; result on the 0-255 scale


# --------------------------------------------------------------------------------------------------
# PSNR / SSIM (KAIR / BasicSR)
# --------------------------------------------------------------------------------------------------

def quantize_uint8(frames: np.ndarray) -> np.ndarray:
    """[..., 3] floats in [0, 1] -> uint8 (clamped, rounded), as the PNGs and the metrics see them."""
    return np.round(np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_255(images, quantize: bool, name: str) -> np.ndarray:
    """Channels-last images -> float64 on the 0-255 scale (see the module docstring)."""
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected channels-last images [..., H, W, 3] or [..., H, W, 1], "
                         f"found shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64)
    if not jnp.issubdtype(images.dtype, jnp.floating):  # jnp's test also accepts bfloat16
        raise ValueError(f"{name}: expected uint8 (0-255) or floating-point (0-1) images, found dtype {images.dtype}")
    if quantize:
        return quantize_uint8(images).astype(np.float64)
    return images.astype(np.float64) * 255.0


def _luma_255(rgb_255: np.ndarray) -> np.ndarray:
    """`[..., 3]` RGB on 0-255 -> `[..., 1]` BT.601 Y on 0-255 (float64)."""
    return (16.0 + rgb_255 @ (_Y_WEIGHTS / 255.0))[..., None]


def rgb_to_y(images) -> np.ndarray:
    """BT.601 luma of RGB `[..., H, W, 3]` (uint8 0-255 or float 0-1) -> `[..., H, W, 1]` float64, 0-255 scale."""
    rgb = _to_255(images, False, "rgb_to_y")
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_y: expected 3 channels, found shape {rgb.shape}")
    return _luma_255(rgb)


def _prepare_pair(img, ref, y_channel: bool, crop_border: int, quantize: bool, name: str):
    if np.shape(img) != np.shape(ref):
        raise ValueError(f"{name}: image shape {np.shape(img)} != reference shape {np.shape(ref)}")
    a, b = _to_255(img, quantize, name), _to_255(ref, quantize, name)
    if y_channel:
        if a.shape[-1] != 3:
            raise ValueError(f"{name}: y_channel=True needs RGB images, found shape {a.shape}")
        a, b = _luma_255(a), _luma_255(b)
    if crop_border:
        if 2 * crop_border >= min(a.shape[-3:-1]):
            raise ValueError(f"{name}: crop_border {crop_border} leaves nothing of a {a.shape[-3:-1]} image")
        a = a[..., crop_border:-crop_border, crop_border:-crop_border, :]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border, :]
    return a, b


def _scalar_or_array(values: np.ndarray):
    return float(values) if values.ndim == 0 else values


def psnr(img, ref, *, y_channel: bool = False, crop_border: int = 0, quantize: bool = False,
         mse_epsilon: float = 0.0):
    """PSNR in dB, KAIR/BasicSR convention, per image.

    Args:
      img, ref: `[..., H, W, C]` channels-last RGB (C = 3) or gray (C = 1); uint8 = 0-255, float = 0-1.
      y_channel: on BT.601 Y instead of RGB.
      crop_border: pixels removed from each side first.
      quantize: round floats to 8 bits first, as `main_test_vrt.py` does.
      mse_epsilon: added to the MSE on the [0, 1]^2 scale (BasicSR's `calculate_psnr_pt` uses 1e-8, which
        caps identical images at 80 dB); 0 gives inf for identical images.
    Returns:
      float for one image, else an array of the leading shape.
    """
    a, b = _prepare_pair(img, ref, y_channel, crop_border, quantize, "psnr")
    mse = np.mean((a - b) ** 2, axis=(-3, -2, -1)) / (255.0 ** 2) + mse_epsilon
    with np.errstate(divide="ignore"):
        return _scalar_or_array(10.0 * np.log10(1.0 / mse))


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return taps / taps.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of `[..., H, W, C]` with `outer(taps, taps)` over H and W."""
    n = len(taps)
    h, w = x.shape[-3] - n + 1, x.shape[-2] - n + 1
    rows = sum(t * x[..., k:k + h, :, :] for k, t in enumerate(taps))
    return sum(t * rows[..., :, k:k + w, :] for k, t in enumerate(taps))


def ssim(img, ref, *, y_channel: bool = False, crop_border: int = 0, quantize: bool = False,
         window: str = "gaussian", win_size: int = 11, sigma: float = 1.5, sample_covariance: bool = False):
    """SSIM per image, KAIR/BasicSR ("MATLAB") convention by default.

    Args:
      img, ref, y_channel, crop_border, quantize: as `psnr`.
      window: "gaussian" (sigma-weighted, the default) or "uniform" (box).
      win_size: window side (11; skimage's default is a uniform 7 with sample_covariance=True).
      sample_covariance: scale variances by N/(N-1) with N = win_size^2 (skimage's default); False =
        population variance (KAIR/BasicSR/MATLAB).
    Returns:
      float for one image, else an array of the leading shape. Mean over the 'valid' SSIM map and channels.
    """
    a, b = _prepare_pair(img, ref, y_channel, crop_border, quantize, "ssim")
    if min(a.shape[-3:-1]) < win_size:
        raise ValueError(f"ssim: images {a.shape[-3:-1]} are smaller than the {win_size}x{win_size} window")
    if window == "gaussian":
        taps = _gaussian_taps(win_size, sigma)
    elif window == "uniform":
        taps = np.full(win_size, 1.0 / win_size)
    else:
        raise ValueError(f"ssim: unknown window {window!r}; expected 'gaussian' or 'uniform'")
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a * mu_a
    var_b = _filter_valid(b * b, taps) - mu_b * mu_b
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    if sample_covariance:
        n = win_size * win_size
        var_a, var_b, cov = (v * (n / (n - 1.0)) for v in (var_a, var_b, cov))
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return _scalar_or_array(ssim_map.mean(axis=(-3, -2, -1)))


# --------------------------------------------------------------------------------------------------
# S-VRT train.py validation metrics (legacy: only for comparing with the original's logs)
# --------------------------------------------------------------------------------------------------

def _svrt_pair(pred, gt, name):
    if np.shape(pred) != np.shape(gt) or np.shape(pred)[-1] != 3:
        raise ValueError(f"{name}: expected two RGB arrays [..., H, W, 3] of one shape, "
                         f"found {np.shape(pred)} and {np.shape(gt)}")
    # S-VRT's validation loop clamps the reconstruction before its metrics.
    return np.clip(np.asarray(pred, np.float32), 0.0, 1.0), np.asarray(gt, np.float32)


def legacy_svrt_rgb_to_y(images) -> np.ndarray:
    """S-VRT's Y: 0.257 R + 0.504 G + 0.098 B + 16/255 (truncated BT.601 coefficients), float32 on 0-1.

    `[..., H, W, 3]` in [0, 1] -> `[..., H, W]`. Not the KAIR/BasicSR Y; for comparing with S-VRT logs only.
    """
    x = np.asarray(images, np.float32)
    return (np.float32(0.257) * x[..., 0] + np.float32(0.504) * x[..., 1] + np.float32(0.098) * x[..., 2]
            + np.float32(16.0 / 255.0))


def _svrt_psnr_value(mse: float) -> float:
    return 99.0 if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


# S-VRT evaluates these formulas in float32 (torch); we evaluate the same formulas in float64 from the
# same float32 inputs, so values differ from its logs only by its float32 rounding (on the fixtures:
# <= 4e-7 dB for PSNR, <= 6e-6 for SSIM).

def legacy_svrt_psnr(pred, gt) -> float:
    """S-VRT `compute_psnr`: one PSNR over the whole batch (all frames pooled), 99 dB when MSE <= 1e-10.

    pred, gt: `[..., H, W, 3]` in [0, 1] (pred clamped first). Not comparable with per-frame KAIR PSNR.
    """
    p, g = _svrt_pair(pred, gt, "legacy_svrt_psnr")
    return _svrt_psnr_value(float(np.mean((p.astype(np.float64) - g) ** 2)))


def legacy_svrt_psnr_y(pred, gt) -> float:
    """`legacy_svrt_psnr` on `legacy_svrt_rgb_to_y` (what S-VRT logs as psnr_y)."""
    p, g = _svrt_pair(pred, gt, "legacy_svrt_psnr_y")
    yp, yg = legacy_svrt_rgb_to_y(p).astype(np.float64), legacy_svrt_rgb_to_y(g)
    return _svrt_psnr_value(float(np.mean((yp - yg) ** 2)))


def legacy_svrt_ssim_y(pred, gt, window_size: int = 11) -> float:
    """S-VRT `compute_ssim` on its Y (what it logs as ssim_y): uniform 11x11 window, zero padding 5
    (full-size map, borders see zeros), C1 = 1e-4, C2 = 9e-4 (0-1 scale), +1e-12 in the denominator,
    mean over the map pooled over all frames. Reads higher than standard SSIM; logs only.

    pred, gt: `[..., H, W, 3]` in [0, 1] (pred clamped first) -> one float.
    """
    p, g = _svrt_pair(pred, gt, "legacy_svrt_ssim_y")
    x = legacy_svrt_rgb_to_y(p).astype(np.float64)[..., None]
    y = legacy_svrt_rgb_to_y(g).astype(np.float64)[..., None]
    pad = window_size // 2
    taps = np.full(window_size, 1.0 / window_size)
    widths = [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
    box = lambda v: _filter_valid(np.pad(v, widths), taps)
    mu_x, mu_y = box(x), box(y)
    var_x, var_y, cov = box(x * x) - mu_x * mu_x, box(y * y) - mu_y * mu_y, box(x * y) - mu_x * mu_y
    c1, c2 = 1e-4, 9e-4
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2) + 1e-12)
    return float(np.mean(ssim_map))


# --------------------------------------------------------------------------------------------------
# The metric set of validation and the restorer (one key schema)
# --------------------------------------------------------------------------------------------------

CONVENTIONS = ("KAIR/BasicSR: 8-bit frames; Y = BT.601 (16 + 65.481R + 128.553G + 24.966B); SSIM 11x11 Gaussian "
               "sigma 1.5, valid, population variance; mean over frames")

METRIC_NAMES = ("psnr", "psnr_y", "ssim", "ssim_y")


def frame_metrics(restored: np.ndarray, reference: np.ndarray, *, quantize: bool = True,
                  crop_border: int = 0) -> Dict[str, np.ndarray]:
    """Per-frame PSNR / SSIM (RGB and Y) of `restored` vs `reference`, both `[n, H, W, 3]` in [0, 1]: arrays [n]."""
    kw = dict(quantize=quantize, crop_border=crop_border)
    return {
        "psnr": np.atleast_1d(psnr(restored, reference, **kw)),
        "psnr_y": np.atleast_1d(psnr(restored, reference, y_channel=True, **kw)),
        "ssim": np.atleast_1d(ssim(restored, reference, **kw)),
        "ssim_y": np.atleast_1d(ssim(restored, reference, y_channel=True, **kw)),
    }


# --------------------------------------------------------------------------------------------------
# LPIPS (AlexNet, lpips v0.1)
# --------------------------------------------------------------------------------------------------

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# (lpips state_dict name, in, out, kernel, stride, padding, max-pool before it)
_ALEX_CONVS = (
    ("net.slice1.0", 3, 64, 11, 4, 2, False),
    ("net.slice2.3", 64, 192, 5, 1, 2, True),
    ("net.slice3.6", 192, 384, 3, 1, 1, True),
    ("net.slice4.8", 384, 256, 3, 1, 1, False),
    ("net.slice5.10", 256, 256, 3, 1, 1, False),
)
LPIPS_CONVENTIONS = ("standard", "svrt_legacy")


class LPIPS(nnx.Module):
    """LPIPS distance (net 'alex', version 0.1) between two batches of RGB images.

    Call `lpips(img, ref)` with `[..., H, W, 3]` channels-last RGB in [0, 1] -> `[...]` distances
    (`per_layer=True`: `[..., 5]`, the 5 layer terms that sum to it).

    convention:
      "standard" (default): [0, 1] inputs are mapped to [-1, 1] (x -> 2x - 1), which is what LPIPS expects
        (`lpips(..., normalize=True)`); values comparable with the literature.
      "svrt_legacy": inputs fed unchanged, as S-VRT's validation did (`lpips_model(x01, y01)`); only for
        comparing with S-VRT's logs.

    Forward: (x - shift) / scale; AlexNet features after each of its 5 ReLUs; per-pixel unit norm over
    channels (f / (||f|| + 1e-10)); squared difference; non-negative 1x1 "lin" weights (no bias); mean
    over space; sum over layers.
    """

    def __init__(self, convention: str = "standard", *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if convention not in LPIPS_CONVENTIONS:
            raise ValueError(f"LPIPS: unknown convention {convention!r}; expected one of {LPIPS_CONVENTIONS}")
        self.convention = convention
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (k, k), strides=(s, s), padding=((p, p), (p, p)), dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
            for _, cin, cout, k, s, p, _ in _ALEX_CONVS
        ])
        self.lins = nnx.List([
            nnx.Param(jnp.full((cout,), 1.0 / cout, param_dtype)) for _, _, cout, *_ in _ALEX_CONVS
        ])

    def __call__(self, img: jax.Array, ref: jax.Array, *, per_layer: bool = False) -> jax.Array:
        if img.shape != ref.shape or img.ndim < 4 or img.shape[-1] != 3:
            raise ValueError(f"LPIPS: expected two RGB batches [..., H, W, 3] of one shape, "
                             f"found {tuple(img.shape)} and {tuple(ref.shape)}")
        lead = img.shape[:-3]
        both = jnp.concatenate([img.reshape(-1, *img.shape[-3:]), ref.reshape(-1, *ref.shape[-3:])], axis=0)
        both = both.astype(jnp.float32)
        if self.convention == "standard":
            both = 2.0 * both - 1.0
        x = (both - jnp.asarray(_LPIPS_SHIFT, jnp.float32)) / jnp.asarray(_LPIPS_SCALE, jnp.float32)
        terms = []
        for conv, lin, spec in zip(self.convs, self.lins, _ALEX_CONVS):
            if spec[-1]:
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
            x = jax.nn.relu(conv(x))
            feats = x.astype(jnp.float32)
            feats = feats / (jnp.sqrt(jnp.sum(feats * feats, axis=-1, keepdims=True)) + 1e-10)
            fa, fb = jnp.split(feats, 2, axis=0)
            terms.append(jnp.mean(jnp.sum((fa - fb) ** 2 * lin[...].astype(jnp.float32), axis=-1), axis=(1, 2)))
        terms = jnp.stack(terms, axis=-1).reshape(*lead, len(terms))
        return terms if per_layer else jnp.sum(terms, axis=-1)


def lpips_state_keys() -> dict[str, tuple[int, ...]]:
    """The `lpips.LPIPS(net='alex')` state_dict names and shapes `load_lpips_state` requires."""
    keys = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    for k, (name, cin, cout, size, *_rest) in enumerate(_ALEX_CONVS):
        keys[f"{name}.weight"] = (cout, cin, size, size)
        keys[f"{name}.bias"] = (cout,)
        keys[f"lin{k}.model.1.weight"] = (1, cout, 1, 1)
    return keys


def load_lpips_state(module: LPIPS, state: Mapping[str, np.ndarray], prefix: str = "",
                     source: str = "state_dict") -> LPIPS:
    """Write an `lpips.LPIPS(net='alex')` state_dict (`prefix + name` -> PyTorch-layout array) into `module`.

    `lins.{k}.model.1.weight` (lpips registers each lin twice) may be present; it must equal `lin{k}`.
    The scaling layer must hold lpips' constants. Raises ValueError naming `source` and every missing,
    unexpected or mis-shaped key. Returns `module`.
    """
    expected = lpips_state_keys()
    available = {key[len(prefix):] for key in state.keys() if key.startswith(prefix)}
    duplicates = {f"lins.{k}.model.1.weight" for k in range(len(_ALEX_CONVS))}
    problems = [f"missing {prefix}{key}" for key in sorted(set(expected) - available)]
    problems += [f"unexpected {prefix}{key}" for key in sorted(available - set(expected) - duplicates)]
    arrays = {}
    for key, shape in expected.items():
        if key in available:
            arrays[key] = np.asarray(state[prefix + key], np.float32)
            if arrays[key].shape != shape:
                problems.append(f"{prefix}{key}: expected shape {shape}, found {arrays[key].shape}")
    for k in range(len(_ALEX_CONVS)):
        dup, main = f"lins.{k}.model.1.weight", f"lin{k}.model.1.weight"
        if dup in available and main in arrays and not np.array_equal(np.asarray(state[prefix + dup]), arrays[main]):
            problems.append(f"{prefix}{dup} differs from {prefix}{main}")
    for key, constant in (("scaling_layer.shift", _LPIPS_SHIFT), ("scaling_layer.scale", _LPIPS_SCALE)):
        if key in arrays and arrays[key].shape == expected[key] and not np.allclose(arrays[key].ravel(), constant, atol=1e-6):
            problems.append(f"{prefix}{key} is {arrays[key].ravel().tolist()}, not lpips' {list(constant)}")
    if problems:
        raise ValueError(f"cannot load LPIPS-alex from {source}: " + "; ".join(problems))
    for k, (conv, lin, (name, *_)) in enumerate(zip(module.convs, module.lins, _ALEX_CONVS)):
        conv.kernel.set_value(jnp.asarray(arrays[f"{name}.weight"].transpose(2, 3, 1, 0), conv.kernel.dtype))
        conv.bias.set_value(jnp.asarray(arrays[f"{name}.bias"], conv.bias.dtype))
        lin.set_value(jnp.asarray(arrays[f"lin{k}.model.1.weight"].reshape(-1), lin.dtype))
    return module


def load_lpips(path: str | os.PathLike, convention: str = "standard", prefix: str = "") -> LPIPS:
    """An `LPIPS` module with weights from a local `.npz` (from scripts/convert_lpips_weights.py). No downloads."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights file {path} not found; make it with `python scripts/convert_lpips_weights.py "
            f"--alexnet alexnet.pth --lin <lpips package>/weights/v0.1/alex.pth --output {path}`"
        )
    module = nnx.eval_shape(lambda: LPIPS(convention, rngs=nnx.Rngs(0)))
    with np.load(path) as archive:
        return load_lpips_state(module, archive, prefix, source=path)
