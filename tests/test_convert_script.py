"""scripts/convert_vrt_checkpoint.py: official weights -> an Orbax checkpoint the project restores."""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from vrtspike_jax.convert import CheckpointError, load_official_weights_into
from vrtspike_jax.models.vrt import config_from_official_kwargs
from vrtspike_jax.models.vrt_spike import VRTWithSpike, VRTWithSpikeConfig

SCRIPT = str(REPO_ROOT / "scripts" / "convert_vrt_checkpoint.py")


def test_converted_checkpoint_restores_the_official_function(tmp_path, fixture_file, load_fixture):
    z = load_fixture("vrt_small_seed0.npz")
    kwargs = json.loads(str(z["config_json"]))
    out = tmp_path / "vrt_small"
    run = subprocess.run([sys.executable, SCRIPT, "--input", str(fixture_file("vrt_small_seed0.npz")),
                          "--official_config", json.dumps(kwargs), "--output", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (out / "params").is_dir() and (out / "config").is_dir()
    from vrtspike_jax.train.checkpointing import load_model_from_checkpoint
    model, config = load_model_from_checkpoint(out)
    assert config.model.use_spike is False
    frames = jnp.asarray(z["input"].transpose(0, 1, 3, 4, 2))
    restored = np.asarray(nnx.jit(lambda m, x: m(x))(model, frames))
    ref = z["output"].transpose(0, 1, 3, 4, 2)
    assert np.linalg.norm(restored - ref) / np.linalg.norm(ref) <= 1e-5
    # The same folder starts the RGB branch of a spike model (training's init_vrt_from).
    spike_model = VRTWithSpike(VRTWithSpikeConfig(vrt=config_from_official_kwargs(**kwargs), spike_bins=4),
                               rngs=nnx.Rngs(1))
    load_official_weights_into(spike_model, out)
    np.testing.assert_array_equal(np.asarray(spike_model.vrt.conv_last.kernel[...]),
                                  np.asarray(model.vrt.conv_last.kernel[...]))
    # ... and refuses a model of another architecture, naming the parameter.
    other = VRTWithSpike(VRTWithSpikeConfig(vrt=config_from_official_kwargs(**dict(kwargs, embed_dims=[8] * 7 + [24, 24])),
                                            spike_bins=4), rngs=nnx.Rngs(1))
    with pytest.raises(CheckpointError, match=r"conv_first\.kernel has shape \(3, 3, 27, 16\), the configured VRT "
                                              r"expects \(3, 3, 27, 8\)"):
        load_official_weights_into(other, out)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"conv_first.weight": np.zeros((96, 27, 1, 3, 3), np.float32)})
    run = subprocess.run([sys.executable, SCRIPT, "--input", str(bad), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "ERROR:" in run.stderr and "missing" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
