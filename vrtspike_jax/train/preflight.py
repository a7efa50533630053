"""Checks of a training config that run before anything is built, compiled or written.

`preflight(config)` reads the config (vrtspike_jax/train/run_config.py) and raises `ConfigError` (one line: the option,
its value and what to do) for
  * a key that no training config has (a typo must not silently fall back to a default; `check_known_keys`), a key
    a section lacks, a value of the wrong type or range,
  * a model section that does not describe a model (unknown field, bad preset),
  * a weights or statistics file that is set but absent, or the VGG file that a non-zero perceptual weight
    needs and that is not set,
and `data_pipelines.errors.DataError` for a data root that is missing or not prepared for the config's K and f.
main.py prints either as `error: <message>` and exits with status 2; `train_and_evaluate` calls it first.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

VGG_COMMAND = ("python scripts/convert_vgg_weights.py --input vgg16-397923af.pth "
               "--output weights/vgg16_features.npz")
LPIPS_COMMAND = ("python scripts/convert_lpips_weights.py --alexnet alexnet-owt-7be5be79.pth --lin alex.pth "
                 "--output weights/lpips_alex.npz")
VRT_COMMAND = ("python scripts/convert_vrt_checkpoint.py --input 006_VRT_videodeblurring_GoPro.pth --preset deblur "
               "--output weights/vrt_gopro")
# Sections whose keys are not in the defaults: checked against the dataclass whose fields they set.
_FREE_SECTIONS = {"model.vrt_overrides": "vrtspike_jax.models.vrt.config:VRTConfig"}
_EXTRA_TOP_LEVEL = ("variant", "source")   # records: the variants used; what a converted checkpoint came from


class ConfigError(ValueError):
    """A training config that cannot run; the message (one line) names the option, its value and the fix."""


def _is_mapping(node: Any) -> bool:
    return isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__"))


def _unknown(path: str, key: str, known: Iterable[str]) -> ConfigError:
    from vrtspike_jax.train.run_config import MOVED

    name = ".".join(filter(None, [path, key]))
    moved = {".".join(old): ".".join(new) for old, new in MOVED.items()}
    if name in moved:
        return ConfigError(f"config key {name!r} is now {moved[name]!r}: use --config.{moved[name]}=...")
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {'.'.join(filter(None, [path, close[0]]))!r}? " if close else ""
    return ConfigError(f"unknown config key {name!r}: {hint}known keys{' of ' + path if path else ''}: "
                       f"{', '.join(known)}")


def _dataclass_fields(spec: str):
    import importlib

    module, name = spec.split(":")
    return [f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))]


def check_known_keys(config: Mapping[str, Any], reference: Optional[Mapping[str, Any]] = None,
                     path: str = "") -> None:
    """Raises ConfigError naming the first key of `config` that `reference` (default: the baseline defaults,
    `vrtspike_jax.train.defaults.base_config()`) does not have, with the closest known key."""
    if reference is None:
        from vrtspike_jax.train.defaults import base_config

        reference = base_config()
    for key in config.keys():
        name = f"{path}.{key}" if path else key
        if name in _FREE_SECTIONS:
            value = config[key]
            if value is not None and not _is_mapping(value):
                raise ConfigError(f"{name}={value!r}: expected a mapping of field names to values")
            fields = _dataclass_fields(_FREE_SECTIONS[name])
            for field in (value or {}).keys():
                if field not in fields:
                    raise _unknown(name, field, fields)
            continue
        if key not in reference.keys():
            if not path and key in _EXTRA_TOP_LEVEL:
                continue
            raise _unknown(path, key, reference.keys())
        if _is_mapping(config[key]) and _is_mapping(reference[key]):
            check_known_keys(config[key], reference[key], name)


def _require_file(option: str, value, what: str, command: Optional[str], directory_ok: bool = False) -> None:
    path = Path(os.path.expanduser(str(value)))
    if path.is_file() or (directory_ok and path.is_dir()):
        return
    make = f"; make it with `{command}`" if command else ""
    raise ConfigError(f"{option}={value}: {what} not found{make}")


def check_files(config) -> None:
    """Every file option that is set must exist; the VGG file must be set when the perceptual weight is not 0."""
    cfg = _typed(config)
    weight, vgg = cfg.loss.perceptual_weight, cfg.loss.vgg_weights
    if weight != 0.0 and not vgg:
        raise ConfigError(f"loss.vgg_weights is not set but loss.perceptual_weight={weight:g} needs the VGG16 features "
                          f"file: make it with `{VGG_COMMAND}` and pass "
                          "--config.loss.vgg_weights=weights/vgg16_features.npz (or --config.loss.perceptual_weight=0)")
    if weight != 0.0:
        _require_file("loss.vgg_weights", vgg, "VGG16 features file", VGG_COMMAND)
    if cfg.eval.lpips_weights:
        _require_file("eval.lpips_weights", cfg.eval.lpips_weights, "LPIPS weights file", LPIPS_COMMAND)
    if cfg.init.vrt_from:
        _require_file("init.vrt_from", cfg.init.vrt_from,
                      "official VRT weights (.npz / .pth, or a converted checkpoint folder)", VRT_COMMAND,
                      directory_ok=True)
    if cfg.data.stats_file:
        _require_file("data.stats_file", cfg.data.stats_file, "voxel statistics file",
                      "python scripts/prepare_data.py --root <data root>")


def check_data_root(config) -> None:
    """A configured data root must exist and be prepared for the config's K and f (DataError otherwise)."""
    data = _typed(config).data
    root = data.root
    if not root:
        return  # the embedded dataset, built on first use
    from data_pipelines import prepare
    from data_pipelines.errors import DataError

    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DataError(path, "data.root: no such folder (give a root made by scripts/prepare_data.py, or leave "
                              "data.root unset for the embedded dataset)", "missing_root")
    prepare.read_prepared(path, num_bins=data.num_bins, spike_scale=data.spike_scale)


def check_model(config) -> None:
    """The model section must describe a model (fields, preset, architecture overrides, dtypes).

    Touches no JAX backend ('auto' is resolved as on a CPU here): a multi-host run must call
    jax.distributed.initialize before anything starts the backend.
    """
    import numpy as np

    from vrtspike_jax import factory

    try:
        mapping = factory.resolved_mapping(_typed(config).model, backend="cpu", device_count=1)
        for name in ("dtype", "param_dtype"):
            value = mapping.get(name)
            if value in (None, "", "bfloat16"):
                continue
            try:
                np.dtype(value)
            except TypeError:
                raise ValueError(f"{name}={value!r} is not a data type (float32, bfloat16, or 'auto' for "
                                 "dtype)") from None
        factory.model_config(mapping)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model: {' '.join(str(err).split())}") from None


def check_training(config) -> None:
    """Training options that depend on each other: parameter groups (optimizer.groups), LoRA (lora: rank, alpha,
    targets; its factors must train), data.spike_representation, data.spike_dropout in [0, 1) and only with spikes.
    (Single-value ranges such as optimizer.restart_at >= 0 are checked when the config is read.)"""
    from data_pipelines import spike_input
    from vrtspike_jax.train import lora, param_groups

    cfg = _typed(config)
    settings = param_groups.group_settings(cfg)
    try:
        param_groups.check(settings)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    frozen = settings["backbone"][1]
    if cfg.init.zero_output_conv and frozen != 0:
        span = "for the run" if frozen == param_groups.ALWAYS else f"for the first {frozen} steps"
        raise ConfigError(f"init.zero_output_conv=True with the backbone frozen {span} "
                          f"(optimizer.groups.backbone.frozen_steps={frozen}): vrt.conv_last would stay zero, so "
                          "the output would be the input and no gradient would reach any parameter; set "
                          "--config.init.zero_output_conv=False (or start from trained weights)")
    try:
        spec = lora.spec_from_config(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if spec is not None and settings["lora"][1] == param_groups.ALWAYS:
        raise ConfigError(f"lora.rank={spec.rank} with optimizer.groups.lora.frozen_steps=-1: the LoRA factors would "
                          "never train; set --config.lora.rank=0 or let the group train")
    spike_input.check_config(cfg.data)   # data.spike_representation and its parameters
    rate = float(cfg.data.spike_dropout)
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"data.spike_dropout={rate}: expected a probability in [0, 1)")
    if rate > 0 and not cfg.model.use_spike:
        raise ConfigError(f"data.spike_dropout={rate} needs a model with spikes (model.use_spike is False)")


def user_errors() -> tuple:
    """The exception types that mean a bad config, data, weights file or checkpoint (not a bug): entry points
    print them as one line and exit with status 2."""
    from data_pipelines.errors import DataError
    from vrtspike_jax.convert import CheckpointError
    from vrtspike_jax.train.checkpointing import CheckpointNotFoundError, CheckpointReadError

    return ConfigError, DataError, CheckpointError, CheckpointNotFoundError, CheckpointReadError


def _typed(config):
    from vrtspike_jax.train import run_config

    return run_config.read(config)


def preflight(config):
    """All checks above, cheapest first (reading the config checks its keys, types and single-value ranges); nothing
    is built, compiled or written. Returns the typed config (run_config.RunConfig)."""
    cfg = _typed(config)
    check_files(cfg)
    check_model(cfg)
    check_training(cfg)
    check_data_root(cfg)
    return cfg


__all__ = ["ConfigError", "check_data_root", "check_files", "check_known_keys", "check_model", "check_training", "preflight",
           "user_errors"]
