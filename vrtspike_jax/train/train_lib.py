"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Order (as big_vision's train.py): distributed init, mesh, losses (a missing VGG file fails here, before any
compile), the model's abstract parameters and their shardings, the optimizer, the checkpoints (resume if any,
else host initialisation placed shard by shard), the run record, the input at the restored step, the
ahead-of-time compiled train step (compile time and memory logged), then the loop: donated update step, metrics one
step behind (no host sync per step), validation, checkpoints.

The train step: one `jax.jit` with in/out shardings over the ("data", "fsdp") mesh; the NNX model is split into a
graphdef (static) and a parameter pure dict (the jit argument); drop-path rng = fold_in(base key, step); loss =
Charbonnier + w x VGG perceptual; AdamW (optax, decoupled weight decay) with linear warm-up then cosine, after
global-norm clipping. A non-finite loss or gradient norm leaves parameters and optimizer state unchanged (the step
still counts, so the input moves on), is logged with the step's samples, and `nonfinite.max_consecutive` such
steps in a row stop the run with NonFiniteLossError, keeping the last checkpoint (nothing is saved at the stop).

Outputs in WORKDIR (only process 0 writes files other than checkpoints; see docs/TRAINING.md):
  checkpoints/{last,best}/<step>/   Orbax (vrtspike_jax.train.checkpointing), every process writes its shards
  tensorboard/                      CLU metric writer: train/*, val/*, triptych images, steps/s, ETA
  train_metrics.jsonl               one line per log step: {"step", "loss", "charbonnier", "perceptual",
                                    "grad_norm", "learning_rate", "nonfinite_steps"} (means over the window)
  metrics/val_step_<step>.json      validation metrics (vrtspike_jax.train.validation)
  triptychs/step_<step>_<seq>_<frame>.png   blur | restored | sharp
  nonfinite_steps.jsonl             skipped steps with their samples
  run_records/run_<k>_step_<s>.json code revision, full config, installed packages (per start)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vrtspike_jax.losses import RestorationLoss
from vrtspike_jax import factory
from vrtspike_jax.train import checkpointing, lora, param_groups, preflight, run_config, sharding, validation
from vrtspike_jax.train.run_record import write_run_record

TRAIN_BATCH_KEYS = ("blur", "sharp", "spike_vox")


class NonFiniteLossError(RuntimeError):
    """Raised when `nonfinite.max_consecutive` train steps in a row had a non-finite loss or gradient."""


# --------------------------------------------------------------------------------------------------------------
# Setup helpers


def maybe_initialize_distributed(config) -> bool:
    """Calls `jax.distributed.initialize` when `config.distributed.initialize` is true or the environment sets
    VRTSPIKE_DISTRIBUTED=1 (and it has not run yet). Returns whether this is a multi-process run.

    Coordinator address, process count and id come from the config or, when unset, from the cluster environment
    (Cloud TPU, SLURM, ...). On CPU the cross-process collectives use `distributed.cpu_collectives` (gloo).
    """
    dist = run_config.read(config).distributed
    wanted = dist.initialize or os.environ.get("VRTSPIKE_DISTRIBUTED") == "1"
    if wanted and not jax.distributed.is_initialized():
        if dist.cpu_collectives:
            jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
        kwargs = {"coordinator_address": dist.coordinator_address, "num_processes": dist.num_processes,
                  "process_id": dist.process_id}
        timeout = dist.initialization_timeout
        logging.info("jax.distributed.initialize(%s, initialization_timeout=%d)", kwargs, timeout)
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None},
                                   initialization_timeout=timeout)
    return jax.process_count() > 1


def enable_compilation_cache(config) -> None:
    """Persistent XLA compilation cache in `config.compilation_cache_dir` (if set): restarts skip compiling."""
    folder = run_config.read(config).compilation_cache_dir
    if folder:
        folder = os.path.expanduser(str(folder))
        os.makedirs(folder, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", folder)


@contextlib.contextmanager
def progress_while(what: str, every_seconds: float = 30.0, emit=None):
    """Logs `<what>: N s so far` every `every_seconds` until the block ends (compiling the train step takes minutes on
    a CPU and shows nothing otherwise); `emit(message)`, when given, replaces logging.info."""
    import threading

    done = threading.Event()
    start = time.perf_counter()
    emit = emit or logging.info

    def report():
        while not done.wait(every_seconds):
            emit(f"{what}: {time.perf_counter() - start:.0f} s so far")

    thread = threading.Thread(target=report, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def lower_and_compile(jitted, args, what: str, emit=None):
    """`jitted.lower(*args).compile()` with progress (`progress_while`, through `emit`, default logging.info): the
    tracing and lowering, then XLA's compile. Returns (compiled, seconds to lower, seconds in all)."""
    emit = emit or logging.info
    start = time.perf_counter()
    with progress_while(f"{what}: tracing and lowering", emit=emit):
        lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - start
    emit(f"{what}: lowered in {lower_s:.1f} s; XLA compiling")
    with progress_while(f"{what}: XLA compiling", emit=emit):
        compiled = lowered.compile()
    return compiled, lower_s, time.perf_counter() - start


def make_schedule(config) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then cosine decay to `end_learning_rate` at
    `optimizer.schedule_steps` (None: `total_steps`). With `optimizer.restart_at` = R > 0 (staged training) the
    schedule runs twice: once over steps [0, R), and again, warm-up included, over [R, horizon)
    (`optax.join_schedules`)."""
    config = run_config.read(config)
    opt = config.optimizer
    total = config.schedule_horizon
    warmup = opt.warmup_steps

    def warmup_cosine(steps: int) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=opt.learning_rate, warmup_steps=min(warmup, max(steps - 1, 0)),
            decay_steps=max(steps, warmup + 1, 1), end_value=opt.end_learning_rate)

    restart = opt.restart_at
    if 0 < restart < total:
        return optax.join_schedules([warmup_cosine(restart), warmup_cosine(total - restart)], [restart])
    if restart >= total:   # e.g. `:quick,staged`: a smoke run shorter than phase 1
        logging.warning("optimizer.restart_at=%d is at or past the schedule's horizon (%d steps): one schedule, "
                        "no restart in this run", restart, total)
    return warmup_cosine(total)


def make_optimizer(config) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping then AdamW (decoupled weight decay on every parameter) at `make_schedule`'s learning rate,
    per parameter group frozen or at a learning-rate multiplier (`optimizer.groups`,
    vrtspike_jax/train/param_groups.py). A group frozen for its first N steps follows the run's schedule once it
    trains (its AdamW counts from 0 at step N, its learning rate is the schedule's at the run's step, as KAIR's
    global scheduler gives). Returns (transformation, schedule)."""
    config = run_config.read(config)
    opt = config.optimizer
    schedule = make_schedule(config)

    def adamw(offset: int = 0):
        rate = schedule if offset == 0 else (lambda count: schedule(count + offset))
        # Only the learning rate is injected (logged, scheduled); the others are compile-time constants, not
        # arguments of the step that every parameter leaf's update reads.
        return optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "eps_root", "weight_decay"))(
            learning_rate=rate, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)

    settings = param_groups.group_settings(config)
    if param_groups.is_default(settings):
        update = adamw()
    else:
        param_groups.check(settings)
        transforms = {}
        for multiplier, frozen_steps in set(settings.values()):
            label = param_groups.label_of((multiplier, frozen_steps))
            if frozen_steps == param_groups.ALWAYS:
                transforms[label] = optax.set_to_zero()
                continue
            offset = max(frozen_steps, 0)
            inner = adamw(offset) if multiplier == 1.0 else optax.chain(adamw(offset), optax.scale(multiplier))
            if frozen_steps > 0:
                inner = optax.transforms.conditionally_mask(inner, lambda count, n=frozen_steps: count >= n)
            transforms[label] = inner
        update = optax.multi_transform(transforms, lambda params: jax.tree.map(
            lambda group: param_groups.label_of(settings[group]), param_groups.group_tree(params)))
    clip = opt.grad_clip_norm
    tx = optax.chain(optax.clip_by_global_norm(clip), update) if clip > 0 else update
    return tx, schedule


def _is_injected(node) -> bool:
    return isinstance(getattr(node, "hyperparams", None), dict)


def learning_rate_of(opt_state) -> jax.Array:
    """The learning rate of the last update, read from the optimizer state (inject_hyperparams)."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(s)]
    return states[0].hyperparams["learning_rate"]


def keep_schedule_position(kept_state, updated_state):
    """`kept_state` (the optimizer state before a skipped update) with the schedule counter of `updated_state`.

    A skipped (non-finite) step leaves AdamW's moments and its bias-correction count as they were (as PyTorch's
    GradScaler skip does), but the step still counts: the learning-rate schedule (inject_hyperparams' own count)
    moves on with it, so after k skipped steps the schedule is still at the train step and not k steps behind.
    """
    def pick(kept, updated):
        if isinstance(kept, optax.transforms.ConditionallyMaskState):   # a group frozen for its first N steps
            return kept._replace(step=updated.step,
                                 inner_state=keep_schedule_position(kept.inner_state, updated.inner_state))
        if not _is_injected(kept):
            return kept
        counters = {name: getattr(updated, name) for name in ("count", "hyperparams_states") if hasattr(kept, name)}
        return kept._replace(**counters)

    def stop(node) -> bool:
        return _is_injected(node) or isinstance(node, optax.transforms.ConditionallyMaskState)

    return jax.tree.map(pick, kept_state, updated_state, is_leaf=stop)


def make_loss(config, vgg_params=None) -> RestorationLoss:
    """The training loss of `config.loss` (a missing VGG weights file with a non-zero weight fails here; `vgg_params`
    given: those VGG weights instead of the file's, e.g. `losses.random_vgg_state` for the benchmark)."""
    loss = run_config.read(config).loss
    return RestorationLoss(charbonnier_delta=loss.charbonnier_delta, perceptual_weight=loss.perceptual_weight,
                           vgg_weights=loss.vgg_weights, vgg_network=loss.vgg_network, vgg_layers=loss.vgg_layers,
                           vgg_distance=loss.vgg_distance, vgg_params=vgg_params)


def batch_keys(use_spike: bool) -> Tuple[str, ...]:
    return TRAIN_BATCH_KEYS if use_spike else ("blur", "sharp")


def drop_spikes(spike_vox: jax.Array, rng: jax.Array, rate: float, zero_value: float) -> jax.Array:
    """Spike dropout: each sample's spikes `[B, ...]` become `zero_value` (the normalised input of no spikes) with
    probability `rate`, drawn from `rng` (one draw per sample)."""
    drop = jax.random.bernoulli(rng, rate, (spike_vox.shape[0],))
    return jnp.where(drop.reshape((-1,) + (1,) * (spike_vox.ndim - 1)), jnp.asarray(zero_value, spike_vox.dtype),
                     spike_vox)


def make_train_step(graphdef, loss_fn: RestorationLoss, tx: optax.GradientTransformation, *, use_spike: bool,
                    spike_dropout: float = 0.0, spike_zero: float = 0.0, gradient_gate=None, ema_decay: float = 0.0,
                    lora_spec: Optional[lora.LoRASpec] = None):
    """The pure train step `(params, train_state, batch, vgg_params) -> (params, train_state, metrics)`.

    params: the model's nnx.Param pure dict. train_state: {"step": int32, "opt_state", "rng": uint32 key data}.
    batch: {"blur", "sharp" [B, T, H, W, 3], "spike_vox" [B, T, H/f, W/f, K]}. metrics: float32 scalars
    "loss", "charbonnier", "perceptual", "grad_norm", "learning_rate" and "finite" (1.0 when the update was applied).
    A non-finite step keeps parameters and AdamW state; its schedule position still advances
    (`keep_schedule_position`). spike_dropout > 0: `drop_spikes` with the value `spike_zero` (data.spike_dropout).
    gradient_gate: `param_groups.gradient_gate(...)` when parameter groups are frozen (their gradients stop).
    ema_decay > 0: train_state["ema"] (a parameter tree) becomes `decay * ema + (1 - decay) * new params` after every
    applied update (optax.incremental_update); a skipped step leaves it as it was.
    lora_spec: params holds LoRA factors (params["lora"]); the model runs with them folded in (`lora.apply`).
    """

    def train_step(params, train_state, batch, vgg_params):
        step = train_state["step"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(train_state["rng"]), step)
        spikes = batch["spike_vox"] if use_spike else None
        if use_spike and spike_dropout > 0:
            # A stream of its own (the drop-path rng of the model is unchanged by turning dropout on).
            spikes = drop_spikes(spikes, jax.random.fold_in(rng, 0x5D0), spike_dropout, spike_zero)

        def compute_loss(p):
            if gradient_gate is not None:
                p = gradient_gate(p, step)
            model = factory.build(graphdef, p, lora_spec)
            restored = model(batch["blur"], spikes, rng=rng)
            with jax.named_scope("loss"):
                return loss_fn(restored, batch["sharp"], vgg_params)

        (loss, terms), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
        # The update runs leaf by leaf (several kernels per parameter leaf): its own scope, so that the breakdown
        # scripts (scripts/memory_breakdown.py, time_breakdown.py) name it.
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, updated_opt_state = tx.update(grads, train_state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
            new_params = keep(new_params, params)
            new_opt_state = keep_schedule_position(keep(updated_opt_state, train_state["opt_state"]),
                                                   updated_opt_state)
            new_train_state = {"step": step + 1, "opt_state": new_opt_state, "rng": train_state["rng"]}
            if ema_decay > 0:
                moved = optax.incremental_update(new_params, train_state["ema"], step_size=1.0 - ema_decay)
                new_train_state["ema"] = keep(moved, train_state["ema"])
        metrics = {"loss": loss, "charbonnier": terms["charbonnier"], "perceptual": terms["perceptual"],
                   "grad_norm": grad_norm, "learning_rate": learning_rate_of(updated_opt_state),
                   "finite": finite.astype(jnp.float32)}
        return new_params, new_train_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)

    return train_step


@dataclasses.dataclass
class TrainSetup:
    """Everything the sharded train step needs, built from a config and a mesh (see `build_train_setup`).

    The train state is two trees: `params` (the model's nnx.Param pure dict, sharded by `param_shardings`) and
    `train_state` ({"step", "opt_state", "rng"}, sharded by `train_state_shardings`).
    """

    config: Any
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_params: Any
    param_shardings: Any
    abstract_train_state: Any
    train_state_shardings: Any
    tx: optax.GradientTransformation
    loss_fn: RestorationLoss
    use_spike: bool
    model_mapping: Dict[str, Any]
    vgg_params: Any
    spike_dropout: float = 0.0
    spike_zero: float = 0.0     # the normalised input of no spikes (from the data's representation and statistics)
    gradient_gate: Any = None   # param_groups.gradient_gate when a group is frozen
    ema_decay: float = 0.0      # > 0: train_state["ema"], an exponential moving average of the parameters
    lora_spec: Optional[lora.LoRASpec] = None   # params["lora"] holds LoRA factors (train/lora.py)

    @property
    def keys(self) -> Tuple[str, ...]:
        return batch_keys(self.use_spike)

    @property
    def batch_shardings(self) -> Dict[str, jax.sharding.NamedSharding]:
        return {k: sharding.batch_sharding(self.mesh) for k in self.keys}

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.abstract_params))

    def abstract_targets(self):
        """(params, train_state) as ShapeDtypeStructs carrying their shardings (restore targets)."""
        return (_abstract_with_shardings(self.abstract_params, self.param_shardings),
                _abstract_with_shardings(self.abstract_train_state, self.train_state_shardings))

    def init_state(self, host_params, seed: int):
        """(params, train_state) at step 0 from host parameters (identical on every process), placed shard by
        shard; the optimizer state is initialised by a jitted tx.init straight into its shardings."""
        repl = sharding.replicated(self.mesh)
        params = sharding.put_global(host_params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.train_state_shardings["opt_state"])(params)
        rng = np.asarray(jax.random.key_data(jax.random.key(int(seed))), np.uint32)
        train_state = {"step": sharding.put_global(np.int32(0), repl), "opt_state": opt_state,
                       "rng": sharding.put_global(rng, repl)}
        if self.ema_decay > 0:   # its own buffers (params are donated to the step)
            train_state["ema"] = sharding.put_global(host_params, self.param_shardings)
        return params, train_state

    @functools.cached_property
    def _replicate(self):
        return jax.jit(lambda tree: tree, out_shardings=sharding.replicated(self.mesh))

    def apply_fn(self, params):
        """The process-local restorer function (inference.make_apply_fn) of the sharded `params`: gathered onto every
        process, LoRA factors folded in. Every process must call it (the gather is collective)."""
        from vrtspike_jax.inference import make_apply_fn

        local = sharding.local_copy(self._replicate(params))
        return make_apply_fn(factory.build(self.graphdef, local, self.lora_spec))

    def jit_step(self):
        """`jax.jit` of the train step with explicit in/out shardings; params and train_state are donated."""
        repl = sharding.replicated(self.mesh)
        vgg_shardings = jax.tree.map(lambda _: repl, self.vgg_params)
        step = make_train_step(self.graphdef, self.loss_fn, self.tx, use_spike=self.use_spike,
                               spike_dropout=self.spike_dropout, spike_zero=self.spike_zero,
                               gradient_gate=self.gradient_gate, ema_decay=self.ema_decay, lora_spec=self.lora_spec)
        return jax.jit(step,
                       in_shardings=(self.param_shardings, self.train_state_shardings, self.batch_shardings,
                                     vgg_shardings),
                       out_shardings=(self.param_shardings, self.train_state_shardings, repl),
                       donate_argnums=(0, 1))

    def compile_step(self, params, train_state, batch_shapes: Mapping[str, Tuple[int, ...]]):
        """Ahead-of-time compiled step for global batch arrays of `batch_shapes`: (compiled, seconds, memory)."""
        shardings = self.batch_shardings
        abstract_batch = {k: jax.ShapeDtypeStruct(tuple(batch_shapes[k]), jnp.float32, sharding=shardings[k])
                          for k in self.keys}
        compiled, lower_s, seconds = lower_and_compile(
            self.jit_step(), (params, train_state, abstract_batch, self.vgg_params), "train step")
        logging.info("train step: traced and lowered in %.1f s, compiled in %.1f s", lower_s, seconds - lower_s)
        return compiled, seconds, _memory_summary(compiled)


def build_train_setup(config, mesh: jax.sharding.Mesh, vgg_params=None) -> TrainSetup:
    """The loss (a missing VGG weights file fails here), the model's abstract parameters and their shardings, the
    optimizer and its state's shardings, for `config` on `mesh` (`vgg_params`: see `make_loss`)."""
    config = run_config.read(config)
    loss_fn = make_loss(config, vgg_params)
    mapping = factory.resolved_mapping(config.model)
    graphdef, abstract_params = factory.abstract_params(config)
    lora_spec = lora.spec_from_config(config)
    param_shardings = sharding.tree_shardings(abstract_params, mesh, config.mesh)
    tx, _ = make_optimizer(config)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    repl = sharding.replicated(mesh)
    train_state_shardings = {"step": repl, "opt_state": sharding.tree_shardings(abstract_opt, mesh, config.mesh),
                             "rng": repl}
    abstract_train_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "opt_state": abstract_opt,
                            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    ema_decay = config.optimizer.ema_decay
    if ema_decay > 0:
        abstract_train_state["ema"] = abstract_params
        train_state_shardings["ema"] = param_shardings
    vgg_params = jax.tree.map(lambda a: sharding.put_global(np.asarray(a), repl), loss_fn.vgg_params)
    settings = param_groups.group_settings(config)
    gate = None if param_groups.is_default(settings) else param_groups.gradient_gate(
        param_groups.group_tree(abstract_params), settings)
    return TrainSetup(config=config, mesh=mesh, graphdef=graphdef, abstract_params=abstract_params,
                      param_shardings=param_shardings, abstract_train_state=abstract_train_state,
                      train_state_shardings=train_state_shardings, tx=tx, loss_fn=loss_fn,
                      use_spike=bool(mapping.get("use_spike", True)), model_mapping=mapping, vgg_params=vgg_params,
                      spike_dropout=float(config.data.spike_dropout), gradient_gate=gate, ema_decay=ema_decay,
                      lora_spec=lora_spec)


class StepMetrics:
    """Host-side bookkeeping of finished train steps: window means for logging and the non-finite guard.

    `add(values)` takes a step's metrics (floats, with "finite"); it returns False for a skipped (non-finite) step.
    `should_stop` is true once `max_consecutive` steps in a row were non-finite. `summary()` returns the window's
    means (finite steps only) plus "nonfinite_steps" (the count) and starts a new window.
    """

    LOGGED = ("loss", "charbonnier", "perceptual", "grad_norm", "learning_rate")

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max(1, int(max_consecutive))
        self.in_row = 0
        self._window: Dict[str, List[float]] = {}
        self._nonfinite = 0

    def add(self, values: Mapping[str, float]) -> bool:
        if values["finite"] < 1.0:
            self.in_row += 1
            self._nonfinite += 1
            return False
        self.in_row = 0
        for key in self.LOGGED:
            self._window.setdefault(key, []).append(float(values[key]))
        return True

    @property
    def should_stop(self) -> bool:
        return self.in_row >= self.max_consecutive

    def summary(self) -> Dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self._window.items()}
        out["nonfinite_steps"] = float(self._nonfinite)
        self._window, self._nonfinite = {}, 0
        return out


class StepLog(StepMetrics):
    """StepMetrics plus what a run writes of its steps (process 0): `train_metrics.jsonl` and TensorBoard `train/*`
    (the window's means, `write_window`), and `nonfinite_steps.jsonl` (every skipped step with its samples, from
    `samples_of(step)`). `finish(step, device_metrics)` reads a step's metrics back; once `max_consecutive` steps in a
    row were non-finite it raises NonFiniteLossError naming the kept checkpoint (`last_checkpoint()`: its step).
    """

    def __init__(self, workdir, writer, max_consecutive: int, *, is_main: bool = True, in_row: int = 0,
                 samples_of=lambda step: [], last_checkpoint=lambda: None):
        super().__init__(max_consecutive)
        self.workdir, self.writer, self.is_main = Path(workdir), writer, bool(is_main)
        self.in_row = int(in_row)
        self.samples_of, self.last_checkpoint = samples_of, last_checkpoint

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        if self.is_main:
            with open(self.workdir / name, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def finish(self, step: int, device_metrics) -> None:
        """The host side of the finished 0-based `step` (may raise NonFiniteLossError)."""
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if self.add(values):
            return
        samples = self.samples_of(step)
        logging.warning("step %d: non-finite loss %s / gradient norm %s: update skipped (%d in a row); samples: %s",
                        step + 1, values["loss"], values["grad_norm"], self.in_row, [s["name"] for s in samples])
        self._append("nonfinite_steps.jsonl", {"step": step + 1, "loss": values["loss"],
                                               "grad_norm": values["grad_norm"], "samples": samples})
        if self.should_stop:
            raise NonFiniteLossError(
                f"{self.in_row} train steps in a row (up to step {step + 1}) had a non-finite loss or gradient; "
                f"stopping. Those steps did not change the parameters; the last checkpoint (step "
                f"{self.last_checkpoint()}) in {self.workdir / checkpointing.CHECKPOINT_DIR} is kept. The samples are "
                f"listed in {self.workdir / 'nonfinite_steps.jsonl'}.")

    def write_window(self, steps_done: int) -> None:
        summary = self.summary()
        self.writer.write_scalars(steps_done, {f"train/{k}": v for k, v in summary.items()})
        self._append("train_metrics.jsonl", {"step": steps_done, **summary})


def _data_position(steps_done: int, nonfinite_in_row: int, *, data_seed: int, global_batch_size: int,
                   train_iter) -> Dict[str, Any]:
    """The input position saved with a checkpoint after `steps_done` steps."""
    return {"next_step": int(steps_done), "data_seed": data_seed, "global_batch_size": global_batch_size,
            "samples_seen": int(steps_done) * global_batch_size, "train_root": str(train_iter.root),
            "num_train_clips": int(train_iter.num_samples),
            # non-finite steps in a row up to `steps_done`: a resume goes on counting (nonfinite.max_consecutive)
            "nonfinite_in_row": int(nonfinite_in_row)}


def _model_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "model") -> List[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _model_differences(a, b, f"{prefix}.{key}")
        elif json.dumps(a) != json.dumps(b):
            diffs.append(f"{prefix}.{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def check_same_model(checkpoints: checkpointing.RunCheckpoints, step: int, config_dict: Mapping[str, Any]) -> None:
    """ConfigError unless `last` checkpoint `step` holds the model of `config_dict` (model section, and LoRA when
    either has it); CheckpointReadError when its saved config cannot be read."""
    step_dir = checkpoints.directory / checkpointing.LAST / str(step)
    try:
        saved = run_config.to_dict(run_config.read(checkpoints.read_config(step), fill_defaults=True))
    except Exception as err:  # a damaged or foreign config item
        checkpoints.close()
        raise checkpointing.CheckpointReadError(
            f"{step_dir}: cannot read the run config of this checkpoint ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); move that step folder away to resume from the previous one, or use "
            "a new --workdir") from err
    diffs = _model_differences(saved["model"], config_dict["model"])
    if saved["lora"]["rank"] or config_dict["lora"]["rank"]:   # LoRA factors change the parameter tree
        diffs += _model_differences(saved["lora"], config_dict["lora"], "lora")
    if diffs:
        checkpoints.close()
        raise preflight.ConfigError(f"{checkpoints.directory.parent} holds checkpoints of another model; differences: "
                                    f"{'; '.join(diffs)}. Use a new --workdir (or the same model config) to go on.")


# --------------------------------------------------------------------------------------------------------------
# The run


def _abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


@contextlib.contextmanager
def _quiet_closed_loop_callbacks():
    """While a restore fails, tensorstore's reader threads may call back into an asyncio loop that Orbax has
    already closed; Python prints each as a RuntimeError traceback (through sys.excepthook, the threading hook or
    the unraisable hook). Those are dropped (logged at debug level) for the duration; every other error goes to the
    usual hook. After a failed restore the filter stays in place (the run is ending and the reader threads may
    still call back)."""
    import threading

    def closed_loop(error) -> bool:
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            logging.debug("dropped a callback into a closed event loop: %s", error)
            return True
        return False

    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    sys.excepthook = lambda kind, value, tb: closed_loop(value) or hooks[0](kind, value, tb)
    threading.excepthook = lambda args: closed_loop(args.exc_value) or hooks[1](args)
    sys.unraisablehook = lambda info: closed_loop(info.exc_value) or hooks[2](info)
    yield   # on failure the hooks stay: the reader threads go on calling back after the exception
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks


def _sample_metadata(train_iter, step: int, *, global_batch_size: int) -> List[Dict[str, Any]]:
    """The global batch of `step` (0-based) as {position, name, crop_y, crop_x, hflip, vflip} per sample."""
    samples = []
    for position in range(step * global_batch_size, (step + 1) * global_batch_size):
        clip, y, x, hflip, vflip = train_iter.planner.plan(position)
        samples.append({"position": position, "name": train_iter.sample_name(clip), "crop_y": y, "crop_x": x,
                        "hflip": hflip, "vflip": vflip})
    return samples


def restore_run(checkpoints: checkpointing.RunCheckpoints, step: int, setup: TrainSetup,
                global_batch_size: int):
    """(params, train_state, data_position, step folder) of `last` checkpoint `step`, placed in the setup's shardings;
    CheckpointReadError naming the step folder when it cannot be restored or holds another step."""
    last_dir = checkpoints.directory / checkpointing.LAST / str(step)
    try:
        with _quiet_closed_loop_callbacks():
            params, train_state, position, _ = checkpoints.restore_last(step, *setup.abstract_targets())
    except Exception as err:  # Orbax / tensorstore raise many types for a damaged or foreign folder
        checkpoints.close()     # its background threads would otherwise print tracebacks at exit
        if checkpointing.holds_older_layout(last_dir, setup.abstract_targets()[0]):
            raise checkpointing.CheckpointReadError(
                f"{last_dir}: written before TMSA groups stored their blocks stacked (2026-11-30), so its optimizer "
                f"state cannot resume; its parameters still load: start a new --workdir with "
                f"--config.init.vrt_from={last_dir} (or restore it with scripts/test.py)") from err
        raise checkpointing.CheckpointReadError(
            f"{last_dir}: cannot restore this checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
            "move that step folder away to resume from the previous one, or use a new --workdir") from err
    held = int(jax.device_get(train_state["step"]))
    if held != step:
        raise checkpointing.CheckpointReadError(f"{last_dir}: holds step {held}, not {step}")
    if int(position.get("global_batch_size", global_batch_size)) != global_batch_size:
        logging.warning("global_batch_size changed from %s to %d: the input order after the resume differs from an "
                        "uninterrupted run", position.get("global_batch_size"), global_batch_size)
    logging.info("resumed from %s (step %d)", last_dir, step)
    return params, train_state, position, str(last_dir)


def open_input(config: run_config.RunConfig, start_step: int):
    """(train iterator at `start_step`, this process's eval iterator, the exclusion counts of both splits)."""
    from data_pipelines import input_pipeline

    train_iter = input_pipeline.create_train_iterator(config.data, global_batch_size=config.global_batch_size,
                                                      seed=config.seed, start_step=start_step,
                                                      process_index=jax.process_index(),
                                                      process_count=jax.process_count())
    eval_iter = input_pipeline.create_eval_iterator(config.data, process_index=jax.process_index(),
                                                    process_count=jax.process_count())
    logging.info("data: %s (%d training clips, %d validation clips on this process)", train_iter.root,
                 train_iter.num_samples, len(eval_iter))
    # What the splits leave out (each exclusion was logged with its file and reason by the input pipeline).
    data_counts = {"train": train_iter.exclusion_counts(), "val": eval_iter.exclusion_counts()}
    logging.info("data exclusions: %s", data_counts)
    return train_iter, eval_iter, data_counts


def open_writers(workdir: Path, config_dict: Mapping[str, Any], start_step: int, compile_seconds: float, *,
                 is_main: bool):
    """(CLU metric writer of WORKDIR/tensorboard (logging only on processes other than 0), ReportProgress: steps/s and
    ETA every log step); the hyper-parameters at a run's first start, and the train step's compile time."""
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(str(workdir / "tensorboard"), just_logging=not is_main,
                                                  asynchronous=True)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in _flatten(config_dict).items()
                              if isinstance(v, (int, float, str, bool))})
    writer.write_scalars(start_step, {"compile/train_step_seconds": compile_seconds})
    report_progress = periodic_actions.ReportProgress(num_train_steps=config_dict["total_steps"], writer=writer,
                                                      every_steps=config_dict["log_every_steps"], every_secs=None)
    return writer, report_progress


def train_and_evaluate(config, workdir) -> Dict[str, Any]:
    """Trains `config.total_steps` steps (resuming from WORKDIR's last checkpoint if there is one), validating every
    `eval.every_steps`; returns a summary {"step", "workdir", "checkpoints", "tensorboard", "triptychs",
    "metrics_dir", "validation" (the last validation's metrics, or None)}.

    Every process of a multi-process run calls this with the same config and workdir (a shared filesystem).
    About 125 lines on purpose (over the ~80-line rule): the run reads top to bottom in banners as big_vision's
    train.py; each policy it uses (Validator, StepLog, RunCheckpoints.keep_if_best, check_same_model, restore_run,
    open_input, open_writers) is a named, separately tested piece, and no closure shares state with the loop.
    """
    run_start = time.perf_counter()
    config = preflight.preflight(config)   # the typed config; bad keys, absent files, unprepared data: one line
    maybe_initialize_distributed(config)
    enable_compilation_cache(config)
    workdir = Path(os.path.expanduser(os.fspath(workdir))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main, process_count = jax.process_index() == 0, jax.process_count()
    config_dict = run_config.to_dict(config)
    if is_main:
        logging.info("config:\n%s", json.dumps(config_dict, indent=1))

    # ---- mesh, loss, model abstract shapes and shardings, optimizer
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.global_batch_size, mesh, process_count)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.devices.size, process_count)
    setup = build_train_setup(config, mesh)
    logging.info("model: %s parameters (use_spike=%s, dtype=%s)", f"{setup.num_params:,}", setup.use_spike,
                 setup.model_mapping.get("dtype"))

    # ---- checkpoints: is there a run of this model to resume?
    checkpoints = checkpointing.RunCheckpoints(workdir, keep_last=config.checkpoint.keep_last,
                                               keep_best=config.checkpoint.keep_best,
                                               async_save=config.checkpoint.async_save)
    latest = checkpoints.latest_step()
    if latest is not None:
        check_same_model(checkpoints, latest, config_dict)
    start_step = 0 if latest is None else int(latest)   # a `last` checkpoint's number is its steps done

    # ---- input (before the parameters: a data error costs no initialisation, and nothing is recorded for it)
    train_iter, eval_iter, data_counts = open_input(config, start_step)
    setup.spike_zero = train_iter.representation.no_spike_input(*train_iter.stats)   # the input for no spikes

    # ---- parameters and train state: restored, or initialised on the host and placed shard by shard
    resumed_from, resumed_position = None, {}
    if latest is not None:
        params, train_state, resumed_position, resumed_from = restore_run(checkpoints, start_step, setup,
                                                                         config.global_batch_size)
    else:
        params, train_state = setup.init_state(factory.initial_params(config), config.seed)
        # The model's eager initialisation compiled dozens of small programs that never run again; dropped, they give
        # back about 0.1 GiB of host memory before the step compiles (plain VRT, 2026-12-02).
        jax.clear_caches()
    if is_main:
        record = write_run_record(workdir, config_dict, start_step=start_step, resumed_from=resumed_from,
                                  extra={"num_parameters": setup.num_params, "mesh": dict(mesh.shape),
                                         "data": data_counts})
        logging.info("run record: %s", record)

    # ---- the compiled train step
    compiled_step, compile_seconds = None, 0.0
    if start_step < config.total_steps:
        spec = train_iter.element_spec
        batch_shapes = {k: (config.global_batch_size,) + tuple(spec[k].shape[1:]) for k in setup.keys}
        compiled_step, compile_seconds, memory = setup.compile_step(params, train_state, batch_shapes)
        logging.info("train step compiled in %.1f s; memory per device: %s", compile_seconds, memory)
    else:
        logging.info("nothing to train: the checkpoint is at step %d and total_steps is %d", start_step,
                     config.total_steps)

    # ---- writers, validation, the step log
    writer, report_progress = open_writers(workdir, config_dict, start_step, compile_seconds, is_main=is_main)
    validator = validation.Validator(config, workdir, eval_iter, writer, use_spike=setup.use_spike,
                                     total_steps=config.total_steps, is_main=is_main, process_count=process_count,
                                     data_counts=data_counts)
    previous = validation.read_metrics_jsons(workdir) if is_main else []
    last_validation: Optional[Dict[str, Any]] = previous[-1] if previous else None
    step_log = StepLog(workdir, writer, config.nonfinite.max_consecutive, is_main=is_main,
                       in_row=int(resumed_position.get("nonfinite_in_row", 0)),
                       samples_of=functools.partial(_sample_metadata, train_iter,
                                                    global_batch_size=config.global_batch_size),
                       last_checkpoint=checkpoints.latest_step)
    data_position = functools.partial(_data_position, data_seed=config.seed,
                                      global_batch_size=config.global_batch_size, train_iter=train_iter)

    # ---- the loop
    log_every, eval_every, ckpt_every = (max(1, config.log_every_steps), config.eval.every_steps,
                                         config.checkpoint.every_steps)
    pending: Optional[Tuple[int, Any]] = None   # (0-based step, device metrics) not yet read back
    try:
        for step in range(start_step, config.total_steps):
            steps_done = step + 1
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = sharding.global_batch(next(train_iter), mesh, setup.keys)
                params, train_state, device_metrics = compiled_step(params, train_state, batch, setup.vgg_params)
            if pending is not None:
                step_log.finish(*pending)
            pending = (step, device_metrics)
            report_progress(steps_done)
            is_last = steps_done == config.total_steps
            preempted = checkpoints.reached_preemption(steps_done)
            due_log = steps_done % log_every == 0 or is_last
            due_eval = (eval_every > 0 and steps_done % eval_every == 0) or is_last
            due_ckpt = (ckpt_every > 0 and steps_done % ckpt_every == 0) or is_last or preempted
            if due_log or due_eval or due_ckpt:
                step_log.finish(*pending)
                pending = None
            if due_log:
                step_log.write_window(steps_done)
            if due_ckpt:
                checkpoints.save_last(steps_done, params, train_state, data_position(steps_done, step_log.in_row),
                                      config_dict, force=True)
            if due_eval:   # the EMA, when there is one, is what validation scores and `best` keeps
                evaluated = train_state["ema"] if setup.ema_decay > 0 else params
                last_validation = validator(steps_done, setup.apply_fn(evaluated))
                checkpoints.keep_if_best(steps_done, evaluated, data_position(steps_done, step_log.in_row),
                                         config_dict, last_validation)
            if preempted:
                logging.warning("preemption signal received: saved step %d and stopping", steps_done)
                break
        if pending is not None:
            step_log.finish(*pending)
    finally:
        checkpoints.wait_until_finished()
        writer.flush()
    checkpoints.close()
    writer.close()
    return {"step": int(jax.device_get(train_state["step"])), "wall_seconds": time.perf_counter() - run_start,
            "workdir": str(workdir), "checkpoints": str(workdir / checkpointing.CHECKPOINT_DIR),
            "tensorboard": str(workdir / "tensorboard"), "triptychs": str(workdir / "triptychs"),
            "metrics_dir": str(workdir / "metrics"), "validation": last_validation,
            "compile_seconds": compile_seconds}


def format_summary(summary: Mapping[str, Any]) -> str:
    """The closing lines of a run: where its outputs are and the PSNR reached against the blurry input."""
    minutes = summary.get("wall_seconds", float("nan")) / 60
    lines = [f"trained to step {summary['step']} in {summary['workdir']} ({minutes:.1f} min)",
             f"  checkpoints:     {summary['checkpoints']}  (last/, best/)",
             f"  TensorBoard:     tensorboard --logdir {summary['tensorboard']}",
             f"  triptychs:       {summary['triptychs']}  (blur | restored | sharp)",
             f"  metrics JSON:    {summary['metrics_dir']}"]
    result = summary.get("validation")
    if result:
        lines.append(f"  validation PSNR: {result['psnr']:.2f} dB restored vs {result.get('input_psnr', float('nan')):.2f} "
                     f"dB blurry input ({result['psnr'] - result.get('input_psnr', float('nan')):+.2f} dB); "
                     f"SSIM-Y {result['ssim_y']:.4f} vs {result.get('input_ssim_y', float('nan')):.4f}; "
                     f"{result['num_frames']} frames")
    return "\n".join(lines)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _memory_summary(compiled) -> Dict[str, float]:
    """runtime.compiled_memory in MiB (for the log), {} when the backend gives no analysis."""
    from vrtspike_jax import runtime

    memory = runtime.compiled_memory(compiled) or {}
    return {k.replace("_bytes", "_mib"): round(v / 2 ** 20, 1) for k, v in memory.items()}


__all__ = ["NonFiniteLossError", "StepMetrics", "TrainSetup", "batch_keys", "build_train_setup", "enable_compilation_cache", "learning_rate_of", "make_loss",
           "format_summary", "make_optimizer", "make_train_step", "maybe_initialize_distributed", "train_and_evaluate"]
