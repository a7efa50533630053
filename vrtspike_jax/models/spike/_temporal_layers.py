"""Private building blocks shared by the spike temporal self-attention and the RGB/spike fusion.

Both attend along time only, independently at every pixel. Tensors stay channels-last
`[B, T, H, W, C]`; the attention is written as einsums over that layout, so no `[B*H*W, T, C]` copy
is made and the largest intermediate is the score tensor `[B, H, W, heads, T_q, T_k]`
(T_q * T_k / C times the size of a feature map; 25/96 at the baseline's T=5, C=96).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Host-side (NumPy) initialisers when given a HostKey, jax.random otherwise; see vrt/layers.py HostKey.
from vrtspike_jax.models.vrt.layers import lecun_normal_init, xavier_uniform_init


def layer_norm(dim: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """PyTorch `nn.LayerNorm(dim)`: eps 1e-5, biased variance over the channel axis, affine."""
    # use_fast_variance=False: two-pass variance, as PyTorch (E[x^2]-E[x]^2 loses digits on offset inputs).
    return nnx.LayerNorm(
        dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class TemporalMultiHeadAttention(nnx.Module):
    """PyTorch `nn.MultiheadAttention(dim, num_heads, batch_first=True)` applied along time at every pixel.

    Query `[B, T_q, H, W, C]`, key/value source `[B, T_k, H, W, C]` -> `[B, T_q, H, W, C]` (channels-last).
    Projections q/k/v/out are separate `(C, C)` Linears (PyTorch packs q|k|v into one `in_proj_weight`;
    `vrtspike_jax.convert.spike` splits it). Head h uses channels `[h*d, (h+1)*d)`, d = C / heads;
    scores q.k / sqrt(d), softmax over keys (computed in float32), no mask, no dropout, no bias_k/v.
    Keys and values are projected from the same tensor (true for both S-VRT uses).
    """

    def __init__(self, dim: int, num_heads: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.dtype = dtype
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=xavier_uniform_init())
        self.q_proj = nnx.Linear(dim, dim, **linear)
        self.k_proj = nnx.Linear(dim, dim, **linear)
        self.v_proj = nnx.Linear(dim, dim, **linear)
        self.out_proj = nnx.Linear(dim, dim, **linear)

    def attention_probs(self, query: jax.Array, key_value: jax.Array) -> jax.Array:
        """Softmax weights `[B, H, W, heads, T_q, T_k]` (float32)."""
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key_value))
        return self._probs(q, k)

    def __call__(self, query: jax.Array, key_value: jax.Array) -> jax.Array:
        q = self._split_heads(self.q_proj(query))  # [B, Tq, H, W, n, d]
        k = self._split_heads(self.k_proj(key_value))
        v = self._split_heads(self.v_proj(key_value))
        probs = self._probs(q, k).astype(v.dtype)  # [B, H, W, n, Tq, Tk]
        mixed = jnp.einsum("bhwnqk,bkhwnd->bqhwnd", probs, v)
        mixed = mixed.reshape(*mixed.shape[:4], self.dim)
        return self.out_proj(mixed)

    def _split_heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:4], self.num_heads, self.dim // self.num_heads)

    def _probs(self, q: jax.Array, k: jax.Array) -> jax.Array:
        scale = 1.0 / math.sqrt(self.dim // self.num_heads)
        scores = jnp.einsum("bqhwnd,bkhwnd->bhwnqk", q, k, preferred_element_type=jnp.float32)
        return jax.nn.softmax(scores * scale, axis=-1)


class FeedForward(nnx.Module):
    """`Linear(C -> int(C * mlp_ratio))` -> exact (erf) GELU -> `Linear(-> C)`, on the last axis."""

    def __init__(self, dim: int, mlp_ratio: float, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty hidden layer for width {dim}")
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=lecun_normal_init())
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_init=lecun_normal_init())

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def check_features(name: str, x: jax.Array, dim: int) -> None:
    """Raise ValueError unless `x` is `[B, T, H, W, dim]`."""
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a 5-D [B, T, H, W, C] tensor, found shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(
            f"{name}: expected {dim} channels in the last axis of [B, T, H, W, C], found {x.shape[-1]} "
            f"(shape {tuple(x.shape)})"
        )
