"""VRT architecture settings: the official constructor arguments, their validation and the released presets."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

# Stage layout of VRT (stages 1-7): how each stage reshapes its input and at which scale it works.
STAGE_RESHAPES = ("none", "down", "down", "down", "up", "up", "up")
STAGE_SCALES = (1, 2, 4, 8, 4, 2, 1)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class VRTConfig:
    """Constructor settings of the official `VRT` (models/network_vrt.py), plus our execution options.

    Architecture fields carry the official names and meanings. `embed_dims`, `depths` and `num_heads` have one
    entry per stage 1-7 followed by one per stage-8 layer (RTMSA); `indep_reconsts` lists the indices (into
    those lists, so >= 7) of the stage-8 layers that use a 1-frame window.

    Execution options (no effect on the function computed):
      remat: rematerialisation policy of each TMSA block in training ('none', 'full', 'dots_saveable',
        'dots_with_no_batch_dims_saveable').
      remat_stages: also rematerialise each of stages 1-7 as a whole (only its input is kept for the backward pass),
        on top of the per-block policy: the leanest training memory, at about one more forward pass.
      remat_attention: also recompute each TMSA block's attention part (norm, window attention) from its input in
        the backward pass, after the MLP's backward pass (inside the block's own recomputation with remat='full'),
        so that the attention's intermediates and the MLP's backward buffers are not alive together.
      scan_blocks: run repeated TMSA blocks with `jax.lax.scan` (compiled once per group, not unrolled).
      attention_chunk_windows: if > 0, attention runs over chunks of at most this many windows, each chunk
        rematerialised, so training holds the attention logits of one chunk at a time (0: all windows at once).
      attention_per_head: attention runs one head at a time (lax.map, forward and backward), so training holds the
        logits of one head at a time; every matmul still spans all windows (unlike attention_chunk_windows, at
        no cost in speed on CPU). With or without it, the backward pass recomputes the probabilities from the
        saved log-sum-exp (`attention.window_attention`).
      alignment_chunk: if > 0, each stage's alignment (flow warping, offset convs, DCN) runs over chunks of at
        most this many (frame pair x direction) problems one after another, each recomputed from its inputs in
        the backward pass (`layers.sequential_chunks`; 0: all 2(D-1)N problems at once). It takes stage 7's
        alignment backward pass off the 5x256x256 train step's peak (XLA temporaries 20.06 -> 19.50 GiB with 2)
        for +29 % compile time; meant for one device (the chunks are ordered by a tie that reads one element
        shared by all problems).
      tie_parameter_gradients: in the backward pass each stage's input gradient (and that of its self-attention
        group, its fusion MLP and each TMSA block's MLP) waits for the parameter gradients of that part
        (layers.gradients_before_input), which XLA:CPU's scheduler otherwise leaves for late, holding the
        activations they read (plain VRT 1x6x64x64 train step: 1.48 against 3.83 GiB of temporaries). Each tie
        reads one element of a parameter gradient: a collective when the step spans devices, where training turns
        it off.
      dtype: compute dtype (None = float32; 'bfloat16' for mixed precision); parameters stay `param_dtype`.
    """

    upscale: int = 1
    in_chans: int = 3
    out_chans: int = 3
    window_size: Tuple[int, int, int] = (6, 8, 8)
    depths: Tuple[int, ...] = (8, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4)
    indep_reconsts: Tuple[int, ...] = (9, 10)
    embed_dims: Tuple[int, ...] = (96, 96, 96, 96, 96, 96, 96, 120, 120, 120, 120)
    num_heads: Tuple[int, ...] = (6,) * 11
    mul_attn_ratio: float = 0.75
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_path_rate: float = 0.2
    pa_frames: int = 2
    deformable_groups: int = 16
    nonblind_denoising: bool = False
    # execution options
    remat: str = "none"
    remat_stages: bool = False
    remat_attention: bool = False
    scan_blocks: bool = False
    attention_chunk_windows: int = 0
    attention_per_head: bool = True
    alignment_chunk: int = 0
    tie_parameter_gradients: bool = True
    dtype: Optional[str] = None
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("window_size", "depths", "indep_reconsts", "embed_dims", "num_heads"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    @property
    def num_stage8_layers(self) -> int:
        return len(self.depths) - 7

    def validate(self) -> None:
        n = len(self.depths)
        if n < 8:
            raise ValueError(f"VRT needs depths for 7 stages and at least one stage-8 layer; got {n} entries")
        for name in ("embed_dims", "num_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but depths has {n}")
        if len(self.window_size) != 3:
            raise ValueError(f"window_size must be (D, H, W), got {self.window_size}")
        if len(set(self.embed_dims[7:])) != 1:
            raise ValueError(f"stage-8 layers must share one width, got embed_dims[7:]={self.embed_dims[7:]}")
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim % heads:
                raise ValueError(f"embed_dims[{i}]={dim} is not divisible by num_heads[{i}]={heads}")
        for i in range(7):
            if int(self.depths[i] * self.mul_attn_ratio) > 0 and self.embed_dims[i] % 4:
                raise ValueError(f"embed_dims[{i}]={self.embed_dims[i]} must be a multiple of 4 (the sine position "
                                 "encoding of mutual attention splits channels into y and x halves of sin/cos pairs)")
        for i in (4, 5, 6):  # 'up' stages take in_dim // 4 channels per pixel
            if self.embed_dims[i - 1] % 4:
                raise ValueError(f"embed_dims[{i - 1}]={self.embed_dims[i - 1]} must be a multiple of 4 for the "
                                 f"'up' reshape of stage {i + 1}")
        if any(i < 7 or i >= n for i in self.indep_reconsts):
            raise ValueError(f"indep_reconsts must index stage-8 layers (7..{n - 1}), got {self.indep_reconsts}")
        if self.pa_frames not in (2, 4, 6):
            raise ValueError(f"pa_frames must be 2, 4 or 6 (0, frame interpolation, is not ported); got {self.pa_frames}")
        for i in range(7):
            if self.embed_dims[i] % self.deformable_groups:
                raise ValueError(f"embed_dims[{i}]={self.embed_dims[i]} is not divisible by deformable_groups="
                                 f"{self.deformable_groups}")
        if self.upscale != 1 and (self.upscale & (self.upscale - 1)) and self.upscale != 3:
            raise ValueError(f"upscale must be 1, 3 or a power of 2, got {self.upscale}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

    def official_kwargs(self) -> dict:
        """The official VRT constructor arguments this config corresponds to."""
        return dict(upscale=self.upscale, in_chans=self.in_chans, out_chans=self.out_chans,
                    window_size=list(self.window_size), depths=list(self.depths),
                    indep_reconsts=list(self.indep_reconsts), embed_dims=list(self.embed_dims),
                    num_heads=list(self.num_heads), mul_attn_ratio=self.mul_attn_ratio, mlp_ratio=self.mlp_ratio,
                    qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, drop_path_rate=self.drop_path_rate,
                    pa_frames=self.pa_frames, deformable_groups=self.deformable_groups,
                    nonblind_denoising=self.nonblind_denoising)

    def replace(self, **kwargs) -> "VRTConfig":
        return dataclasses.replace(self, **kwargs)


# Official keyword arguments that only concern PyTorch memory / metadata / downloads and never the function.
_IGNORED_OFFICIAL_KWARGS = ("img_size", "spynet_path", "use_checkpoint_attn", "use_checkpoint_ffn",
                            "no_checkpoint_attn_blocks", "no_checkpoint_ffn_blocks", "recal_all_flows",
                            "norm_layer")


def config_from_official_kwargs(**kwargs) -> VRTConfig:
    """Builds a VRTConfig from the official VRT(...) keyword arguments (as in main_test_vrt.py / KAIR json).

    Unknown keywords are an error; the PyTorch-only ones (checkpointing flags, img_size, spynet_path) are ignored.
    Official defaults apply to what is not given (the official default is the 4x SR layout).
    """
    official_defaults = dict(upscale=4, window_size=(6, 8, 8), depths=(8,) * 7 + (4,) * 6, indep_reconsts=(11, 12),
                             embed_dims=(120,) * 7 + (180,) * 6, num_heads=(6,) * 13, deformable_groups=16)
    fields = {f.name for f in dataclasses.fields(VRTConfig)}
    args = dict(official_defaults)
    for key, value in kwargs.items():
        if key in _IGNORED_OFFICIAL_KWARGS:
            continue
        if key not in fields:
            raise TypeError(f"unknown VRT constructor argument {key!r}")
        args[key] = value
    return VRTConfig(**args)


def deblur_config(**overrides) -> VRTConfig:
    """The official deblurring VRT (tasks 005 DVD, 006 GoPro, 007 REDS): 18,320,007 parameters."""
    return VRTConfig(**overrides)


def small_fixture_config(**overrides) -> VRTConfig:
    """The small VRT of ../shared/fixtures/vrt_small_*.npz (1,914,795 parameters)."""
    args = dict(window_size=(6, 8, 8), depths=(6, 4, 4, 4, 4, 4, 6, 2, 2), indep_reconsts=(8,),
                embed_dims=(16,) * 7 + (24, 24), num_heads=(2,) * 7 + (3, 3), deformable_groups=4)
    args.update(overrides)
    return VRTConfig(**args)


def sr_reds_config(**overrides) -> VRTConfig:
    """The official 4x video SR VRT (task 001, REDS, 6 frames): 30,676,435 parameters; the seed's 120-wide layout."""
    args = dict(upscale=4, depths=(8,) * 7 + (4,) * 6, indep_reconsts=(11, 12), embed_dims=(120,) * 7 + (180,) * 6,
                num_heads=(6,) * 13, deformable_groups=12)
    args.update(overrides)
    return VRTConfig(**args)


PRESETS = {
    "deblur": deblur_config,
    "deblur_gopro": deblur_config,
    "deblur_dvd": deblur_config,
    "deblur_reds": deblur_config,
    "small_fixture": small_fixture_config,
    "sr_reds": sr_reds_config,
}


def preset(name: str, **overrides) -> VRTConfig:
    """A named preset: one of PRESETS."""
    if name not in PRESETS:
        raise ValueError(f"unknown VRT preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def check_input_shape(shape: Sequence[int], in_chans: int = 3) -> None:
    """Raises ValueError unless `shape` is [N, D, H, W, C] with D >= 2 and H, W multiples of 8 and >= 64.

    The official VRT crashes (shape mismatch in mutual attention or in the 'down' reshape) for other sizes: the
    mutual attention at 1/8 scale adds a fixed 8x8-token position encoding.
    """
    if len(shape) != 5:
        raise ValueError(f"VRT input must be [N, D, H, W, C] frames, got shape {tuple(shape)}")
    _, d, h, w, c = shape
    if c != in_chans:
        raise ValueError(f"VRT input must have {in_chans} channels (last axis), got {c} in shape {tuple(shape)}")
    if d < 2:
        raise ValueError(f"VRT needs at least 2 frames, got D={d} in shape {tuple(shape)}")
    if h % 8 or w % 8 or h < 64 or w < 64:
        raise ValueError(f"VRT needs frame height and width that are multiples of 8 and at least 64; got "
                         f"H={h}, W={w} (shape {tuple(shape)}). Pad or crop the frames, or use tiled inference.")
