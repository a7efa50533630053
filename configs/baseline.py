r"""The baseline: VRT (official deblurring layout) + spike branch, trained with the original's recipe.

    python scripts/convert_vgg_weights.py --input vgg16-397923af.pth --output weights/vgg16_features.npz  # once
    python main.py --config=configs/baseline.py --workdir=runs/baseline \
        --config.loss.vgg_weights=weights/vgg16_features.npz                          # embedded data (a GPU run)
    python main.py --config=configs/baseline.py --workdir=runs/x4k --config.data.root=/data/x4k_ours \
        --config.data.spike_scale=2 --config.loss.vgg_weights=weights/vgg16_features.npz \
        --config.init.vrt_from=weights/006_VRT.npz
    python main.py --config=configs/baseline.py:quick --workdir=runs/quick           # a first try on a laptop

The defaults (every key a config may set) are in vrtspike_jax/train/defaults.py; a misspelt key is an error.

Variants (`get_config(arg)`, comma-separated, applied left to right, e.g. `:quick,vrt_only`):
  quick     a small VRT+Spike (same architecture, fewer blocks and channels) on the embedded dataset at 64x64
            crops; about 10 minutes on 2 CPU cores with a clear PSNR gain over the blurry input. No VGG term
            (the VGG weights are a local file a first try does not have).
  vrt_only  the plain-VRT control of the same size (use_spike=False).
  vrt120    the seed's 120-channel VRT layout in stages 1-7 (the 4x-SR VRT's widths, upscale 1).
  fuse14    fusion after stages 1-4 only (S-VRT's later choice) instead of 1-7.
  tiny      a few-second model and dataset for tests and smoke runs (not a meaningful training).
  kair_warmup  KAIR's VRT recipe: SpyNet and the deformable convolutions frozen for the first 20k steps, then
            trained at 0.125x the learning rate (fix_iter 20000, fix_lr_mul 0.125, fix_keys spynet, deform).
  frozen_backbone  VRT (backbone, SpyNet, deformable convolutions) frozen for the run: only the spike encoder, its
            temporal self-attention and the fusion train (meant with --config.init.vrt_from=<VRT .npz>;
            keeps vrt.conv_last as initialised, never zero).
  staged    two phases in one run: the spike path and the fusion alone for the first 10k steps (VRT frozen: its
            groups' frozen_steps = 10000), then everything at a new schedule (optimizer.restart_at = 10000: warm-up
            and cosine again); resumes exactly across the boundary. Meant with --config.init.vrt_from=<VRT .npz>.
            Phase 2 with LoRA instead of VRT's weights: `:lora --config.optimizer.groups.lora.frozen_steps=10000
            --config.optimizer.restart_at=10000` (docs/TRAINING.md section 2b).
  lora      VRT frozen as in frozen_backbone, adapted by LoRA (rank 8, alpha 16) on every TMSA attention and MLP
            projection (lora.targets); the factors, the spike path and the fusion train. Meant with
            --config.init.vrt_from=<VRT .npz>; scripts/merge_lora.py folds the factors into plain weights.
  ema       an exponential moving average of the parameters (decay 0.999, S-VRT main's) for validation, best and
            the restorer.
  lean      the memory levers for large crops on one device, all on: each stage rematerialised as a whole
            (remat_stages), each TMSA block's attention recomputed after its MLP's backward pass (remat_attention),
            the alignment in chunks of 2 problems (alignment_chunk) and each spike fusion over chunks of 32 rows
            (fusion_chunk_rows). The same function; less memory for more compute (docs/TRAINING.md section 2d).
  bench     the fair benchmark data (docs/DATA.md section 7), used as `:quick,bench`: 3 val and 3 test
            sequences of photos never trained on, blur from mild to severe (6-24 px per exposure), spikes at
            half resolution (spike_scale 2, as Spk-X4K1000FPS) with read noise, dark spikes and threshold
            mismatch. Data only: the frame size stays the model variant's (128x128 with quick).

Hyper-parameters (SPEC section 3): Charbonnier(delta 1e-3) + 0.1 x VGG16-relu3_3 L1 perceptual loss; AdamW lr 2e-4,
betas (0.9, 0.99), weight decay 1e-4 (decoupled, on every parameter as PyTorch's AdamW), linear warm-up 5k steps
then cosine to 1e-7; batch 8; seed 123; T = 5 frames, 256x256 crops, K = 32 bins; validation every 1000 steps
with best/last checkpoints; triptychs every 10k steps. Total steps 300k (VRT's deblurring recipe; the original
does not fix it). Gradient clipping at global norm 1.0 (the original does not state one; 0 disables).
"""
from __future__ import annotations

import ml_collections

from vrtspike_jax.train.defaults import base_config


def _quick(config: ml_collections.ConfigDict) -> None:
    config.total_steps = 300
    config.global_batch_size = 1
    config.log_every_steps = 20
    config.data.crop_size = 64
    config.data.clip_length = 2
    config.data.embedded.update(dict(height=128, width=128))
    config.model.vrt_preset = "small_fixture"
    config.model.vrt_overrides = ml_collections.ConfigDict(dict(
        depths=(2,) * 7 + (1, 1), embed_dims=(16,) * 7 + (24, 24), num_heads=(2,) * 7 + (3, 3),
        deformable_groups=4, window_size=(2, 8, 8), indep_reconsts=(8,), drop_path_rate=0.0))
    config.model.remat = "none"
    config.init.zero_output_conv = True
    config.optimizer.learning_rate = 3e-4        # measured best of 2e-3 .. 2e-4 for this model (docs/TRAINING.md)
    config.optimizer.warmup_steps = 20
    config.optimizer.end_learning_rate = 1e-6
    config.loss.perceptual_weight = 0.0
    config.eval.every_steps = 100
    config.eval.tile.spatial = 0
    config.eval.tile.spatial_overlap = 0
    config.eval.triptych_every_steps = 100
    config.eval.num_triptychs = 2
    config.checkpoint.every_steps = 100


def _tiny(config: ml_collections.ConfigDict) -> None:
    """Seconds per step on a CPU: tests and smoke runs only."""
    _quick(config)
    config.total_steps = 4
    config.global_batch_size = 2               # two processes of the multi-host test get one sample each
    config.log_every_steps = 1
    config.optimizer.learning_rate = 1e-3
    config.data.embedded.update(dict(height=64, width=64, train_sequences=2, val_sequences=1, train_frames=4,
                                     val_frames=4, subframes=8, blur_px=4.0))
    config.data.num_bins = 4
    config.data.clip_length = 2
    config.data.crop_size = 64
    config.data.num_parallel_calls = 1
    config.model.vrt_overrides.update(dict(depths=(1,) * 8, embed_dims=(16,) * 7 + (24,), num_heads=(2,) * 7 + (3,),
                                           indep_reconsts=(), window_size=(2, 8, 8)))
    config.eval.every_steps = 2
    config.eval.triptych_every_steps = 2
    config.checkpoint.every_steps = 2
    config.compilation_cache_dir = None


def _bench(config: ml_collections.ConfigDict) -> None:
    """The fair benchmark data (docs/DATA.md section 7); the size is left to the model variant (quick: 128x128)."""
    config.data.spike_scale = 2                 # Spk-X4K1000FPS's half-resolution spikes (the embedded spec follows)
    config.data.embedded.update(dict(
        spike_scale=2, val_sequences=3, val_frames=10, test_sequences=3, test_frames=10,
        blur_px=6.0, blur_px_max=24.0, noise_std=0.1, dark_current=0.005, threshold_std=0.05))


def _lean(config: ml_collections.ConfigDict) -> None:
    config.model.update(dict(remat_stages=True, remat_attention=True, alignment_chunk=2, fusion_chunk_rows=32))


def _kair_warmup(config: ml_collections.ConfigDict) -> None:
    for group in ("spynet", "deform"):
        config.optimizer.groups[group].update(dict(frozen_steps=20_000, lr_multiplier=0.125))


def _frozen_backbone(config: ml_collections.ConfigDict) -> None:
    for group in ("backbone", "spynet", "deform"):
        config.optimizer.groups[group].frozen_steps = -1
    config.init.zero_output_conv = False        # a frozen zero output conv would pass no gradient to anything


def _lora(config: ml_collections.ConfigDict) -> None:
    _frozen_backbone(config)
    config.lora.rank = 8


def _staged(config: ml_collections.ConfigDict) -> None:
    for group in ("backbone", "spynet", "deform"):
        config.optimizer.groups[group].frozen_steps = 10_000
    config.optimizer.restart_at = 10_000        # phase 2 has a schedule of its own (warm-up + cosine)
    config.init.zero_output_conv = False        # a zero output conv frozen in phase 1 would pass no gradient


VARIANTS = {
    "quick": _quick,
    "tiny": _tiny,
    "vrt_only": lambda c: setattr(c.model, "use_spike", False),
    "vrt120": lambda c: c.model.update(dict(vrt_preset="sr_reds", vrt_overrides=ml_collections.ConfigDict(
        dict(upscale=1)))),
    "fuse14": lambda c: setattr(c.model, "fuse_stages", (1, 2, 3, 4)),
    "bench": _bench,
    "lean": _lean,
    "kair_warmup": _kair_warmup,
    "frozen_backbone": _frozen_backbone,
    "staged": _staged,
    "ema": lambda c: setattr(c.optimizer, "ema_decay", 0.999),
    "lora": _lora,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The baseline config with the comma-separated variants of `arg` applied in order (see the module docstring)."""
    config = base_config()
    for name in [a.strip() for a in (arg or "").split(",") if a.strip()]:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r} of configs/baseline.py; known: {sorted(VARIANTS)}")
        VARIANTS[name](config)
    config.variant = arg or ""
    return config
