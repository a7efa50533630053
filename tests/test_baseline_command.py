"""The documented baseline command (docs/TRAINING.md):

    python scripts/convert_vgg_weights.py --input vgg16-397923af.pth --output weights/vgg16_features.npz
    python main.py --config=configs/baseline.py --workdir=runs/baseline --config.loss.vgg_weights=weights/vgg16_features.npz

The full baseline step needs about 50 GiB at its 256x256 crops and compiles for minutes on a CPU, so here: its
config passes every start-up check with the converted file and its embedded frames hold its crops, and the same
two commands train (VGG term included) with the `tiny` model and data. The weights are random, of VGG16's shapes:
no real weights can be downloaded here."""
import json
import subprocess
import sys

import numpy as np
import pytest

from configs import baseline
from data_pipelines.synthetic import SyntheticSpec
import helpers as testing
from vrtspike_jax.train import preflight

# torchvision's VGG16 `features` convolutions up to relu3_3: index -> (out, in) channels
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256)}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """weights/vgg16_features.npz made by the documented converter command from a torchvision-named state."""
    folder = tmp_path_factory.mktemp("vgg")
    rng = np.random.default_rng(0)
    state = {}
    for index, (out, inp) in VGG16_CONVS.items():
        state[f"features.{index}.weight"] = (rng.normal(size=(out, inp, 3, 3)) * np.sqrt(2 / (9 * inp))).astype(
            np.float32)
        state[f"features.{index}.bias"] = np.zeros(out, np.float32)
    np.savez(folder / "vgg16_state.npz", **state)
    (folder / "weights").mkdir()
    result = subprocess.run([sys.executable, "scripts/convert_vgg_weights.py", "--input", str(folder / "vgg16_state.npz"),
                             "--output", str(folder / "weights" / "vgg16_features.npz"), "--up-to", "relu3_3"],
                            cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return folder / "weights" / "vgg16_features.npz"


def test_the_baseline_config_passes_every_start_up_check_with_the_converted_vgg_file(vgg_file):
    config = baseline.get_config()
    with pytest.raises(preflight.ConfigError, match="loss.vgg_weights is not set"):
        preflight.preflight(config)
    config.loss.vgg_weights = str(vgg_file)
    preflight.preflight(config)


def test_the_baseline_embedded_frames_hold_its_crops():
    config = baseline.get_config()
    spec = SyntheticSpec(**config.data.embedded)
    spec.validate()
    assert min(spec.height, spec.width) >= config.data.crop_size == 256
    assert spec.height % config.data.spike_scale == 0
    quick = SyntheticSpec(**baseline.get_config("quick").data.embedded)
    assert (quick.height, quick.width) == (128, 128)   # the quickstart's dataset (and its cached build) unchanged


def test_the_documented_commands_train_with_the_vgg_term(vgg_file, tmp_path):
    workdir = tmp_path / "runs" / "baseline"
    testing.run_main(workdir, "tiny", {"loss.perceptual_weight": 0.1, "loss.vgg_weights": vgg_file,
                                       "total_steps": 2, "eval.max_clips": 1,
                                       "data.embedded_dir": tmp_path / "embedded"})
    lines = testing.read_jsonl(workdir / "train_metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert np.isfinite(line["loss"]) and line["perceptual"] > 0
        assert line["loss"] == pytest.approx(line["charbonnier"] + 0.1 * line["perceptual"], rel=1e-5)
    record = json.loads(next((workdir / "run_records").glob("run_000_*.json")).read_text())
    assert record["config"]["loss"]["vgg_weights"] == str(vgg_file)
