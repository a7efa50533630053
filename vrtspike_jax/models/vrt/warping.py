"""Sampling operators of VRT, in pixel space and channels-last.

* `flow_warp`: VRT's `flow_warp` (F.grid_sample with align_corners=True) for the modes VRT uses: bilinear with
  'zeros' or 'border' padding, and 'nearest4' (the four integer neighbours, for the input frames).
* `deform_conv2d`: torchvision.ops.deform_conv2d (modulated deformable convolution, DCNv2) with torchvision's
  offset / mask channel layout, offset groups and weight groups.
* `resize_bilinear`, `avg_pool2x2`, `pad_replicate_end`: the exact interpolate / pool / pad calls of SpyNet.

grid_sample with align_corners=True normalises pixel coordinates to [-1, 1] and back; doing the sampling directly
in pixel coordinates is the same function (the round trip only adds float32 noise of ~2e-6).
"""
from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np


def _gather_pixels(images, rows, cols):
    """images [N, H, W, C]; rows, cols int32 [N, ...] (assumed in range) -> [N, ..., C]."""
    n, h, w, c = images.shape
    flat = images.reshape(n, h * w, c)
    index = (rows * w + cols).reshape(n, -1)
    out = jnp.take_along_axis(flat, index[..., None], axis=1, mode="clip")
    return out.reshape(*rows.shape, c)


def _bilinear_sample(images, x, y, padding_mode: str):
    """Bilinear sampling at float pixel coordinates.

    images: [N, H, W, C]; x, y: [N, ...] float pixel coordinates (x along W, y along H).
    padding_mode 'zeros': each of the four corners outside the image contributes 0 (grid_sample / DCN rule).
    padding_mode 'border': coordinates are clamped to [0, size-1] first (grid_sample 'border').
    Returns [N, ..., C] in the dtype of `images`.
    """
    _, h, w, _ = images.shape
    coord_dtype = x.dtype
    if padding_mode == "border":
        x = jnp.clip(x, 0.0, w - 1.0)
        y = jnp.clip(y, 0.0, h - 1.0)
    elif padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}")
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    wx1 = x - x0
    wy1 = y - y0
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    x0i = x0.astype(jnp.int32)
    y0i = y0.astype(jnp.int32)
    out = None
    for dy, wy in ((0, wy0), (1, wy1)):
        for dx, wx in ((0, wx0), (1, wx1)):
            yi = y0i + dy
            xi = x0i + dx
            valid = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
            weight = jnp.where(valid, wy * wx, jnp.zeros((), coord_dtype))
            value = _gather_pixels(images, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1))
            term = value * weight[..., None].astype(images.dtype)
            out = term if out is None else out + term
    return out


def _pixel_grid(h: int, w: int, dtype):
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype), indexing="ij")
    return xs, ys


def flow_warp(images, flow, interp_mode: str = "bilinear", padding_mode: str = "zeros"):
    """Warps `images` [N, H, W, C] by `flow` [N, H, W, 2] ((dx, dy) in pixels), as VRT's flow_warp.

    Output pixel (i, j) samples `images` at (i + dy, j + dx). Modes:
      'bilinear' + 'zeros' (feature warping), 'bilinear' + 'border' (SpyNet), 'nearest4' + 'zeros' (input frames):
      nearest4 returns [N, H, W, 4C], the samples at (floor x, floor y), (floor x, ceil y), (ceil x, floor y),
      (ceil x, ceil y), channel = 4-sample index * C + c, with zeros outside the image.
    Sampling coordinates are computed in float32 whatever the image dtype.
    """
    n, h, w, c = images.shape
    if flow.shape != (n, h, w, 2):
        raise ValueError(f"flow must have shape {(n, h, w, 2)} for images {images.shape}, got {flow.shape}")
    flow = flow.astype(jnp.float32)
    xs, ys = _pixel_grid(h, w, jnp.float32)
    x = xs[None] + flow[..., 0]
    y = ys[None] + flow[..., 1]
    if interp_mode == "bilinear":
        return _bilinear_sample(images, x, y, padding_mode)
    if interp_mode != "nearest4":
        raise ValueError(f"interp_mode must be 'bilinear' or 'nearest4', got {interp_mode!r}")
    if padding_mode != "zeros":
        raise ValueError("nearest4 is only defined with padding_mode='zeros'")
    outs = []
    for fx in (jnp.floor, jnp.ceil):
        for fy in (jnp.floor, jnp.ceil):
            xi = fx(x).astype(jnp.int32)
            yi = fy(y).astype(jnp.int32)
            valid = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
            value = _gather_pixels(images, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1))
            outs.append(jnp.where(valid[..., None], value, jnp.zeros((), images.dtype)))
    return jnp.concatenate(outs, axis=-1)


def deform_conv2d(images, offset, weight, bias=None, mask=None, *, stride=(1, 1), padding=(1, 1),
                  dilation=(1, 1)):
    """Modulated deformable convolution with torchvision.ops.deform_conv2d semantics, channels-last.

    Args:
      images: [N, H, W, Cin].
      offset: [N, Ho, Wo, 2 * G * kh * kw], torchvision channel order: channel g*2K + 2k is dy and g*2K + 2k + 1
        is dx for kernel tap k = i*kw + j; G offset groups each cover Cin/G consecutive input channels.
      weight: [Cout, Cin / weight_groups, kh, kw] (PyTorch layout); weight_groups = Cin / weight.shape[1].
      bias: [Cout] or None.
      mask: [N, Ho, Wo, G * kh * kw] (channel g*K + k) or None (all ones).
    Returns:
      [N, Ho, Wo, Cout]. Tap (i, j) of output (ho, wo) samples (ho*s - p + i*dil + dy, wo*s - p + j*dil + dx)
      bilinearly; corners outside the image contribute 0.
    """
    n, h, w, cin = images.shape
    cout, cin_per_wgroup, kh, kw = weight.shape
    taps = kh * kw
    if cin % cin_per_wgroup:
        raise ValueError(f"input channels {cin} are not a multiple of the weight's {cin_per_wgroup}")
    weight_groups = cin // cin_per_wgroup
    if offset.shape[-1] % (2 * taps):
        raise ValueError(f"offset channels {offset.shape[-1]} are not a multiple of 2*{taps}")
    groups = offset.shape[-1] // (2 * taps)
    if cin % groups:
        raise ValueError(f"input channels {cin} are not divisible by {groups} offset groups")
    _, ho, wo, _ = offset.shape
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    cg = cin // groups

    offset = offset.astype(jnp.float32).reshape(n, ho, wo, groups, taps, 2)
    ki, kj = np.divmod(np.arange(taps), kw)
    base_y = (np.arange(ho) * sh - ph)[:, None] + ki[None, :] * dh  # [Ho, K]
    base_x = (np.arange(wo) * sw - pw)[:, None] + kj[None, :] * dw  # [Wo, K]
    y = jnp.asarray(base_y, jnp.float32)[None, :, None, None, :] + offset[..., 0]  # [N, Ho, Wo, G, K]
    x = jnp.asarray(base_x, jnp.float32)[None, None, :, None, :] + offset[..., 1]
    # Sample each offset group from its own channel slice: fold groups into the batch.
    grouped = images.reshape(n, h, w, groups, cg).transpose(0, 3, 1, 2, 4).reshape(n * groups, h, w, cg)
    y_g = y.transpose(0, 3, 1, 2, 4).reshape(n * groups, ho, wo, taps)
    x_g = x.transpose(0, 3, 1, 2, 4).reshape(n * groups, ho, wo, taps)
    samples = _bilinear_sample(grouped, x_g, y_g, "zeros")  # [N*G, Ho, Wo, K, cg]
    if mask is not None:
        m = mask.reshape(n, ho, wo, groups, taps).transpose(0, 3, 1, 2, 4).reshape(n * groups, ho, wo, taps)
        samples = samples * m[..., None].astype(samples.dtype)
    samples = samples.reshape(n, groups, ho, wo, taps, cg).transpose(0, 2, 3, 1, 5, 4)  # [N, Ho, Wo, G, cg, K]
    samples = samples.reshape(n, ho, wo, weight_groups, cin_per_wgroup, taps)
    w_ = weight.reshape(weight_groups, cout // weight_groups, cin_per_wgroup, taps).astype(samples.dtype)
    out = jnp.einsum("nhwgck,gock->nhwgo", samples, w_).reshape(n, ho, wo, cout)
    if bias is not None:
        out = out + bias.astype(out.dtype)
    return out


@lru_cache(maxsize=None)
def _interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """[out, in] matrix of 1-D linear interpolation with torch's F.interpolate source-index rule."""
    mat = np.zeros((out_size, in_size), np.float64)
    # torch computes the scale, the source index and the weights in float32; so do we, for bit-level agreement.
    dst = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
        src = dst * scale
    else:
        scale = np.float32(in_size / out_size)
        src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float64)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, i0), 1.0 - lam)
    np.add.at(mat, (rows, i1), lam)
    return mat.astype(np.float32)


def resize_bilinear(images, out_hw, align_corners: bool):
    """F.interpolate(mode='bilinear', align_corners=...) without antialiasing, on [N, H, W, C]."""
    _, h, w, _ = images.shape
    oh, ow = out_hw
    if (oh, ow) == (h, w) and not align_corners:
        return images
    my = jnp.asarray(_interp_matrix(h, oh, align_corners))
    mx = jnp.asarray(_interp_matrix(w, ow, align_corners))
    hp = jax.lax.Precision.HIGHEST
    out = jnp.einsum("oh,nhwc->nowc", my.astype(images.dtype), images, precision=hp)
    return jnp.einsum("pw,nowc->nopc", mx.astype(images.dtype), out, precision=hp)


def avg_pool2x2(images):
    """F.avg_pool2d(kernel 2, stride 2) on [N, H, W, C]; odd sizes are floored (the last row/column dropped)."""
    n, h, w, c = images.shape
    h2, w2 = h // 2, w // 2
    x = images[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, c)
    return x.mean(axis=(2, 4))


def pad_replicate_end(images, pad_h: int, pad_w: int):
    """Replicate-pads `pad_h` rows at the bottom and `pad_w` columns at the right of [N, H, W, C]."""
    if pad_h == 0 and pad_w == 0:
        return images
    return jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
