"""SpikeTemporalSABlock / SpikeTemporalSA: parity with S-VRT (fixtures/spike_modules.npz), locality, errors."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from vrtspike_jax.convert.spike import load_torch_state
from vrtspike_jax.models.spike import SpikeTemporalSA, SpikeTemporalSABlock

from conftest import btchw_to_ours, ours_to_btchw, rel_l2

CHANNELS = [8, 16, 24, 32]


@pytest.fixture(scope="module")
def fixture_block(load_fixture):
    z = load_fixture("spike_modules.npz")
    block = nnx.eval_shape(lambda: SpikeTemporalSABlock(16, num_heads=4, mlp_ratio=2.0, rngs=nnx.Rngs(0)))
    load_torch_state(block, z, prefix="param/tsa_block/", source="spike_modules.npz")
    return z, block


def test_block_matches_svrt(fixture_block):
    z, block = fixture_block
    y = ours_to_btchw(block(btchw_to_ours(z["input/tsa_block/x"])))
    # Chunking is memory-only in S-VRT: its chunked output equals the plain one, and so must ours.
    for key in ("output/tsa_block/y", "output/tsa_block/y_chunked", "f64/tsa_block/y"):
        assert rel_l2(y, z[key]) <= 1e-5, key


def test_block_intermediates_match_svrt(fixture_block):
    """Layer-by-layer agreement (debug hooks, rows in (b, h, w) order), so a failure points at a layer."""
    z, block = fixture_block
    x = btchw_to_ours(z["input/tsa_block/x"])
    rows = lambda a: np.asarray(a).transpose(0, 2, 3, 1, 4).reshape(-1, a.shape[1], a.shape[-1])
    normed = block.ln1(x)
    assert rel_l2(rows(normed), z["debug/tsa_block/ln1_out"]) <= 1e-5
    probs = np.asarray(block.attn.attention_probs(normed, normed))  # [B, H, W, n, T, T]
    assert rel_l2(probs.reshape(-1, 4, 5, 5), z["debug/tsa_block/attn_probs"]) <= 1e-5
    attn_out = block.attn(normed, normed)
    assert rel_l2(rows(attn_out), z["debug/tsa_block/attn_out"]) <= 1e-5
    after_attn = x + attn_out
    assert rel_l2(rows(block.ln2(after_attn)), z["debug/tsa_block/ln2_out"]) <= 1e-5
    assert rel_l2(rows(block.mlp(block.ln2(after_attn))), z["debug/tsa_block/mlp_out"]) <= 1e-5


def test_multiscale_matches_svrt(load_fixture):
    z = load_fixture("spike_modules.npz")
    tsa = nnx.eval_shape(lambda: SpikeTemporalSA(CHANNELS, rngs=nnx.Rngs(1)))
    load_torch_state(tsa, z, prefix="param/tsa_ms/")
    # S-VRT's multi-scale TSA works in the encoder layout [B, C, T, H, W].
    inputs = [jnp.asarray(z[f"input/tsa_ms/x_s{i}"].transpose(0, 2, 3, 4, 1)) for i in range(4)]
    outputs = nnx.jit(lambda module, xs: module(xs))(tsa, inputs)
    assert len(outputs) == 4
    for i, y in enumerate(outputs):
        assert rel_l2(np.asarray(y).transpose(0, 4, 1, 2, 3), z[f"output/tsa_ms/y_s{i}"]) <= 1e-5, i


def test_attention_is_per_pixel():
    block = SpikeTemporalSABlock(8, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7, 8))
    changed = x.at[1, :, 3, 4, :].add(jax.random.normal(jax.random.key(1), (5, 8)))
    diff = np.abs(np.asarray(block(changed) - block(x))).max(axis=(1, 4))  # [B, H, W]
    assert diff[1, 3, 4] > 1e-3
    diff[1, 3, 4] = 0.0
    assert diff.max() == 0.0


def test_gradients_reach_every_parameter():
    tsa = SpikeTemporalSA([8, 12], rngs=nnx.Rngs(3))
    inputs = [jax.random.normal(jax.random.key(0), (1, 5, 4, 4, 8)),
              jax.random.normal(jax.random.key(1), (1, 5, 2, 2, 12))]

    def loss(module):
        return sum(jnp.sum(jnp.sin(y)) for y in module(inputs))

    grads = nnx.jit(nnx.grad(loss))(tsa)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert len(leaves) == 2 * 16  # per block: 2 LayerNorms, q/k/v/out projections, 2 MLP layers (kernel + bias)
    largest = max(float(jnp.abs(g).max()) for _, g in leaves)
    for path, g in leaves:
        name = jax.tree_util.keystr(path)
        if "k_proj" in name and "bias" in name:
            # The key bias adds q.b_k to every score of a query: softmax ignores it, so its gradient is
            # zero in exact arithmetic (in PyTorch's MultiheadAttention too).
            assert float(jnp.abs(g).max()) < 1e-5 * largest, name
        else:
            assert float(jnp.abs(g).max()) > 1e-6 * largest, name


def test_bfloat16_compute_keeps_float32_params():
    block = SpikeTemporalSABlock(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(0), (1, 5, 3, 3, 8))
    reference = SpikeTemporalSABlock(8, rngs=nnx.Rngs(4))
    y = block(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nnx.state(block, nnx.Param)))
    assert rel_l2(np.asarray(y, np.float32), reference(x)) < 3e-2


def test_errors_name_expected_and_found():
    with pytest.raises(ValueError, match="not divisible by num_heads=4"):
        SpikeTemporalSABlock(10, num_heads=4, rngs=nnx.Rngs(0))
    block = SpikeTemporalSABlock(8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected 8 channels.*found 16"):
        block(jnp.zeros((1, 5, 4, 4, 16)))
    with pytest.raises(ValueError, match=r"5-D \[B, T, H, W, C\].*\(5, 4, 4, 8\)"):
        block(jnp.zeros((5, 4, 4, 8)))
    tsa = SpikeTemporalSA([8, 16], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expected 2 scales.*found 1"):
        tsa([jnp.zeros((1, 5, 4, 4, 8))])
    with pytest.raises(ValueError, match="scale 1: expected 16 channels.*found 8"):
        tsa([jnp.zeros((1, 5, 4, 4, 8)), jnp.zeros((1, 5, 2, 2, 8))])


def test_converter_reports_missing_unexpected_and_misshaped_keys(load_fixture):
    z = load_fixture("spike_modules.npz")
    state = {k: z[k] for k in z.files if k.startswith("param/tsa_block/")}
    del state["param/tsa_block/ln2.bias"]
    state["param/tsa_block/attn.bias_k"] = np.zeros((1, 1, 16), np.float32)
    state["param/tsa_block/mlp.0.weight"] = np.zeros((16, 32), np.float32)
    block = SpikeTemporalSABlock(16, rngs=nnx.Rngs(0))
    before = np.asarray(block.ln1.scale[...])
    with pytest.raises(ValueError) as err:
        load_torch_state(block, state, prefix="param/tsa_block/", source="edited.npz")
    message = str(err.value)
    assert "edited.npz" in message
    assert "missing keys: param/tsa_block/ln2.bias" in message
    assert "unexpected keys: param/tsa_block/attn.bias_k" in message
    assert "param/tsa_block/mlp.0.weight: expected shape (32, 16), found (16, 32)" in message
    np.testing.assert_array_equal(block.ln1.scale[...], before)  # nothing written on failure
