"""SpikeEncoder3D: the spike branch's Conv3D residual pyramid (S-VRT `src/models/spike_encoder3d.py`).

Spike voxels `[B, T, H, W, K]` (channels-last; the K time bins of each frame's exposure are the conv
input channels, T is the conv depth axis) become one feature map per scale `[B, T_i, H_i, W_i, C_i]`.

Structure, as the original:
  scale 0:   ReLU(Conv3d(K -> C_0, k3, stride 1, pad 1)), then 2 x ResidualBlock3D(C_0)
  scale i>0: ReLU(Conv3d(C_{i-1} -> C_i, k3, stride (s_t, s_s, s_s), pad 1)), then 2 x ResidualBlock3D(C_i)
  ResidualBlock3D(x) = ReLU(conv2(ReLU(conv1(x))) + x), both convs k3 stride 1 pad 1 with bias.
All padding is zeros. A k3/pad1 conv with stride s maps a length n to floor((n - 1) / s) + 1.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vrtspike_jax.models.vrt.layers import he_normal_init, variance_scaling_init

_PAD_1 = ((1, 1), (1, 1), (1, 1))


def _conv3d(cin: int, cout: int, strides, *, dtype, param_dtype, rngs, kernel_init=None) -> nnx.Conv:
    kw = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Conv(cin, cout, kernel_size=(3, 3, 3), strides=tuple(strides), padding=_PAD_1,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)


class ResidualBlock3D(nnx.Module):
    """`y = ReLU(conv2(ReLU(conv1(x))) + x)` on `[B, T, H, W, C]`; both convs 3x3x3, stride 1, pad 1."""

    def __init__(self, channels: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # He init for the ReLU conv, a smaller second conv so the residual path starts near identity.
        self.conv1 = _conv3d(channels, channels, (1, 1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=he_normal_init())
        self.conv2 = _conv3d(channels, channels, (1, 1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=variance_scaling_init(0.5, "fan_in", "truncated_normal"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))) + x)


def _strided_length(length: int, stride: int) -> int:
    return (length - 1) // stride + 1


class SpikeEncoder3D(nnx.Module):
    """Conv3D + residual pyramid over spike voxels.

    Args:
      in_bins: K, the number of voxel time bins per frame (input channels).
      channels_per_scale: C_i for each scale (the width of the VRT stage each scale feeds).
      temporal_strides: time stride between consecutive scales, length n_scales - 1; default all 1
        (T_i = T, as the original, because VRT stages keep the clip length).
      spatial_strides: spatial stride between consecutive scales, length n_scales - 1; default all 2
        (1, 1/2, 1/4, 1/8 for four scales, matching VRT stages 1-4).

    Parameters: in_proj, res0[0..1].conv{1,2}, downs[i], residuals[i][0..1].conv{1,2}.
    Call: `spike_voxels [B, T, H, W, K]` -> list of `[B, T_i, H_i, W_i, C_i]`, one per scale
    (`output_shapes` gives them without running the model).
    """

    def __init__(
        self,
        in_bins: int,
        channels_per_scale: Sequence[int],
        temporal_strides: Sequence[int] | None = None,
        spatial_strides: Sequence[int] | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        n_scales = len(channels_per_scale)
        if n_scales == 0:
            raise ValueError("SpikeEncoder3D: channels_per_scale is empty; at least one scale is needed")
        if in_bins < 1 or any(int(c) < 1 for c in channels_per_scale):
            raise ValueError(
                f"SpikeEncoder3D: in_bins and channels must be positive, found in_bins={in_bins}, "
                f"channels_per_scale={list(channels_per_scale)}"
            )
        temporal_strides = [1] * (n_scales - 1) if temporal_strides is None else list(temporal_strides)
        spatial_strides = [2] * (n_scales - 1) if spatial_strides is None else list(spatial_strides)
        for name, strides in (("temporal_strides", temporal_strides), ("spatial_strides", spatial_strides)):
            if len(strides) != n_scales - 1:
                raise ValueError(
                    f"SpikeEncoder3D: {name} must have len(channels_per_scale) - 1 = {n_scales - 1} entries "
                    f"(one per down-sampling step), found {len(strides)}: {strides}"
                )
            if any(int(s) < 1 for s in strides):
                raise ValueError(f"SpikeEncoder3D: {name} must all be >= 1, found {strides}")

        self.in_bins = int(in_bins)
        self.channels_per_scale = tuple(int(c) for c in channels_per_scale)
        self.temporal_strides = tuple(int(s) for s in temporal_strides)
        self.spatial_strides = tuple(int(s) for s in spatial_strides)

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c0 = self.channels_per_scale[0]
        self.in_proj = _conv3d(self.in_bins, c0, (1, 1, 1), kernel_init=he_normal_init(), **kw)
        self.res0 = nnx.List([ResidualBlock3D(c0, **kw), ResidualBlock3D(c0, **kw)])
        downs, residuals = [], []
        for i in range(1, n_scales):
            cin, cout = self.channels_per_scale[i - 1], self.channels_per_scale[i]
            s_t, s_s = self.temporal_strides[i - 1], self.spatial_strides[i - 1]
            downs.append(_conv3d(cin, cout, (s_t, s_s, s_s), kernel_init=he_normal_init(), **kw))
            residuals.append(nnx.List([ResidualBlock3D(cout, **kw), ResidualBlock3D(cout, **kw)]))
        self.downs = nnx.List(downs)
        self.residuals = nnx.List(residuals)

    def output_shapes(self, time: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """`(T_i, H_i, W_i, C_i)` of every scale for an input of `time` frames of `height x width`."""
        shapes = [(time, height, width, self.channels_per_scale[0])]
        for s_t, s_s, c in zip(self.temporal_strides, self.spatial_strides, self.channels_per_scale[1:]):
            t, h, w, _ = shapes[-1]
            shapes.append((_strided_length(t, s_t), _strided_length(h, s_s), _strided_length(w, s_s), c))
        return shapes

    def __call__(self, spike_voxels: jax.Array) -> list[jax.Array]:
        """spike_voxels `[B, T, H, W, K]` -> list of `[B, T_i, H_i, W_i, C_i]`, finest scale first."""
        if spike_voxels.ndim != 5 or spike_voxels.shape[-1] != self.in_bins:
            raise ValueError(
                f"SpikeEncoder3D: expected spike voxels [B, T, H, W, K] with K = in_bins = {self.in_bins}, "
                f"found shape {tuple(spike_voxels.shape)}"
            )
        out = jax.nn.relu(self.in_proj(spike_voxels))
        for block in self.res0:
            out = block(out)
        features = [out]
        for down, blocks in zip(self.downs, self.residuals):
            out = jax.nn.relu(down(out))
            for block in blocks:
                out = block(out)
            features.append(out)
        return features
