"""scripts/compare.py end to end on the tiny config: two arms, one seed, a few steps. Checks the table, the plot
and the frames exist with finite numbers (not which arm wins), that a rerun reuses everything, and bad arms."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import helpers as testing


def compare_command(workdir, shared, *extra):
    overrides = testing.overrides_to_flags({"data.embedded_dir": shared["embedded"],
                                            "compilation_cache_dir": shared["cache"],
                                            "optimizer.schedule_steps": 16})
    return [sys.executable, str(testing.REPO_ROOT / "scripts" / "compare.py"),
            f"--config={testing.REPO_ROOT / 'configs' / 'baseline.py'}:tiny", f"--workdir={workdir}",
            *overrides, *extra]


def paths_in(folder):
    """A tiny dataset and XLA cache of a test's own (for runs that stop at a start-up error)."""
    return {"embedded": folder / "train_embedded", "cache": folder / "train_xla_cache"}


def run(command):
    return subprocess.run(command, cwd=testing.REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          env=testing.subprocess_env())


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, tiny_run_paths):
    shared = tiny_run_paths   # the tiny dataset and XLA cache of the training tests
    workdir = tmp_path_factory.mktemp("cmp")
    result = run(compare_command(workdir, shared, "--arms=spike,vrt_only", "--seeds=1", "--steps=2", "--frames=1",
                                 "--robustness=no_spikes,shift:-1"))
    assert result.returncode == 0, testing.tail(result)
    return workdir, shared, result


def test_comparison_writes_table_plot_and_frames(comparison):
    workdir, _, result = comparison
    results = json.loads((workdir / "results.json").read_text())
    assert results["arms"] == ["spike", "vrt_only"] and results["seed_values"] == [123]
    val = results["splits"]["val"]
    for arm in ("spike", "vrt_only"):
        entry = val["arms"][arm]
        for metric in ("psnr", "psnr_y", "ssim_y"):
            assert np.isfinite(entry[metric]["mean"]) and entry[metric]["std"] == 0.0 and entry[metric]["n"] == 1
        assert entry["num_frames"] == 4 and entry["per_sequence"]
        assert np.isfinite(results["train_seconds"][arm]["mean"])
        assert (workdir / arm / "seed_123" / "checkpoints" / "best").is_dir()
    assert np.isfinite(val["input"]["psnr"])
    assert "test" not in results["splits"]          # the tiny dataset has no test split
    table = (workdir / "results.md").read_text()
    assert "| spike |" in table and "| vrt_only |" in table and "| blurry input |" in table
    assert "| spike |" in result.stdout
    for method in ("tfp", "tfi"):                    # the spike-only references, chosen and fitted on val
        ref = results["spike_only"][method]
        assert np.isfinite(ref["splits"]["val"]["psnr_y"]) and np.isfinite(ref["splits"]["val"]["ssim_y"])
        assert str(ref["param"]) in ref["val_psnr_y_by_param"]
        assert ref["splits"]["val"]["psnr_y"] == max(ref["val_psnr_y_by_param"].values())
        assert f"| spike only: {method.upper()} (" in table
    robust = results["robustness"]["val"]
    assert set(robust) == {"spike"}                  # only arms that use spikes are perturbed
    for name in ("no_spikes", "shift:-1"):
        assert np.isfinite(robust["spike"][name]["psnr"]["mean"]) and robust["spike"][name]["psnr"]["n"] == 1
    # Without its spikes the model gives other frames (zero counts are not what it was trained on).
    assert robust["spike"]["no_spikes"]["psnr"]["mean"] != val["arms"]["spike"]["psnr"]["mean"]
    assert "## Robustness (val)" in table and "| spike | " in table.split("## Robustness (val)")[1]
    plot = Image.open(workdir / "val_psnr.png")
    assert plot.size[0] > 300 and plot.size[1] > 200
    (frame,) = results["frames"]
    image = np.asarray(Image.open(frame))
    assert image.shape == (14 + 64, 64 * 4, 3)        # labels over blurry | spike | vrt_only | sharp
    assert image[:14].min() < 64 and image[:14].max() == 255   # the caption band has text


def test_a_rerun_reuses_the_trained_runs(comparison):
    workdir, shared, _ = comparison
    records = sorted((workdir / "spike" / "seed_123" / "run_records").glob("run_*.json"))
    before = json.loads((workdir / "results.json").read_text())
    result = run(compare_command(workdir, shared, "--arms=spike,vrt_only", "--seeds=1", "--steps=2", "--frames=1",
                                 "--robustness=no_spikes,shift:-1"))
    assert result.returncode == 0, testing.tail(result)
    assert sorted((workdir / "spike" / "seed_123" / "run_records").glob("run_*.json")) == records
    after = json.loads((workdir / "results.json").read_text())
    assert after["splits"] == before["splits"] and after["train_seconds"] == before["train_seconds"]
    assert after["robustness"] == before["robustness"] and after["spike_only"] == before["spike_only"]


def test_an_unknown_arm_is_a_one_line_error(tmp_path):
    result = run(compare_command(tmp_path / "w", paths_in(tmp_path), "--arms=spike,vrt_olny"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--arms spike,vrt_olny" in errors[0] and "vrt_only" in errors[0]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flag, message", [("shift:0", "--robustness shift:0"), ("blur:2", "--robustness blur:2")])
def test_a_bad_perturbation_is_a_one_line_error(tmp_path, flag, message):
    result = run(compare_command(tmp_path / "w", paths_in(tmp_path), f"--robustness={flag}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "no_spikes" in errors[0]
    assert not (tmp_path / "w").exists()


def test_a_shift_of_raw_windows_is_a_one_line_error(tmp_path):
    result = run(compare_command(tmp_path / "w", paths_in(tmp_path), "--robustness=no_spikes,shift:1",
                                 "--config.data.spike_representation=raw"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--robustness shift:1 with data.spike_representation=raw" in errors[0]
    assert not (tmp_path / "w").exists()


def test_perturbations_feed_the_representations_input_of_no_spikes():
    import importlib.util

    from data_pipelines import spike_input

    spec = importlib.util.spec_from_file_location("compare_script", testing.REPO_ROOT / "scripts" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    class Eval:   # the evaluation iterator's interface: batches, stats, representation
        stats = (0.3, 0.5)

        def __init__(self, kind):
            self.representation = spike_input.Representation(kind, 4, tfi_max_search=5)

        def __len__(self):
            return 1

        def __iter__(self):
            yield {"spike_vox": np.ones((1, 2, 3, 3, 4), np.float32)}

    zero = (float(np.float16(1 / 10)) - 0.3) / 0.5          # TFI of no spikes: 1 / 2m, normalised
    (batch,) = compare.PerturbedSpikes(Eval("tfi"), "no_spikes", None)
    np.testing.assert_allclose(batch["spike_vox"], zero, rtol=1e-6)
    (batch,) = compare.PerturbedSpikes(Eval("tfi"), "shift", 1)     # the first instant is left without spikes
    np.testing.assert_allclose(batch["spike_vox"][..., 0, :, :, 0], zero, rtol=1e-6)
    assert (batch["spike_vox"][..., 1:] == 1).all() and (batch["spike_vox"][..., 1, :, :, 0] == 1).all()
    with pytest.raises(ValueError, match="shift:1 with data.spike_representation=raw"):
        compare.PerturbedSpikes(Eval("raw"), "shift", 1)
