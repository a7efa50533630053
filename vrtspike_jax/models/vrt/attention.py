"""Temporal mutual self attention of VRT: windows, masks, relative position bias, TMSA blocks and groups.

Layout: features are channels-last [B, D, H, W, C]. Windows are ordered (B, D/wd, H/wh, W/ww) and the tokens in a
window row-major over (d, h, w), exactly as the official `window_partition`, so that attention masks, relative
position indices and the mutual-attention frame split line up with the official weights.
"""
from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.vrt.layers import (LayerNorm, Linear, MlpGEGLU, checkpoint_after_cotangent,
                                           parameter_gradients_first, trunc_normal_init)

MASK_VALUE = -100.0  # the official mask value between tokens of different shifted regions


# ----------------------------------------------------------------------------------------------------------------
# Static helpers (numpy, evaluated at trace time)

def get_window_size(x_size, window_size, shift_size=None):
    """Shrinks the window (and zeroes the shift) along every axis where the input is not larger than the window."""
    use_window = list(window_size)
    use_shift = list(shift_size) if shift_size is not None else None
    for i, size in enumerate(x_size):
        if size <= window_size[i]:
            use_window[i] = size
            if use_shift is not None:
                use_shift[i] = 0
    if shift_size is None:
        return tuple(use_window)
    return tuple(use_window), tuple(use_shift)


def window_partition(x, window_size):
    """[B, D, H, W, C] -> [B * nW, wd*wh*ww, C] (D, H, W must be multiples of the window)."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window_size
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def window_reverse(windows, window_size, b, d, h, w):
    """Inverse of window_partition: [B * nW, wd*wh*ww, C] -> [B, D, H, W, C]."""
    wd, wh, ww = window_size
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, -1)


@lru_cache(maxsize=None)
def compute_region_labels(d: int, h: int, w: int, window_size: Tuple[int, int, int],
                          shift_size: Tuple[int, int, int]) -> np.ndarray:
    """Region label of every token of every shifted window [nW, N] (int32) for a padded input (d, h, w).

    The official attention mask (compute_mask) is 0 between tokens with equal labels and -100 otherwise; it is
    built from these labels inside the attention instead of being stored ([nW, N, N] would be hundreds of MB at
    training crop sizes).
    """
    img = np.zeros((1, d, h, w, 1), np.int32)
    cnt = 0
    slices = [(slice(-ws), slice(-ws, -s), slice(-s, None)) for ws, s in zip(window_size, shift_size)]
    for ds in slices[0]:
        for hs in slices[1]:
            for ws_ in slices[2]:
                img[:, ds, hs, ws_, :] = cnt
                cnt += 1
    return window_partition(img, window_size)[..., 0]


def compute_mask(d: int, h: int, w: int, window_size: Tuple[int, int, int],
                 shift_size: Tuple[int, int, int]) -> np.ndarray:
    """The official attention mask [nW, N, N]: 0 within a shifted region, -100 across (reference / tests)."""
    labels = compute_region_labels(d, h, w, tuple(window_size), tuple(shift_size))
    return np.where(labels[:, None, :] != labels[:, :, None], np.float32(MASK_VALUE), np.float32(0.0))


def _mask_from_labels(labels):
    """[M, n] region labels -> [M, 1, n, n] additive mask (broadcast over heads)."""
    same = labels[:, :, None] == labels[:, None, :]
    return jnp.where(same, 0.0, MASK_VALUE).astype(jnp.float32)[:, None]


def _head_logits(qh, kh, bias_h, labels, scale):
    """Logits of one head over all windows, float32: qh, kh [M, n, hd]; bias_h [n, n] or None; labels [M, n] or
    None (tokens of different shifted regions get MASK_VALUE, built here instead of a stored [M, n, n] mask)."""
    logits = jnp.einsum("bqd,bkd->bqk", qh * jnp.asarray(scale, qh.dtype), kh, preferred_element_type=jnp.float32)
    if bias_h is not None:
        logits = logits + bias_h[None].astype(jnp.float32)
    if labels is not None:
        logits = logits + _mask_from_labels(labels)[:, 0]
    return logits


def _head_forward(qh, kh, vh, bias_h, labels, scale):
    """Softmax attention of one head: -> (out [M, n, hd] in v's dtype, log-sum-exp of the logits [M, n] float32).
    The probabilities are jax.nn.softmax's: exp(logits - max) / sum."""
    logits = _head_logits(qh, kh, bias_h, labels, scale)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    unnormalised = jnp.exp(logits - peak)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("bqk,bkd->bqd", (unnormalised / total).astype(vh.dtype), vh)
    return out, (peak + jnp.log(total))[..., 0]


def _head_backward(qh, kh, vh, bias_h, labels, out, lse, grad_out, scale):
    """Gradients (q, k, v, bias) of one head from the forward's output and log-sum-exp: the probabilities are
    recomputed as exp(logits - lse) (no max or sum over the keys), and the softmax's row sum
    sum_k(dP * P) is sum_d(dO * O), a sum over the head's features instead of the keys."""
    logits = _head_logits(qh, kh, bias_h, labels, scale)
    probs = jnp.exp(logits - lse[..., None])
    grad_v = jnp.einsum("bqk,bqd->bkd", probs.astype(vh.dtype), grad_out.astype(vh.dtype),
                        preferred_element_type=jnp.float32)
    grad_probs = jnp.einsum("bqd,bkd->bqk", grad_out.astype(vh.dtype), vh, preferred_element_type=jnp.float32)
    row = jnp.sum(grad_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    grad_logits = probs * (grad_probs - row)
    scaled = jnp.asarray(scale, jnp.float32)
    grad_q = jnp.einsum("bqk,bkd->bqd", grad_logits.astype(kh.dtype), kh, preferred_element_type=jnp.float32) * scaled
    grad_k = jnp.einsum("bqk,bqd->bkd", grad_logits.astype(qh.dtype), qh, preferred_element_type=jnp.float32) * scaled
    grad_bias = None
    if bias_h is not None:
        # The sum over windows as a matrix-vector product with ones at full float32 precision: the reduction
        # autodiff makes was fused by XLA:CPU (jaxlib 0.10) with the softmax gradient into one YNNPACK kernel
        # that ran at under 1 GB/s (docs/PERFORMANCE.md, "Where the time goes").
        windows = jnp.ones((grad_logits.shape[0],), jnp.float32)
        grad_bias = jnp.einsum("m,mqk->qk", windows, grad_logits,
                               precision=jax.lax.Precision.HIGHEST).astype(bias_h.dtype)
    return grad_q.astype(qh.dtype), grad_k.astype(kh.dtype), grad_v.astype(vh.dtype), grad_bias


def _over_heads(fn, per_head, *args):
    """fn on head-major arguments ([heads, ...] or None): one head at a time under lax.map (the logits of one
    head alive at a time) or all heads at once (vmap)."""
    if per_head:
        return jax.lax.map(lambda a: fn(*a), args)
    return jax.vmap(fn)(*args)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def window_attention(q, k, v, bias, labels, scale, per_head):
    """Softmax attention of every head over every window, with the gradient written out as flash attention does.

    q, k, v: [heads, M, n, hd]; bias: [heads, n, n] (float, the relative position bias added to every window's
    logits) or None; labels: [M, n] region labels (tokens with different labels do not attend to each other,
    official mask value -100) or None; scale: the query scale (static); per_head: run one head at a time (static).
    Returns [heads, M, n, hd] in v's dtype; logits, softmax and the gradients' products in float32.

    The forward pass is jax.nn.softmax attention. The backward pass keeps q, k, v, the output and the logits'
    log-sum-exp ([heads, M, n]) and recomputes each head's probabilities from them. Autodiff of a rematerialised
    head recomputes the whole forward instead (logits, max, sum, the probability-value product) and takes the
    softmax's row sums over the keys. Under a rematerialised TMSA block that was a third pass over the attention.
    """
    out, _ = _window_attention_fwd(q, k, v, bias, labels, scale, per_head)
    return out


def _window_attention_fwd(q, k, v, bias, labels, scale, per_head):
    out, lse = _over_heads(lambda qh, kh, vh, bh: _head_forward(qh, kh, vh, bh, labels, scale), per_head,
                           q, k, v, bias)
    return out, (q, k, v, bias, labels, out, lse)


def _window_attention_bwd(scale, per_head, residuals, grad_out):
    q, k, v, bias, labels, out, lse = residuals
    grad_q, grad_k, grad_v, grad_bias = _over_heads(
        lambda qh, kh, vh, bh, oh, sh, gh: _head_backward(qh, kh, vh, bh, labels, oh, sh, gh, scale), per_head,
        q, k, v, bias, out, lse, grad_out)
    return grad_q, grad_k, grad_v, grad_bias, None


window_attention.defvjp(_window_attention_fwd, _window_attention_bwd)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for c in range(min(n, max(limit, 1)), 0, -1):
        if n % c == 0:
            return c
    return 1


@lru_cache(maxsize=None)
def relative_position_index(window_size: Tuple[int, int, int]) -> np.ndarray:
    """The official `relative_position_index` [N, N] (int) of a window."""
    wd, wh, ww = window_size
    coords = np.stack(np.meshgrid(np.arange(wd), np.arange(wh), np.arange(ww), indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.array([wd - 1, wh - 1, ww - 1])
    return (rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]).astype(np.int64)


@lru_cache(maxsize=None)
def sine_position_encoding(hw: Tuple[int, int], num_pos_feats: int, temperature: float = 10000.0) -> np.ndarray:
    """The official mutual-attention `position_bias` [1, h*w, 2*num_pos_feats] (normalised sine encoding).

    Computed in float32 in the official op order; it can differ from the PyTorch buffer by one ulp.
    """
    h, w = hw
    scale = np.float32(2 * math.pi)
    eps = np.float32(1e-6)
    y_embed = np.cumsum(np.ones((1, h, w), np.float32), axis=1, dtype=np.float32)
    x_embed = np.cumsum(np.ones((1, h, w), np.float32), axis=2, dtype=np.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = np.arange(num_pos_feats, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(num_pos_feats))
    dim_t = dim_t.astype(np.float32)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = np.stack((np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])), axis=4).reshape(1, h, w, -1)
    pos_y = np.stack((np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])), axis=4).reshape(1, h, w, -1)
    pos = np.concatenate((pos_y, pos_x), axis=3)  # 1, h, w, C
    return pos.reshape(1, h * w, -1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Modules

class WindowAttention(nnx.Module):
    """Window multi-head self attention with relative position bias, plus (if mut_attn) mutual attention between
    the two frames of a (2, wh, ww) window with a sine position encoding (official WindowAttention, N:588-725)."""

    def __init__(self, dim: int, window_size: Tuple[int, int, int], num_heads: int, *, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, mut_attn: bool = True, chunk_windows: int = 0,
                 per_head: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dim = dim
        self.per_head = bool(per_head)
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.mut_attn = mut_attn
        self.chunk_windows = int(chunk_windows)
        self.dtype = dtype
        wd, wh, ww = self.window_size
        table_size = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
        self.relative_position_bias_table = nnx.Param(
            trunc_normal_init(0.02)(rngs.params(), (table_size, num_heads), param_dtype))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_self = Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
        if mut_attn:
            self.qkv_mut = Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
            self.proj = Linear(2 * dim, dim, **kw)
        else:
            self.proj = Linear(dim, dim, **kw)

    def relative_position_bias(self, n: int):
        """[heads, n, n] bias for the first n tokens of the configured window (official `index[:N, :N]`)."""
        index = relative_position_index(self.window_size)[:n, :n].reshape(-1)
        table = self.relative_position_bias_table[...]
        return jnp.take(table, jnp.asarray(index), axis=0).reshape(n, n, -1).transpose(2, 0, 1)

    def _heads(self, qkv):
        """[M, n, 3C] -> q, k, v, each [heads, M, n, hd] (one transpose for the three)."""
        m, n, c3 = qkv.shape
        qkv = qkv.reshape(m, n, 3, self.num_heads, c3 // (3 * self.num_heads)).transpose(2, 3, 0, 1, 4)
        # jnp.split, not indexing: its gradient is one concatenation, where each index's gradient was a zero-padded
        # copy of the whole [3, ...] tensor, three of them summed
        return tuple(t[0] for t in jnp.split(qkv, 3, axis=0))

    def _attend(self, q, k, v, labels, bias):
        """q, k, v: [heads, M, n, hd]; labels: [M, n] region labels or None; bias [heads, n, n] or None.
        Returns [M, n, heads*hd]. Logits and softmax in float32 (`window_attention`); with `per_head` one head at
        a time, so that training holds the logits of one head (1/heads of all) while every matmul spans all
        windows."""
        heads, m, n, hd = q.shape
        bias = None if bias is None else bias.astype(jnp.float32)
        out = window_attention(q, k, v, bias, labels, self.scale, self.per_head)
        return out.transpose(1, 2, 0, 3).reshape(m, n, heads * hd)

    def _core(self, qkv, qkv_mut, labels, bias):
        """Attention of M windows: qkv, qkv_mut [M, n, 3C]; labels [M, n] or None -> [M, n, C or 2C]."""
        n = qkv.shape[1]
        q, k, v = self._heads(qkv)
        out = self._attend(q, k, v, labels, bias)
        if qkv_mut is None:
            return out
        q, k, v = self._heads(qkv_mut)
        half = n // 2
        half_labels = None if labels is None else labels[:, :half]  # official mask[:, :N/2, :N/2]
        (q0, q1), (k0, k1), (v0, v1) = (jnp.split(t, 2, axis=2) for t in (q, k, v))   # the two frames
        # Frame-0 slots hold what frame-1 queries gather from frame 0, and vice versa (official order).
        x1_aligned = self._attend(q1, k0, v0, half_labels, None)
        x2_aligned = self._attend(q0, k1, v1, half_labels, None)
        return jnp.concatenate([jnp.concatenate([x1_aligned, x2_aligned], axis=1), out], axis=2)

    def __call__(self, x, region_labels: Optional[np.ndarray] = None):
        """x: [B * nW, N, C] window tokens (windows ordered batch-major); region_labels: [nW, N] labels of the
        shifted regions (tokens with different labels do not attend to each other) or None. -> [B * nW, N, C].

        With chunk_windows > 0 the attention runs over chunks of windows under lax.map with a rematerialised body,
        so that training memory holds the logits of one chunk at a time instead of all windows.
        """
        b_, n, c = x.shape
        qkv = self.qkv_self(x)
        qkv_mut = None
        if self.mut_attn:
            pos = sine_position_encoding(self.window_size[1:], self.dim // 2)
            pos = np.concatenate([pos, pos], axis=1)  # the same encoding for both frames of the window
            qkv_mut = self.qkv_mut(x + jnp.asarray(pos, x.dtype))
        bias = self.relative_position_bias(n)
        labels = None
        if region_labels is not None:
            nw = region_labels.shape[0]
            labels = jnp.tile(jnp.asarray(region_labels[:, :n]), (b_ // nw, 1))
        chunk = _largest_divisor_at_most(b_, self.chunk_windows) if self.chunk_windows else b_
        if chunk >= b_:
            out = self._core(qkv, qkv_mut, labels, bias)
        else:
            split = lambda t: None if t is None else t.reshape((b_ // chunk, chunk) + t.shape[1:])
            body = jax.checkpoint(lambda args: self._core(args[0], args[1], args[2], bias))
            out = jax.lax.map(body, (split(qkv), split(qkv_mut), split(labels)))
            out = out.reshape((b_,) + out.shape[2:])
        return self.proj(out)


def drop_path(x, rate, keep_mask):
    """Stochastic depth: zeroes the samples whose `keep_mask` [B] (booleans, from `draw_keep_masks`) is False and
    rescales the rest by 1 / (1 - rate) (training only; None: x unchanged).

    `rate` may be a Python float or a traced scalar (inside a scan over blocks)."""
    if keep_mask is None or (isinstance(rate, (int, float)) and rate <= 0.0):
        return x
    keep = 1.0 - rate
    mask = keep_mask.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


def draw_keep_masks(rng, rates, batch: int):
    """Drop-path masks of a group of blocks, [len(rates), 2, batch] booleans: block i keeps sample b in its attention
    (index 0) and MLP (index 1) residual with probability 1 - rates[i]. One draw for the whole group: a draw per
    block and residual compiled to a loop of its own each (XLA:CPU's threefry), 12 s of the plain-VRT train step's
    115 s compile."""
    keep = 1.0 - jnp.asarray(rates, jnp.float32)[:, None, None]
    return jax.random.bernoulli(rng, keep, (len(rates), 2, batch))


def _attention_part(norm1, attn, block_window_size, x, region_labels, shift_size):
    """TMSA.attention_part's computation: norm1, zero padding to window multiples, the cyclic shift, window attention
    and the way back."""
    b, d, h, w, c = x.shape
    window_size, shift_size = get_window_size((d, h, w), block_window_size, shift_size)
    x = norm1(x)
    # Zero-pad after the norm up to window multiples; padded tokens take part as keys/values (official).
    pad_d = (window_size[0] - d % window_size[0]) % window_size[0]
    pad_h = (window_size[1] - h % window_size[1]) % window_size[1]
    pad_w = (window_size[2] - w % window_size[2]) % window_size[2]
    if pad_d or pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_d), (0, pad_h), (0, pad_w), (0, 0)))
    _, dp, hp, wp, _ = x.shape
    shifted = any(s > 0 for s in shift_size)
    if shifted:
        x = jnp.roll(x, shift=tuple(-s for s in shift_size), axis=(1, 2, 3))
    windows = window_partition(x, window_size)
    windows = attn(windows, region_labels if shifted else None)
    x = window_reverse(windows, window_size, b, dp, hp, wp)
    if shifted:
        x = jnp.roll(x, shift=shift_size, axis=(1, 2, 3))
    if pad_d or pad_h or pad_w:
        x = x[:, :d, :h, :w, :]
    return x


class TMSA(nnx.Module):
    """One temporal mutual self attention block (official TMSA, N:728-852), pre-norm, on [B, D, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, window_size, shift_size, *, mut_attn: bool = True,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, qk_scale=None, drop_path: float = 0.0,
                 chunk_windows: int = 0, per_head: bool = False, tie_mlp_gradients: bool = False,
                 remat_attention: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.tie_mlp_gradients = bool(tie_mlp_gradients)
        self.remat_attention = bool(remat_attention)
        for ws, s in zip(self.window_size, self.shift_size):
            if not 0 <= s < ws:
                raise ValueError(f"shift_size {self.shift_size} must lie in [0, window_size {self.window_size})")
        self.drop_path_rate = float(drop_path)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn = WindowAttention(dim, self.window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                    mut_attn=mut_attn, chunk_windows=chunk_windows, per_head=per_head, **kw)
        self.norm2 = LayerNorm(dim, **kw)
        self.mlp = MlpGEGLU(dim, int(dim * mlp_ratio), **kw)

    def attention_part(self, x, region_labels, shift_size=None):
        """norm1 and the (shifted) window attention of x: [B, D, H, W, C] -> [B, D, H, W, C] (no residual).

        With remat_attention it is recomputed from x in the backward pass once its output's cotangent exists
        (layers.checkpoint_after_cotangent), so that inside a rematerialised block the MLP's backward pass runs
        without the attention's intermediates alive."""
        shift_size = self.shift_size if shift_size is None else tuple(shift_size)
        if not self.remat_attention:
            return _attention_part(self.norm1, self.attn, self.window_size, x, region_labels, shift_size)
        graphdef, state = nnx.split((self.norm1, self.attn))

        def fn(st, y):
            norm1, attn = nnx.merge(graphdef, st)
            return _attention_part(norm1, attn, self.window_size, y, region_labels, shift_size)

        return checkpoint_after_cotangent(fn)(state, x)

    def __call__(self, x, region_labels, keep_masks=None, drop_rate=None, shift_size=None):
        """x: [B, D, H, W, C]; region_labels: the group's shifted-window region labels [nW, N] (numpy) or None;
        keep_masks: this block's drop-path masks [2, B] (attention, MLP; `draw_keep_masks`) or None;
        drop_rate: overrides the block's drop-path rate (used by the scan over blocks); shift_size: overrides the
        block's window shift (a TMSAG's stacked blocks share one module: even blocks unshifted, odd ones shifted)."""
        rate = self.drop_path_rate if drop_rate is None else drop_rate
        keep1 = keep2 = None
        if keep_masks is not None:
            keep1, keep2 = keep_masks[0], keep_masks[1]
        with jax.named_scope("attention"):
            x = x + drop_path(self.attention_part(x, region_labels, shift_size), rate, keep1)
        with jax.named_scope("mlp"):
            (norm2, mlp), y = (self.norm2, self.mlp), x
            if self.tie_mlp_gradients:
                # The MLP's parameter gradients before its input gradient (hence before the attention's backward
                # pass): without this tie XLA:CPU kept the MLP's backward buffers (the GELU derivative, its matmul
                # outputs) alive under the attention's backward pass, stage 7's memory peak at 5x256x256.
                (norm2, mlp), y = parameter_gradients_first((self.norm2, self.mlp), x)
            x = x + drop_path(mlp(norm2(y)), rate, keep2)
        return x


_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class TMSAG(nnx.Module):
    """A group of TMSA blocks with alternating shifts (official TMSAG, N:855-936), on [B, D, H, W, C].

    The blocks' parameters are stored stacked: `blocks` is one TMSA module whose every parameter has a leading axis
    of length `depth` (block i's parameters are `leaf[i]`; block i is unshifted for even i, shifted for odd i). The
    blocks are drawn one by one as separate modules would be (same initial values) and then stacked. The scan over
    blocks (`scan_blocks`) takes the even and the odd blocks as two strided slices of the stack, and the train
    step's optimizer sees one leaf per parameter kind of the group instead of one per block: on the official
    deblurring VRT 1,410 parameter leaves become 530, which is what XLA compiles per leaf (AdamW, the clipping, the
    non-finite guard, EMA) and what the GPU compiler's fusion pass rates against each of the optimizer's scalars
    (docs/PERFORMANCE.md)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size, *, shift_size=None, mut_attn: bool = True,
                 mlp_ratio: float = 2.0, qkv_bias: bool = True, qk_scale=None, drop_path=0.0, remat: str = "none",
                 scan_blocks: bool = False, chunk_windows: int = 0, per_head: bool = False,
                 tie_parameter_gradients: bool = False, remat_attention: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.window_size = tuple(window_size)
        self.shift_size = tuple(s // 2 for s in window_size) if shift_size is None else tuple(shift_size)
        for ws, s in zip(self.window_size, self.shift_size):
            if not 0 <= s < ws:
                raise ValueError(f"shift_size {self.shift_size} must lie in [0, window_size {self.window_size})")
        self.remat = remat
        self.scan_blocks = scan_blocks
        self.depth = int(depth)
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.drop_path_rates = tuple(float(r) for r in rates[:depth])
        blocks = [TMSA(dim, num_heads, self.window_size, (0, 0, 0), mut_attn=mut_attn, mlp_ratio=mlp_ratio,
                       qkv_bias=qkv_bias, qk_scale=qk_scale, drop_path=self.drop_path_rates[i],
                       chunk_windows=chunk_windows, per_head=per_head,
                       tie_mlp_gradients=remat != "none" and tie_parameter_gradients,
                       remat_attention=remat_attention, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
                  for i in range(depth)]
        if blocks:
            stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[nnx.state(b, nnx.Param) for b in blocks])
            nnx.update(blocks[0], stacked)
        self.blocks = blocks[0] if blocks else None

    def block_shift(self, i: int):
        """The window shift of block i: none for even i, `shift_size` for odd i (official alternation)."""
        return (0, 0, 0) if i % 2 == 0 else self.shift_size

    def block_state(self, i: int):
        """(graphdef, state) of block i alone: a TMSA with block i's parameters (its shift: `block_shift(i)`)."""
        graphdef, state = nnx.split(self.blocks)
        return graphdef, jax.tree.map(lambda leaf: leaf[i], state)

    def _block_fn(self, static_rate: bool):
        """A pure function (graphdef, state, x, labels, keep_masks, rate, shift) -> x applying one block,
        rematerialised per the configured policy; `rate` is static (a float, or None: no drop path) or traced (the
        scan over blocks)."""

        def apply(graphdef, state, x, labels, keep_masks, rate, shift):
            return nnx.merge(graphdef, state)(x, labels, keep_masks, rate, shift_size=shift)

        if self.remat == "none":
            return apply
        if self.remat == "full":
            # Recomputed only once the block's output cotangent exists (layers.checkpoint_after_cotangent): with
            # jax.checkpoint XLA:CPU started the recomputation of unrolled blocks early in the backward pass.
            if static_rate:
                def ordered(graphdef, state, x, labels, keep_masks, rate, shift):
                    fn = lambda st, y, km: apply(graphdef, st, y, labels, km, rate, shift)  # noqa: E731
                    return checkpoint_after_cotangent(fn)(state, x, keep_masks)
            else:
                def ordered(graphdef, state, x, labels, keep_masks, rate, shift):
                    fn = lambda st, y, km, r: apply(graphdef, st, y, labels, km, r, shift)  # noqa: E731
                    return checkpoint_after_cotangent(fn)(state, x, keep_masks, rate)
            return ordered
        static = (0, 3, 5, 6) if static_rate else (0, 3, 6)
        return jax.checkpoint(apply, policy=_REMAT_POLICIES[self.remat], static_argnums=static)

    def __call__(self, x, rng=None):
        """x: [B, D, H, W, C] -> [B, D, H, W, C]; rng: drop-path key (training) or None."""
        if self.depth == 0:
            return x
        _, d, h, w, _ = x.shape
        window_size, shift_size = get_window_size((d, h, w), self.window_size, self.shift_size)
        dp = int(np.ceil(d / window_size[0])) * window_size[0]
        hp = int(np.ceil(h / window_size[1])) * window_size[1]
        wp = int(np.ceil(w / window_size[2])) * window_size[2]
        labels = _HashableArray(compute_region_labels(dp, hp, wp, window_size, shift_size))
        masks = None if rng is None else draw_keep_masks(rng, self.drop_path_rates, x.shape[0])
        n_pairs = self.depth // 2 if self.scan_blocks and self.depth >= 4 else 0
        if n_pairs:
            x = self._scan_pairs(x, labels, masks, n_pairs)
        apply = self._block_fn(static_rate=True)
        for i in range(2 * n_pairs, self.depth):
            graphdef, state = self.block_state(i)
            use = masks is not None
            x = apply(graphdef, state, x, labels, masks[i] if use else None, self.drop_path_rates[i] if use else None,
                      self.block_shift(i))
        return x

    def _scan_pairs(self, x, labels, masks, n_pairs):
        """Runs blocks 0 .. 2*n_pairs-1 as a lax.scan over (unshifted, shifted) pairs: one compiled body per group
        instead of one per block, over the stacked parameters."""
        graphdef, state = nnx.split(self.blocks)
        # The unshifted and the shifted blocks as two scanned inputs (strided slices of the stack, parameter-sized
        # copies): a body that indexed one [2, ...] input instead let XLA:CPU's scheduler keep more of the
        # attention's backward buffers alive (57.9 -> 60.5 GiB of temporaries at 5x256x256).
        even = jax.tree.map(lambda leaf: leaf[0:2 * n_pairs:2], state)
        odd = jax.tree.map(lambda leaf: leaf[1:2 * n_pairs:2], state)
        rates = jnp.asarray(self.drop_path_rates[:2 * n_pairs], jnp.float32).reshape(n_pairs, 2)
        use_masks = masks is not None
        # [n_pairs, 2 blocks, 2 residuals, B]
        pair_masks = masks[:2 * n_pairs].reshape((n_pairs, 2) + masks.shape[1:]) if use_masks \
            else jnp.zeros((n_pairs,), jnp.int32)
        apply = self._block_fn(static_rate=False)
        shift_a, shift_b = self.block_shift(0), self.block_shift(1)

        def body(carry, inputs):
            state_a, state_b, pair_mask, rate = inputs
            carry = apply(graphdef, state_a, carry, labels, pair_mask[0] if use_masks else None,
                          rate[0] if use_masks else None, shift_a)
            carry = apply(graphdef, state_b, carry, labels, pair_mask[1] if use_masks else None,
                          rate[1] if use_masks else None, shift_b)
            return carry, None

        x, _ = jax.lax.scan(body, x, (even, odd, pair_masks, rates))
        return x


class _HashableArray:
    """Wraps static numpy region labels so that they can be a static argument of jax.checkpoint."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self._key = (array.shape, array.tobytes())

    def __getitem__(self, item):
        return self.array[item]

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _HashableArray) and self._key == other._key


class RTMSA(nnx.Module):
    """Residual TMSA group of stage 8 (official RTMSA, N:939-992): x + linear(TMSAG_self_only(x))."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size, *, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True, qk_scale=None, drop_path=0.0, remat: str = "none", scan_blocks: bool = False,
                 chunk_windows: int = 0, per_head: bool = False, tie_parameter_gradients: bool = False,
                 remat_attention: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.residual_group = TMSAG(dim, depth, num_heads, window_size, mut_attn=False, mlp_ratio=mlp_ratio,
                                    qkv_bias=qkv_bias, qk_scale=qk_scale, drop_path=drop_path, remat=remat,
                                    scan_blocks=scan_blocks, chunk_windows=chunk_windows, per_head=per_head,
                                    tie_parameter_gradients=tie_parameter_gradients,
                                    remat_attention=remat_attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, rng=None):
        return x + self.linear(self.residual_group(x, rng))
