"""main.py turns every kind of user error into one line on stderr and exit status 2, before the work it concerns,
with no traceback and nothing in the workdir that a corrected rerun would trip over (no run record, no checkpoint).
Each case is the command a user would type, run in a subprocess."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import helpers as testing


def run(workdir: Path, variant: str = "tiny", *flags: str, config: str = None):
    config = config or f"{testing.REPO_ROOT / 'configs' / 'baseline.py'}:{variant}"
    command = [sys.executable, str(testing.MAIN), f"--config={config}", f"--workdir={workdir}", *flags]
    return subprocess.run(command, cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=testing.subprocess_env())


def expect_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, and one `error:` line on stderr containing every fragment; returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def assert_clean(workdir: Path) -> None:
    """Nothing that a corrected rerun would read: no run record, no checkpoint step, no metrics."""
    if not workdir.exists():
        return
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert files == [], files


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded")


def test_unknown_override_key_names_the_closest_key(tmp_path):
    expect_error(run(tmp_path / "w", "tiny", "--config.data.crop_sise=64"),
                 "--config.data.crop_sise=64", "unknown config key 'data.crop_sise'", "did you mean 'data.crop_size'")
    assert not (tmp_path / "w").exists()


def test_unknown_variant(tmp_path):
    expect_error(run(tmp_path / "w", "tyni"), "unknown variant 'tyni'", "tiny")


def test_misspelt_key_in_a_users_config_file_is_an_error_not_a_default(tmp_path):
    config = tmp_path / "my_config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(testing.REPO_ROOT)!r})\n"
                      "from configs import baseline\n\n\ndef get_config():\n"
                      "    config = baseline.get_config('tiny')\n"
                      "    config.eval.crop_boarder = 4   # misspelt: eval.crop_border\n"
                      "    return config\n")
    expect_error(run(tmp_path / "w", config=str(config)), "eval.crop_boarder", "did you mean 'eval.crop_border'")
    assert_clean(tmp_path / "w")


def test_perceptual_loss_without_vgg_file_fails_before_the_dataset_is_built(tmp_path):
    line = expect_error(run(tmp_path / "w", "tiny", "--config.loss.perceptual_weight=0.1",
                            f"--config.data.embedded_dir={tmp_path / 'embedded'}"),
                        "loss.vgg_weights", "scripts/convert_vgg_weights.py")
    assert "--config.loss.vgg_weights=" in line
    assert not (tmp_path / "embedded").exists()
    assert_clean(tmp_path / "w")


@pytest.mark.parametrize("option,what,command", [
    ("loss.vgg_weights", "VGG16 features file", "convert_vgg_weights.py"),
    ("eval.lpips_weights", "LPIPS weights file", "convert_lpips_weights.py"),
    ("init.vrt_from", "official VRT weights", "convert_vrt_checkpoint.py"),
    ("data.stats_file", "voxel statistics file", "prepare_data.py"),
])
def test_missing_weights_and_statistics_files(tmp_path, option, what, command):
    missing = tmp_path / "absent" / "file.npz"
    expect_error(run(tmp_path / "w", "tiny", f"--config.{option}={missing}", "--config.loss.perceptual_weight=0.1"
                     if option == "loss.vgg_weights" else "--config.log_every_steps=1"),
                 f"{option}={missing}", what, command)
    assert_clean(tmp_path / "w")


def test_missing_and_unprepared_data_roots(tmp_path):
    expect_error(run(tmp_path / "w", "tiny", f"--config.data.root={tmp_path / 'nowhere'}"),
                 str(tmp_path / "nowhere"), "no such folder")
    (tmp_path / "raw").mkdir()
    expect_error(run(tmp_path / "w", "tiny", f"--config.data.root={tmp_path / 'raw'}"),
                 str(tmp_path / "raw" / "prepared.json"), "prepare_data.py")
    assert_clean(tmp_path / "w")


def test_crop_larger_than_the_frames(tmp_path, embedded):
    expect_error(run(tmp_path / "w", "tiny", "--config.data.crop_size=128", f"--config.data.embedded_dir={embedded}"),
                 "crop_size 128 is larger than the frames", "(64x64)", "data.crop_size")
    assert_clean(tmp_path / "w")


def test_batch_that_does_not_fit_the_mesh(tmp_path, embedded):
    result = subprocess.run(
        testing.main_command(tmp_path / "w", "tiny", {"global_batch_size": 3, "data.embedded_dir": embedded}),
        cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=600,
        env=testing.subprocess_env(device_count=2))
    expect_error(result, "global_batch_size 3 is not a multiple of the 2 devices", "--config.global_batch_size")
    assert_clean(tmp_path / "w")


def _fake_run(workdir: Path, variant: str = "tiny") -> None:
    """A workdir with one `last` checkpoint (step 2) of the tiny model, as training would leave it."""
    from configs import baseline
    from vrtspike_jax import factory
    from vrtspike_jax.train import checkpointing, train_lib

    config = baseline.get_config(variant)
    params = factory.initial_params(config)
    tx, _ = train_lib.make_optimizer(config)
    train_state = {"step": np.int32(2), "opt_state": tx.init(params), "rng": np.zeros(2, np.uint32)}
    saver = checkpointing.RunCheckpoints(workdir, async_save=False)
    saver.save_last(2, params, train_state, {"next_step": 2, "global_batch_size": 2},
                    checkpointing.config_to_dict(config), force=True)
    saver.wait_until_finished()
    saver.close()


def test_resuming_a_workdir_of_another_model(tmp_path, embedded):
    _fake_run(tmp_path / "w")
    before = sorted(p for p in (tmp_path / "w").rglob("*"))
    expect_error(run(tmp_path / "w", "tiny,vrt_only", f"--config.data.embedded_dir={embedded}"),
                 str(tmp_path / "w"), "another model", "model.use_spike: checkpoint True, now False", "--workdir")
    assert sorted(p for p in (tmp_path / "w").rglob("*")) == before


def test_damaged_checkpoint_names_the_step_folder(tmp_path, embedded):
    _fake_run(tmp_path / "w")
    params = tmp_path / "w" / "checkpoints" / "last" / "2" / "params"
    for path in params.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "manifest" in path.name:
            path.write_bytes(b"damaged")
    expect_error(run(tmp_path / "w", "tiny", f"--config.data.embedded_dir={embedded}"),
                 str(tmp_path / "w" / "checkpoints" / "last" / "2"), "cannot restore", "--workdir")
    assert not (tmp_path / "w" / "run_records").exists()


def test_a_checkpoint_of_the_per_block_layout_says_it_cannot_resume_and_how_to_start_from_it(tmp_path, embedded):
    import orbax.checkpoint as ocp

    _fake_run(tmp_path / "w")
    step_dir = tmp_path / "w" / "checkpoints" / "last" / "2"
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(step_dir / "params")
        shutil.rmtree(step_dir / "params")
        checkpointer.save(step_dir / "params", testing.blocks_one_by_one(raw))
    expect_error(run(tmp_path / "w", "tiny", f"--config.data.embedded_dir={embedded}"),
                 str(step_dir), "blocks stacked", "cannot resume", f"--config.init.vrt_from={step_dir}")
    assert not (tmp_path / "w" / "run_records").exists()


def test_bad_initial_vrt_weights(tmp_path, embedded):
    weights = tmp_path / "vrt.npz"
    np.savez(weights, **{"conv_first.weight": np.zeros((3, 3), np.float32)})
    expect_error(run(tmp_path / "w", "tiny", f"--config.init.vrt_from={weights}",
                     f"--config.data.embedded_dir={embedded}"), str(weights))
    assert not (tmp_path / "w" / "run_records").exists()


def test_a_moved_key_names_its_new_place(tmp_path):
    # The initial weights are a start option (init), not a model field: the old name says where it went.
    expect_error(run(tmp_path / "w", "tiny", "--config.model.init_vrt_from=weights/vrt_gopro"),
                 "'model.init_vrt_from' is now 'init.vrt_from'", "--config.init.vrt_from=")
    assert not (tmp_path / "w").exists()


def test_damaged_checkpoint_config_names_the_step_folder(tmp_path, embedded):
    _fake_run(tmp_path / "w")
    (tmp_path / "w" / "checkpoints" / "last" / "2" / "config" / "metadata").write_text("{damaged")
    expect_error(run(tmp_path / "w", "tiny", f"--config.data.embedded_dir={embedded}"),
                 str(tmp_path / "w" / "checkpoints" / "last" / "2"), "cannot read the run config", "--workdir")


def test_unknown_spike_representation(tmp_path):
    expect_error(run(tmp_path / "w", "tiny", "--config.data.spike_representation=tpf"),
                 "data.spike_representation='tpf': expected one of voxel, tfp, tfi, raw")
    assert_clean(tmp_path / "w")


def test_bad_model_dtype(tmp_path):
    expect_error(run(tmp_path / "w", "tiny", "--config.model.dtype=float32x"), "model: dtype='float32x'")


def test_start_up_checks_leave_the_backend_to_jax_distributed():
    """preflight runs before jax.distributed.initialize (main.py), which fails once anything started the backend."""
    code = ("from configs import baseline\nfrom jax._src import xla_bridge\n"
            "from vrtspike_jax.train import preflight\n"
            "config = baseline.get_config('tiny')\npreflight.preflight(config)\n"
            "assert config.model.dtype == 'auto'\n"
            "assert not xla_bridge.backends_are_initialized(), 'preflight started the XLA backend'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=testing.REPO_ROOT, capture_output=True, text=True,
                            timeout=300, env=testing.subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
