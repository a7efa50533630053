"""The defaults of every training config: the baseline's values and the set of keys a config may have.

`configs/baseline.py` is the baseline (these defaults) plus its named variants. A training config may set only
keys that exist here (`vrtspike_jax.train.preflight.check_known_keys`): a misspelt key is an error naming it,
never a silently ignored value. `model.vrt_overrides` takes VRTConfig architecture fields and `data.embedded`
the fields of data_pipelines.synthetic.SyntheticSpec.
"""
from __future__ import annotations

import ml_collections

from data_pipelines import input_pipeline
from vrtspike_jax.train.param_groups import GROUP_NAMES

placeholder = ml_collections.config_dict.placeholder


def _model_config(data) -> ml_collections.ConfigDict:
    """The `model` section (fields of vrtspike_jax.models.model_config_from_dict)."""
    model = ml_collections.ConfigDict()
    model.vrt_preset = "deblur"                 # official deblurring VRT: 18.3M parameters, widths [96]*7+[120]*4
    model.vrt_overrides = ml_collections.ConfigDict()   # VRTConfig architecture fields (depths, embed_dims, ...)
    model.remat = "full"                        # rematerialise every TMSA block in training (memory)
    model.remat_stages = False                  # True: also each stage as a whole (leanest memory, +1 forward)
    model.remat_attention = False               # True: each block's attention recomputed after its MLP's backward
    model.scan_blocks = True                    # repeated TMSA blocks compiled once (lax.scan)
    model.attention_chunk_windows = 0
    model.attention_per_head = True             # attention logits of one head at a time (training memory)
    model.alignment_chunk = 0
    model.tie_parameter_gradients = "auto"      # 'on' / 'off'; auto: on with one device, off with several
                                                # (each stage's input gradient waits for its weight gradients)
    model.dtype = "auto"                        # bfloat16 compute on GPU/TPU, float32 on CPU; or None / 'bfloat16'
    model.param_dtype = "float32"
    model.use_spike = True
    model.spike_bins = data.get_ref("num_bins")        # K follows the data
    model.fuse_stages = (1, 2, 3, 4, 5, 6, 7)
    model.spike_scale = data.get_ref("spike_scale")    # f follows the data
    model.spike_upsample = "nearest"
    model.spike_heads = 4
    model.spike_mlp_ratio = 2.0
    model.encoder_temporal_strides = (1, 1, 1)
    model.fusion_chunk_rows = 0                 # > 0: each fusion over chunks of this many rows (memory; one device)
    return model


def base_config() -> ml_collections.ConfigDict:
    """The baseline without variants (every key a training config may set).

    Longer than the ~80-line rule on purpose: one flat list of every key with its default and meaning reads better
    than the same list split over helpers (the model section is one, as the data pipeline's is its own)."""
    config = ml_collections.ConfigDict()
    config.seed = 123                           # parameters, drop-path rng and data order
    config.total_steps = 300_000
    config.global_batch_size = 8
    config.log_every_steps = 50                 # training scalars (TensorBoard + train_metrics.jsonl)

    config.data = input_pipeline.default_data_config()   # root None: the embedded dataset, built on first use
    # The embedded dataset's frames must hold the 256x256 training crops (it is 128x128 by default).
    config.data.embedded.height = config.data.embedded.width = 320
    config.model = _model_config(config.data)

    # Where the first parameters come from (training-start options; the model section says what the model is).
    config.init = ml_collections.ConfigDict()
    config.init.vrt_from = placeholder(str)     # official VRT weights (.npz, .pth state_dict or converted folder)
    config.init.zero_output_conv = False        # True: vrt.conv_last starts at 0, so the model starts as identity

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.99
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 5000
    config.optimizer.end_learning_rate = 1e-7
    config.optimizer.schedule_steps = placeholder(int)   # cosine horizon; None: total_steps
    config.optimizer.restart_at = 0             # R > 0: warm-up + cosine over [0, R), then again over [R, horizon)
    config.optimizer.grad_clip_norm = 1.0       # global-norm clipping; 0 disables
    # > 0 (e.g. 0.999): an exponential moving average of the parameters, updated after every applied step; validation,
    # `best` and the restorer use it. 0: none.
    config.optimizer.ema_decay = 0.0
    # Per parameter group (vrtspike_jax/train/param_groups.py): learning-rate multiplier, and frozen_steps
    # (0 trains from the start, N > 0 frozen for the first N steps, -1 frozen for the run).
    config.optimizer.groups = ml_collections.ConfigDict(
        {name: ml_collections.ConfigDict(dict(lr_multiplier=1.0, frozen_steps=0)) for name in GROUP_NAMES})

    # LoRA of VRT's TMSA projections (vrtspike_jax/train/lora.py): W + (alpha / rank) a @ b, factors in the parameter
    # group `lora`. rank 0: none. The `lora` variant of configs/baseline.py sets rank 8 and freezes VRT's own weights.
    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 0
    config.lora.alpha = 16.0
    config.lora.targets = ("qkv_self", "qkv_mut", "proj", "fc11", "fc12", "fc2")

    config.loss = ml_collections.ConfigDict()
    config.loss.charbonnier_delta = 1e-3
    config.loss.perceptual_weight = 0.1
    config.loss.vgg_weights = placeholder(str)  # .npz from scripts/convert_vgg_weights.py; required if weight != 0
    config.loss.vgg_network = "vgg16"
    config.loss.vgg_layers = ("relu3_3",)
    config.loss.vgg_distance = "l1"

    config.eval = ml_collections.ConfigDict()
    config.eval.every_steps = 1000
    config.eval.max_clips = -1                  # per process; -1: the whole validation split
    config.eval.tile = ml_collections.ConfigDict(dict(temporal=0, temporal_overlap=0, spatial=256,
                                                      spatial_overlap=20))   # inference.TileSpec
    config.eval.quantize = True                 # 8-bit frames, as main_test_vrt.py
    config.eval.crop_border = 0
    config.eval.lpips_weights = placeholder(str)   # .npz from scripts/convert_lpips_weights.py
    config.eval.lpips_convention = "standard"
    config.eval.triptych_every_steps = 10_000   # blur | restored | sharp PNGs + image summaries
    config.eval.num_triptychs = 4               # clips (of process 0) that get one

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep_last = 3
    config.checkpoint.keep_best = 1
    config.checkpoint.async_save = True

    config.nonfinite = ml_collections.ConfigDict()
    config.nonfinite.max_consecutive = 10       # K non-finite steps in a row stop the run

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1                       # -1: every device not used by fsdp
    config.mesh.fsdp = 1                        # > 1 shards parameters and optimizer state over that many devices
    config.mesh.fsdp_min_size = 2 ** 14

    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False       # multi-host: True (or env VRTSPIKE_DISTRIBUTED=1)
    config.distributed.coordinator_address = placeholder(str)   # None: detected from the cluster (TPU, SLURM, ...)
    config.distributed.num_processes = placeholder(int)
    config.distributed.process_id = placeholder(int)
    config.distributed.initialization_timeout = 300    # seconds
    config.distributed.cpu_collectives = "gloo"        # CPU-only multi-process runs

    # Persistent XLA compilation cache: a restart (or a second run of the same program) skips compiling the train
    # step (minutes on a CPU). None disables it.
    config.compilation_cache_dir = ml_collections.FieldReference("~/.cache/vrtspike_jax/xla", field_type=str)
    return config


__all__ = ["base_config"]
