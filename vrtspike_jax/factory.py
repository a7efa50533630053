"""Config -> model, in one place. Training (train_lib), checkpoint restore (checkpointing), the start-up checks
(preflight), scripts/validate_model_shapes.py and scripts/benchmark.py build their model through these functions
only:

  resolved_mapping(section)  the `model` section as `models.build_model` takes it: `dtype: 'auto'` resolved for the
                             backend (bfloat16 compute on GPU/TPU, float32 on CPU), `tie_parameter_gradients:
                             'auto'` for the device count (on with one device)
  model_config(section)      the frozen VRTWithSpikeConfig (an unknown or bad field is a ValueError naming it)
  abstract(section)          (graphdef, abstract parameters): shapes only, nothing allocated
  abstract_params(config)    the abstract parameter tree a run trains: the model's, plus LoRA factors when set
  initial_params(config)     the run's step-0 parameters on the host (NumPy, the same on every process): drawn from
                             `config.seed`, then the start options of `init` (official VRT weights `init.vrt_from`,
                             `init.zero_output_conv`), and LoRA factors (`lora`)

A run config is anything `vrtspike_jax.train.run_config.read` takes (a ConfigDict, or a RunConfig).
  build(graphdef, params, lora_spec)   the model of a parameter tree, LoRA factors folded in
  with_official_weights(section, weights)   the model of a section with official VRT weights in its RGB branch
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
from flax import nnx

from vrtspike_jax.models import VRTWithSpike, VRTWithSpikeConfig, build_model, model_config_from_dict
from vrtspike_jax.train import lora


def _plain(section) -> Dict[str, Any]:
    if isinstance(section, dict):
        return dict(section)
    from vrtspike_jax.train.checkpointing import config_to_dict

    return config_to_dict(section)


def resolve_compute_dtype(mapping: Mapping[str, Any], backend: Optional[str] = None) -> Dict[str, Any]:
    """`mapping` with `dtype: 'auto'` resolved for `backend` (default: jax.default_backend()): 'bfloat16' on GPU and
    TPU (mixed precision, float32 parameters), None (float32) on CPU. Other values unchanged."""
    resolved = dict(mapping)
    if resolved.get("dtype") == "auto":
        backend = backend or jax.default_backend()
        resolved["dtype"] = "bfloat16" if backend in ("gpu", "tpu", "cuda", "rocm") else None
    return resolved


def resolve_gradient_ties(mapping: Mapping[str, Any], device_count: Optional[int] = None) -> Dict[str, Any]:
    """`mapping` with `tie_parameter_gradients` as VRTConfig takes it (a bool): 'on' / 'off', or 'auto': on when the
    process sees one device (`device_count`, default jax.device_count()), off otherwise (there each tie would be
    a collective: VRTConfig)."""
    resolved = dict(mapping)
    value = resolved.get("tie_parameter_gradients")
    if value in ("on", "off"):
        resolved["tie_parameter_gradients"] = value == "on"
    elif value == "auto":
        count = jax.device_count() if device_count is None else int(device_count)
        resolved["tie_parameter_gradients"] = count == 1
    elif value is not None and not isinstance(value, bool):
        raise ValueError(f"tie_parameter_gradients must be 'auto', 'on' or 'off', got {value!r}")
    return resolved


def resolved_mapping(section, backend: Optional[str] = None, device_count: Optional[int] = None) -> Dict[str, Any]:
    """The `model` section (ConfigDict or mapping) as build_model takes it (see the module docstring)."""
    return resolve_gradient_ties(resolve_compute_dtype(_plain(section), backend), device_count)


def model_config(section, backend: Optional[str] = None) -> VRTWithSpikeConfig:
    return model_config_from_dict(resolved_mapping(section, backend))


def abstract(section) -> Tuple[nnx.GraphDef, Dict[str, Any]]:
    """(graphdef, abstract parameters as a pure dict of ShapeDtypeStructs) of the model a `model` section describes."""
    cfg = model_config(section)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def _run_config(config):
    from vrtspike_jax.train import run_config

    return run_config.read(config)


def abstract_params(config) -> Tuple[nnx.GraphDef, Dict[str, Any]]:
    """(graphdef, abstract parameter tree) of a run config: the model's, plus `params["lora"]` when LoRA is set."""
    config = _run_config(config)
    graphdef, params = abstract(config.model)
    spec = lora.spec_from_config(config)
    if spec is not None:
        params = {**params, lora.KEY: lora.abstract_adapters(params, spec)}
    return graphdef, params


def with_official_weights(section, weights, seed: int = 0) -> VRTWithSpike:
    """The model of a `model` section with the official VRT weights of `weights` (.npz / .pth state_dict, or a folder
    from scripts/convert_vrt_checkpoint.py) in its RGB branch; the other parameters drawn from `seed`. Training's
    `init.vrt_from` and the restorer's official weights both load through here."""
    from vrtspike_jax.convert import load_official_weights_into

    model = build_model(model_config(section), rngs=nnx.Rngs(seed))
    load_official_weights_into(model, os.path.expanduser(str(weights)))
    logging.info("RGB branch initialised from official VRT weights %s", weights)
    return model


def _host_cpu_device():
    """This host's first CPU device, or None (the default device) where JAX_PLATFORMS leaves the CPU backend out."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def initial_params(config) -> Dict[str, Any]:
    """The run's parameters at step 0 (see the module docstring), NumPy on the host. They are drawn on the host's CPU
    device whatever the default backend (unless JAX_PLATFORMS leaves the CPU out): the model's eager initialisation
    compiles its own small programs (53 for the baseline), which an accelerator would compile for itself only for
    the values to come back to the host."""
    config = _run_config(config)
    with jax.default_device(_host_cpu_device()):
        if config.init.vrt_from:
            model = with_official_weights(config.model, config.init.vrt_from, config.seed)
        else:
            model = build_model(model_config(config.model), rngs=nnx.Rngs(config.seed))
        params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if config.init.zero_output_conv:
        # VRT adds its output to the input frames: zero output weights make the untrained model the identity.
        params["vrt"]["conv_last"] = jax.tree.map(np.zeros_like, params["vrt"]["conv_last"])
        logging.info("vrt.conv_last initialised to zero: the model starts as the identity")
    return lora.with_adapters(params, lora.spec_from_config(config), config.seed)


def build(graphdef, params, lora_spec: Optional[lora.LoRASpec] = None) -> VRTWithSpike:
    """The model of a parameter tree (traceable): LoRA factors, if any, folded in first."""
    return nnx.merge(graphdef, lora.apply(params, lora_spec))


__all__ = ["with_official_weights", "abstract", "abstract_params", "build", "initial_params", "model_config",
           "resolve_compute_dtype", "resolve_gradient_ties", "resolved_mapping"]
