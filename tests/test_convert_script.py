"""scripts/convert_vrt_checkpoint.py: official weights -> an Orbax checkpoint the project restores; the user
errors of the three conversion scripts (VRT, VGG, LPIPS)."""
import importlib.util
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

import helpers as testing
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
    # The same folder starts the RGB branch of a spike model (training's init.vrt_from).
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

    # A checkpoint written before TMSA groups stored their blocks stacked (2026-11-30: one entry per block) still
    # loads, for inference and as init.vrt_from, into the same model.
    old_layout = tmp_path / "vrt_small_per_block"
    shutil.copytree(out, old_layout)
    shutil.rmtree(old_layout / "params")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(old_layout / "params", testing.blocks_one_by_one(checkpointer.restore(out / "params")))
    with ocp.StandardCheckpointer() as checkpointer:
        written = ["/".join(map(str, key))
                   for key in traverse_util.flatten_dict(checkpointer.restore(old_layout / "params"))]
    assert any("/blocks/1/attn/" in key for key in written)     # really the per-block layout
    old_model, _ = load_model_from_checkpoint(old_layout)
    pairs = list(zip(jax.tree.leaves(nnx.state(old_model, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param))))
    assert len(pairs) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for got, want in pairs:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    old_spike = VRTWithSpike(VRTWithSpikeConfig(vrt=config_from_official_kwargs(**kwargs), spike_bins=4),
                             rngs=nnx.Rngs(1))
    load_official_weights_into(old_spike, old_layout)
    for got, want in zip(jax.tree.leaves(nnx.state(old_spike.vrt, nnx.Param)),
                         jax.tree.leaves(nnx.state(spike_model.vrt, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"conv_first.weight": np.zeros((96, 27, 1, 3, 3), np.float32)})
    run = subprocess.run([sys.executable, SCRIPT, "--input", str(bad), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    line = one_line_error(run.returncode, run.stdout, run.stderr, str(bad))
    assert "missing 1409 parameter(s)" in line and "--preset or --official_config" in line
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


# --------------------------------------------------------------------------------------------------------------
# User errors of the conversion scripts: one line on stderr naming the file or value, exit status 2, no traceback,
# no output left behind. The subprocess tests run a script as a user does; the others call its main(argv).

def one_line_error(returncode, stdout, stderr, *needles):
    assert returncode == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("convert_vrt_checkpoint", "convert_vgg_weights",
                                                 "convert_lpips_weights")}


def main_error(capsys, script, argv, *needles):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        script.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return one_line_error(exit_.value.code, captured.out, captured.err, *needles)


@pytest.fixture(scope="module")
def small_official(load_fixture):
    z = load_fixture("vrt_small_seed0.npz")
    params = {k[len("param/"):]: np.asarray(z[k]) for k in z.files if k.startswith("param/")}
    return params, str(z["config_json"])


def run_cli(script: str, *args) -> subprocess.CompletedProcess:
    """`python scripts/<script> ARGS` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_vrt_missing_input_file(tmp_path):
    missing = tmp_path / "006_VRT_videodeblurring_GoPro.pth"
    run = run_cli("convert_vrt_checkpoint.py", "--input", missing, "--output", tmp_path / "out")
    one_line_error(run.returncode, run.stdout, run.stderr, f"--input {missing}: no such file")
    assert list(tmp_path.iterdir()) == []


def test_vrt_unreadable_and_wrong_format_files(tmp_path, capsys, scripts):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"<html>not the weights</html>")
    main_error(capsys, scripts["convert_vrt_checkpoint"], ["--input", corrupt, "--output", tmp_path / "out"],
               f"--input {corrupt}: not a readable .npz archive (it is not a zip file")
    other = tmp_path / "vrt.safetensors"
    other.write_bytes(b"x")
    main_error(capsys, scripts["convert_vrt_checkpoint"], ["--input", other, "--output", tmp_path / "out"],
               f"--input {other}: unknown checkpoint format '.safetensors'; expected .npz or .pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.npz", "vrt.safetensors"]


@pytest.mark.parametrize("change, needle", [
    ("missing", "missing 1 parameter(s): stage3.pa_deform.conv_offset.4.bias"),
    ("extra", "unexpected key 'stage9.linear1.weight' (16, 16)"),
    ("misshaped", "key 'stage2.linear1.weight' has shape (16, 17); the configured VRT expects (16, 16)"),
])
def test_vrt_missing_extra_and_misshaped_keys(tmp_path, capsys, scripts, small_official, change, needle):
    params, config_json = small_official
    arrays = dict(params)
    if change == "missing":
        del arrays["stage3.pa_deform.conv_offset.4.bias"]
    elif change == "extra":
        arrays["stage9.linear1.weight"] = np.zeros((16, 16), np.float32)
    else:
        arrays["stage2.linear1.weight"] = np.zeros((16, 17), np.float32)
    weights = tmp_path / "weights.npz"
    np.savez(weights, **arrays)
    out = tmp_path / "nested" / "out"
    line = main_error(capsys, scripts["convert_vrt_checkpoint"],
                      ["--input", weights, "--official_config", config_json, "--output", out],
                      f"--input {weights}: cannot load into VRT(", needle)
    assert line.endswith("(the weights do not fit the architecture: give the one they were trained with, via "
                         "--preset or --official_config)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.npz"]


def test_vrt_bad_official_config(tmp_path, capsys, scripts, fixture_file):
    weights = fixture_file("vrt_small_seed0.npz")
    main_error(capsys, scripts["convert_vrt_checkpoint"],
               ["--input", weights, "--official_config", '{"embed_dim": [16]}', "--output", tmp_path / "out"],
               "--official_config: unknown VRT constructor argument 'embed_dim'")
    main_error(capsys, scripts["convert_vrt_checkpoint"],
               ["--input", weights, "--official_config", f"@{tmp_path / 'kwargs.json'}", "--output", tmp_path / "out"],
               f"--official_config file {tmp_path / 'kwargs.json'}: cannot be read")
    main_error(capsys, scripts["convert_vrt_checkpoint"],
               ["--input", weights, "--official_config", "{upscale: 1}", "--output", tmp_path / "out"],
               "--official_config {upscale: 1}: not valid JSON")
    assert list(tmp_path.iterdir()) == []


def test_vrt_existing_output_is_kept(tmp_path, capsys, scripts, fixture_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    main_error(capsys, scripts["convert_vrt_checkpoint"],
               ["--input", fixture_file("vrt_small_seed0.npz"), "--preset", "small_fixture", "--output", out],
               f"--output {out} exists (pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_vrt_relative_output_folder(tmp_path, capsys, scripts, fixture_file, monkeypatch):
    """Orbax writes absolute paths only: `--output checkpoints/vrt` (relative, as in the docstring) must work."""
    monkeypatch.chdir(tmp_path)
    assert scripts["convert_vrt_checkpoint"].main(
        ["--input", str(fixture_file("vrt_small_seed0.npz")), "--preset", "small_fixture",
         "--output", "checkpoints/vrt"]) == 0
    assert (tmp_path / "checkpoints" / "vrt" / "params").is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["vrt"]   # no staging left behind


# convert_vgg_weights.py

def vgg_state(up_to_conv=2, bad_shape=False):
    """torchvision vgg16 `features` up to relu1_2 (convs 0 and 2)."""
    state = {"features.0.weight": np.ones((64, 3, 3, 3), np.float32), "features.0.bias": np.ones(64, np.float32),
             "features.2.weight": np.ones((64, 32 if bad_shape else 64, 3, 3), np.float32),
             "features.2.bias": np.ones(64, np.float32)}
    return state if up_to_conv == 2 else {k: v for k, v in state.items() if k.startswith("features.0.")}


def test_vgg_missing_input_file(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    run = run_cli("convert_vgg_weights.py", "--input", missing, "--output", tmp_path / "vgg.npz")
    one_line_error(run.returncode, run.stdout, run.stderr, f"--input {missing}: no such file")
    assert list(tmp_path.iterdir()) == []


def test_vgg_unreadable_file(tmp_path, capsys, scripts):
    corrupt = tmp_path / "vgg16.npz"
    corrupt.write_bytes(b"truncated")
    main_error(capsys, scripts["convert_vgg_weights"], ["--input", corrupt, "--output", tmp_path / "out.npz"],
               f"--input {corrupt}: not a readable .npz archive", "torchvision VGG state_dict")
    assert [p.name for p in tmp_path.iterdir()] == ["vgg16.npz"]


@pytest.mark.parametrize("kind", ["missing", "misshaped"])
def test_vgg_missing_and_misshaped_keys_keep_an_existing_output(tmp_path, capsys, scripts, kind):
    source = tmp_path / "vgg.npz"
    np.savez(source, **vgg_state(up_to_conv=0 if kind == "missing" else 2, bad_shape=kind == "misshaped"))
    out = tmp_path / "features.npz"
    out.write_bytes(b"previous output")
    needle = ("missing features.2.weight; missing features.2.bias" if kind == "missing" else
              "features.2.weight: expected shape (64, 64, 3, 3), found (64, 32, 3, 3)")
    main_error(capsys, scripts["convert_vgg_weights"], ["--input", source, "--up-to", "relu1_2", "--output", out],
               str(source), needle, "(check --input, --network, --prefix and --up-to)")
    assert out.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.npz", "vgg.npz"]


def test_vgg_unknown_layer_and_missing_output_folder(tmp_path, capsys, scripts):
    source = tmp_path / "vgg.npz"
    np.savez(source, **vgg_state())
    main_error(capsys, scripts["convert_vgg_weights"], ["--input", source, "--up-to", "relu9_9", "--output",
                                                        tmp_path / "out.npz"],
               "--up-to 'relu9_9' is not a vgg16 ReLU; known: ['relu1_1', 'relu1_2'")
    main_error(capsys, scripts["convert_vgg_weights"], ["--input", source, "--up-to", "relu1_2", "--output",
                                                        tmp_path / "no_dir" / "out.npz"],
               f"--output {tmp_path / 'no_dir' / 'out.npz'}: the folder {tmp_path / 'no_dir'} does not exist")
    assert [p.name for p in tmp_path.iterdir()] == ["vgg.npz"]


# convert_lpips_weights.py

def alexnet_and_lin(drop=None, bad=None):
    from vrtspike_jax.metrics import lpips_state_keys
    shapes = lpips_state_keys()
    to_alexnet = {"net.slice1.0": 0, "net.slice2.3": 3, "net.slice3.6": 6, "net.slice4.8": 8, "net.slice5.10": 10}
    alexnet = {f"features.{i}.{s}": np.ones(shapes[f"{name}.{s}"], np.float32)
               for name, i in to_alexnet.items() for s in ("weight", "bias")}
    lin = {f"lin{k}.model.1.weight": np.ones(shapes[f"lin{k}.model.1.weight"], np.float32) for k in range(5)}
    for part in (alexnet, lin):
        part.pop(drop, None)
        if bad in part:
            part[bad] = np.ones(part[bad].shape[:-1] + (part[bad].shape[-1] + 1,), np.float32)
    return alexnet, lin


def test_lpips_missing_input_file(tmp_path):
    alexnet, _ = alexnet_and_lin()
    np.savez(tmp_path / "alexnet.npz", **alexnet)
    missing = tmp_path / "alex.pth"
    run = run_cli("convert_lpips_weights.py", "--alexnet", tmp_path / "alexnet.npz", "--lin", missing,
                  "--output", tmp_path / "l.npz")
    one_line_error(run.returncode, run.stdout, run.stderr, f"--lin {missing}: no such file")
    assert [p.name for p in tmp_path.iterdir()] == ["alexnet.npz"]


def test_lpips_unreadable_file(tmp_path, capsys, scripts):
    corrupt = tmp_path / "lpips_state.npz"
    corrupt.write_bytes(b"PK but not really")
    main_error(capsys, scripts["convert_lpips_weights"], ["--state", corrupt, "--output", tmp_path / "l.npz"],
               f"--state {corrupt}: not a readable .npz archive")
    assert [p.name for p in tmp_path.iterdir()] == ["lpips_state.npz"]


@pytest.mark.parametrize("option, drop, bad, needle", [
    ("--alexnet", "features.6.bias", None, "missing features.6.bias"),
    ("--alexnet", None, "features.3.weight", "features.3.weight: expected shape (192, 64, 5, 5), found (192, 64, 5, 6)"),
    ("--lin", "lin4.model.1.weight", None, "missing lin4.model.1.weight"),
])
def test_lpips_missing_and_misshaped_keys_in_the_inputs_own_names(tmp_path, capsys, scripts, option, drop, bad,
                                                                  needle):
    alexnet, lin = alexnet_and_lin(drop, bad)
    np.savez(tmp_path / "alexnet.npz", **alexnet)
    np.savez(tmp_path / "alex_lin.npz", **lin)
    named = tmp_path / ("alexnet.npz" if option == "--alexnet" else "alex_lin.npz")
    main_error(capsys, scripts["convert_lpips_weights"],
               ["--alexnet", tmp_path / "alexnet.npz", "--lin", tmp_path / "alex_lin.npz", "--output",
                tmp_path / "lpips_alex.npz"], f"{option} {named} is not usable for LPIPS-alex: {needle}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alex_lin.npz", "alexnet.npz"]
