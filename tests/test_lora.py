"""LoRA (vrtspike_jax/train/lora.py): the adapted forward is LoRA's, only the factors train, and a merged
checkpoint (scripts/merge_lora.py) restores into the plain model with the same frames."""
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

import helpers as testing
from configs import baseline
from vrtspike_jax import factory
from vrtspike_jax.train import checkpointing, lora, param_groups, preflight

_spec = importlib.util.spec_from_file_location("merge_lora", testing.REPO_ROOT / "scripts" / "merge_lora.py")
merge_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_lora)
# a TMSA group's blocks are stored stacked: the target kernel is [depth, in, out] (tiny: depth 1), its factors too
TARGET = ("vrt", "stages", 0, "residual_group2", "blocks", "attn", "qkv_self")


def _lora_params(config, seed=1):
    """Host parameters of `config` (tiny,lora) with random (non-zero) factors, as after some training."""
    params = factory.initial_params(config)
    rng = np.random.default_rng(seed)
    params[lora.KEY] = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), params[lora.KEY])
    return params


def _forward(graphdef, params, spec, batch):
    """The un-merged forward: the factors folded in inside the jitted program, as in the train step."""
    return jax.jit(lambda p: nnx.merge(graphdef, lora.apply(p, spec))(batch["blur"], batch["spike_vox"]))(params)


def test_the_adapted_kernel_is_loras_forward_and_starts_as_the_plain_model():
    config = baseline.get_config("tiny,lora")
    spec = lora.spec_from_config(config)
    assert (spec.rank, spec.alpha, spec.scale) == (8, 16.0, 2.0)
    fresh = factory.initial_params(config)
    plain = {k: v for k, v in fresh.items() if k != lora.KEY}
    # At initialisation b = 0: the adapted tree is the plain one, bit for bit.
    for a, b in zip(jax.tree.leaves(lora.apply(fresh, spec)), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    factors = traverse_util.flatten_dict(fresh[lora.KEY])
    a0 = factors[TARGET + ("a",)]
    assert a0.shape == (1, 16, 8) and np.abs(a0).max() <= 1 / np.sqrt(16) and a0.std() > 0.1   # U(+-1/sqrt(in))
    # Only TMSA attention and MLP projections are adapted (not pa_fuse's MLP, not the spike path).
    modules = {key[:-1] for key in factors}
    assert all(m[0] == "vrt" and m[3].startswith("residual_group") and m[-2] in ("attn", "mlp") for m in modules)
    assert {m[-1] for m in modules} == set(lora.TARGET_NAMES) - {"qkv_mut"}   # tiny has no mutual attention
    _, quick = factory.abstract(baseline.get_config("quick").model)
    assert {m[-1] for m in lora.targets_of(quick, spec)} == set(lora.TARGET_NAMES)
    # With trained factors: x W_eff + bias == x W + bias + (alpha / r) (x a) b, PEFT's LoRA forward (float64).
    params = _lora_params(config)
    kernel = traverse_util.flatten_dict(lora.apply(params, spec))[TARGET + ("kernel",)][0]
    flat = traverse_util.flatten_dict(params)
    w, bias = flat[TARGET + ("kernel",)][0].astype(np.float64), flat[TARGET + ("bias",)][0].astype(np.float64)
    a, b = (flat[(lora.KEY,) + TARGET + (name,)][0].astype(np.float64) for name in ("a", "b"))
    x = np.random.default_rng(2).normal(size=(5, 16))
    want = x @ w + bias + spec.scale * (x @ a) @ b
    np.testing.assert_allclose(x @ np.asarray(kernel, np.float64) + bias, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - (x @ w + bias)).max() > 1e-2          # the factors move the output
    untouched = traverse_util.flatten_dict(lora.apply(params, spec))
    for key, value in traverse_util.flatten_dict(plain).items():
        if key[:-1] not in modules or key[-1] != "kernel":
            np.testing.assert_array_equal(untouched[key], value)


def test_only_the_factors_and_the_spike_path_train_and_merged_equals_unmerged():
    config = baseline.get_config("tiny,lora")
    config.optimizer.warmup_steps = 0
    preflight.check_training(config)
    flops, history, state = testing.tiny_train_steps(config, 2)
    for group in ("backbone", "spynet", "deform"):             # VRT's own weights: bit-identical
        assert all(testing.same_leaves(testing.group_leaves(h, group), testing.group_leaves(history[0], group))
                   for h in history)
    for group in ("lora", "spike_encoder", "fusion"):
        assert not testing.same_leaves(testing.group_leaves(history[2], group), testing.group_leaves(history[0], group))
    inner = state["opt_state"][1].inner_states
    assert jax.tree.leaves(inner["frozen"]) == []               # VRT's groups: no optimizer state
    counts = param_groups.trainable_count(history[0], param_groups.group_settings(config))
    spec = lora.spec_from_config(config)
    shapes = lora.targets_of(history[0], spec).values()              # stacked kernels: [depth, in, out]
    assert counts["lora"] == sum(8 * int(np.prod(s[:-2])) * (s[-2] + s[-1]) for s in shapes) > 0
    assert counts["trainable"] == counts["lora"] + counts["spike_encoder"] + counts["spike_temporal_sa"] + \
        counts["fusion"]
    graphdef, _ = factory.abstract(config.model)
    batch = {k: jnp.asarray(v[:1]) for k, v in testing.tiny_batch(3).items()}
    trained = history[2]
    unmerged = _forward(graphdef, trained, spec, batch)
    merged = _forward(graphdef, lora.merge(trained, spec), None, batch)
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=2e-6)
    base = _forward(graphdef, {k: v for k, v in trained.items() if k != lora.KEY}, None, batch)
    assert float(jnp.abs(base - unmerged).max()) > 1e-5         # the trained factors do change the frames


def test_a_merged_checkpoint_restores_into_the_plain_model_with_the_same_frames(tmp_path, capsys):
    config = baseline.get_config("tiny,lora")
    params = _lora_params(config)
    run = tmp_path / "run"
    saver = checkpointing.RunCheckpoints(run, async_save=False)
    saver.save_best(5, params, {"next_step": 5}, checkpointing.config_to_dict(config), {"psnr": 21.0})
    saver.wait_until_finished()
    saver.close()
    merged_dir = tmp_path / "merged"
    assert merge_lora.main(["--checkpoint", str(run), "--output", str(merged_dir)]) == 0
    assert f"{merged_dir}/checkpoints/best/5" in capsys.readouterr().out
    saved = json.loads((merged_dir / "checkpoints/best/5/config/metadata").read_text())
    assert saved["lora"]["rank"] == 0
    assert json.loads((merged_dir / "checkpoints/best/5/metrics/metrics").read_text())["psnr"] == 21.0
    position = json.loads((merged_dir / "checkpoints/best/5/data/metadata").read_text())
    assert position["merged_from"].endswith("checkpoints/best/5") and position["lora"]["rank"] == 8
    # The LoRA run's checkpoint loads with its factors folded in; the merged one as a plain model: same weights.
    lora_model, _ = checkpointing.load_model_from_checkpoint(run)
    plain_model, plain_config = checkpointing.load_model_from_checkpoint(merged_dir)
    assert lora.spec_from_config(plain_config) is None
    leaves = [jax.tree.leaves(nnx.state(model, nnx.Param)) for model in (lora_model, plain_model)]
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    batch = {k: jnp.asarray(v[:1]) for k, v in testing.tiny_batch(4).items()}
    graphdef, _ = factory.abstract(config.model)
    unmerged = _forward(graphdef, params, lora.spec_from_config(config), batch)
    plain_params = nnx.to_pure_dict(nnx.state(plain_model, nnx.Param))
    np.testing.assert_allclose(_forward(graphdef, plain_params, None, batch), unmerged, rtol=0, atol=2e-6)
    # Errors (one line, status 2): the output exists; a run without LoRA.
    for argv, message in (([str(run), str(merged_dir)], f"error: --output {merged_dir}: already holds checkpoints/; "
                           "give a new folder"),
                          ([str(merged_dir), str(tmp_path / "twice")], "has no LoRA (lora.rank is 0)")):
        with pytest.raises(SystemExit) as exit_info:
            merge_lora.main(["--checkpoint", argv[0], "--output", argv[1]])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"lora.rank": -1}, "lora.rank=-1: expected 0 (no LoRA) or a rank >= 1"),
    ({"lora.alpha": 0.0}, "lora.alpha=0: expected > 0"),
    ({"lora.targets": ("qkv",)}, "lora.targets=['qkv']: expected a non-empty subset of"),
    ({"optimizer.groups.lora.frozen_steps": -1}, "the LoRA factors would never train"),
])
def test_bad_lora_settings_are_start_up_errors(overrides, message):
    config = baseline.get_config("tiny,lora")
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[name] = value
    with pytest.raises(preflight.ConfigError, match=re.escape(message)):
        preflight.check_training(config)
