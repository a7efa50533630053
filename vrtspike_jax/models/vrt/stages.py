"""VRT stages 1-7 (official `Stage`, N:995-1228): reshape, TMSA groups and flow-guided parallel warping.

All tensors are channels-last: features [N, D, H, W, C], flows [N, D-1 (or D-2, D-3), H, W, 2] with (dx, dy).
"""
from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.vrt.attention import _REMAT_POLICIES, TMSAG, _largest_divisor_at_most
from vrtspike_jax.models.vrt.layers import (Conv2d, LayerNorm, Linear, MlpGEGLU, checkpoint_after_cotangent,
                                            gradients_before_input, parameter_gradients_first, sequential_chunks,
                                            torch_uniform_init)
from vrtspike_jax.models.vrt.warping import deform_conv2d, flow_warp


def fold_frames(x):
    """[N, D, ...] -> [N*D, ...]."""
    return x.reshape((-1,) + x.shape[2:])


def down_reshape(x):
    """'n d (h neih) (w neiw) c -> n d h w (neiw neih c)': each 2x2 block to channel (dw*2 + dh)*C + c."""
    n, d, h, w, c = x.shape
    x = x.reshape(n, d, h // 2, 2, w // 2, 2, c)  # n d h neih w neiw c
    x = x.transpose(0, 1, 2, 4, 5, 3, 6)  # n d h w neiw neih c
    return x.reshape(n, d, h // 2, w // 2, 4 * c)


def up_reshape(x):
    """'n d h w (neiw neih c) -> n d (h neih) (w neiw) c', the inverse of down_reshape."""
    n, d, h, w, c4 = x.shape
    c = c4 // 4
    x = x.reshape(n, d, h, w, 2, 2, c)  # n d h w neiw neih c
    x = x.transpose(0, 1, 2, 5, 3, 4, 6)  # n d h neih w neiw c
    return x.reshape(n, d, 2 * h, 2 * w, c)


class DCNv2PackFlowGuided(nnx.Module):
    """Flow-guided modulated deformable alignment (official DCNv2PackFlowGuided, N:267-338).

    `weight` keeps the PyTorch layout (C_out, C_in, 3, 3) used by `deform_conv2d`. conv_offset predicts 27*dg
    channels: offset residues (tanh-bounded by max_residue_magnitude, added to the flipped flow) and mask logits.
    """

    def __init__(self, channels: int, *, deformable_groups: int, max_residue_magnitude: float, pa_frames: int = 2,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.max_residue_magnitude = float(max_residue_magnitude)
        self.pa_frames = pa_frames
        self.deformable_groups = deformable_groups
        self.dtype = dtype
        self.weight = nnx.Param(torch_uniform_init(channels * 9)(rngs.params(), (channels, channels, 3, 3),
                                                                 param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        kw = dict(padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_offset = (1 + pa_frames // 2) * channels + pa_frames
        self.conv_offset = nnx.List([
            Conv2d(in_offset, channels, 3, **kw),
            Conv2d(channels, channels, 3, **kw),
            Conv2d(channels, channels, 3, **kw),
            Conv2d(channels, 27 * deformable_groups, 3, zero_init=True, **kw),
        ])

    def __call__(self, neighbours, warped_neighbours: Sequence, current, flows: Sequence):
        """neighbours: [B, H, W, (pa/2)*C] the raw neighbour features (concatenated); warped_neighbours: pa/2 arrays
        [B, H, W, C] (each neighbour flow-warped); current: [B, H, W, C]; flows: pa/2 flows [B, H, W, 2]."""
        dtype = self.dtype or current.dtype
        out = jnp.concatenate([w.astype(dtype) for w in warped_neighbours] + [current.astype(dtype)] +
                              [f.astype(dtype) for f in flows], axis=-1)
        for i, conv in enumerate(self.conv_offset):
            out = conv(out)
            if i < len(self.conv_offset) - 1:
                out = jax.nn.leaky_relu(out, 0.1)
        out = out.astype(jnp.float32)
        third = out.shape[-1] // 3
        o1, o2, mask_logits = out[..., :third], out[..., third:2 * third], out[..., 2 * third:]
        offset = self.max_residue_magnitude * jnp.tanh(jnp.concatenate([o1, o2], axis=-1))
        # Add the flow, (dx, dy) flipped to torchvision's (dy, dx), to every (group, tap) pair of its chunk.
        chunks = jnp.split(offset, len(flows), axis=-1)
        chunks = [chunk + jnp.tile(flow.astype(jnp.float32)[..., ::-1], (1, 1, 1, chunk.shape[-1] // 2))
                  for chunk, flow in zip(chunks, flows)]
        offset = jnp.concatenate(chunks, axis=-1)
        mask = jax.nn.sigmoid(mask_logits)
        return deform_conv2d(neighbours.astype(dtype), offset, self.weight[...].astype(dtype),
                             self.bias[...].astype(dtype), mask.astype(dtype))


def _zeros_like_frame(x):
    return jnp.zeros_like(x[:, 0])


class Stage(nnx.Module):
    """One of VRT's stages 1-7 on [N, D, H, W, C_in] -> [N, D, H', W', C]."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size, *, reshape: str,
                 mul_attn_ratio: float = 0.75, mlp_ratio: float = 2.0, qkv_bias: bool = True, qk_scale=None,
                 drop_path=0.0, pa_frames: int = 2, deformable_groups: int = 16, max_residue_magnitude: float = 10.0,
                 remat: str = "none", scan_blocks: bool = False, chunk_windows: int = 0, per_head: bool = False,
                 alignment_chunk: int = 0, tie_parameter_gradients: bool = True, remat_attention: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if reshape not in ("none", "down", "up"):
            raise ValueError(f"reshape must be 'none', 'down' or 'up', got {reshape!r}")
        self.alignment_chunk = int(alignment_chunk)
        self.tie_parameter_gradients = bool(tie_parameter_gradients)
        self.remat = remat
        self.reshape_mode = reshape
        self.pa_frames = pa_frames
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if reshape == "none":
            self.reshape_norm = LayerNorm(dim, **kw)
            self.reshape_linear = None
        elif reshape == "down":
            self.reshape_norm = LayerNorm(4 * in_dim, **kw)
            self.reshape_linear = Linear(4 * in_dim, dim, **kw)
        else:
            self.reshape_norm = LayerNorm(in_dim // 4, **kw)
            self.reshape_linear = Linear(in_dim // 4, dim, **kw)
        depth_mut = int(depth * mul_attn_ratio)
        group_kw = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_path=drop_path,
                        remat=remat, scan_blocks=scan_blocks, chunk_windows=chunk_windows, per_head=per_head,
                        tie_parameter_gradients=tie_parameter_gradients, remat_attention=remat_attention, **kw)
        self.residual_group1 = TMSAG(dim, depth_mut, num_heads, (2, window_size[1], window_size[2]),
                                     mut_attn=True, **group_kw)
        self.linear1 = Linear(dim, dim, **kw)
        # Official quirk: residual_group2 receives the stage's whole drop-path slice and uses its first entries.
        self.residual_group2 = TMSAG(dim, depth - depth_mut, num_heads, window_size, mut_attn=False, **group_kw)
        self.linear2 = Linear(dim, dim, **kw)
        self.pa_deform = DCNv2PackFlowGuided(dim, deformable_groups=deformable_groups,
                                             max_residue_magnitude=max_residue_magnitude, pa_frames=pa_frames, **kw)
        self.pa_fuse = MlpGEGLU(3 * dim, 3 * dim, dim, **kw)

    def __call__(self, x, flows_backward: List, flows_forward: List, rng=None):
        """x: [N, D, H, W, C_in]; flows_*: the pa_frames//2 flow tensors of this stage's scale
        ([N, D-k, H, W, 2] for k = 1..pa_frames//2). Returns [N, D, H, W, C]."""
        if self.reshape_mode == "down":
            x = down_reshape(x)
        elif self.reshape_mode == "up":
            x = up_reshape(x)
        x = self.reshape_norm(x)
        if self.reshape_linear is not None:
            x = self.reshape_linear(x)
        rng1 = rng2 = None
        if rng is not None:
            rng1, rng2 = jax.random.split(rng)
        with jax.named_scope("tmsa_mutual"):
            x = self.linear1(self.residual_group1(x, rng1)) + x
        with jax.named_scope("tmsa_self"):
            (group, linear), y = (self.residual_group2, self.linear2), x
            if self._orders_gradients:
                # The self-attention group's parameter gradients before the mutual group's backward pass: without
                # this tie, XLA:CPU kept the self group's MLP and attention backward buffers (6.1 GiB at 5x256x256)
                # alive under the mutual group's backward pass, the step's memory peak (docs/PERFORMANCE.md).
                (group, linear), y = parameter_gradients_first((group, linear), x)
            x = linear(group(y, rng2)) + y
        with jax.named_scope("parallel_warp"):
            if self.remat == "none":
                return self._warp_and_fuse(x, flows_backward, flows_forward)
            # Rematerialise the alignment (flow warping, DCN and its offset convs) and the fusion MLP: only their
            # inputs are kept for the backward pass, not the 27*dg-channel offset maps and sampled taps.
            graphdef, state = nnx.split(self)
            state, x, (flows_backward, flows_forward) = gradients_before_input(
                state, x, (flows_backward, flows_forward), self.tie_parameter_gradients)
            fn = lambda st, x, fb, ff: nnx.merge(graphdef, st)._warp_and_fuse(x, fb, ff)  # noqa: E731
            policy = _REMAT_POLICIES[self.remat]
            fn = checkpoint_after_cotangent(fn) if policy is None else jax.checkpoint(fn, policy=policy)
            return fn(state, x, flows_backward, flows_forward)

    @property
    def _orders_gradients(self) -> bool:
        """Whether parts of the stage take their input through parameter-gradient ties (under remat only)."""
        return self.remat != "none" and self.tie_parameter_gradients

    def _warp_and_fuse(self, x, flows_backward, flows_forward):
        x_backward, x_forward = self.parallel_warp(x, flows_backward, flows_forward)
        fuse, fuse_input = self.pa_fuse, jnp.concatenate([x, x_backward, x_forward], axis=-1)
        if self._orders_gradients:
            # The fusion MLP's parameter gradients before its input gradient: without this tie, XLA:CPU kept the
            # MLP's backward buffers (GELU derivative, its matmul outputs: ten [N, D, H, W, 3C] tensors, 3.5 GiB at
            # 5x256x256) alive under the DCN's backward pass, at the train step's memory peak (docs/PERFORMANCE.md).
            fuse, fuse_input = parameter_gradients_first(fuse, fuse_input)
        return fuse(fuse_input)

    def parallel_warp(self, x, flows_backward, flows_forward):
        """Aligns the neighbours of every frame to it (official get_aligned_feature_{2,4,6}frames).

        backward[t] aligns frames t+1 .. t+k to t (zeros for the last frame); forward[t] aligns t-1 .. t-k to t
        (zeros for the first). All 2(D-1) alignments are independent and run as one batched DCN call.
        Returns (x_backward, x_forward), each [N, D, H, W, C].
        """
        n, d, h, w, c = x.shape
        k_max = self.pa_frames // 2

        def pad_time(t, before, after):
            return jnp.pad(t, ((0, 0), (before, after)) + ((0, 0),) * (t.ndim - 2))

        # Problems along a time axis of 2(D-1): backward targets t = 0..D-2, then forward targets t = 1..D-1.
        # Neighbour k of backward target t is frame t+k (with flows_backward[k-1][:, t]); of forward target t it
        # is frame t-k (with flows_forward[k-1][:, t-k]); missing neighbours and their flows are zeros.
        neighbours, flows = [], []
        for k in range(1, k_max + 1):
            neighbours.append(jnp.concatenate([pad_time(x[:, k:], 0, k - 1), pad_time(x[:, :d - k], k - 1, 0)], 1))
            fb = flows_backward[k - 1].astype(jnp.float32)
            ff = flows_forward[k - 1].astype(jnp.float32)
            flows.append(jnp.concatenate([pad_time(fb, 0, k - 1), pad_time(ff, k - 1, 0)], axis=1))
        current = jnp.concatenate([x[:, :-1], x[:, 1:]], axis=1)
        aligned = self._align([fold_frames(t) for t in neighbours], [fold_frames(t) for t in flows],
                              fold_frames(current))
        aligned = aligned.reshape(n, 2, d - 1, h, w, -1).astype(x.dtype)
        zeros = jnp.zeros((n, 1, h, w, aligned.shape[-1]), x.dtype)
        backward = jnp.concatenate([aligned[:, 0], zeros], axis=1)
        forward = jnp.concatenate([zeros, aligned[:, 1]], axis=1)
        return backward, forward

    def _align(self, neighbours, flows, current):
        """Flow warping + DCN of M stacked alignment problems ([M, H, W, ...] each) -> [M, H, W, C].

        With alignment_chunk > 0 the problems run in chunks one after another (layers.sequential_chunks), in the
        forward pass and, each chunk recomputed from its inputs, in the backward pass: the alignment's
        intermediates (the offset convs' activations, the 27*dg-channel offset and mask maps, the DCN's sampling
        and their gradients) exist for one chunk at a time."""

        def run(deform, nbs, fls, cur):
            warped = [flow_warp(nb, fl, "bilinear", "zeros") for nb, fl in zip(nbs, fls)]
            return deform(jnp.concatenate(nbs, axis=-1), warped, cur, fls)

        m = current.shape[0]
        chunk = _largest_divisor_at_most(m, self.alignment_chunk) if self.alignment_chunk else m
        if chunk >= m:
            return run(self.pa_deform, neighbours, flows, current)
        graphdef, state = nnx.split(self.pa_deform)
        apply = lambda st, nbs, fls, cur: run(nnx.merge(graphdef, st), nbs, fls, cur)  # noqa: E731
        return sequential_chunks(apply, chunk)(state, neighbours, flows, current)
