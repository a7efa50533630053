"""The Video Restoration Transformer (official `VRT`, models/network_vrt.py N:1231-1598) in Flax NNX.

Boundary layout: frames [N, D, H, W, C] (channels-last), float in [0, 1], RGB. Everything inside is channels-last.
The official network takes (N, D, C, H, W); `vrtspike_jax.convert` maps its state_dict onto this module.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.vrt.attention import RTMSA
from vrtspike_jax.models.vrt.config import STAGE_RESHAPES, STAGE_SCALES, VRTConfig, check_input_shape
from vrtspike_jax.models.vrt.layers import Conv2d, HostKey, LayerNorm, Linear, gradients_before_input
from vrtspike_jax.models.vrt.spynet import SpyNet
from vrtspike_jax.models.vrt.stages import Stage, fold_frames
from vrtspike_jax.models.vrt.warping import flow_warp, resize_bilinear

# A hook called after each of stages 1-7: (stage_number 1..7, stage_output [N, D, h, w, C]) -> replacement.
StageHook = Callable[[int, jax.Array], jax.Array]


def _dtype(name):
    return None if name is None else jnp.dtype(name)


def per_frame(fn, x):
    """Applies a [B, H, W, C] -> [B, H', W', C'] function to every frame of [N, D, H, W, C]."""
    n, d = x.shape[:2]
    y = fn(fold_frames(x))
    return y.reshape((n, d) + y.shape[1:])


def pixel_shuffle(x, r: int):
    """torch.nn.PixelShuffle on channels-last [B, H, W, C*r*r] -> [B, H*r, W*r, C]."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


class Upsample(nnx.Module):
    """Official `Upsample` for video SR: per x2, Conv(64->256) + PixelShuffle(2) + LeakyReLU(0.1); then a Conv."""

    def __init__(self, scale: int, num_feat: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if scale & (scale - 1) == 0:
            self.factors = [2] * int(np.log2(scale))
        elif scale == 3:
            self.factors = [3]
        else:
            raise ValueError(f"upscale {scale} is not supported; supported: 2^n and 3")
        self.convs = nnx.List([Conv2d(num_feat, f * f * num_feat, 3, **kw) for f in self.factors])
        self.conv_out = Conv2d(num_feat, num_feat, 3, **kw)

    def __call__(self, x):
        for conv, f in zip(self.convs, self.factors):
            x = jax.nn.leaky_relu(pixel_shuffle(conv(x), f), 0.1)
        return self.conv_out(x)


class VRT(nnx.Module):
    """VRT for video restoration. `model(frames)` maps [N, D, H, W, 3] in [0, 1] to the restored frames
    [N, D, H*upscale, W*upscale, 3]. D >= 2; H and W multiples of 8 and >= 64 (checked before any compute)."""

    def __init__(self, config: VRTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        rngs = HostKey.from_rngs(rngs)
        dtype = _dtype(c.dtype)
        param_dtype = jnp.dtype(c.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        in_first = c.in_chans * (1 + 2 * 4) + (1 if c.nonblind_denoising else 0)
        self.conv_first = Conv2d(in_first, c.embed_dims[0], 3, padding=1, **kw)
        self.spynet = SpyNet(param_dtype=param_dtype, rngs=rngs)
        dpr = np.linspace(0, c.drop_path_rate, sum(c.depths)).tolist()
        stages = []
        for i in range(7):
            stages.append(Stage(
                in_dim=c.embed_dims[i - 1], dim=c.embed_dims[i], depth=c.depths[i], num_heads=c.num_heads[i],
                window_size=c.window_size, reshape=STAGE_RESHAPES[i], mul_attn_ratio=c.mul_attn_ratio,
                mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale,
                drop_path=dpr[sum(c.depths[:i]):sum(c.depths[:i + 1])], pa_frames=c.pa_frames,
                deformable_groups=c.deformable_groups, max_residue_magnitude=10 / STAGE_SCALES[i], remat=c.remat,
                scan_blocks=c.scan_blocks, chunk_windows=c.attention_chunk_windows,
                per_head=c.attention_per_head, alignment_chunk=c.alignment_chunk,
                tie_parameter_gradients=c.tie_parameter_gradients, remat_attention=c.remat_attention, **kw))
        self.stages = nnx.List(stages)
        self.stage8_norm = LayerNorm(c.embed_dims[6], **kw)
        self.stage8_linear = Linear(c.embed_dims[6], c.embed_dims[7], **kw)
        self.stage8 = nnx.List([
            RTMSA(c.embed_dims[i], c.depths[i], c.num_heads[i],
                  (1, c.window_size[1], c.window_size[2]) if i in c.indep_reconsts else c.window_size,
                  mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale,
                  drop_path=dpr[sum(c.depths[:i]):sum(c.depths[:i + 1])], remat=c.remat, scan_blocks=c.scan_blocks,
                  chunk_windows=c.attention_chunk_windows, per_head=c.attention_per_head,
                  tie_parameter_gradients=c.tie_parameter_gradients, remat_attention=c.remat_attention, **kw)
            for i in range(7, len(c.depths))])
        self.norm = LayerNorm(c.embed_dims[-1], **kw)
        self.conv_after_body = Linear(c.embed_dims[-1], c.embed_dims[0], **kw)
        if c.upscale == 1:
            self.conv_before_upsample = None
            self.upsample = None
            self.conv_last = Conv2d(c.embed_dims[0], c.out_chans, 3, padding=1, **kw)
        else:
            num_feat = 64
            self.conv_before_upsample = Conv2d(c.embed_dims[0], num_feat, 3, padding=1, **kw)
            self.upsample = Upsample(c.upscale, num_feat, **kw)
            self.conv_last = Conv2d(num_feat, c.out_chans, 3, padding=1, **kw)

    # ------------------------------------------------------------------------------------------------------------
    def check_input(self, frames) -> None:
        channels = self.config.in_chans + (1 if self.config.nonblind_denoising else 0)
        check_input_shape(frames.shape, channels)

    def get_flows(self, frames):
        """Optical flows between neighbouring frames at scales 1, 1/2, 1/4, 1/8.

        Returns (flows_backward, flows_forward): lists of pa_frames//2 * 4 tensors, ordered [2-frame flows at
        scales 1..1/8, then 4-frame flows, then 6-frame flows]; a k-frame flow at scale s is [N, D-k/2, H/s, W/s, 2].
        flows_backward[0][:, t] warps frame t+1 onto frame t; flows_forward[0][:, t] warps frame t onto t+1.
        """
        n, d, h, w, c = frames.shape
        x1 = fold_frames(frames[:, :-1])
        x2 = fold_frames(frames[:, 1:])
        # Backward (ref = t, supp = t+1) and forward (ref = t+1, supp = t) in one batched SpyNet call.
        with jax.named_scope("spynet"):
            flows = self.spynet(jnp.concatenate([x1, x2], 0), jnp.concatenate([x2, x1], 0))
        m = x1.shape[0]
        backward = [f[:m].reshape((n, d - 1) + f.shape[1:]) for f in flows]
        forward = [f[m:].reshape((n, d - 1) + f.shape[1:]) for f in flows]
        if self.config.pa_frames >= 4:
            with jax.named_scope("compose_flows"):
                b2, f2 = _compose_flows_4(backward, forward)
                if self.config.pa_frames == 6:
                    b3, f3 = _compose_flows_6(backward, forward, b2, f2)
                    return backward + b2 + b3, forward + f2 + f3
            return backward + b2, forward + f2
        return backward, forward

    @staticmethod
    def get_aligned_images(frames, flow_backward, flow_forward):
        """Nearest-4 warping of the input frames (official get_aligned_image_2frames).

        Returns (x_backward, x_forward), each [N, D, H, W, 4C]: backward[t] samples frame t+1 (zeros at t = D-1),
        forward[t] samples frame t-1 (zeros at t = 0)."""
        n, d, h, w, c = frames.shape
        back = flow_warp(fold_frames(frames[:, 1:]), fold_frames(flow_backward), "nearest4")
        fwd = flow_warp(fold_frames(frames[:, :-1]), fold_frames(flow_forward), "nearest4")
        back = back.reshape(n, d - 1, h, w, 4 * c)
        fwd = fwd.reshape(n, d - 1, h, w, 4 * c)
        zeros = jnp.zeros((n, 1, h, w, 4 * c), frames.dtype)
        return jnp.concatenate([back, zeros], axis=1), jnp.concatenate([zeros, fwd], axis=1)

    def embed(self, frames, intermediates: Optional[Dict] = None):
        """Flows, aligned images and conv_first: returns (features [N, D, H, W, C0], flows_backward, flows_forward)."""
        c = self.config
        images = frames[..., :c.in_chans]
        flows_backward, flows_forward = self.get_flows(images)
        x_backward, x_forward = self.get_aligned_images(images, flows_backward[0], flows_forward[0])
        parts = [images, x_backward, x_forward]
        if c.nonblind_denoising:
            parts.append(frames[..., c.in_chans:])
        x = jnp.concatenate(parts, axis=-1)
        dtype = _dtype(c.dtype)
        if dtype is not None:
            x = x.astype(dtype)
        x = per_frame(self.conv_first, x)
        if intermediates is not None:
            intermediates.update(flows_backward=flows_backward, flows_forward=flows_forward,
                                 aligned_image_backward=x_backward, aligned_image_forward=x_forward,
                                 conv_first_out=x)
        return x, flows_backward, flows_forward

    def forward_features(self, x, flows_backward: List, flows_forward: List, *, rng=None,
                         stage_hook: Optional[StageHook] = None, intermediates: Optional[Dict] = None):
        """Stages 1-7 (with skips), stage 8 and the final norm (official forward_features), on [N, D, H, W, C0].

        `stage_hook(i, out_i)`, if given, is applied to the output of stage i (1..7) and its result replaces the
        stage output everywhere downstream (skips included): this is where VRTWithSpike fuses the spike features.
        """
        k = self.config.pa_frames // 2
        scale_of_stage = (0, 1, 2, 3, 2, 1, 0)
        rngs = [None] * (7 + len(self.stage8)) if rng is None else list(jax.random.split(rng, 7 + len(self.stage8)))

        def run_stage(i, inp):
            s = scale_of_stage[i]
            fb = [flows_backward[s + 4 * j] for j in range(k)]
            ff = [flows_forward[s + 4 * j] for j in range(k)]
            with jax.named_scope(f"stage{i + 1}"):   # names in XLA's metadata (scripts/memory_breakdown.py)
                graphdef, state = nnx.split(self.stages[i])
                state, inp, (fb, ff) = gradients_before_input(state, inp, (fb, ff),
                                                              self.config.tie_parameter_gradients)
                fn = lambda st, a, b, c, r: nnx.merge(graphdef, st)(a, b, c, r)  # noqa: E731
                if self.config.remat_stages:
                    # Keep only the stage input for the backward pass (the stage is recomputed, its blocks then
                    # rematerialised again inside): the leanest memory, at about one more forward pass.
                    fn = jax.checkpoint(fn)
                out = fn(state, inp, fb, ff, rngs[i])
            if stage_hook is not None:
                with jax.named_scope(f"fusion{i + 1}"):
                    out = stage_hook(i + 1, out)
            if intermediates is not None:
                intermediates[f"stage{i + 1}_out"] = out
            return out

        x1 = run_stage(0, x)
        x2 = run_stage(1, x1)
        x3 = run_stage(2, x2)
        x4 = run_stage(3, x3)
        y = run_stage(4, x4)
        y = run_stage(5, y + x3)
        y = run_stage(6, y + x2)
        y = y + x1
        with jax.named_scope("stage8"):
            y = self.stage8_linear(self.stage8_norm(y))
        for j, layer in enumerate(self.stage8):
            with jax.named_scope(f"stage8_{j + 1}"):
                y = layer(y, rngs[7 + j])
            if intermediates is not None:
                intermediates[f"stage8_{j + 1}_out"] = y
        return self.norm(y)

    def reconstruct(self, x, features, frames):
        """conv_after_body residual, reconstruction and the global residual: returns [N, D, H*s, W*s, out_chans]."""
        c = self.config
        x = x + self.conv_after_body(features)
        if c.upscale == 1:
            out = per_frame(self.conv_last, x).astype(jnp.float32)
            return out + frames[..., :c.in_chans].astype(jnp.float32)
        x = per_frame(lambda t: jax.nn.leaky_relu(self.conv_before_upsample(t), 0.01), x)
        x = per_frame(self.upsample, x)
        out = per_frame(self.conv_last, x).astype(jnp.float32)
        n, d, h, w, _ = frames.shape
        skip = resize_bilinear(fold_frames(frames[..., :c.in_chans].astype(jnp.float32)),
                               (h * c.upscale, w * c.upscale), align_corners=False)
        return out + skip.reshape(out.shape[:-1] + (c.in_chans,))

    def __call__(self, frames, *, rng=None, stage_hook: Optional[StageHook] = None,
                 return_intermediates: bool = False):
        """frames: [N, D, H, W, in_chans] in [0, 1]. rng: drop-path key for training (None: deterministic).

        Returns the restored frames [N, D, H*upscale, W*upscale, out_chans] (float32), or (frames, intermediates)
        with `return_intermediates=True` (flows, aligned images, conv_first and every stage output).
        """
        self.check_input(frames)
        intermediates = {} if return_intermediates else None
        with jax.named_scope("embed"):
            x, flows_backward, flows_forward = self.embed(frames, intermediates)
        features = self.forward_features(x, flows_backward, flows_forward, rng=rng, stage_hook=stage_hook,
                                         intermediates=intermediates)
        with jax.named_scope("reconstruct"):
            out = self.reconstruct(x, features, frames)
        return (out, intermediates) if return_intermediates else out


def _warp_sequence(flows, by):
    """flows + flow_warp(flows, by): composes [N, T, H, W, 2] flow fields frame by frame."""
    n, t = flows.shape[:2]
    warped = flow_warp(fold_frames(flows), fold_frames(by), "bilinear", "zeros")
    return warped.reshape(flows.shape)


def _compose_flows_4(backward, forward):
    """Flows between t and t+2 from consecutive flows (official get_flow_4frames), per scale."""
    b2 = [f[:, :-1] + _warp_sequence(f[:, 1:], f[:, :-1]) for f in backward]
    f2 = [f[:, 1:] + _warp_sequence(f[:, :-1], f[:, 1:]) for f in forward]
    return b2, f2


def _compose_flows_6(backward, forward, backward2, forward2):
    """Flows between t and t+3 from the 4-frame and 2-frame flows (official get_flow_6frames), per scale."""
    b3, f3 = [], []
    for f1, f2 in zip(backward, backward2):
        d = f2.shape[1]
        b3.append(f2[:, :d - 1] + _warp_sequence(f1[:, 2:d + 1], f2[:, :d - 1]))
    for f1, f2 in zip(forward, forward2):
        d = f2.shape[1]
        f3.append(f2[:, 1:d] + _warp_sequence(f1[:, :d - 1], f2[:, 1:d]))
    return b3, f3
