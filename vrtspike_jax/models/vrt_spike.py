"""VRTWithSpike: the one place where the RGB backbone (VRT) and the spike branch meet.

Boundary layout (channels-last): frames [B, T, H, W, 3] in [0, 1]; spike voxels [B, T, H/f, W/f, K] (normalised
voxel counts of each frame's exposure, K time bins last; f = `spike_scale`, the integer RGB/spike resolution
ratio). The spike voxels are brought to the RGB resolution by `spike_upsample` (nearest: each spike pixel covers an
f x f block of RGB pixels), encoded by SpikeEncoder3D into four scales (1, 1/2, 1/4, 1/8), and after each fused
VRT stage i (after its TMSA groups and parallel warping) the stage output is replaced by
`Ff_i = TemporalCrossAttnFuse_i(Q = Fr_i, K/V = SpikeTemporalSA_i(Fs_i))`, which then flows on through VRT's own
skips and decoder. Stages 5-7 (1/4, 1/2, 1) take the encoder features of their resolution; every fused stage has
its own temporal self-attention and fusion block. `use_spike=False` is the plain VRT (the very same module).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from vrtspike_jax.models.fusion import TemporalCrossAttnFuse
from vrtspike_jax.models.spike import SpikeEncoder3D, SpikeTemporalSABlock
from vrtspike_jax.models.vrt import VRT, VRTConfig
from vrtspike_jax.models.vrt.attention import _REMAT_POLICIES, _largest_divisor_at_most
from vrtspike_jax.models.vrt.layers import (HostKey, checkpoint_after_cotangent, gradients_before_input,
                                           sequential_chunks)
from vrtspike_jax.models.vrt.warping import resize_bilinear

ENCODER_SCALE_OF_STAGE = {1: 0, 2: 1, 3: 2, 4: 3, 5: 2, 6: 1, 7: 0}  # stage -> encoder scale (1, 1/2, 1/4, 1/8)


@dataclasses.dataclass(frozen=True)
class VRTWithSpikeConfig:
    """The whole restoration model.

    vrt: the backbone (its stage widths set the spike channels per scale).
    use_spike: False gives the plain-VRT control of the same backbone.
    spike_bins: K, voxel bins per frame (32 in the baseline).
    fuse_stages: the VRT stages (1..7) after which spike features are fused (seed: 1-7; later S-VRT: 1-4).
    spike_scale: integer ratio of RGB to spike resolution (2 for Spk-X4K1000FPS's half-resolution spikes).
    spike_upsample: how spike voxels are brought to the RGB resolution when spike_scale > 1 ('nearest' or
      'bilinear').
    spike_heads, spike_mlp_ratio: of every SpikeTemporalSA and fusion block (4 and 2 in the original).
    encoder_temporal_strides: time strides between encoder scales (1: the clip length is kept, as VRT's stages).
    fusion_chunk_rows: execution option (the same function): if > 0, each fusion (spike self-attention and
      cross-attention, both per pixel along time) runs over chunks of at most this many image rows one after
      another, each recomputed from its inputs in the backward pass (layers.sequential_chunks), so its
      intermediates exist for one chunk at a time: the 5x256x256 peak had been stage 7's fusion backward pass. For
      one device (the chunks are ordered by a tie that reads one element shared by all rows).
    """

    vrt: VRTConfig = dataclasses.field(default_factory=VRTConfig)
    use_spike: bool = True
    spike_bins: int = 32
    fuse_stages: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    spike_scale: int = 1
    spike_upsample: str = "nearest"
    spike_heads: int = 4
    spike_mlp_ratio: float = 2.0
    encoder_temporal_strides: Tuple[int, ...] = (1, 1, 1)
    fusion_chunk_rows: int = 0

    def __post_init__(self):
        object.__setattr__(self, "fuse_stages", tuple(sorted(int(s) for s in self.fuse_stages)))
        object.__setattr__(self, "encoder_temporal_strides", tuple(int(s) for s in self.encoder_temporal_strides))
        self.validate()

    @property
    def encoder_channels(self) -> Tuple[int, ...]:
        """Encoder widths per scale: the widths of the VRT stages 1-4 that work at scales 1, 1/2, 1/4, 1/8."""
        return tuple(self.vrt.embed_dims[:4])

    def validate(self) -> None:
        if not self.use_spike:
            return
        bad = [s for s in self.fuse_stages if s not in ENCODER_SCALE_OF_STAGE]
        if bad or len(set(self.fuse_stages)) != len(self.fuse_stages):
            raise ValueError(f"fuse_stages must be distinct VRT stages among 1..7, got {list(self.fuse_stages)}")
        if int(self.fusion_chunk_rows) != self.fusion_chunk_rows or self.fusion_chunk_rows < 0:
            raise ValueError(f"fusion_chunk_rows must be an integer >= 0 (0: no chunks), got {self.fusion_chunk_rows}")
        if self.spike_bins < 1:
            raise ValueError(f"spike_bins must be >= 1, got {self.spike_bins}")
        if int(self.spike_scale) != self.spike_scale or self.spike_scale < 1:
            raise ValueError(f"spike_scale must be a positive integer (RGB/spike resolution ratio), got "
                             f"{self.spike_scale}")
        if self.spike_upsample not in ("nearest", "bilinear"):
            raise ValueError(f"spike_upsample must be 'nearest' or 'bilinear', got {self.spike_upsample!r}")
        if len(self.encoder_temporal_strides) != 3 or any(s < 1 for s in self.encoder_temporal_strides):
            raise ValueError(f"encoder_temporal_strides needs 3 strides >= 1 (between the 4 encoder scales), got "
                             f"{list(self.encoder_temporal_strides)}")
        channels = self.encoder_channels
        for stage in self.fuse_stages:
            scale = ENCODER_SCALE_OF_STAGE[stage]
            stage_dim = self.vrt.embed_dims[stage - 1]
            if stage_dim != channels[scale]:
                raise ValueError(
                    f"stage {stage}: its RGB features Fr_{stage} have {stage_dim} channels but the spike encoder "
                    f"features of its resolution (1/{2 ** scale}, the width of stage {scale + 1}) have "
                    f"{channels[scale]}; the fusion changes no channels (no 1x1 projection), so fuse only stages "
                    f"whose width equals that of the encoder scale")
            if stage_dim % self.spike_heads:
                raise ValueError(f"stage {stage}: width {stage_dim} is not divisible by spike_heads="
                                 f"{self.spike_heads}")
            if any(s != 1 for s in self.encoder_temporal_strides[:scale]):
                raise ValueError(
                    f"stage {stage}: VRT keeps all T frames at every stage, but encoder_temporal_strides="
                    f"{list(self.encoder_temporal_strides)} shortens time before scale {scale} (1/{2 ** scale}), so "
                    f"Fs_{stage} would have fewer frames than Fr_{stage}")

    def replace(self, **kwargs) -> "VRTWithSpikeConfig":
        return dataclasses.replace(self, **kwargs)


class VRTWithSpike(nnx.Module):
    """VRT with spike-guided fusion after the configured stages (see the module docstring)."""

    def __init__(self, config: VRTWithSpikeConfig, *, rngs: nnx.Rngs):
        self.config = config
        keys = HostKey.from_rngs(rngs)
        self.vrt = VRT(config.vrt, rngs=keys)
        self.fuse_stages = tuple(config.fuse_stages) if config.use_spike else ()
        if config.use_spike:
            dtype = None if config.vrt.dtype is None else jnp.dtype(config.vrt.dtype)
            kw = dict(dtype=dtype, param_dtype=jnp.dtype(config.vrt.param_dtype), rngs=keys)
            self.spike_encoder = SpikeEncoder3D(config.spike_bins, config.encoder_channels,
                                                temporal_strides=config.encoder_temporal_strides,
                                                spatial_strides=(2, 2, 2), **kw)
            self.spike_temporal_sa = nnx.List([
                SpikeTemporalSABlock(config.vrt.embed_dims[s - 1], num_heads=config.spike_heads,
                                     mlp_ratio=config.spike_mlp_ratio, **kw) for s in self.fuse_stages])
            self.cross_attn_fuse = nnx.List([
                TemporalCrossAttnFuse(config.vrt.embed_dims[s - 1], num_heads=config.spike_heads,
                                      mlp_ratio=config.spike_mlp_ratio, **kw) for s in self.fuse_stages])
        else:
            self.spike_encoder = None
            self.spike_temporal_sa = None
            self.cross_attn_fuse = None

    def check_inputs(self, frames, spike_voxels) -> None:
        """Raises ValueError (naming both shapes) unless spike voxels fit the frames."""
        self.vrt.check_input(frames)
        if not self.config.use_spike:
            return
        if spike_voxels is None:
            raise ValueError("this model fuses spike features (use_spike=True): spike_voxels are required")
        f = self.config.spike_scale
        b, t, h, w, _ = frames.shape
        expected = (b, t, h // f, w // f, self.config.spike_bins)
        if h % f or w % f or tuple(spike_voxels.shape) != expected:
            raise ValueError(
                f"spike voxels have shape {tuple(spike_voxels.shape)} but frames {tuple(frames.shape)} with "
                f"spike_scale={f} and spike_bins={self.config.spike_bins} need {expected} "
                f"([B, T, H/{f}, W/{f}, K])")

    def encode_spikes(self, spike_voxels):
        """Spike voxels [B, T, H/f, W/f, K] -> encoder features at scales 1, 1/2, 1/4, 1/8 (RGB resolution)."""
        f = self.config.spike_scale
        if f > 1:
            if self.config.spike_upsample == "nearest":
                spike_voxels = jnp.repeat(jnp.repeat(spike_voxels, f, axis=2), f, axis=3)
            else:
                b, t, hs, ws, k = spike_voxels.shape
                flat = resize_bilinear(spike_voxels.reshape(b * t, hs, ws, k), (hs * f, ws * f), align_corners=False)
                spike_voxels = flat.reshape(b, t, hs * f, ws * f, k)
        dtype = self.config.vrt.dtype
        if dtype is not None:
            spike_voxels = spike_voxels.astype(dtype)
        return self.spike_encoder(spike_voxels)

    def _fuse_fn(self):
        """(graphdef, state, rgb, spike) -> fused, rematerialised like the TMSA blocks."""

        def fuse(graphdef, state, rgb, spike):
            tsa, fuse_block = nnx.merge(graphdef, state)
            return fuse_block(rgb, tsa(spike))

        policy = self.config.vrt.remat
        if policy == "none":
            return fuse
        if policy == "full":
            # recomputed only once the fused output's cotangent exists (as the TMSA blocks and the alignment)
            return lambda graphdef, state, rgb, spike: checkpoint_after_cotangent(
                lambda st, r, s: fuse(graphdef, st, r, s))(state, rgb, spike)
        return jax.checkpoint(fuse, policy=_REMAT_POLICIES[policy], static_argnums=(0,))

    def _fuse_in_rows(self, fuse, graphdef, state, rgb, spike):
        """fuse(graphdef, state, rgb, spike) ([B, T, H, W, C] each), over chunks of at most `fusion_chunk_rows` rows
        one after another (layers.sequential_chunks, each chunk recomputed in the backward pass); the fusion works
        per pixel, so the chunks compute the same function."""
        h = rgb.shape[2]
        rows = _largest_divisor_at_most(h, self.config.fusion_chunk_rows) if self.config.fusion_chunk_rows else h
        if rows >= h:
            return fuse(graphdef, state, rgb, spike)

        def plain(st, r, s):   # rows first: sequential_chunks splits the leading axis
            tsa, fuse_block = nnx.merge(graphdef, st)
            return jnp.moveaxis(fuse_block(jnp.moveaxis(r, 0, 2), tsa(jnp.moveaxis(s, 0, 2))), 2, 0)

        rows_first = sequential_chunks(plain, rows)(state, jnp.moveaxis(rgb, 2, 0), jnp.moveaxis(spike, 2, 0))
        return jnp.moveaxis(rows_first, 0, 2)

    def __call__(self, frames, spike_voxels=None, *, rng=None, return_intermediates: bool = False):
        """frames [B, T, H, W, 3] in [0, 1]; spike_voxels [B, T, H/f, W/f, K] (ignored when use_spike=False).

        Returns the restored frames [B, T, H, W, 3] (float32), or (frames, intermediates) where intermediates hold
        the VRT intermediates plus `Fr_i`, `Fs_i`, `Fs'_i`, `Ff_i` for every fused stage i.
        """
        if not self.config.use_spike:
            return self.vrt(frames, rng=rng, return_intermediates=return_intermediates)
        self.check_inputs(frames, spike_voxels)
        with jax.named_scope("spike_encoder"):
            encoded = self.encode_spikes(spike_voxels)
        index_of_stage = {s: j for j, s in enumerate(self.fuse_stages)}
        fuse = self._fuse_fn()
        spike_inter: Dict[str, jax.Array] = {}

        def hook(stage, rgb):
            if stage not in index_of_stage:
                return rgb
            j = index_of_stage[stage]
            spike = encoded[ENCODER_SCALE_OF_STAGE[stage]]
            if spike.shape[:4] != rgb.shape[:4]:
                raise ValueError(f"stage {stage}: spike features Fs_{stage} {tuple(spike.shape)} do not match the RGB "
                                 f"features Fr_{stage} {tuple(rgb.shape)} in [B, T, H, W]")
            graphdef, state = nnx.split((self.spike_temporal_sa[j], self.cross_attn_fuse[j]))
            # the fusion's whole backward pass (parameter and spike-feature gradients) before the stage's
            state, rgb_in, spike_in = gradients_before_input(state, rgb, spike.astype(rgb.dtype),
                                                             self.config.vrt.tie_parameter_gradients)
            fused = self._fuse_in_rows(fuse, graphdef, state, rgb_in, spike_in)
            if return_intermediates:
                spike_inter.update({f"Fr_{stage}": rgb, f"Fs_{stage}": spike,
                                    f"Fs'_{stage}": self.spike_temporal_sa[j](spike.astype(rgb.dtype)),
                                    f"Ff_{stage}": fused})
            return fused

        result = self.vrt(frames, rng=rng, stage_hook=hook, return_intermediates=return_intermediates)
        if return_intermediates:
            out, inter = result
            inter.update(spike_inter)
            return out, inter
        return result


def part_parameter_counts(model: VRTWithSpike) -> Dict[str, int]:
    """Parameters per part: 'vrt', 'spike_encoder', 'spike_temporal_sa', 'cross_attn_fuse' (0 when absent)."""
    counts = {}
    for name in ("vrt", "spike_encoder", "spike_temporal_sa", "cross_attn_fuse"):
        part = getattr(model, name)
        counts[name] = 0 if part is None else sum(
            int(x.size) for x in jax.tree.leaves(nnx.state(part, nnx.Param)))
    return counts
