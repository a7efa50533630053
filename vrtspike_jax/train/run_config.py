"""The training config, typed and frozen: `read(config) -> RunConfig`, once, at the top of every entry point.

ml_collections stays the command-line surface (`configs/baseline.py`, `--config.optimizer.learning_rate=...`) and
`vrtspike_jax/train/defaults.py` holds every default. `read` turns such a ConfigDict (or the JSON dict a checkpoint
saved) into the frozen dataclasses below: a key no training config has is a ConfigError naming it (with the closest
known key), a key a section lacks is one too, and every value is converted to its field's type, so the training
library reads `config.optimizer.restart_at` as an int and never asks for a default. The dataclasses hold no default
values: those are defaults.py's alone.

Two sections stay mappings, typed by their owners: `data` (an ml_collections FrozenConfigDict with the keys of
`data_pipelines.input_pipeline.default_data_config`; the data pipeline reads it) and `model` (the fields of
`vrtspike_jax.models.VRTWithSpikeConfig`, built by `vrtspike_jax.factory`, which resolves `dtype: 'auto'` for the
backend). The training-start options (initial weights, an identity start) are in `init`, not in `model`: the model
section says what the model is, `init` where its first parameters come from.
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections

from vrtspike_jax.inference import TileSpec
from vrtspike_jax.train.preflight import ConfigError

# Keys that moved: a saved run config (or a command line) with the old name is read under the new one.
MOVED = {("model", "init_vrt_from"): ("init", "vrt_from")}


@dataclasses.dataclass(frozen=True)
class InitSettings:
    vrt_from: Optional[str]        # official VRT weights (.npz / .pth / converted folder) for the RGB branch
    zero_output_conv: bool         # vrt.conv_last starts at 0: the untrained model is the identity


@dataclasses.dataclass(frozen=True)
class GroupSettings:
    lr_multiplier: float
    frozen_steps: int              # 0 trains from the start, N > 0 frozen for the first N steps, -1 for the run


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    warmup_steps: int
    end_learning_rate: float
    schedule_steps: Optional[int]  # the cosine horizon; None: total_steps
    restart_at: int
    grad_clip_norm: float
    ema_decay: float
    groups: Dict[str, GroupSettings]

    def __post_init__(self):
        if self.restart_at < 0:
            raise ConfigError(f"optimizer.restart_at={self.restart_at}: expected 0 (one schedule) or the step N > 0 "
                              "where the schedule starts again")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optimizer.ema_decay={self.ema_decay}: expected 0 (no EMA) or a decay in (0, 1), e.g. "
                              "0.999")


@dataclasses.dataclass(frozen=True)
class LoRASettings:
    rank: int                      # 0: no LoRA
    alpha: float
    targets: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LossSettings:
    charbonnier_delta: float
    perceptual_weight: float
    vgg_weights: Optional[str]
    vgg_network: str
    vgg_layers: Tuple[str, ...]
    vgg_distance: str


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    every_steps: int
    max_clips: int
    tile: TileSpec
    quantize: bool
    crop_border: int
    lpips_weights: Optional[str]
    lpips_convention: str
    triptych_every_steps: int
    num_triptychs: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    every_steps: int
    keep_last: int
    keep_best: int
    async_save: bool


@dataclasses.dataclass(frozen=True)
class NonfiniteSettings:
    max_consecutive: int


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int                      # -1: every device not used by fsdp
    fsdp: int
    fsdp_min_size: int


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    initialize: bool
    coordinator_address: Optional[str]
    num_processes: Optional[int]
    process_id: Optional[int]
    initialization_timeout: int
    cpu_collectives: Optional[str]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int
    total_steps: int
    global_batch_size: int
    log_every_steps: int
    data: ml_collections.FrozenConfigDict
    model: ml_collections.FrozenConfigDict
    init: InitSettings
    optimizer: OptimizerSettings
    lora: LoRASettings
    loss: LossSettings
    eval: EvalSettings
    checkpoint: CheckpointSettings
    nonfinite: NonfiniteSettings
    mesh: MeshSettings
    distributed: DistributedSettings
    compilation_cache_dir: Optional[str]
    variant: Optional[str] = None  # the configs/baseline.py variants it was made with (a record, not a setting)

    @property
    def schedule_horizon(self) -> int:
        """The step where the cosine ends: optimizer.schedule_steps, else total_steps."""
        return int(self.optimizer.schedule_steps or self.total_steps)


# ------------------------------------------------------------------------------------------------- reading


def _plain(config) -> Dict[str, Any]:
    from vrtspike_jax.train.checkpointing import config_to_dict

    return config_to_dict(config)


def _move_renamed(values: Dict[str, Any]) -> Dict[str, Any]:
    for (old_section, old_key), (new_section, new_key) in MOVED.items():
        section = values.get(old_section)
        if isinstance(section, dict) and old_key in section:
            moved = section.pop(old_key)
            target = values.setdefault(new_section, {})
            if target.get(new_key) is None:
                target[new_key] = moved
    return values


def _with_defaults(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(defaults)
    for key, value in values.items():
        out[key] = (_with_defaults(value, defaults[key]) if isinstance(value, dict) and
                    isinstance(defaults.get(key), dict) else value)
    return out


def _convert(path: str, hint, value):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:   # Optional[X]
        return None if value is None else _convert(path, args[0], value)
    if dataclasses.is_dataclass(hint):
        if hint is TileSpec:
            try:
                return TileSpec.from_dict(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"{path}: {err}") from None
        return build_section(hint, value, path)
    if hint is ml_collections.FrozenConfigDict:
        return ml_collections.FrozenConfigDict(value)
    if origin is dict:
        return {str(k): _convert(f"{path}.{k}", args[1], v) for k, v in value.items()}
    if origin is tuple:
        return tuple(_convert(f"{path}[]", args[0], v) for v in (value or ()))
    if value is None:
        raise ConfigError(f"{path} is None: expected a {hint.__name__}")
    if hint is int and (isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or value != int(value)):
        raise ConfigError(f"{path}={value!r}: expected an integer")
    try:
        return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}={value!r}: expected a {hint.__name__}") from None


def build_section(cls, values: Mapping[str, Any], path: str = ""):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}={values!r}: expected a section (a mapping of keys to values)")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        name = f"{path}.{field.name}" if path else field.name
        if field.name not in values:
            if field.default is not dataclasses.MISSING:
                continue
            raise ConfigError(f"config key {name!r} is missing (a training config starts from "
                              "vrtspike_jax/train/defaults.py's base_config(), which has every key)")
        kwargs[field.name] = _convert(name, hints[field.name], values[field.name])
    return cls(**kwargs)


def read(config, *, fill_defaults: bool = False) -> RunConfig:
    """The frozen RunConfig of `config` (an ml_collections ConfigDict, or the dict a checkpoint saved); a RunConfig is
    returned as it is.

    ConfigError (one line) for an unknown key (naming it and the closest known one), a missing key, or a value of the
    wrong type or range. fill_defaults: keys the config lacks take today's defaults (a run config saved before those
    keys existed); keys under an old name (MOVED) are read under the new one.
    """
    if isinstance(config, RunConfig):
        return config
    from vrtspike_jax.train import preflight
    from vrtspike_jax.train.defaults import base_config

    values = _move_renamed(_plain(config))
    if fill_defaults:
        values = _with_defaults(values, _plain(base_config()))
    preflight.check_known_keys(values)
    return build_section(RunConfig, values)


def to_dict(config: RunConfig) -> Dict[str, Any]:
    """The JSON-able dict of a RunConfig (what checkpoints and run records save; `read` reads it back)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, ml_collections.ConfigDict):
            return _plain(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


__all__ = ["CheckpointSettings", "DistributedSettings", "EvalSettings", "GroupSettings", "InitSettings",
           "LoRASettings", "LossSettings", "MOVED", "MeshSettings", "NonfiniteSettings", "OptimizerSettings",
           "RunConfig", "build_section", "read", "to_dict"]
