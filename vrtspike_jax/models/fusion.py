"""RGB/spike fusion by temporal cross-attention (S-VRT `src/models/fusion/cross_attn_temporal.py`).

At every pixel, the RGB stage output's T tokens (queries) attend over the spike features' tokens
(keys/values) along time. Layout is channels-last `[B, T, H, W, C]` (S-VRT: `[B, T, C, H, W]`).

Per pixel, with Fr the RGB features and Fs the spike features:
  Q = ln_q(Fr);  K = V = ln_kv(Fs)          (one LayerNorm shared by keys and values)
  X = Fr + MHA(Q, K, V)                     (residual onto the *raw* Fr, as S-VRT's code; its guide's
                                             "Q + Y" would break the identity path)
  out = X + FFN(ln_ffn(X))                  (FFN: C -> int(C * mlp_ratio) -> C, exact GELU)
No channel change, no gates. S-VRT's spatial chunking does not change the math and is left out.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vrtspike_jax.models.spike._temporal_layers import (
    FeedForward,
    TemporalMultiHeadAttention,
    check_features,
    layer_norm,
)


class TemporalCrossAttnFuse(nnx.Module):
    """Fuse spike features into RGB features: `(rgb [B,T,H,W,C], spike [B,T,H,W,C]) -> [B,T,H,W,C]`.

    Args:
      dim: C, the channel width of both inputs (the VRT stage's width).
      num_heads: attention heads (4 in the original); dim must divide by it.
      mlp_ratio: FFN hidden width = int(dim * mlp_ratio).
      allow_time_mismatch: S-VRT requires the spike features to have the RGB clip's length T (its
        reshape fails otherwise) and so does this module by default. With True, spike features of any
        length T_s are accepted; each of the T RGB tokens then attends over the T_s spike tokens.

    Parameters: ln_q, ln_kv, attn.{q,k,v,out}_proj, ln_ffn, ffn.{fc1,fc2}.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        *,
        allow_time_mismatch: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        self.allow_time_mismatch = allow_time_mismatch
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = layer_norm(dim, **kw)
        self.ln_kv = layer_norm(dim, **kw)
        self.attn = TemporalMultiHeadAttention(dim, num_heads, **kw)
        self.ln_ffn = layer_norm(dim, **kw)
        self.ffn = FeedForward(dim, mlp_ratio, **kw)

    def __call__(self, rgb_features: jax.Array, spike_features: jax.Array) -> jax.Array:
        """rgb_features `[B, T, H, W, C]` (queries), spike_features `[B, T, H, W, C]` (keys/values)
        -> fused `[B, T, H, W, C]`."""
        name = type(self).__name__
        check_features(f"{name} rgb_features", rgb_features, self.dim)
        check_features(f"{name} spike_features", spike_features, self.dim)
        rgb_shape, spike_shape = tuple(rgb_features.shape), tuple(spike_features.shape)
        if rgb_shape[0] != spike_shape[0] or rgb_shape[2:4] != spike_shape[2:4]:
            raise ValueError(
                f"{name}: batch and spatial size of the spike features must equal the RGB features' "
                f"[B, T, H, W, C]; found rgb {rgb_shape}, spike {spike_shape}"
            )
        if rgb_shape[1] != spike_shape[1] and not self.allow_time_mismatch:
            raise ValueError(
                f"{name}: spike features have T={spike_shape[1]} frames, RGB features T={rgb_shape[1]} "
                f"(rgb {rgb_shape}, spike {spike_shape}); the time lengths must be equal "
                f"(or construct with allow_time_mismatch=True)"
            )
        keys_values = self.ln_kv(spike_features)
        fused = rgb_features + self.attn(self.ln_q(rgb_features), keys_values)
        return fused + self.ffn(self.ln_ffn(fused))


class MultiScaleTemporalCrossAttnFuse(nnx.Module):
    """One `TemporalCrossAttnFuse` per scale (S-VRT `MultiScaleTemporalCrossAttnFuse`).

    `fuse_blocks[i]` has width `channels_per_scale[i]`. Call with two lists of `[B, T, H_i, W_i, C_i]`
    (RGB, spike), one entry per scale; returns the list of fused `[B, T, H_i, W_i, C_i]`.
    """

    def __init__(
        self,
        channels_per_scale: Sequence[int],
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        *,
        allow_time_mismatch: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(channels_per_scale) == 0:
            raise ValueError("MultiScaleTemporalCrossAttnFuse: channels_per_scale is empty")
        self.channels_per_scale = tuple(int(c) for c in channels_per_scale)
        self.fuse_blocks = nnx.List([
            TemporalCrossAttnFuse(c, num_heads, mlp_ratio, allow_time_mismatch=allow_time_mismatch,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for c in self.channels_per_scale
        ])

    def __call__(self, rgb_per_scale: Sequence[jax.Array], spike_per_scale: Sequence[jax.Array]) -> list[jax.Array]:
        """Lists of `[B, T, H_i, W_i, C_i]` (RGB queries, spike keys/values) -> list of fused maps."""
        n = len(self.fuse_blocks)
        if len(rgb_per_scale) != n or len(spike_per_scale) != n:
            raise ValueError(
                f"MultiScaleTemporalCrossAttnFuse: expected {n} scales (channels {list(self.channels_per_scale)}), "
                f"found {len(rgb_per_scale)} RGB and {len(spike_per_scale)} spike feature maps"
            )
        fused = []
        for scale, (block, rgb, spike) in enumerate(zip(self.fuse_blocks, rgb_per_scale, spike_per_scale)):
            try:
                fused.append(block(rgb, spike))
            except ValueError as err:
                raise ValueError(f"MultiScaleTemporalCrossAttnFuse scale {scale}: {err}") from err
        return fused
