"""Parameter groups (vrtspike_jax/train/param_groups.py): frozen groups, KAIR's warm-up, learning-rate multipliers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers as testing
from configs import baseline
from vrtspike_jax import factory
from vrtspike_jax.train import param_groups, preflight, train_lib


def test_every_parameter_of_the_spike_model_has_its_group():
    config = baseline.get_config("tiny")
    _, abstract = factory.abstract(config.model)
    paths = jax.tree.leaves(param_groups.path_tree(abstract))
    groups = dict(zip(paths, jax.tree.leaves(param_groups.group_tree(abstract))))
    assert set(groups.values()) == set(param_groups.GROUP_NAMES) - {"lora"}   # no LoRA factors without config.lora
    assert groups["vrt/spynet/basic_module/0/convs/0/kernel"] == "spynet"
    deform = [p for p in paths if "pa_deform" in p]
    assert deform and all(groups[p] == "deform" for p in deform)        # offsets and the DCN weights (KAIR "deform")
    assert groups["vrt/conv_first/kernel"] == "backbone" and groups["vrt/conv_last/kernel"] == "backbone"
    assert all(groups[p] == "fusion" for p in paths if p.startswith("cross_attn_fuse/"))
    with pytest.raises(ValueError, match="in no parameter group"):
        param_groups.group_of("adapters/0/a")


def test_a_multiplier_is_adamw_at_that_learning_rate():
    """chain(adamw, scale(m)) == adamw(m * lr), decoupled weight decay included."""
    config = baseline.get_config("tiny")
    config.optimizer.warmup_steps = 0
    config.optimizer.grad_clip_norm = 0.0
    config.optimizer.groups.fusion.lr_multiplier = 0.25
    tx, schedule = train_lib.make_optimizer(config)
    params = {"cross_attn_fuse": {"w": jnp.arange(6.0).reshape(2, 3)}, "vrt": {"conv_first": {"w": jnp.ones(3)}}}
    grads = jax.tree.map(lambda x: jnp.sin(x + 1.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    opt = config.optimizer
    for mult, sub in ((0.25, "cross_attn_fuse"), (1.0, "vrt")):
        ref = optax.adamw(mult * schedule(0), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
        want, _ = ref.update(grads[sub], ref.init(params[sub]), params[sub])
        for a, b in zip(jax.tree.leaves(updates[sub]), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_frozen_groups_stay_bit_identical_and_the_warm_up_unfreezes_at_step_n():
    config = baseline.get_config("tiny,frozen_backbone")
    config.optimizer.groups.deform.frozen_steps = 2           # KAIR-style: frozen for 2 steps, then 0.125x
    config.optimizer.groups.deform.lr_multiplier = 0.125
    config.optimizer.warmup_steps = 0
    preflight.check_training(config)
    flops, history, state = testing.tiny_train_steps(config, 3)
    for group in ("backbone", "spynet"):                      # frozen for the run
        assert all(testing.same_leaves(testing.group_leaves(h, group), testing.group_leaves(history[0], group))
                   for h in history)
    deform = [testing.group_leaves(h, "deform") for h in history]
    # steps 0 and 1: frozen
    assert testing.same_leaves(deform[1], deform[0]) and testing.same_leaves(deform[2], deform[0])
    assert not testing.same_leaves(deform[3], deform[0])                    # step 2 (the 3rd) trains it
    for group in ("spike_encoder", "spike_temporal_sa", "fusion"):
        assert not testing.same_leaves(testing.group_leaves(history[1], group), testing.group_leaves(history[0], group))
    inner = state["opt_state"][1].inner_states
    assert jax.tree.leaves(inner["frozen"]) == []              # no optimizer state for groups frozen for the run
    warm = inner["lr0.125_after2"].inner_state
    assert int(warm.step) == 3                                 # counts every step ...
    assert int(warm.inner_state[0].count) == 1                 # ... AdamW saw one update: its count starts at N
    counts = param_groups.trainable_count(history[0], param_groups.group_settings(config))
    assert counts["trainable"] == counts["spike_encoder"] + counts["spike_temporal_sa"] + counts["fusion"] + \
        counts["deform"] and counts["total"] == sum(np.prod(x.shape) for x in jax.tree.leaves(history[0]))
    # The compiled step does less: the frozen groups' weight gradients (SpyNet's above all) are dead code for XLA
    # (measured: 21.5 against 46.3 GFLOPs for this tiny step; the deformable convolutions' gate is a select and
    # saves nothing while they are frozen for N steps). The full step: the tiny training runs' program (the same
    # model and loss; a persistent-cache hit once a training test has compiled it).
    full = testing.compiled_tiny_step(testing.tiny_run_config())[-1].cost_analysis()["flops"]
    assert flops < 0.6 * full, (flops, full)


def test_a_frozen_zero_output_conv_is_a_start_up_error():
    config = baseline.get_config("tiny,frozen_backbone")
    assert not config.init.zero_output_conv                   # the variant keeps the output conv as initialised
    preflight.check_training(config)
    config.init.zero_output_conv = True                       # tiny's own choice: it would stay zero, frozen
    with pytest.raises(preflight.ConfigError, match="init.zero_output_conv=True with the backbone frozen for the run"):
        preflight.check_training(config)
    staged = baseline.get_config("tiny,staged")
    preflight.check_training(staged)
    staged.init.zero_output_conv = True
    with pytest.raises(preflight.ConfigError, match="frozen for the first 10000 steps"):
        preflight.check_training(staged)


@pytest.mark.parametrize("group, field, value, message", [
    ("fusion", "lr_multiplier", -1.0, "optimizer.groups.fusion.lr_multiplier=-1: expected >= 0"),
    ("spynet", "frozen_steps", -2, "optimizer.groups.spynet.frozen_steps=-2"),
])
def test_bad_group_settings_are_start_up_errors(group, field, value, message):
    config = baseline.get_config("tiny")
    config.optimizer.groups[group][field] = value
    with pytest.raises(preflight.ConfigError, match=message):
        preflight.check_training(config)
    config = baseline.get_config("tiny")
    for name in param_groups.GROUP_NAMES:
        config.optimizer.groups[name].frozen_steps = -1
    with pytest.raises(preflight.ConfigError, match="nothing would train"):
        preflight.check_training(config)


def _last_learning_rates(config, steps):
    """{optax label: the learning rate of its last update} after `steps` updates of the config's optimizer."""
    tx, schedule = train_lib.make_optimizer(config)
    params = {"vrt": {"stages": {0: {"pa_deform": {"w": jnp.ones(3)}}}, "conv_first": {"w": jnp.ones(3)}},
              "cross_attn_fuse": {"w": jnp.ones(2)}}
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    inner = state[1].inner_states if isinstance(state, tuple) else state.inner_states
    found = {}
    for label, sub in inner.items():
        injected = [s for s in jax.tree.leaves(sub, is_leaf=train_lib._is_injected) if train_lib._is_injected(s)]
        found[label] = float(injected[0].hyperparams["learning_rate"]) if injected else None
    return found, schedule


def test_a_group_frozen_for_n_steps_follows_the_runs_schedule_once_it_trains():
    """KAIR's global scheduler: after fix_iter the flow parts train at the run's (x multiplier) rate, not at a warm-up
    of their own starting at 0."""
    config = baseline.get_config("tiny")
    config.total_steps, config.optimizer.schedule_steps, config.optimizer.warmup_steps = 100, None, 10
    config.optimizer.groups.deform.frozen_steps = 2
    rates, schedule = _last_learning_rates(config, 4)          # the 4th update is the run's step 3
    assert rates["lr1_after2"] == rates["lr1"] == pytest.approx(float(schedule(3)), rel=1e-6) and rates["lr1"] > 0


def test_restart_at_runs_the_schedule_again_from_that_step():
    config = baseline.get_config("tiny,staged")
    config.total_steps, config.optimizer.schedule_steps, config.optimizer.warmup_steps = 100, None, 4
    config.optimizer.restart_at = 30
    for group in ("backbone", "spynet", "deform"):
        config.optimizer.groups[group].frozen_steps = 30
    _, schedule = train_lib.make_optimizer(config)
    opt = config.optimizer
    first = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, 4, 30, opt.end_learning_rate)
    second = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, 4, 70, opt.end_learning_rate)
    for step in (0, 2, 4, 17, 29, 30, 32, 34, 60, 99, 100):
        want = first(step) if step < 30 else second(step - 30)
        assert float(schedule(step)) == pytest.approx(float(want), rel=1e-6, abs=1e-12), step
    assert float(schedule(29)) < 1e-5 < float(schedule(34))  # decayed at the end of phase 1, warmed up again
    rates, _ = _last_learning_rates(config, 33)                # the 33rd update is step 32: phase 2's 3rd
    assert rates["lr1_after30"] == rates["lr1"] == pytest.approx(float(second(2)), rel=1e-6)
    config.optimizer.restart_at = 100                           # past the horizon: one schedule (and a warning)
    preflight.check_training(config)
    _, single = train_lib.make_optimizer(config)
    whole = optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, 4, 100, opt.end_learning_rate)
    assert all(float(single(s)) == pytest.approx(float(whole(s)), rel=1e-6, abs=1e-12) for s in (0, 3, 50, 99))
    config.optimizer.restart_at = -1
    with pytest.raises(preflight.ConfigError, match="optimizer.restart_at=-1: expected 0"):
        preflight.check_training(config)
