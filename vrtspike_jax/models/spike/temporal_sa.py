"""Temporal self-attention of the spike branch (S-VRT `SpikeTemporalSelfAttention` / `SpikeTemporalSA`).

Attention runs along time only, independently at every pixel: each (b, h, w) is a sequence of T
tokens of width C. Layout is channels-last `[B, T, H, W, C]` in and out (S-VRT's code uses
`[B, T, C, H, W]` for the block and `[B, C, T, H, W]` for the multi-scale wrapper; we keep one layout).
S-VRT's spatial chunking is a memory device that does not change the math, so there is none here.
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


class SpikeTemporalSABlock(nnx.Module):
    """One pre-norm transformer block along time: `[B, T, H, W, C] -> [B, T, H, W, C]`.

    Per pixel sequence u (T tokens):
      u <- u + MHA(LN1(u))          (4 heads by default, no dropout, no position encoding)
      u <- u + MLP(LN2(u))          (C -> int(C * mlp_ratio) -> C, exact GELU)
    LayerNorm eps 1e-5. Parameters: ln1, attn.{q,k,v,out}_proj, ln2, mlp.{fc1,fc2}.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dim = dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = layer_norm(dim, **kw)
        self.attn = TemporalMultiHeadAttention(dim, num_heads, **kw)
        self.ln2 = layer_norm(dim, **kw)
        self.mlp = FeedForward(dim, mlp_ratio, **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features `[B, T, H, W, C]` -> `[B, T, H, W, C]`."""
        check_features(type(self).__name__, features, self.dim)
        normed = self.ln1(features)
        features = features + self.attn(normed, normed)
        return features + self.mlp(self.ln2(features))


class SpikeTemporalSA(nnx.Module):
    """One `SpikeTemporalSABlock` per scale; list of `[B, T_i, H_i, W_i, C_i]` in, same list out.

    Scale i uses `blocks[i]` with width `channels_per_scale[i]`; nothing mixes between scales.
    """

    def __init__(
        self,
        channels_per_scale: Sequence[int],
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(channels_per_scale) == 0:
            raise ValueError("SpikeTemporalSA needs at least one scale; channels_per_scale is empty")
        self.channels_per_scale = tuple(int(c) for c in channels_per_scale)
        self.blocks = nnx.List([
            SpikeTemporalSABlock(c, num_heads, mlp_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for c in self.channels_per_scale
        ])

    def __call__(self, features_per_scale: Sequence[jax.Array]) -> list[jax.Array]:
        """List of `[B, T_i, H_i, W_i, C_i]` (one per scale) -> list of the same shapes."""
        if len(features_per_scale) != len(self.blocks):
            raise ValueError(
                f"SpikeTemporalSA: expected {len(self.blocks)} scales (channels {list(self.channels_per_scale)}), "
                f"found {len(features_per_scale)} feature maps"
            )
        outputs = []
        for scale, (block, feat) in enumerate(zip(self.blocks, features_per_scale)):
            check_features(f"SpikeTemporalSA scale {scale}", feat, block.dim)
            outputs.append(block(feat))
        return outputs
