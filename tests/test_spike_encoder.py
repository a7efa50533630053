"""SpikeEncoder3D: parity with S-VRT (fixtures/spike_modules.npz), the encoder -> TSA -> fusion chain,
shapes under temporal/spatial strides, errors, gradients."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vrtspike_jax.convert.spike import load_torch_state, torch_state_keys
from vrtspike_jax.models.fusion import MultiScaleTemporalCrossAttnFuse
from vrtspike_jax.models.spike import SpikeEncoder3D, SpikeTemporalSA

from conftest import rel_l2

CHANNELS = [8, 16, 24, 32]


def abstract(cls, *args, **kwargs):
    """The module with shape-only parameters (no random-init compile): enough for shapes and key maps."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def run(module, *args):
    return nnx.jit(lambda m, *a: m(*a))(module, *args)


@pytest.fixture(scope="module")
def fixture_encoder(load_fixture):
    z = load_fixture("spike_modules.npz")
    # Built abstractly (no random init): every parameter must then come from the state_dict.
    encoder = nnx.eval_shape(lambda: SpikeEncoder3D(32, CHANNELS, temporal_strides=[1, 1, 1], spatial_strides=[2, 2, 2], rngs=nnx.Rngs(0)))
    load_torch_state(encoder, z, prefix="param/encoder/", source="spike_modules.npz")
    # S-VRT takes [B, T, K, H, W]; ours is channels-last [B, T, H, W, K].
    voxels = jnp.asarray(z["input/encoder/x"].transpose(0, 1, 3, 4, 2))
    return z, encoder, voxels


def test_encoder_matches_svrt(fixture_encoder):
    z, encoder, voxels = fixture_encoder
    features = run(encoder, voxels)
    assert len(features) == 4
    for i, feat in enumerate(features):
        reference = z[f"output/encoder/y_s{i}"]  # S-VRT [B, C, T, H, W]
        assert feat.shape == (1, 5, 32 >> i, 32 >> i, CHANNELS[i])
        assert rel_l2(np.asarray(feat).transpose(0, 4, 1, 2, 3), reference) <= 1e-5, i


def test_spike_branch_chain_matches_svrt(fixture_encoder):
    """Encoder -> SpikeTemporalSA -> fusion with S-VRT's RGB inputs: our own outputs feed each next stage."""
    z, encoder, voxels = fixture_encoder
    tsa = abstract(SpikeTemporalSA, CHANNELS)
    load_torch_state(tsa, z, prefix="param/tsa_ms/")
    fuse = abstract(MultiScaleTemporalCrossAttnFuse, CHANNELS)
    load_torch_state(fuse, z, prefix="param/fuse_ms/")
    rgb = [jnp.asarray(z[f"input/fuse_ms/Fr_s{i}"].transpose(0, 1, 3, 4, 2)) for i in range(4)]

    def chain(encoder, tsa, fuse, voxels, rgb):
        spike = tsa(encoder(voxels))
        return spike, fuse(rgb, spike)

    spike, fused = nnx.jit(chain)(encoder, tsa, fuse, voxels, rgb)
    for i in range(4):
        assert rel_l2(np.asarray(spike[i]).transpose(0, 4, 1, 2, 3), z[f"output/tsa_ms/y_s{i}"]) <= 1e-5, i
        assert rel_l2(np.asarray(fused[i]).transpose(0, 1, 4, 2, 3), z[f"output/fuse_ms/y_s{i}"]) <= 1e-5, i


@pytest.mark.parametrize(
    "temporal, spatial, size",
    [([1, 1, 1], [2, 2, 2], (5, 17, 12)), ([2, 1, 2], [2, 1, 2], (6, 9, 8)), ([3], [1], (5, 4, 4))],
)
def test_output_shapes_follow_strides(temporal, spatial, size):
    channels = [4, 6, 8, 5][: len(temporal) + 1]
    encoder = abstract(SpikeEncoder3D, 3, channels, temporal, spatial)
    t, h, w = size
    graphdef, state = nnx.split(encoder)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, t, h, w, 3), jnp.float32))
    expected = encoder.output_shapes(t, h, w)
    assert [f.shape[1:] for f in features] == expected
    assert all(f.shape[0] == 2 for f in features)
    # k3 / pad 1 / stride s: n -> floor((n - 1) / s) + 1
    t_i, h_i = t, h
    for i, (s_t, s_s) in enumerate(zip(temporal, spatial), 1):
        t_i, h_i = (t_i - 1) // s_t + 1, (h_i - 1) // s_s + 1
        assert expected[i][:2] == (t_i, h_i)


def test_default_strides_keep_time_and_halve_space():
    encoder = abstract(SpikeEncoder3D, 4, [6, 6, 6, 6])
    assert encoder.temporal_strides == (1, 1, 1) and encoder.spatial_strides == (2, 2, 2)
    assert encoder.output_shapes(5, 64, 48) == [(5, 64, 48, 6), (5, 32, 24, 6), (5, 16, 12, 6), (5, 8, 6, 6)]


def test_misconfiguration_errors():
    with pytest.raises(ValueError, match=r"temporal_strides must have .* = 3 entries .* found 2"):
        SpikeEncoder3D(32, CHANNELS, temporal_strides=[1, 1], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"spatial_strides must all be >= 1, found \[2, 0, 2\]"):
        SpikeEncoder3D(32, CHANNELS, spatial_strides=[2, 0, 2], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels_per_scale is empty"):
        SpikeEncoder3D(32, [], rngs=nnx.Rngs(0))
    encoder = abstract(SpikeEncoder3D, 32, [4, 4])
    with pytest.raises(ValueError, match=r"K = in_bins = 32, found shape \(1, 5, 8, 8, 16\)"):
        encoder(jnp.zeros((1, 5, 8, 8, 16)))
    with pytest.raises(ValueError, match=r"found shape \(5, 8, 8, 32\)"):
        encoder(jnp.zeros((5, 8, 8, 32)))


def test_converter_checks_encoder_keys(load_fixture):
    z = load_fixture("spike_modules.npz")
    expected = {k[len("param/encoder/"):]: z[k].shape for k in z.files if k.startswith("param/encoder/")}
    encoder = abstract(SpikeEncoder3D, 32, CHANNELS)
    assert torch_state_keys(encoder) == expected
    three_scales = abstract(SpikeEncoder3D, 32, CHANNELS[:3])
    with pytest.raises(ValueError, match=r"unexpected keys: .*param/encoder/downs\.2\.bias"):
        load_torch_state(three_scales, z, prefix="param/encoder/")
    wrong_bins = abstract(SpikeEncoder3D, 16, CHANNELS)
    with pytest.raises(ValueError, match=r"in_proj\.weight: expected shape \(8, 16, 3, 3, 3\), found \(8, 32, 3, 3, 3\)"):
        load_torch_state(wrong_bins, z, prefix="param/encoder/")
    with pytest.raises(ValueError, match=r"missing keys: spike_encoder\.downs\.0\.bias"):
        load_torch_state(encoder, {}, prefix="spike_encoder.")


def test_gradients_reach_every_parameter():
    encoder = SpikeEncoder3D(6, [4, 8], rngs=nnx.Rngs(5))
    voxels = jax.random.uniform(jax.random.key(0), (1, 5, 8, 8, 6))
    grads = nnx.jit(nnx.grad(lambda m: sum(jnp.sum(jnp.sin(f)) for f in m(voxels))))(encoder)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert len(leaves) == len(torch_state_keys(encoder))
    for path, g in leaves:
        assert float(jnp.abs(g).max()) > 0.0, jax.tree_util.keystr(path)
