"""VRTWithSpike: the spike branch fused into VRT after the configured stages."""
import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrtspike_jax.convert import load_official_weights_into
from vrtspike_jax.models import build_model, model_config_from_dict, part_parameter_counts
from vrtspike_jax.models.vrt import VRT, preset
from vrtspike_jax.models.vrt_spike import VRTWithSpike, VRTWithSpikeConfig

from conftest import REPO_ROOT, rel_l2

TINY = dict(depths=(2,) * 7 + (1, 1), embed_dims=(16,) * 7 + (24, 24), num_heads=(2,) * 7 + (3, 3),
            deformable_groups=4, indep_reconsts=(8,))


def tiny_config(**kwargs):
    return VRTWithSpikeConfig(vrt=preset("small_fixture", **TINY), spike_bins=4, **kwargs)


def inputs(t=2, h=64, w=64, k=4, f=1, seed=0):
    rng = np.random.default_rng(seed)
    frames = jnp.asarray(rng.random((1, t, h, w, 3), np.float32))
    spikes = jnp.asarray(rng.standard_normal((1, t, h // f, w // f, k)).astype(np.float32))
    return frames, spikes


def test_use_spike_false_is_exactly_the_plain_vrt(fixture_file, load_fixture):
    """Same weights (the official fixture's), same function, bit for bit."""
    import json
    z = load_fixture("vrt_small_seed0.npz")
    from vrtspike_jax.models.vrt import config_from_official_kwargs
    vrt_config = config_from_official_kwargs(**json.loads(str(z["config_json"])))
    control = VRTWithSpike(VRTWithSpikeConfig(vrt=vrt_config, use_spike=False), rngs=nnx.Rngs(5))
    load_official_weights_into(control, fixture_file("vrt_small_seed0.npz"))
    plain = load_official_weights_into(VRT(vrt_config, rngs=nnx.Rngs(9)), fixture_file("vrt_small_seed0.npz"))
    assert control.spike_encoder is None and part_parameter_counts(control)["vrt"] == 1_914_795
    frames = jnp.asarray(z["input"].transpose(0, 1, 3, 4, 2))
    run = nnx.jit(lambda m, x: m(x))
    out_control, out_plain = np.asarray(run(control, frames)), np.asarray(run(plain, frames))
    np.testing.assert_array_equal(out_control, out_plain)
    ref = z["output"].transpose(0, 1, 3, 4, 2)
    assert np.linalg.norm(out_control - ref) / np.linalg.norm(ref) <= 1e-5


def test_fusion_changes_the_output_and_shapes_line_up():
    model = VRTWithSpike(tiny_config(fuse_stages=(1, 2, 3, 4, 5, 6, 7)), rngs=nnx.Rngs(0))
    frames, spikes = inputs()
    out, inter = nnx.jit(lambda m, x, s: m(x, s, return_intermediates=True))(model, frames, spikes)
    assert out.shape == frames.shape
    sizes = {1: 64, 2: 32, 3: 16, 4: 8, 5: 16, 6: 32, 7: 64}
    for stage, size in sizes.items():
        for key in ("Fr", "Fs", "Fs'", "Ff"):
            assert inter[f"{key}_{stage}"].shape == (1, 2, size, size, 16), (key, stage)
        # the fused output replaced the stage output everywhere downstream
        np.testing.assert_array_equal(np.asarray(inter[f"stage{stage}_out"]), np.asarray(inter[f"Ff_{stage}"]))
    _, other = nnx.jit(lambda m, x, s: m(x, s, return_intermediates=True))(model, frames, spikes * 3.0)
    assert not np.allclose(np.asarray(inter["Ff_1"]), np.asarray(other["Ff_1"]))


def test_fused_stage_subset():
    model = VRTWithSpike(tiny_config(fuse_stages=(1, 2, 3, 4)), rngs=nnx.Rngs(0))
    assert model.fuse_stages == (1, 2, 3, 4) and len(model.cross_attn_fuse) == 4
    frames, spikes = inputs()
    _, inter = nnx.jit(lambda m, x, s: m(x, s, return_intermediates=True))(model, frames, spikes)
    assert "Ff_4" in inter and "Ff_5" not in inter


def test_half_resolution_spikes():
    model = VRTWithSpike(tiny_config(spike_scale=2, fuse_stages=(1, 4)), rngs=nnx.Rngs(0))
    frames, spikes = inputs(f=2)
    out, inter = nnx.jit(lambda m, x, s: m(x, s, return_intermediates=True))(model, frames, spikes)
    assert out.shape == frames.shape and inter["Fs_1"].shape == (1, 2, 64, 64, 16)
    with pytest.raises(ValueError, match=r"spike voxels have shape \(1, 2, 64, 64, 4\) but frames .* need "
                                         r"\(1, 2, 32, 32, 4\)"):
        model(*inputs(f=1))


def test_spike_input_errors():
    model = VRTWithSpike(tiny_config(fuse_stages=(1,)), rngs=nnx.Rngs(0))
    frames, spikes = inputs()
    with pytest.raises(ValueError, match="spike_voxels are required"):
        model(frames)
    with pytest.raises(ValueError, match=r"need \(1, 2, 64, 64, 4\)"):
        model(frames, spikes[..., :3])
    with pytest.raises(ValueError, match=r"need \(1, 2, 64, 64, 4\)"):
        model(frames, jnp.concatenate([spikes, spikes], axis=1))


@pytest.mark.parametrize("kwargs,message", [
    (dict(vrt=preset("small_fixture", **dict(TINY, embed_dims=(16, 16, 24, 16, 16, 16, 16, 24, 24))),
          fuse_stages=(5,)),
     r"stage 5: its RGB features Fr_5 have 16 channels but the spike encoder features of its resolution "
     r"\(1/4, the width of stage 3\) have 24"),
    (dict(encoder_temporal_strides=(1, 2, 1)), r"stage 3: VRT keeps all T frames.*shortens time"),
    (dict(spike_scale=0), "spike_scale must be a positive integer"),
    (dict(spike_scale=1.5), "spike_scale must be a positive integer"),
    (dict(fuse_stages=(0, 8)), "fuse_stages must be distinct VRT stages among 1..7"),
    (dict(spike_heads=3), "stage 1: width 16 is not divisible by spike_heads=3"),
    (dict(fusion_chunk_rows=-8), r"fusion_chunk_rows must be an integer >= 0 \(0: no chunks\), got -8"),
])
def test_misconfiguration_fails_at_construction(kwargs, message):
    base = dict(vrt=preset("small_fixture", **TINY), spike_bins=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        VRTWithSpikeConfig(**base)


def test_encoder_time_strides_after_the_fused_scales_are_allowed():
    config = tiny_config(fuse_stages=(1, 2, 6, 7), encoder_temporal_strides=(1, 1, 2))
    assert config.encoder_temporal_strides == (1, 1, 2)


def test_one_training_step_reaches_every_spike_parameter():
    model = VRTWithSpike(tiny_config(), rngs=nnx.Rngs(0))
    frames, spikes = inputs(seed=1)
    target = frames[..., ::-1]

    def loss(m):
        return jnp.mean(jnp.abs(m(frames, spikes) - target))

    grads = nnx.jit(nnx.grad(loss))(model)
    for part in ("spike_encoder", "spike_temporal_sa", "cross_attn_fuse"):
        for path, grad in nnx.to_flat_state(getattr(grads, part)):
            value = np.abs(np.asarray(grad[...])).max()
            if path[-2:] == ("k_proj", "bias"):
                # Softmax is invariant to a per-query constant: the key bias gets exactly no gradient, in the
                # original as here.
                assert value < 1e-6, (part, path, value)
            else:
                assert value > 0, (part, path)


def test_the_fusion_has_the_same_value_and_gradients_with_every_remat_option():
    """The fusion after a stage (spike self-attention, then cross-attention into the RGB features), rematerialised
    under each policy (with remat_attention, which leaves the fusion as it is), and over chunks of rows
    (fusion_chunk_rows 3: 4 chunks of 2 of the 8 rows): the value and every gradient (parameters, RGB and spike
    features) of the plain fusion."""
    rng = np.random.default_rng(5)
    rgb, spike = (jnp.asarray(rng.standard_normal((1, 3, 8, 8, 16)), jnp.float32) for _ in range(2))
    results = []
    for remat, again, rows in (("none", False, 0), ("full", False, 0), ("full", True, 0), ("dots_saveable", True, 0),
                               ("full", False, 3), ("none", False, 4)):
        config = VRTWithSpikeConfig(vrt=preset("small_fixture", **TINY, remat=remat, remat_attention=again),
                                    spike_bins=4, fuse_stages=(1,), fusion_chunk_rows=rows)
        model = VRTWithSpike(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split((model.spike_temporal_sa[0], model.cross_attn_fuse[0]))

        def loss(state, rgb, spike, graphdef=graphdef, model=model):
            return jnp.sum(jnp.sin(model._fuse_in_rows(model._fuse_fn(), graphdef, state, rgb, spike)) ** 2)

        results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(state, rgb, spike))
    # A key bias gets exactly no gradient (softmax is invariant to a per-query constant): float32 leaves ~1e-6 there.
    key_bias = lambda path: "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path)  # noqa
    plain = results[0]
    for variant in results:
        np.testing.assert_allclose(variant[0], plain[0], rtol=1e-6)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variant[1]), jax.tree.leaves(plain[1])):
            if key_bias(path):
                assert np.abs(a).max() < 1e-5, jax.tree_util.keystr(path)
                continue
            assert np.abs(b).max() > 0, jax.tree_util.keystr(path)    # every other gradient reaches its input
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_the_lean_levers_together_leave_the_models_value_and_gradients_as_they_are():
    """The model `configs/baseline.py:tiny,lean` builds, with every TMSA block rematerialised as in training (the
    variant's levers: each stage as a whole too, each block's attention after its MLP's backward pass, the alignment
    in chunks, each fusion over chunks of rows), against the same model without remat or levers: the same output and
    the same gradients (at initialisation the offset convolutions get none: their last layer starts at zero; the
    stage test of tests/test_vrt_model.py covers them)."""
    from configs import baseline
    from vrtspike_jax import factory

    lean = factory.model_config(baseline.get_config("tiny,lean").model)
    lean = dataclasses.replace(lean, vrt=dataclasses.replace(lean.vrt, remat="full"))
    plain = dataclasses.replace(lean, fusion_chunk_rows=0, vrt=dataclasses.replace(
        lean.vrt, remat="none", remat_stages=False, remat_attention=False, alignment_chunk=0))
    assert lean.fusion_chunk_rows and lean.vrt.alignment_chunk and lean.vrt.remat_stages and lean.vrt.remat_attention
    frames, spikes = inputs(k=lean.spike_bins)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(frames.shape), jnp.float32)
    results = []
    for config in (plain, lean):
        graphdef, params, rest = nnx.split(VRTWithSpike(config, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            return jnp.sum(nnx.merge(graphdef, params, rest)(frames, spikes) * weights)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (plain_value, plain_grads), (lean_value, lean_grads) = results
    np.testing.assert_allclose(lean_value, plain_value, rtol=1e-6)
    plain_leaves, lean_leaves = jax.tree.leaves(plain_grads), jax.tree.leaves(lean_grads)
    assert len(plain_leaves) == len(lean_leaves) > 100
    assert rel_l2(np.concatenate([np.ravel(g) for g in lean_leaves]),
                  np.concatenate([np.ravel(g) for g in plain_leaves])) <= 1e-5
    nonzero = [np.abs(g).max() > 0 for g in plain_leaves]
    assert sum(nonzero) > 0.8 * len(nonzero), sum(nonzero)


def test_model_config_from_dict_and_build():
    cfg = {"vrt_preset": "small_fixture", "vrt_overrides": dict(TINY), "spike_bins": 4, "fuse_stages": [1, 7],
           "remat": "full", "scan_blocks": True, "dtype": None}
    config = model_config_from_dict(cfg)
    assert config.fuse_stages == (1, 7) and config.vrt.remat == "full" and config.vrt.dtype is None
    model = build_model(cfg, rngs=nnx.Rngs(0))
    assert model.fuse_stages == (1, 7)
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['fuse_stage'\]"):
        model_config_from_dict({"fuse_stage": [1]})


def test_bf16_compute_runs_and_stays_close():
    frames, spikes = inputs()
    f32 = VRTWithSpike(tiny_config(), rngs=nnx.Rngs(0))
    bf16 = VRTWithSpike(tiny_config().replace(vrt=tiny_config().vrt.replace(dtype="bfloat16")), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, x, s: m(x, s))
    a, b = np.asarray(run(f32, frames, spikes)), np.asarray(run(bf16, frames, spikes))
    assert b.dtype == np.float32 and np.all(np.isfinite(b))
    assert np.abs(a - b).max() < 0.1


def test_validate_model_shapes_script(tmp_path):
    cfg = tmp_path / "tiny_config.py"
    cfg.write_text(textwrap.dedent(f"""
        import ml_collections
        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.model = ml_collections.ConfigDict(dict(vrt_preset="small_fixture", vrt_overrides={dict(TINY)!r},
                                                     spike_bins=4, fuse_stages=(1, 2, 3, 4, 5, 6, 7)))
            if arg == "bad":
                c.model.vrt_overrides.embed_dims = (16, 16, 24, 16, 16, 16, 16, 24, 24)
            return c
    """))
    script = str(REPO_ROOT / "scripts" / "validate_model_shapes.py")
    ok = subprocess.run([sys.executable, script, f"--config={cfg}", "--frames=5", "--height=64", "--width=96"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "(1, 5, 32, 48, 16)" in ok.stdout  # stage 2 and 6 at 1/2 scale
    assert "spike_encoder" in ok.stdout and "total" in ok.stdout
    bad = subprocess.run([sys.executable, script, f"--config={cfg}:bad", "--height=64", "--width=64"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "stage 5: its RGB features Fr_5 have 16 channels" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr
