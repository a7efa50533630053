"""Models: the VRT port, the spike branch and VRTWithSpike, plus `build_model` from a plain config mapping.

`models/` is pure: functions of parameters and inputs, no I/O and no config files. `model_config_from_dict`
turns the `model` section of a training config (any mapping, e.g. an ml_collections.ConfigDict) into the frozen
dataclasses the modules take.
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from vrtspike_jax.models.vrt import VRT, VRTConfig, preset
from vrtspike_jax.models.vrt_spike import VRTWithSpike, VRTWithSpikeConfig, part_parameter_counts

# Fields of the `model` config section and where they go.
_VRT_EXECUTION_FIELDS = ("remat", "remat_stages", "remat_attention", "scan_blocks", "attention_chunk_windows",
                         "attention_per_head", "alignment_chunk", "tie_parameter_gradients", "dtype", "param_dtype")
_SPIKE_FIELDS = ("use_spike", "spike_bins", "fuse_stages", "spike_scale", "spike_upsample", "spike_heads",
                 "spike_mlp_ratio", "encoder_temporal_strides", "fusion_chunk_rows")


def model_config_from_dict(cfg: Mapping[str, Any]) -> VRTWithSpikeConfig:
    """Builds the model config from a mapping with keys:

    vrt_preset (a name of vrtspike_jax.models.vrt.PRESETS, e.g. 'deblur', 'sr_reds', 'small_fixture'),
    vrt_overrides (mapping of VRTConfig architecture fields, e.g. {'embed_dims': [...], 'depths': [...]}),
    the VRT execution options (remat, remat_stages, remat_attention, scan_blocks, attention_chunk_windows,
    attention_per_head, alignment_chunk, tie_parameter_gradients, dtype, param_dtype)
    and the spike fields of VRTWithSpikeConfig (use_spike, spike_bins, fuse_stages, spike_scale, ...).
    Unknown keys are an error (a typo must not silently train another model).
    """
    cfg = dict(cfg)
    known = {"vrt_preset", "vrt_overrides"} | set(_VRT_EXECUTION_FIELDS) | set(_SPIKE_FIELDS)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
    vrt_kwargs = dict(cfg.get("vrt_overrides") or {})
    for key in _VRT_EXECUTION_FIELDS:
        if key in cfg and cfg[key] is not None:
            vrt_kwargs[key] = cfg[key]
    if "dtype" in cfg and cfg["dtype"] in (None, "", "float32"):
        vrt_kwargs["dtype"] = None
    vrt = preset(cfg.get("vrt_preset", "deblur"), **vrt_kwargs)
    spike_kwargs = {k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k])
                    for k in _SPIKE_FIELDS if k in cfg}
    return VRTWithSpikeConfig(vrt=vrt, **spike_kwargs)


def build_model(cfg, *, rngs: nnx.Rngs) -> VRTWithSpike:
    """VRTWithSpike from a VRTWithSpikeConfig or a `model` config mapping (see model_config_from_dict)."""
    if not isinstance(cfg, VRTWithSpikeConfig):
        cfg = model_config_from_dict(cfg)
    return VRTWithSpike(cfg, rngs=rngs)


__all__ = ["VRT", "VRTConfig", "VRTWithSpike", "VRTWithSpikeConfig", "build_model", "model_config_from_dict",
           "part_parameter_counts", "preset"]
