"""Unit tests of the training library (in-process, small): configs, schedule, sharding rules, the train step's
non-finite skip, step bookkeeping, checkpoint loading errors. The end-to-end runs are in test_train_run.py."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import baseline
from vrtspike_jax import factory
from vrtspike_jax.train import checkpointing, run_config, sharding, train_lib
from vrtspike_jax.train.train_lib import StepMetrics, make_optimizer, make_train_step


# ----------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("variant", ["", "quick", "tiny", "vrt_only", "vrt120", "fuse14", "quick,vrt_only"])
def test_config_variants_build_their_model(variant):
    config = baseline.get_config(variant)
    graphdef, params = factory.abstract(config.model)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    mapping = factory.resolved_mapping(config.model)
    assert mapping["spike_bins"] == config.data.num_bins and mapping["spike_scale"] == config.data.spike_scale
    if variant == "":
        # the official deblurring VRT (18,320,007 parameters incl. SpyNet) plus the spike branch
        vrt_only = baseline.get_config("vrt_only")
        _, vrt_params = factory.abstract(vrt_only.model)
        assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(vrt_params)) == 18_320_007
        assert count > 18_320_007
    if "vrt_only" in variant:
        assert "spike_encoder" not in params
    if variant == "vrt120":
        assert {int(d) for d in mapping["vrt_overrides"].get("embed_dims", [120])[:7]} == {120}


def test_baseline_hyper_parameters_follow_the_spec():
    config = baseline.get_config()
    assert config.seed == 123 and config.global_batch_size == 8
    assert (config.optimizer.learning_rate, config.optimizer.b1, config.optimizer.b2) == (2e-4, 0.9, 0.99)
    assert config.optimizer.weight_decay == 1e-4 and config.optimizer.warmup_steps == 5000
    assert config.loss.charbonnier_delta == 1e-3 and config.loss.perceptual_weight == 0.1
    assert (config.loss.vgg_network, tuple(config.loss.vgg_layers), config.loss.vgg_distance) == (
        "vgg16", ("relu3_3",), "l1")
    assert config.data.clip_length == 5 and config.data.crop_size == 256 and config.data.num_bins == 32
    assert config.eval.every_steps == 1000 and config.eval.triptych_every_steps == 10_000
    assert tuple(config.model.fuse_stages) == (1, 2, 3, 4, 5, 6, 7)
    assert tuple(baseline.get_config("fuse14").model.fuse_stages) == (1, 2, 3, 4)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant 'qick'"):
        baseline.get_config("qick")


def test_data_fields_drive_the_model_fields():
    config = baseline.get_config()
    config.data.num_bins = 16
    config.data.spike_scale = 2
    mapping = factory.resolved_mapping(config.model)
    assert mapping["spike_bins"] == 16 and mapping["spike_scale"] == 2


def test_missing_vgg_weights_with_nonzero_weight_fail_before_compiling():
    config = baseline.get_config("tiny")
    config.loss.perceptual_weight = 0.1
    with pytest.raises(ValueError, match="no VGG weights file"):
        train_lib.make_loss(config)
    config.loss.vgg_weights = "/nonexistent/vgg16.npz"
    with pytest.raises(FileNotFoundError, match="/nonexistent/vgg16.npz"):
        train_lib.make_loss(config)


def test_dtype_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert factory.resolve_compute_dtype({"dtype": "auto"}, "gpu")["dtype"] == "bfloat16"
    assert factory.resolve_compute_dtype({"dtype": "auto"}, "tpu")["dtype"] == "bfloat16"
    assert factory.resolve_compute_dtype({"dtype": "auto"}, "cpu")["dtype"] is None
    assert factory.resolve_compute_dtype({"dtype": "bfloat16"}, "cpu")["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------- optimizer

def test_schedule_is_linear_warmup_then_cosine():
    config = baseline.get_config()
    config.total_steps = 1000
    config.optimizer.warmup_steps = 100
    _, schedule = make_optimizer(config)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(50)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 2e-4, rtol=1e-6)
    # cosine: half way through the decay the rate is the mean of peak and end
    np.testing.assert_allclose(float(schedule(550)), (2e-4 + 1e-7) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(1000)), 1e-7, rtol=1e-5)
    config.optimizer.schedule_steps = 2000
    _, longer = make_optimizer(config)
    assert float(longer(1000)) > float(schedule(1000))


def test_parameter_gradient_ties_are_on_with_one_device_and_off_with_several():
    """'auto' turns the ties off where each would be a collective (several devices); 'on' / 'off' force them; any
    other value is an error naming it. The model built from the resolved mapping carries the setting."""
    assert factory.resolve_gradient_ties({"tie_parameter_gradients": "auto"}, 1)["tie_parameter_gradients"] is True
    assert factory.resolve_gradient_ties({"tie_parameter_gradients": "auto"}, 2)["tie_parameter_gradients"] is False
    assert factory.resolve_gradient_ties({"tie_parameter_gradients": "on"}, 8)["tie_parameter_gradients"] is True
    assert factory.resolve_gradient_ties({"tie_parameter_gradients": "off"}, 1)["tie_parameter_gradients"] is False
    with pytest.raises(ValueError, match="tie_parameter_gradients.*'sometimes'"):
        factory.resolve_gradient_ties({"tie_parameter_gradients": "sometimes"}, 1)
    config = baseline.get_config("tiny")
    config.model.tie_parameter_gradients = "off"
    assert factory.model_config(config.model).vrt.tie_parameter_gradients is False


def test_adamw_step_matches_pytorch_semantics_and_clipping():
    """One AdamW step (decoupled decay lr*wd*p, bias-corrected moments) after global-norm clipping."""
    config = baseline.get_config()
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 1.0
    tx, schedule = make_optimizer(config)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([3.0, 4.0, 0.0])}  # norm 5 -> clipped to norm 1
    updates, state = tx.update(grads, tx.init(params), params)
    lr = float(schedule(0))
    clipped = np.array([0.6, 0.8, 0.0])
    m_hat = clipped  # (1 - b1) g / (1 - b1)
    v_hat = clipped ** 2
    expected = -lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + 1e-4 * np.array([1.0, -2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-5)
    assert float(train_lib.learning_rate_of(state)) == pytest.approx(lr)


# ----------------------------------------------------------------------------------------------- sharding

def test_fsdp_spec_shards_the_largest_divisible_axis_of_large_arrays():
    P = jax.sharding.PartitionSpec
    assert sharding.fsdp_spec((96, 384), 4) == P(None, "fsdp")
    assert sharding.fsdp_spec((3, 3, 96, 96), 4) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((675, 6), 4, min_size=16) == P()   # no axis divisible by 4
    assert sharding.fsdp_spec((96,), 4) == P()                    # small: replicated
    assert sharding.fsdp_spec((96, 384), 1) == P()


def test_mesh_shape_checks():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2)
    assert sharding.mesh_shape({"data": 2, "fsdp": 4}, 8) == (2, 4)
    with pytest.raises(ValueError, match="4 devices, but 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert mesh.axis_names == ("data", "fsdp")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="not a multiple"):
        sharding.check_batch_size(3, sharding.make_mesh({"data": -1}), process_count=2)


# ----------------------------------------------------------------------------------------------- the step

class _ToyRestorer(nnx.Module):
    """A stand-in with the model's call signature: frames + spikes -> frames (one per-pixel linear map)."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3 + 2, 3, rngs=rngs)

    def __call__(self, frames, spike_voxels=None, *, rng=None):
        return frames + self.linear(jnp.concatenate([frames, spike_voxels], axis=-1))


def _toy_config():
    config = baseline.get_config("tiny")
    config.optimizer.warmup_steps = 0
    return config


def _toy_setup(**step_options):
    config = _toy_config()
    model = _ToyRestorer(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(config)
    step = jax.jit(make_train_step(graphdef, train_lib.make_loss(config), tx, use_spike=True, **step_options))
    train_state = {"step": jnp.int32(0), "opt_state": tx.init(params),
                   "rng": jax.random.key_data(jax.random.key(0))}
    if step_options.get("ema_decay"):
        train_state["ema"] = jax.tree.map(jnp.array, params)
    rng = np.random.default_rng(0)
    batch = {"blur": rng.uniform(size=(2, 2, 8, 8, 3)).astype(np.float32),
             "sharp": rng.uniform(size=(2, 2, 8, 8, 3)).astype(np.float32),
             "spike_vox": rng.normal(size=(2, 2, 8, 8, 2)).astype(np.float32)}
    return step, params, train_state, batch


def test_train_step_applies_finite_updates_and_skips_nonfinite_ones():
    step, params, train_state, batch = _toy_setup()
    new_params, new_state, metrics = step(params, train_state, batch, {})
    assert float(metrics["finite"]) == 1.0 and int(new_state["step"]) == 1
    assert not np.allclose(new_params["linear"]["kernel"], params["linear"]["kernel"])
    bad = dict(batch, spike_vox=np.full_like(batch["spike_vox"], np.nan))
    skipped_params, skipped_state, bad_metrics = step(new_params, new_state, bad, {})
    assert float(bad_metrics["finite"]) == 0.0 and not np.isfinite(float(bad_metrics["loss"]))
    assert int(skipped_state["step"]) == 2   # the step counts (the input moves on) ...
    for a, b in zip(jax.tree.leaves(skipped_params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(a, b)  # ... but parameters and AdamW's state stay as they were
    adam_before, adam_after = new_state["opt_state"][1].inner_state, skipped_state["opt_state"][1].inner_state
    for a, b in zip(jax.tree.leaves(adam_after), jax.tree.leaves(adam_before)):
        np.testing.assert_array_equal(a, b)


def test_schedule_follows_the_train_step_across_skipped_steps():
    """After non-finite (skipped) steps the learning rate is still the schedule at the train step, not k steps
    behind: step s (0-based) uses schedule(s) whether or not earlier steps were skipped."""
    step, params, train_state, batch = _toy_setup()
    _, schedule = make_optimizer(_toy_config())
    bad = dict(batch, spike_vox=np.full_like(batch["spike_vox"], np.nan))
    for s, inputs in enumerate([batch, bad, bad, batch, batch]):
        params, train_state, metrics = step(params, train_state, inputs, {})
        assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(s)), rel=1e-6), s
        assert int(train_state["opt_state"][1].count) == s + 1
    assert int(train_state["opt_state"][1].inner_state[0].count) == 3   # AdamW counted the 3 applied updates


def test_step_metrics_windows_and_stops_after_k_nonfinite_in_a_row():
    metrics = StepMetrics(max_consecutive=2)
    good = {"loss": 1.0, "charbonnier": 1.0, "perceptual": 0.0, "grad_norm": 2.0, "learning_rate": 1e-3,
            "finite": 1.0}
    bad = dict(good, loss=float("nan"), finite=0.0)
    assert metrics.add(good) and not metrics.add(bad) and not metrics.should_stop
    assert metrics.add(dict(good, loss=3.0))          # a finite step resets the count
    summary = metrics.summary()
    assert summary["loss"] == 2.0 and summary["nonfinite_steps"] == 1.0
    assert not metrics.add(bad) and not metrics.should_stop
    assert not metrics.add(bad) and metrics.should_stop


# ----------------------------------------------------------------------------------------------- loading

def test_load_model_from_checkpoint_errors_name_what_is_missing(tmp_path):
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="does not exist"):
        checkpointing.load_model_from_checkpoint(tmp_path / "nothing")
    (tmp_path / "checkpoints" / "last").mkdir(parents=True)
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="no complete 'best' checkpoint"):
        checkpointing.load_model_from_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="which must be"):
        checkpointing.load_model_from_checkpoint(tmp_path, which="first")


def test_load_model_from_checkpoint_roundtrip(tmp_path):
    config = baseline.get_config("tiny")
    params = factory.initial_params(config)
    saver = checkpointing.RunCheckpoints(tmp_path, async_save=False)
    config_dict = checkpointing.config_to_dict(config)
    saver.save_best(7, params, {"next_step": 7}, config_dict, {"psnr": 20.0})
    saver.save_best(9, params, {"next_step": 9}, config_dict, {"psnr": 19.0})  # worse: not kept
    saver.wait_until_finished()
    saver.close()
    assert checkpointing.resolve_checkpoint_dir(tmp_path).name == "7"
    model, loaded_config = checkpointing.load_model_from_checkpoint(tmp_path)
    # The run config comes back typed (run_config.RunConfig) and equal to what was saved.
    assert isinstance(loaded_config, run_config.RunConfig) and run_config.to_dict(loaded_config) == config_dict
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    for path in (tmp_path / "checkpoints", tmp_path / "checkpoints" / "best", tmp_path / "checkpoints" / "best" / "7"):
        assert checkpointing.resolve_checkpoint_dir(path).name == "7"
    with pytest.MonkeyPatch.context() as patch:  # a path relative to the working directory (Orbax needs absolute)
        patch.chdir(tmp_path)
        model, _ = checkpointing.load_model_from_checkpoint("checkpoints/best/7")
        first = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
        np.testing.assert_array_equal(np.asarray(first), jax.tree.leaves(params)[0])
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="no complete 'last' checkpoint.*best has"):
        checkpointing.load_model_from_checkpoint(tmp_path, which="last")


def test_model_config_changes_are_named():
    diffs = train_lib._model_differences({"use_spike": True, "vrt_overrides": {"depths": [1, 2]}},
                                         {"use_spike": False, "vrt_overrides": {"depths": [1, 2]}})
    assert diffs == ["model.use_spike: checkpoint True, now False"]
    assert json.dumps(train_lib.format_summary({
        "step": 3, "workdir": "w", "checkpoints": "c", "tensorboard": "t", "triptychs": "p", "metrics_dir": "m",
        "validation": {"psnr": 30.0, "input_psnr": 25.0, "ssim_y": 0.9, "input_ssim_y": 0.8, "num_frames": 5}}))


def test_spike_dropout_replaces_whole_samples_with_zero_counts():
    key = jax.random.key(3)
    vox = jnp.asarray(np.random.default_rng(0).normal(size=(4000, 2, 3, 3, 2)), jnp.float32)
    out = np.asarray(train_lib.drop_spikes(vox, key, 0.25, -1.5))
    dropped = np.all(out == -1.5, axis=(1, 2, 3, 4))
    kept = np.all(out == np.asarray(vox), axis=(1, 2, 3, 4))
    assert np.all(dropped ^ kept)                              # a sample is dropped whole or kept whole
    assert abs(dropped.mean() - 0.25) < 0.03                   # 4000 draws: std of the fraction 0.007
    np.testing.assert_array_equal(train_lib.drop_spikes(vox, key, 0.0, -1.5), vox)


def test_train_step_with_spike_dropout_trains_on_the_dropped_batch():
    """The step with data.spike_dropout equals the plain step on the batch whose drawn samples have zero counts;
    the drop-path rng is not changed by it."""
    config = _toy_config()
    model = _ToyRestorer(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx, _ = make_optimizer(config)
    loss = train_lib.make_loss(config)
    plain = jax.jit(make_train_step(graphdef, loss, tx, use_spike=True))
    dropping = jax.jit(make_train_step(graphdef, loss, tx, use_spike=True, spike_dropout=0.5, spike_zero=-0.7))
    rng = np.random.default_rng(1)
    batch = {"blur": rng.uniform(size=(8, 2, 8, 8, 3)).astype(np.float32),
             "sharp": rng.uniform(size=(8, 2, 8, 8, 3)).astype(np.float32),
             "spike_vox": rng.normal(size=(8, 2, 8, 8, 2)).astype(np.float32)}
    key_data = jax.random.key_data(jax.random.key(0))
    state = {"step": jnp.int32(5), "opt_state": tx.init(params), "rng": key_data}
    step_key = jax.random.fold_in(jax.random.wrap_key_data(key_data), 5)
    dropped = train_lib.drop_spikes(batch["spike_vox"], jax.random.fold_in(step_key, 0x5D0), 0.5, -0.7)
    assert 0 < int(np.all(np.asarray(dropped) == -0.7, axis=(1, 2, 3, 4)).sum()) < 8
    want, _, want_metrics = plain(params, state, dict(batch, spike_vox=dropped), {})
    got, _, got_metrics = dropping(params, state, batch, {})
    np.testing.assert_array_equal(got_metrics["loss"], want_metrics["loss"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, message", [({"data.spike_dropout": 1.0}, "expected a probability in [0, 1)"),
                                                ({"data.spike_dropout": 0.3, "model.use_spike": False},
                                                 "needs a model with spikes")])
def test_spike_dropout_range_is_checked_at_start(overrides, message):
    from vrtspike_jax.train import preflight

    config = _toy_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(preflight.ConfigError, match=re.escape(message)):
        preflight.check_training(config)


def test_ema_follows_a_numpy_reference_and_holds_on_skipped_steps():
    step, params, state, batch = _toy_setup(ema_decay=0.9)
    bad = dict(batch, spike_vox=np.full_like(batch["spike_vox"], np.nan))
    expected = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    for inputs in (batch, batch, bad, batch):
        params, state, metrics = step(params, state, inputs, {})
        if float(metrics["finite"]):
            expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * np.asarray(p, np.float64), expected, params)
    for got, want in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(state["ema"]["linear"]["kernel"], params["linear"]["kernel"])


def test_initial_params_are_drawn_on_the_host_cpu_and_without_a_cpu_backend_the_same(monkeypatch):
    """factory.initial_params draws on the host's CPU device; where JAX_PLATFORMS leaves the CPU backend out (a TPU
    or GPU host) it draws on the default device instead of failing, to the same values."""
    config = baseline.get_config("tiny")
    used = []
    real_default_device = jax.default_device

    def recording_default_device(device):
        used.append(device)
        return real_default_device(device)

    monkeypatch.setattr(jax, "default_device", recording_default_device)
    expected = factory.initial_params(config)
    assert used == [jax.local_devices(backend="cpu")[0]]

    real_local_devices = jax.local_devices

    def without_cpu(*args, backend=None, **kwargs):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real_local_devices(*args, backend=backend, **kwargs)

    monkeypatch.setattr(jax, "local_devices", without_cpu)
    got = factory.initial_params(config)
    assert used[-1] is None
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)


def test_the_optimizer_update_runs_under_its_own_scope():
    """The update (global norm, AdamW, the non-finite guard, EMA) carries the `optimizer` name scope that the breakdown
    scripts report it under; the model's forward pass does not."""
    import helpers as testing

    config = baseline.get_config("tiny")
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    setup = train_lib.build_train_setup(config, mesh)
    params, state = setup.init_state(factory.initial_params(config), config.seed)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in testing.TINY_BATCH_SHAPES.items()
             if k in setup.keys}
    text = setup.jit_step().lower(params, state, batch, setup.vgg_params).as_text(debug_info=True)
    scoped = [line for line in text.splitlines() if "/optimizer/" in line]
    assert any("sqrt" in line for line in scoped) and any("select" in line for line in scoped), scoped[:5]
    assert not any("stage1" in line for line in scoped)
