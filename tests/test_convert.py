"""Loading official VRT state_dicts: every key used once, every parameter filled, clear errors otherwise."""
import ast
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vrtspike_jax.convert import (CheckpointError, load_official_vrt, load_state_dict_into, official_key_of_path,
                                  official_key_to_path, official_parameter_slots, read_state_dict)
from vrtspike_jax.models.vrt import VRT, preset, small_fixture_config


@pytest.fixture(scope="module")
def official(load_fixture):
    z = load_fixture("vrt_small_seed0.npz")
    params = {k[len("param/"):]: z[k] for k in z.keys() if k.startswith("param/")}
    buffers = {k[len("buffer/"):]: z[k] for k in z.keys() if k.startswith("buffer/")}
    return params, buffers, json.loads(str(z["config_json"]))


def save(tmp_path, name, arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_fixture_loads_with_prefixes_and_every_parameter_is_filled(official, fixture_file):
    params, buffers, kwargs = official
    assert len(params) == 828
    model = load_official_vrt(fixture_file("vrt_small_seed0.npz"), **kwargs)
    assert len(official_parameter_slots(model)) == len(params)
    np.testing.assert_array_equal(np.asarray(model.conv_first.kernel[...]),
                                  params["conv_first.weight"][:, :, 0].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.stages[1].reshape_linear.kernel[...]),
                                  params["stage2.reshape.2.weight"].T)
    # a TMSA group's blocks are stored stacked: block 1's table is index 1 of the group's stacked table
    np.testing.assert_array_equal(np.asarray(model.stage8[1].residual_group.blocks.attn.relative_position_bias_table[...][1]),
                                  params["stage8.2.residual_group.blocks.1.attn.relative_position_bias_table"])


def test_plain_npz_with_buffers_and_relative_index_is_accepted(official, tmp_path, load_fixture):
    params, buffers, kwargs = official
    z = load_fixture("vrt_small_seed0.npz")
    arrays = dict(params)
    arrays.update(buffers)
    arrays["stage1.residual_group1.blocks.0.attn.relative_position_index"] = z["relpos_index/2x8x8"]
    arrays["stage8.2.residual_group.blocks.0.attn.relative_position_index"] = z["relpos_index/1x8x8"]
    path = save(tmp_path, "plain.npz", arrays)
    model = load_official_vrt(path, **kwargs)
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), params["norm.weight"])


def test_missing_key_is_named(official, tmp_path):
    params, _, kwargs = official
    arrays = {k: v for k, v in params.items() if k != "stage3.pa_deform.conv_offset.4.bias"}
    path = save(tmp_path, "missing.npz", arrays)
    with pytest.raises(CheckpointError) as err:
        load_official_vrt(path, **kwargs)
    assert str(err.value).splitlines()[-1].strip() == "missing 1 parameter(s): stage3.pa_deform.conv_offset.4.bias"


def test_extra_key_is_named(official, tmp_path):
    params, _, kwargs = official
    arrays = dict(params)
    arrays["stage9.linear1.weight"] = np.zeros((16, 16), np.float32)
    path = save(tmp_path, "extra.npz", arrays)
    with pytest.raises(CheckpointError, match=r"(?s)extra\.npz.*unexpected key 'stage9\.linear1\.weight'"):
        load_official_vrt(path, **kwargs)


def test_misshaped_key_is_named_with_both_shapes(official, tmp_path):
    params, _, kwargs = official
    arrays = dict(params)
    arrays["stage2.linear1.weight"] = np.zeros((16, 17), np.float32)
    path = save(tmp_path, "shape.npz", arrays)
    with pytest.raises(CheckpointError, match=r"'stage2\.linear1\.weight' has shape \(16, 17\); the configured VRT "
                                              r"expects \(16, 16\)"):
        load_official_vrt(path, **kwargs)


def test_wrong_architecture_is_reported(official, tmp_path, fixture_file):
    _, _, kwargs = official
    kwargs = dict(kwargs, embed_dims=[32] * 7 + [24, 24])
    with pytest.raises(CheckpointError, match="has shape"):
        load_official_vrt(fixture_file("vrt_small_seed0.npz"), **kwargs)


def test_inconsistent_buffer_is_reported(official, tmp_path):
    params, buffers, kwargs = official
    arrays = {f"param/{k}": v for k, v in params.items()}
    bad = dict(buffers)
    key = next(k for k in bad if k.endswith("position_bias"))
    bad[key] = bad[key] + 1.0
    arrays.update({f"buffer/{k}": v for k, v in bad.items()})
    path = save(tmp_path, "buffer.npz", arrays)
    with pytest.raises(CheckpointError, match=f"buffer '{key}' differs"):
        load_official_vrt(path, **kwargs)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "nope.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match=r"corrupt\.npz: not a readable \.npz"):
        read_state_dict(corrupt)
    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(other)


def test_pth_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "vrt.pth"
    path.write_bytes(b"\x80")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(CheckpointError, match="needs torch, which is not installed"):
        read_state_dict(path)


def test_unknown_official_kwarg_is_rejected(fixture_file):
    with pytest.raises(TypeError, match="unknown VRT constructor argument 'embed_dim'"):
        load_official_vrt(fixture_file("vrt_small_seed0.npz"), embed_dim=[16])


# ----------------------------------------------------------------------------------------------------------------
# Names in errors: every official key maps to one parameter of ours and back to exactly that key.

def read_keys_tsv(path):
    """[(key, shape, kind)] of a state_dict_keys_*.tsv fixture (columns key, shape, dtype, kind)."""
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "shape", "dtype", "kind"]
    rows = [line.split("\t") for line in lines[1:] if line]
    return [(key, tuple(ast.literal_eval(shape)), kind) for key, shape, _, kind in rows]


def param_shapes(model):
    """{path: shape} in the official state_dict's granularity (a TMSA group's stacked parameters once per block)."""
    return {p: tuple(v.shape) for p, v in official_parameter_slots(model).items()}


@pytest.fixture(scope="module")
def deblur_keys(fixture_file):
    rows = read_keys_tsv(fixture_file("state_dict_keys_deblur.tsv"))
    return {key: shape for key, shape, kind in rows if kind == "param"}


@pytest.mark.parametrize("tsv, config", [("state_dict_keys_deblur.tsv", preset("deblur")),
                                         ("state_dict_keys_small_fixture.tsv", small_fixture_config())],
                         ids=["deblur", "small_fixture"])
def test_every_official_key_maps_to_one_parameter_and_back(fixture_file, tsv, config):
    rows = [(k, shape) for k, shape, kind in read_keys_tsv(fixture_file(tsv)) if kind == "param"]
    ours = param_shapes(nnx.eval_shape(lambda: VRT(config, rngs=nnx.Rngs(0))))
    seen = {}
    for key, shape in rows:
        mapped = official_key_to_path(key, config)
        assert mapped is not None, key
        path, transform = mapped
        assert path in ours, (key, path)
        assert path not in seen, (key, seen.get(path))
        seen[path] = key
        assert transform(np.zeros(shape, np.float32)).shape == ours[path], key
        assert official_key_of_path(path, config) == key
        assert official_key_of_path(".".join(map(str, path)), config) == key
    assert set(seen) == set(ours)


@pytest.mark.parametrize("name", ["deblur", "sr_reds", "small_fixture"])
def test_every_parameter_of_ours_has_an_official_name_that_maps_back(name):
    """Also the upsampler of the SR layout (upsample.0/5/10, conv_before_upsample.0), absent from deblur."""
    config = preset(name)
    ours = param_shapes(nnx.eval_shape(lambda: VRT(config, rngs=nnx.Rngs(0))))
    names = {official_key_of_path(path, config): path for path in ours}
    assert len(names) == len(ours)
    for key, path in names.items():
        assert official_key_to_path(key, config)[0] == path, key
    if name == "sr_reds":
        assert {"upsample.0.weight", "upsample.5.weight", "upsample.10.bias", "conv_before_upsample.0.weight"} <= set(names)


@pytest.fixture(scope="module")
def deblur_model():
    return VRT(preset("deblur"), rngs=nnx.Rngs(0))


def missing_names(model, params):
    with pytest.raises(CheckpointError) as err:
        load_state_dict_into(model, params, {}, source="deblur.npz")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("deblur.npz: cannot load into VRT(")
    (missing,) = [line.strip() for line in lines[1:] if line.strip().startswith("missing ")]
    assert len(lines) == 2, lines  # nothing else is wrong
    head, names = missing.split(": ", 1)
    return head, names.split(", ")


@pytest.mark.parametrize("key", ["stage3.pa_deform.conv_offset.4.bias", "stage3.pa_deform.conv_offset.6.weight",
                                 "spynet.basic_module.2.basic_module.6.weight",
                                 "spynet.basic_module.5.basic_module.8.bias"])
def test_a_removed_key_is_named_exactly(deblur_model, deblur_keys, key):
    params = {k: np.zeros(shape, np.float32) for k, shape in deblur_keys.items() if k != key}
    assert missing_names(deblur_model, params) == ("missing 1 parameter(s)", [key])


def test_a_failed_load_leaves_the_model_as_it_was(deblur_model, deblur_keys):
    """Every key is checked before any parameter is written: a file with one key missing changes nothing."""
    before = [np.array(leaf) for leaf in jax.tree.leaves(nnx.state(deblur_model, nnx.Param))]
    keys = list(deblur_keys)
    params = {k: np.ones(deblur_keys[k], np.float32) for k in keys[:-1]}
    assert missing_names(deblur_model, params) == ("missing 1 parameter(s)", [keys[-1]])
    after = jax.tree.leaves(nnx.state(deblur_model, nnx.Param))
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


def test_every_removed_key_of_the_deblur_checkpoint_is_named_exactly(deblur_model, deblur_keys):
    """All 1410 keys, removed 20 at a time (the most an error lists); neighbours go to different groups."""
    keys = list(deblur_keys)
    groups = -(-len(keys) // 20)
    for g in range(groups):
        removed = keys[g::groups]
        assert 0 < len(removed) <= 20
        params = {k: np.zeros(deblur_keys[k], np.float32) for k in keys if k not in set(removed)}
        assert missing_names(deblur_model, params) == (f"missing {len(removed)} parameter(s)", sorted(removed))
