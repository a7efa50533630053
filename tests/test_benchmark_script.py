"""scripts/benchmark.py runs and reports what docs/PERFORMANCE.md quotes (tiny model, one timed call), its train
phase is the training step (train_lib's, same loss, clipping, groups), and its compile-only mode reports XLA's plan
without running."""
import importlib.util
import json
import re

import jax

import pytest

import helpers as testing


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("benchmark", testing.REPO_ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    precision = jax.config.jax_default_matmul_precision   # main() sets it for its process
    yield module
    jax.config.update("jax_default_matmul_precision", precision)


TINY = ["--config", "configs/baseline.py:tiny", "--frames", "2", "--batch", "1"]


def test_benchmark_reports_time_flops_and_memory(bench_script, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_script.main(TINY + ["--mode", "forward", "--runs", "1", "--warmup", "0", "--remat", "none",
                                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["input"] == [1, 2, 64, 64, 3] and report["spike_input"] == [1, 2, 64, 64, 4]
    assert report["parameters"]["spike_encoder"] > 0 and report["parameters"]["backbone"] > 0
    assert report["parameters"]["trainable"] == report["parameters"]["total"] and report["model"]["remat"] == "none"
    (forward,) = report["results"]
    assert forward["phase"] == "forward" and len(forward["times_s"]) == 1 and forward["median_s"] > 0
    assert forward["flops"] > 1e8 and forward["xla_memory_bytes"]["temp_bytes"] > 0
    assert forward["peak_rss_run_bytes"] > 0 and forward["peak_rss_compile_bytes"] > 0
    captured = capsys.readouterr()
    assert "forward |" in captured.out
    # stderr shows each stage as it ends, each call included (a run cut off by a time limit still tells its times)
    assert re.search(r"forward: lowered in [0-9.]+ s; XLA compiling", captured.err)
    assert re.search(r"forward: compiled in [0-9.]+ s", captured.err)
    assert re.search(r"forward: call 1/1 \(timed\) [0-9.]+ s", captured.err)


def test_compile_only_mode(bench_script, tmp_path):
    out = tmp_path / "compile.json"
    assert bench_script.main(TINY + ["--mode", "forward", "--runs", "0", "--warmup", "0", "--remat", "none",
                                     "--json", str(out)]) == 0
    (forward,) = json.loads(out.read_text())["results"]
    assert forward["times_s"] == [] and forward["median_s"] is None and forward["peak_rss_run_bytes"] is None
    assert forward["compile_s"] > 0 and forward["flops"] > 1e8


@pytest.mark.parametrize("flags,fragment", [
    (["--height", "60"], "--height 60 --width 64: VRT needs frame height and width that are multiples of 8"),
    (["--frames", "1"], "VRT needs at least 2 frames"),
    (["--mode", "fwd"], "--mode 'fwd': expected a comma list of forward, train"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--runs", "0"], "--runs 0 compiles only: give --warmup 0 as well"),
    (["--profile_dir", "p", "--runs", "0", "--warmup", "0"], "--profile_dir p: --runs 0 compiles only, there is no call"),
    (["--remat", "nope"], "invalid choice: 'nope'"),
    (["--config", "configs/baseline.py:nope"], "unknown variant 'nope'"),
    (["--config", "configs/nope.py"], "--config configs/nope.py: config file configs/nope.py not found"),
    (["--set", "optimizer.lr=1"], "--set optimizer.lr=1: unknown config key 'optimizer.lr'"),
    (["--set", "optimizer.groups.fusion.lr_multiplier=-1"], "lr_multiplier=-1: expected >= 0"),
    (["--set", "mesh.data=2"], "mesh data=2 x fsdp=1 = 2 devices, but 1 devices are available"),
])
def test_bad_flags_are_one_line_errors_before_anything_is_built(bench_script, capsys, monkeypatch, flags, fragment):
    from vrtspike_jax.train import train_lib

    monkeypatch.setattr(train_lib, "build_train_setup", lambda *a, **k: pytest.fail("built a model for bad flags"))
    with pytest.raises(SystemExit) as exit_info:
        bench_script.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_the_train_phase_is_the_training_step(bench_script, tmp_path, monkeypatch):
    """The benchmark compiles `TrainSetup.jit_step()` of the config (not a step of its own): the loss it returns
    is the training step's on the same batch, VGG term included (random VGG weights without a file)."""
    import numpy as np

    from vrtspike_jax.train import train_lib

    compiled_steps = []
    original = train_lib.TrainSetup.jit_step

    def spy(self):
        compiled_steps.append(self)
        return original(self)

    monkeypatch.setattr(train_lib.TrainSetup, "jit_step", spy)
    out = tmp_path / "train.json"
    assert bench_script.main(TINY + ["--mode", "train", "--runs", "1", "--warmup", "0", "--set",
                                     "loss.perceptual_weight=0.1", "--set", "optimizer.groups.backbone.frozen_steps=-1",
                                     "--set", "init.zero_output_conv=False", "--json", str(out)]) == 0
    (setup,) = compiled_steps
    assert setup.loss_fn.perceptual_weight == 0.1 and setup.vgg_params and setup.gradient_gate is not None
    report = json.loads(out.read_text())
    assert "random values" in report["loss"]["vgg"] and report["grad_clip_norm"] == 1.0
    assert report["parameters"]["trainable"] == report["parameters"]["total"] - report["parameters"]["backbone"]
    (train,) = report["results"]
    assert train["phase"] == "train" and train["median_s"] > 0 and np.isfinite(train["flops"])


def test_the_benchmark_lowers_the_program_training_compiles(bench_script):
    """The benchmark's train step and the one train_and_evaluate compiles (build_train_setup of the run config on the
    mesh, lowered on its global batch shapes) are the same program: their StableHLO text is identical (loss,
    clipping, the non-finite guard, a frozen group's gradient gate, shardings)."""
    from configs import baseline
    from vrtspike_jax.train import run_config, sharding, train_lib

    sets = ["--set", "optimizer.groups.backbone.frozen_steps=-1", "--set", "init.zero_output_conv=False"]
    args = bench_script.build_parser().parse_args(TINY + sets)
    _, mesh, bench_setup, _, _ = bench_script.build(args)
    shapes = bench_script.batch_shapes(args, bench_setup.config, bench_setup)

    config = baseline.get_config("tiny")                 # what main.py --config=configs/baseline.py:tiny reads
    config.global_batch_size, config.data.clip_length = 1, 2
    config.optimizer.groups.backbone.frozen_steps, config.init.zero_output_conv = -1, False
    train_setup = train_lib.build_train_setup(run_config.read(config), sharding.make_mesh(config.mesh))

    def lowered_text(setup):
        batch = {k: jax.ShapeDtypeStruct(shapes[k], jax.numpy.float32, sharding=setup.batch_shardings[k])
                 for k in setup.keys}
        return setup.jit_step().lower(*setup.abstract_targets(), batch, setup.vgg_params).as_text()

    assert lowered_text(bench_setup) == lowered_text(train_setup)
