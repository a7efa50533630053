"""Orbax checkpoints of training runs, and loading a trained model from them.

Layout of a workdir (every process of a run calls save; Orbax writes each process's array shards):

  WORKDIR/checkpoints/last/<step>/   kept `checkpoint.keep_last` newest, written every `checkpoint_every_steps`
      params/        the model parameters: a nested dict (nnx pure dict) of float arrays, sharded as in training
      train_state/   {"step", "opt_state", "rng"}: the optimizer state, the number of steps done, the base rng key
      data/          JSON: the input position ({"next_step", "data_seed", "global_batch_size", ...})
      config/        JSON: the full run config (ml_collections ConfigDict as a dict)
  WORKDIR/checkpoints/best/<step>/   kept `checkpoint.keep_best` best by validation PSNR (RGB)
      params/, data/, config/ as above; metrics/ (JSON: the validation metrics of that step)

A checkpoint directory appears only when complete (Orbax writes to a temporary name and renames it), so a run
killed at any moment resumes from the last complete checkpoint.

`load_model_from_checkpoint` restores parameters only, on one host (the default device), for inference.
This module imports no TensorFlow and no CLU.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vrtspike_jax import factory
from vrtspike_jax.models import VRTWithSpike
from vrtspike_jax.train import lora, run_config

CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last", "best"
LAST_ITEMS = ("params", "train_state", "data", "config")
BEST_ITEMS = ("params", "data", "config")
BEST_METRIC = "psnr"


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint where one was asked for (the message says what was looked for and what exists)."""


class CheckpointReadError(ValueError):
    """A checkpoint folder that exists but cannot be restored (damaged, or of another program)."""


# --------------------------------------------------------------------------------------------------------------
# Config <-> JSON


def config_to_dict(config) -> Dict[str, Any]:
    """A JSON-able dict of an ml_collections ConfigDict (placeholders and references resolved; tuples as lists), a
    RunConfig or a mapping."""
    from vrtspike_jax.train import run_config

    if isinstance(config, run_config.RunConfig):
        return run_config.to_dict(config)
    if isinstance(config, Mapping) and not hasattr(config, "to_json_best_effort"):
        return json.loads(json.dumps(dict(config), default=_json_default))
    return json.loads(config.to_json_best_effort())


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


# --------------------------------------------------------------------------------------------------------------
# Managers used by training


def _manager(directory: Path, items, *, max_to_keep: int, async_save: bool, best: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
        best_fn=(lambda metrics: float(metrics[BEST_METRIC])) if best else None,
        best_mode="max",
        keep_checkpoints_without_metrics=not best,
    )
    return ocp.CheckpointManager(os.fspath(directory), options=options, item_names=items)


class RunCheckpoints:
    """The `last` and `best` Orbax CheckpointManagers of one workdir (see the module docstring).

    Every process must call every method (saves and restores are collective in multi-process runs).
    """

    def __init__(self, workdir, *, keep_last: int = 3, keep_best: int = 1, async_save: bool = True):
        root = Path(workdir) / CHECKPOINT_DIR
        self.last = _manager(root / LAST, LAST_ITEMS, max_to_keep=keep_last, async_save=async_save, best=False)
        self.best = _manager(root / BEST, BEST_ITEMS, max_to_keep=keep_best, async_save=async_save, best=True)
        self._best_psnr = self.best_value()     # of the kept `best` checkpoints (a restart goes on from it)

    @property
    def directory(self) -> Path:
        return Path(os.fspath(self.last.directory)).parent

    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def best_value(self) -> Optional[float]:
        """The best validation PSNR among the kept `best` checkpoints (None when there is none)."""
        step = self.best.best_step()
        if step is None:
            return None
        metrics = self.best.metrics(step)
        return None if not metrics else float(metrics[BEST_METRIC])

    def save_last(self, step: int, params, train_state, data_position: Mapping[str, Any],
                  config_dict: Mapping[str, Any], force: bool = False) -> bool:
        """Starts an asynchronous save of the full training state at `step` (steps done)."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  train_state=ocp.args.StandardSave(train_state),
                                  data=ocp.args.JsonSave(dict(data_position)),
                                  config=ocp.args.JsonSave(dict(config_dict)))
        return self.last.save(step, args=args, force=force)

    def save_best(self, step: int, params, data_position: Mapping[str, Any], config_dict: Mapping[str, Any],
                  metrics: Mapping[str, float]) -> bool:
        """Saves the parameters as a `best` candidate with its validation metrics (Orbax keeps the best ones)."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                                  data=ocp.args.JsonSave(dict(data_position)),
                                  config=ocp.args.JsonSave(dict(config_dict)))
        clean = {k: float(v) for k, v in metrics.items() if np.isfinite(v) or k == BEST_METRIC}
        return self.best.save(step, args=args, metrics=clean, force=True)

    def keep_if_best(self, step: int, params, data_position: Mapping[str, Any], config_dict: Mapping[str, Any],
                     result: Mapping[str, Any]) -> bool:
        """The best-checkpoint policy: saves `params` as `best` when the validation PSNR (`result["psnr"]`) is finite
        and above every earlier one of the run (kept checkpoints included, across restarts). Returns whether it
        saved."""
        psnr = float(result[BEST_METRIC])
        if not np.isfinite(psnr) or (self._best_psnr is not None and psnr <= self._best_psnr):
            return False
        self._best_psnr = psnr
        self.save_best(step, params, data_position, config_dict,
                       {k: v for k, v in result.items() if isinstance(v, float)})
        return True

    def restore_last(self, step: int, abstract_params, abstract_train_state):
        """Restores (params, train_state, data_position, config_dict) of `last` checkpoint `step` into the shardings
        carried by the abstract trees (ShapeDtypeStructs with `.sharding`)."""
        restored = self.last.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            train_state=ocp.args.StandardRestore(abstract_train_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        return restored.params, restored.train_state, dict(restored.data), dict(restored.config)

    def read_config(self, step: int) -> Dict[str, Any]:
        """The run config saved with `last` checkpoint `step`."""
        return dict(self.last.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)

    def wait_until_finished(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return bool(self.last.reached_preemption(step))

    def close(self) -> None:
        self.last.close()
        self.best.close()


# --------------------------------------------------------------------------------------------------------------
# Loading a trained model (inference)


def _is_step_dir(path: Path) -> bool:
    return (path / "params").is_dir() and (path / "config").is_dir()


def _step_dirs(manager_dir: Path):
    if not manager_dir.is_dir():
        return []
    return sorted(int(p.name) for p in manager_dir.iterdir() if p.is_dir() and p.name.isdigit()
                  and _is_step_dir(p))


def resolve_checkpoint_dir(workdir_or_checkpoint_dir, step: Optional[int] = None, which: str = BEST) -> Path:
    """The step directory that `load_model_from_checkpoint` reads (see there for the accepted paths)."""
    if which not in (BEST, LAST):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    path = Path(os.path.expanduser(os.fspath(workdir_or_checkpoint_dir))).absolute()  # Orbax wants absolute paths
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist (expected a training workdir, its "
                                      f"{CHECKPOINT_DIR}/{{last,best}} folder or one step folder of it)")
    if _is_step_dir(path):
        if step is not None and path.name.isdigit() and int(path.name) != step:
            raise ValueError(f"{path} is the checkpoint of step {path.name}, but step={step} was asked for")
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        manager_dir = path / CHECKPOINT_DIR / which
    elif path.name == CHECKPOINT_DIR:
        manager_dir = path / which
    else:
        manager_dir = path
    steps = _step_dirs(manager_dir)
    if not steps:
        others = {w: _step_dirs(manager_dir.parent / w) for w in (BEST, LAST) if w != which}
        hint = "".join(f"; {w} has steps {s} (which={w!r})" for w, s in others.items() if s)
        raise CheckpointNotFoundError(f"no complete '{which}' checkpoint in {manager_dir}"
                                      + (" (no validation has run yet)" if which == BEST else "") + hint)
    if step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(f"no '{which}' checkpoint of step {step} in {manager_dir}; it has steps "
                                          f"{steps}")
        return manager_dir / str(step)
    if manager_dir.name == BEST and len(steps) > 1:
        scores = {}
        for s in steps:
            metrics_file = manager_dir / str(s) / "metrics" / "metrics"
            try:
                scores[s] = float(json.loads(metrics_file.read_text())[BEST_METRIC])
            except (OSError, ValueError, KeyError):
                continue
        if scores:
            return manager_dir / str(max(scores, key=lambda s: (scores[s], s)))
    return manager_dir / str(steps[-1])


def load_model_from_checkpoint(workdir_or_checkpoint_dir, step: Optional[int] = None,
                               which: str = "best") -> Tuple[VRTWithSpike, Any]:
    """The trained model and its run config, from a training checkpoint (parameters only, one host).

    Args:
      workdir_or_checkpoint_dir: a training workdir (holding `checkpoints/`), its `checkpoints/` folder, a manager
        folder (`checkpoints/best` or `checkpoints/last`) or one step folder (`checkpoints/last/1000`).
      step: the step to load (None: for `best`, the best kept by validation PSNR; for `last`, the newest).
      which: "best" (by validation PSNR) or "last" (the newest training checkpoint). Ignored for a step folder.
    Returns:
      (model, config): a VRTWithSpike with the trained parameters on the default device (compute dtype 'auto'
      resolved for this backend), and the run config (run_config.RunConfig; keys a config saved by an older version
      lacks take today's defaults, e.g. a folder from scripts/convert_vrt_checkpoint.py saves only `model`).
    Raises:
      CheckpointNotFoundError naming what was looked for; ValueError for a bad `which`.
    """
    step_dir = resolve_checkpoint_dir(workdir_or_checkpoint_dir, step, which)
    config_file = step_dir / "config" / "metadata"
    try:
        config_dict = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointNotFoundError(f"{config_file}: cannot read the run config of the checkpoint ({error})")
    try:
        config = run_config.read(config_dict, fill_defaults=True)
    except ValueError as error:   # ConfigError: a key this version does not know, a bad value
        raise CheckpointNotFoundError(f"{config_file}: {error}") from None
    # With LoRA the checkpoint holds VRT's weights and the factors: they are folded in below.
    graphdef, abstract_params = factory.abstract_params(config)
    lora_spec = lora.spec_from_config(config)
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_params)
    ema_decay = config.optimizer.ema_decay
    with ocp.StandardCheckpointer() as checkpointer:
        if ema_decay > 0 and (step_dir / "train_state").is_dir():
            # A `last` checkpoint of a run with an EMA: the EMA (in its train state) is the model to restore, as
            # validation and `best` use it (a `best` checkpoint's params already are the EMA).
            folder = step_dir / "train_state"
            try:
                params = checkpointer.restore(folder, _abstract_train_state(config, target, sharding))["ema"]
            except Exception as err:  # Orbax raises many types; an older layout is fitted, else one clear error
                params = _restore_older_layout(checkpointer, folder, target, err, part="ema")
            what = f"EMA (decay {ema_decay:g}) parameters"
        else:
            folder = step_dir / "params"
            try:
                params = checkpointer.restore(folder, target)
            except Exception as err:
                params = _restore_older_layout(checkpointer, folder, target, err)
            what = "EMA parameters" if ema_decay > 0 else "model parameters"
    if lora_spec is not None:
        params = lora.merge(params, lora_spec)
        what += f" with LoRA (rank {lora_spec.rank}) merged"
    model = nnx.merge(graphdef, params)
    logging.info("loaded %s from %s", what, step_dir)
    return model, config


def fit_layout(raw, target, path: Tuple[str, ...] = ()):
    """A parameter tree restored without a target (`raw`: nested dicts, digit-string keys for list entries) in the
    structure of `target` (a tree of ShapeDtypeStructs). Where `target` holds a TMSA group's stacked blocks and `raw`
    the group's blocks one by one (`.../blocks/0/...`, `.../blocks/1/...`: checkpoints written before 2026-11-30),
    the blocks are stacked on a leading axis. ValueError naming the first path that does not fit."""
    where = "/".join(path) or "the tree"
    if isinstance(target, Mapping):
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a folder of parameters, found an array")
        keys = [str(k) for k in target]
        if raw and all(str(k).isdigit() for k in raw) and not all(k.isdigit() for k in keys):
            blocks = [raw[k] for k in sorted(raw, key=int)]
            try:
                raw = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *blocks)
            except ValueError as err:
                raise ValueError(f"{where}: its {len(blocks)} blocks differ in structure ({err})") from None
        out = {}
        for key, sub in target.items():
            found = key if key in raw else str(key)
            if found not in raw:
                raise ValueError(f"{'/'.join(path + (str(key),))}: missing")
            out[key] = fit_layout(raw[found], sub, path + (str(key),))
        extra = sorted(set(map(str, raw)) - set(keys))
        if extra:
            raise ValueError(f"{'/'.join(path + (extra[0],))}: not a parameter of the configured model")
        return out
    if isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected an array, found a folder")
    if tuple(np.shape(raw)) != tuple(target.shape):
        raise ValueError(f"{where}: shape {tuple(np.shape(raw))}, the configured model expects {tuple(target.shape)}")
    return np.asarray(raw, target.dtype)


def holds_older_layout(step_dir: Path, abstract_params) -> bool:
    """Whether the parameters in `step_dir` are those of `abstract_params`' model in the layout before TMSA groups
    stored their blocks stacked (one folder per block; `fit_layout` stacks them)."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            fit_layout(checkpointer.restore(Path(step_dir) / "params"), abstract_params)
    except Exception:  # Orbax raises many types for a folder it cannot read
        return False
    return True


def _restore_older_layout(checkpointer, folder: Path, target, err: Exception, part: Optional[str] = None):
    """After a failed restore into `target`: the folder restored without a target, its `part` taken (None: all),
    fitted to `target` (`fit_layout`) and placed in the target's shardings. CheckpointReadError naming the folder
    and the first problem otherwise."""
    try:
        raw = checkpointer.restore(folder)
        fitted = fit_layout(raw if part is None else raw[part], target)
    except Exception as problem:
        raise CheckpointReadError(f"{folder}: cannot restore the parameters of this checkpoint into the configured "
                                  f"model ({' '.join(str(problem).split())[:300]})") from err
    logging.warning("%s: restored from an older parameter layout (TMSA blocks one by one, now stacked)", folder)
    return jax.tree.map(lambda array, t: jax.device_put(array, t.sharding), fitted, target)


def _abstract_train_state(config, abstract_params, sharding) -> Dict[str, Any]:
    """The train state's restore target of `config` (train_lib's layout) on one device."""
    from vrtspike_jax.train import train_lib

    tx, _ = train_lib.make_optimizer(config)
    on_device = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    return {"step": on_device(jax.ShapeDtypeStruct((), jnp.int32)),
            "opt_state": jax.tree.map(on_device, jax.eval_shape(tx.init, abstract_params)),
            "rng": on_device(jax.ShapeDtypeStruct((2,), jnp.uint32)), "ema": abstract_params}


__all__ = ["BEST", "CHECKPOINT_DIR", "CheckpointNotFoundError", "CheckpointReadError", "LAST", "RunCheckpoints",
           "config_to_dict", "fit_layout", "holds_older_layout", "load_model_from_checkpoint", "resolve_checkpoint_dir"]
