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
    """Grouped gather. images [N, H, W, G, C]; rows, cols int32 [N, ..., G] (in range) -> [N, ..., G, C]:
    point (..., g) reads group g of pixel (row, col)."""
    n, h, w, g, c = images.shape
    flat = images.reshape(n, h * w * g, c)
    index = ((rows * w + cols) * g + jnp.arange(g, dtype=rows.dtype)).reshape(n, -1)
    out = jnp.take_along_axis(flat, index[..., None], axis=1, mode="clip")
    return out.reshape(*rows.shape, c)


def _corners(h: int, w: int, x, y):
    """The four bilinear corners of float pixel coordinates: [(rows, cols, weight, d_weight/dx, d_weight/dy,
    valid)], corners outside the image marked invalid (they contribute 0: the grid_sample / DCN 'zeros' rule)."""
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0i = x0.astype(jnp.int32)
    y0i = y0.astype(jnp.int32)
    corners = []
    for dy, wy, dwy in ((0, 1.0 - fy, -1.0), (1, fy, 1.0)):
        for dx, wx, dwx in ((0, 1.0 - fx, -1.0), (1, fx, 1.0)):
            rows = y0i + dy
            cols = x0i + dx
            valid = (rows >= 0) & (rows <= h - 1) & (cols >= 0) & (cols <= w - 1)
            corners.append((jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1), wy * wx, wy * dwx, wx * dwy, valid))
    return corners


def _sample_zeros_forward(images, x, y):
    _, h, w, _, _ = images.shape
    out = None
    for rows, cols, weight, _, _, valid in _corners(h, w, x, y):
        weight = jnp.where(valid, weight, 0.0).astype(images.dtype)
        term = _gather_pixels(images, rows, cols) * weight[..., None]
        out = term if out is None else out + term
    return out


@jax.custom_vjp
def _sample_zeros(images, x, y):
    """Grouped bilinear sampling with zero padding: images [N, H, W, G, C], x, y [N, ..., G] -> [N, ..., G, C].

    The custom gradient recomputes the corner values instead of saving them (autodiff would keep the four gathered
    corners, 4x the sampled tensor, for the coordinate gradient)."""
    return _sample_zeros_forward(images, x, y)


def _sample_zeros_fwd(images, x, y):
    return _sample_zeros_forward(images, x, y), (images, x, y)


def _sample_zeros_bwd(residuals, grad_out):
    images, x, y = residuals
    n, h, w, g, c = images.shape
    grad_images = jnp.zeros((n, h * w * g, c), jnp.float32)
    grad_x = jnp.zeros(x.shape, jnp.float32)
    grad_y = jnp.zeros(y.shape, jnp.float32)
    grad = grad_out.astype(jnp.float32)
    for rows, cols, weight, dweight_dx, dweight_dy, valid in _corners(h, w, x, y):
        # d out / d image: scatter the weighted output gradient back to the corner pixels.
        index = ((rows * w + cols) * g + jnp.arange(g, dtype=rows.dtype)).reshape(n, -1)
        contribution = (grad * jnp.where(valid, weight, 0.0)[..., None]).reshape(n, -1, c)
        # One scatter per sample (vmap: the batch is a batching dimension of the scatter), not one over a flattened
        # batch index: with the batch sharded over devices, XLA's partitioner then scatters locally instead of
        # scattering into a replicated image gradient and all-reducing it (an activation-sized collective per corner,
        # which inside deform_conv2d's tap loop also broke multi-process CPU runs: gloo collectives out of order).
        grad_images = jax.vmap(lambda gi, i, u: gi.at[i].add(u))(grad_images, index, contribution)
        # d out / d coordinates: <grad_out, corner value> times the weight's derivative.
        value_dot = jnp.sum(grad * _gather_pixels(images, rows, cols).astype(jnp.float32), axis=-1)
        value_dot = jnp.where(valid, value_dot, 0.0)
        grad_x = grad_x + value_dot * dweight_dx
        grad_y = grad_y + value_dot * dweight_dy
    return (grad_images.reshape(n, h, w, g, c).astype(images.dtype), grad_x.astype(x.dtype),
            grad_y.astype(y.dtype))


_sample_zeros.defvjp(_sample_zeros_fwd, _sample_zeros_bwd)


def _bilinear_sample(images, x, y, padding_mode: str):
    """Bilinear sampling at float pixel coordinates (one group).

    images: [N, H, W, C]; x, y: [N, ...] float pixel coordinates (x along W, y along H).
    padding_mode 'zeros': each of the four corners outside the image contributes 0 (grid_sample / DCN rule).
    padding_mode 'border': coordinates are clamped to [0, size-1] first (grid_sample 'border').
    Returns [N, ..., C] in the dtype of `images`.
    """
    n, h, w, c = images.shape
    if padding_mode == "border":
        x = jnp.clip(x, 0.0, w - 1.0)
        y = jnp.clip(y, 0.0, h - 1.0)
        sample = _sample_zeros_forward  # in-range coordinates: autodiff (with clip's zero gradient outside)
    elif padding_mode == "zeros":
        sample = _sample_zeros
    else:
        raise ValueError(f"padding_mode must be 'zeros' or 'border', got {padding_mode!r}")
    out = sample(images[:, :, :, None], x[..., None], y[..., None])
    return out[..., 0, :]


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
            value = _gather_pixels(images[:, :, :, None], jnp.clip(yi, 0, h - 1)[..., None],
                                   jnp.clip(xi, 0, w - 1)[..., None])[..., 0, :]
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
    offset_y = offset[..., 0]  # [N, Ho, Wo, G, K]
    offset_x = offset[..., 1]
    mask = None if mask is None else mask.reshape(n, ho, wo, groups, taps)
    grouped = images.reshape(n, h, w, groups, cg)
    w_ = weight.reshape(weight_groups, cout // weight_groups, cin_per_wgroup, taps)
    # One tap at a time under lax.scan, its body rematerialised: each step samples [N, Ho, Wo, G, cg] (the size of
    # the input) and accumulates its matmul into the output, in tap order, so that no tensor of 9x the feature map
    # exists in the forward or in the gradient, and the sampling code is compiled once instead of once per tap.
    # Measured on one stage-1 DCN of the 1x6x64x64 train step (10 problems, 96 channels, 16 groups), value and
    # gradient, against the nine unrolled taps: XLA:CPU compiles it in 0.9 s instead of 3.3 s, runs it in 0.96 s
    # instead of 1.31 s and plans 342 MiB of temporaries instead of 1765 MiB (docs/PERFORMANCE.md).
    # The weights enter the loop broadcast over the batch ([K, N, ...], a few MB), so that the weight gradient of a
    # tap stays per sample inside the loop and its sum over the batch (a collective when the batch is sharded over
    # devices) happens once, after the loop.
    per_tap = lambda t: jnp.moveaxis(t, -1, 0)  # noqa: E731  [..., K] -> [K, ...]
    w_batch = jnp.broadcast_to(per_tap(w_)[:, None], (taps, n) + w_.shape[:-1])   # [K, N, wg, cout/wg, cin/wg]

    def tap(out, xs):
        by, bx, oy, ox, mk, wk = xs
        sample = _sample_zeros(grouped, bx[None, None, :, None] + ox, by[None, :, None, None] + oy)
        if mask is not None:
            sample = sample * mk[..., None].astype(sample.dtype)
        sample = sample.reshape(n, ho, wo, weight_groups, cin_per_wgroup)
        return out + jnp.einsum("nhwgc,ngoc->nhwgo", sample, wk.astype(sample.dtype)), None

    xs = (jnp.asarray(base_y.T, jnp.float32), jnp.asarray(base_x.T, jnp.float32), per_tap(offset_y),
          per_tap(offset_x), per_tap(mask) if mask is not None else jnp.zeros((taps,), jnp.float32), w_batch)
    init = jnp.zeros((n, ho, wo, weight_groups, cout // weight_groups), images.dtype)
    out, _ = jax.lax.scan(jax.checkpoint(tap), init, xs)
    out = out.reshape(n, ho, wo, cout)
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
