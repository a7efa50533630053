"""scripts/test.py: folders in, PNGs + metrics out; bad inputs refused before any compute; no partial output.

The spike model is the tiny VRTWithSpike of tests/test_inference.py saved as a real training checkpoint (Orbax, via
vrtspike_jax.train.checkpointing) and read back through `--checkpoint`; plain VRT runs from the official fixture
weights. Clip and tile shapes equal those of tests/test_inference.py, so both files share their compilations.
"""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipelines import layout, spike_dat, voxelize
from vrtspike_jax import metrics
from vrtspike_jax.inference import TileSpec, make_apply_fn, restore_video
from vrtspike_jax.metrics import METRIC_NAMES

from test_inference import TINY_MODEL, build_tiny_model, make_clip

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "test.py"
NAMES = ["000000", "000001", "000002"]
SEQ = "val/clip"
STATS = {"mean": 0.25, "std": 0.5, "num_bins": 4, "split": "train"}
TILE_ARGS = ["--tile", "0", "64", "--tile_overlap", "0", "16"]
TILE = TileSpec(spatial=64, spatial_overlap=16)


def load_script():
    spec = importlib.util.spec_from_file_location("vrtspike_test_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def save_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def to_u8(frames: np.ndarray) -> np.ndarray:
    return np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """ROOT/val/clip/{blur,sharp,spike,spike_vox} of 3 frames of 112x112 (spikes 56x56, f = 2, K = 4), with
    ROOT/alignment.csv and ROOT/voxel_stats.json, in our layout (docs/DATA.md)."""
    root = tmp_path_factory.mktemp("data")
    seq = root / "val" / "clip"
    frames, _ = make_clip(3, 112, 112)
    blur = to_u8(frames)
    sharp = to_u8(make_clip(3, 112, 112, seed=1)[0][:, ::-1])  # any other images of the same size
    rng = np.random.default_rng(0)
    rows = []
    for t, name in enumerate(NAMES):
        save_png(seq / "blur" / f"{name}.png", blur[t])
        save_png(seq / "sharp" / f"{name}.png", sharp[t])
        spikes = rng.random((12, 56, 56)) < 0.3
        (seq / "spike").mkdir(parents=True, exist_ok=True)
        spike_dat.write_dat(seq / "spike" / f"{name}.dat", spikes)
        row = layout.AlignmentRow(SEQ, t, 100.0 * t + 2, 100.0 * t + 9, 100.0 * t)
        rows.append(row)
        counts = voxelize.count_spikes(spikes, row.frame_times(12), row.t0, row.t1, 4)
        (seq / "spike_vox").mkdir(parents=True, exist_ok=True)
        np.save(seq / "spike_vox" / f"{name}.npy", counts.astype(np.uint8))
    layout.write_alignment(root / "alignment.csv", rows)
    (root / "voxel_stats.json").write_text(json.dumps(STATS))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A training workdir whose `last` checkpoint (step 1) holds the tiny VRT+Spike model."""
    from vrtspike_jax.train.checkpointing import RunCheckpoints

    workdir = tmp_path_factory.mktemp("run")
    model = build_tiny_model(seed=3)
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
    config = {"model": json.loads(json.dumps(TINY_MODEL)), "data": {"root": None, "stats_file": None}}
    manager = RunCheckpoints(workdir, async_save=False)
    manager.save_last(1, params, {"step": np.asarray(1)}, {"next_step": 1}, config, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir, model


def clip_inputs(root: Path):
    seq = root / "val" / "clip"
    frames = np.stack([read_png(seq / "blur" / f"{n}.png") for n in NAMES]).astype(np.float32) / 255.0
    counts = np.stack([np.load(seq / "spike_vox" / f"{n}.npy") for n in NAMES]).transpose(0, 2, 3, 1)
    return frames, voxelize.normalize(counts, STATS["mean"], STATS["std"])


def run_script(script, *args):
    return script.main([str(a) for a in args] + ["--noprogress"])


def spike_args(dataset, checkpoint, out, kind="dat"):
    folder = "spike" if kind == "dat" else "spike_vox"
    return ["--checkpoint", checkpoint[0], "--which", "last", "--input_blur", dataset / "val/clip/blur",
            f"--input_spike{'' if kind == 'dat' else '_vox'}", dataset / "val/clip" / folder, "--output", out,
            *TILE_ARGS]


def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------
# Successful runs


@pytest.fixture(scope="module")
def dat_run(script, dataset, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dat"
    code = run_script(script, *spike_args(dataset, checkpoint, out), "--gt", dataset / "val/clip/sharp")
    return code, out


def test_restores_dat_spikes_to_pngs_named_like_the_inputs(dat_run, dataset, checkpoint):
    code, out = dat_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in NAMES] + ["metrics.json"])
    assert leftovers(out.parent) == []
    # PNGs round-trip to the restored values within 8-bit quantisation.
    frames, spikes = clip_inputs(dataset)
    restored = restore_video(make_apply_fn(checkpoint[1]), frames, spikes, tile=TILE, spike_scale=2)
    for t, name in enumerate(NAMES):
        png = read_png(out / f"{name}.png").astype(np.float64) / 255.0
        assert png.shape == (112, 112, 3)
        assert np.abs(png - np.clip(restored[t], 0, 1)).max() <= 0.5 / 255 + 1e-5, name
    assert np.abs(restored - frames).mean() > 0.05  # the model did something: the check above is not vacuous


def test_metrics_json_has_timing_memory_tiles_and_kair_metrics(dat_run, dataset):
    _, out = dat_run
    report = json.loads((out / "metrics.json").read_text())
    assert report["timing"]["seconds_per_frame"] > 0 and report["timing"]["compile_seconds"] >= 0
    assert report["timing"]["measured"] is True
    assert report["memory"]["peak_rss_bytes"] > 100 * 2 ** 20
    assert report["tile"] == TILE.to_dict()
    assert report["tiling"]["num_tiles"] == 4 and report["tiling"]["tile_shape_thw"] == [3, 64, 64]
    assert report["model"]["kind"] == "training_checkpoint"
    assert report["trained_clip_length"] is None   # its saved config does not say (the loaded one has defaults)
    spikes = report["input"]["spikes"]
    assert spikes["format"] == "dat" and spikes["seq"] == SEQ and spikes["spike_bins"] == 4
    assert spikes["voxel_stats"]["path"].endswith("voxel_stats.json")
    per_frame = report["metrics"]["per_frame"]
    assert [row["name"] for row in per_frame] == [f"{n}.png" for n in NAMES]
    for row in per_frame:
        png = read_png(out / row["name"])
        gt = read_png(dataset / "val/clip/sharp" / row["name"])
        assert row["psnr"] == pytest.approx(metrics.psnr(png, gt), abs=1e-9)
        assert row["ssim_y"] == pytest.approx(metrics.ssim(png, gt, y_channel=True), abs=1e-9)
        blur = read_png(dataset / "val/clip/blur" / row["name"])
        assert row["input_ssim"] == pytest.approx(metrics.ssim(blur, gt), abs=1e-9)
        # one key schema with training's validation: its metrics, and input_* of the blurry frames
        assert set(row) == {"name", *METRIC_NAMES, *(f"input_{k}" for k in METRIC_NAMES)}
    for key in ("psnr", "ssim", "psnr_y", "ssim_y", "input_psnr", "input_psnr_y", "input_ssim", "input_ssim_y"):
        assert report["metrics"]["average"][key] == pytest.approx(np.mean([row[key] for row in per_frame]))


def test_voxel_npy_input_gives_the_same_frames(script, dat_run, dataset, checkpoint, tmp_path):
    out = tmp_path / "vox"
    assert run_script(script, *spike_args(dataset, checkpoint, out, "vox")) == 0
    for name in NAMES:
        np.testing.assert_array_equal(read_png(out / f"{name}.png"), read_png(dat_run[1] / f"{name}.png"))
    assert json.loads((out / "metrics.json").read_text())["input"]["spikes"]["format"] == "npy"


def test_estimate_mode_times_windows_and_writes_no_frames(script, dataset, checkpoint, tmp_path):
    out = tmp_path / "estimate"
    assert run_script(script, *spike_args(dataset, checkpoint, out), "--estimate_tiles", "2") == 0
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    estimate = json.loads((out / "metrics.json").read_text())["estimate"]
    assert estimate["windows_timed"] == 2 and estimate["num_windows"] == 4
    assert estimate["estimated_restore_seconds"] == pytest.approx(4 * estimate["median_seconds_per_window"])


@pytest.fixture(scope="module")
def official_clip(load_fixture, tmp_path_factory):
    z = load_fixture("vrt_small_seed0.npz")
    folder = tmp_path_factory.mktemp("official") / "blur"
    frames = to_u8(np.asarray(z["input"])[0].transpose(0, 2, 3, 1))
    for t in range(frames.shape[0]):
        save_png(folder / f"frame_{t + 1:04d}.png", frames[t])  # names need not be numbers without spikes
    return folder, frames, json.loads(str(z["config_json"]))


def test_official_vrt_weights_with_a_preset(script, official_clip, fixture_file, tmp_path):
    from vrtspike_jax.convert import load_official_vrt

    folder, frames_u8, kwargs = official_clip
    weights = fixture_file("vrt_small_seed0.npz")
    out = tmp_path / "preset"
    assert run_script(script, "--checkpoint", weights, "--vrt_preset", "small_fixture", "--input_blur", folder,
                      "--output", out, "--tile", "0", "0") == 0
    restored = restore_video(make_apply_fn(load_official_vrt(weights, **kwargs)),
                             frames_u8.astype(np.float32) / 255.0, tile=TileSpec())
    names = sorted(p.stem for p in folder.iterdir())
    assert sorted(p.stem for p in out.glob("*.png")) == names
    for t, name in enumerate(names):
        png = read_png(out / f"{name}.png").astype(np.float64) / 255.0
        assert np.abs(png - np.clip(restored[t], 0, 1)).max() <= 0.5 / 255 + 1e-5
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"]["kind"] == "official_vrt" and report["input"]["spikes"] == {"used": False}

    # The same architecture from --official_config (JSON), or from the .npz's own config_json.
    for extra, name in ((["--official_config", json.dumps(kwargs)], "json"), ([], "embedded")):
        other = tmp_path / name
        assert run_script(script, "--checkpoint", weights, *extra, "--input_blur", folder, "--output", other,
                          "--tile", "0", "0") == 0
        for png in out.glob("*.png"):
            np.testing.assert_array_equal(read_png(other / png.name), read_png(png))


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one clear line, before any compute, nothing written


@pytest.fixture
def no_compute(script, monkeypatch):
    def computed(*args, **kwargs):
        pytest.fail("the run started computing although the input is bad")

    monkeypatch.setattr(script, "run", computed)


def copy_clip(dataset: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    return root


def expect_refusal(script, capsys, args, *fragments):
    out = Path(args[args.index("--output") + 1])
    existed = out.exists()
    before = sorted(p.name for p in out.iterdir()) if existed else None
    code = run_script(script, *args)
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1, err
    for fragment in fragments:
        assert fragment in line[0], (fragment, line[0])
    if existed:
        assert sorted(p.name for p in out.iterdir()) == before
    else:
        assert not out.exists()
    assert leftovers(out.parent) == []
    return line[0]


def test_missing_spike_file(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    (root / "val/clip/spike/000001.dat").unlink()
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"),
                   "frame-count mismatch", "has 3 frames", "has 2 .dat files",
                   f"missing spike file(s) {root / 'val/clip/spike/000001.dat'}")


def test_more_spike_files_than_frames(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    shutil.copy(root / "val/clip/spike_vox/000002.npy", root / "val/clip/spike_vox/000003.npy")
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out", "vox"),
                   "has 3 frames", "has 4 .npy files", "without a frame: 000003.npy")


def test_frames_of_different_sizes(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    save_png(root / "val/clip/blur/000002.png", np.zeros((112, 120, 3), np.uint8))
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"),
                   str(root / "val/clip/blur/000002.png"), "112x120 (HxW)", "000000.png is 112x112")


def test_a_frame_that_is_not_an_image(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    (root / "val/clip/blur/000001.png").write_bytes(b"this is not a PNG")
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"),
                   str(root / "val/clip/blur/000001.png"), "not a readable image")


def test_a_truncated_png(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    path = root / "val/clip/blur/000002.png"
    path.write_bytes(path.read_bytes()[:200])  # a valid header, cut pixel data: found by the full decode
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"), str(path), "not a readable image")


def test_truncated_dat(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    path = root / "val/clip/spike/000000.dat"
    path.write_bytes(path.read_bytes()[:-5])
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"), str(path),
                   "not a multiple of 392 bytes per 56x56 (WxH) frame")


def test_missing_alignment_line(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    rows, _, _ = layout.read_alignment(root / "alignment.csv")
    layout.write_alignment(root / "alignment.csv", [r for r in rows.values() if r.frame_idx != 2])
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"),
                   "no line for seq=val/clip frame_idx=2", "000002.dat")


def test_spikes_that_do_not_cover_the_exposure(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    rows, _, _ = layout.read_alignment(root / "alignment.csv")
    moved = [layout.AlignmentRow(r.seq, r.frame_idx, r.t0, r.t1 + 20 * (r.frame_idx == 1), r.spike_t0)
             for r in rows.values()]
    layout.write_alignment(root / "alignment.csv", moved)
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"),
                   "000001.dat", "does not cover the exposure window [102, 129]")


def test_voxels_of_the_wrong_shape(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    np.save(root / "val/clip/spike_vox/000001.npy", np.zeros((4, 28, 28), np.uint8))
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out", "vox"),
                   "000001.npy", "(4, 28, 28)", "expected (K, H/f, W/f) = (4, 56, 56)")


def test_ground_truth_of_another_size(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    save_png(root / "val/clip/sharp/000001.png", np.zeros((56, 56, 3), np.uint8))
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out") + ["--gt", root / "val/clip/sharp"],
                   "000001.png", "ground-truth frame of another size: 56x56 (HxW), expected 112x112")


def test_spike_model_without_spikes(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    expect_refusal(script, capsys, ["--checkpoint", checkpoint[0], "--which", "last", "--input_blur",
                                    dataset / "val/clip/blur", "--output", tmp_path / "out"],
                   "fuses spike features", "--input_spike")


def test_missing_voxel_statistics(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    root = copy_clip(dataset, tmp_path)
    (root / "voxel_stats.json").unlink()
    expect_refusal(script, capsys, spike_args(root, checkpoint, tmp_path / "out"), "--spike_stats", "--voxel_stats")


def test_spike_stats_flag_keeps_its_older_name(script, dataset, checkpoint, tmp_path):
    args = [str(a) for a in spike_args(dataset, checkpoint, tmp_path / "out")]
    for flag in ("--spike_stats", "--voxel_stats"):
        assert script.parse_args(args + [flag, "stats.json"]).spike_stats == "stats.json"


def test_official_weights_of_another_architecture(script, official_clip, fixture_file, tmp_path, capsys, no_compute):
    folder, _, kwargs = official_clip
    other = json.dumps({**kwargs, "mlp_ratio": 4.0})   # every MLP of the weights has another shape
    expect_refusal(script, capsys, ["--checkpoint", fixture_file("vrt_small_seed0.npz"), "--official_config", other,
                                    "--input_blur", folder, "--output", tmp_path / "out"],
                   "vrt_small_seed0.npz: cannot load into VRT", "more problem(s)")   # the list, shortened


def test_tiles_that_do_not_fit_the_spikes(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    args = spike_args(dataset, checkpoint, tmp_path / "out")
    args[args.index("--tile_overlap") + 2] = "15"
    expect_refusal(script, capsys, args, "multiples of spike_scale=2")


def test_existing_output_is_kept_without_overwrite(script, dataset, checkpoint, tmp_path, capsys, no_compute):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_refusal(script, capsys, spike_args(dataset, checkpoint, out), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------------------------
# Failures during compute leave nothing behind


def test_failure_during_compute_leaves_no_partial_output(script, dataset, checkpoint, tmp_path, capsys,
                                                         monkeypatch):
    real = script.inference.make_apply_fn
    calls = []

    class FailingApply:
        def __init__(self, model):
            self.inner = real(model)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("device lost")
            return self.inner(*args)

    monkeypatch.setattr(script.inference, "make_apply_fn", FailingApply)
    out = tmp_path / "out"
    assert run_script(script, *spike_args(dataset, checkpoint, out)) == 3
    assert "device lost" in capsys.readouterr().err
    assert len(calls) == 3 and not out.exists() and leftovers(tmp_path) == []

    # With --overwrite, the old output survives a failed run untouched.
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    calls.clear()
    assert run_script(script, *spike_args(dataset, checkpoint, out), "--overwrite") == 3
    assert [p.name for p in out.iterdir()] == ["old.png"] and leftovers(tmp_path) == []


def test_bad_voxel_values_found_while_running_leave_no_output(script, dataset, checkpoint, tmp_path, capsys):
    root = copy_clip(dataset, tmp_path)
    np.save(root / "val/clip/spike_vox/000002.npy", -np.ones((4, 56, 56), np.int16))  # header fine, values not
    out = tmp_path / "out"
    assert run_script(script, *spike_args(root, checkpoint, out, "vox")) == 3
    assert "negative spike counts" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_output_after_success(script, dataset, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"stale")
    assert run_script(script, *spike_args(dataset, checkpoint, out), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.png" for n in NAMES] + ["metrics.json"])
    assert leftovers(tmp_path) == []


def test_a_window_that_does_not_fit_in_memory_is_refused_before_compute(script, dataset, checkpoint, tmp_path,
                                                                       capsys, monkeypatch):
    monkeypatch.setattr(script.restore, "available_memory", lambda: (2 ** 20, "available RAM"))
    monkeypatch.setattr(script, "run", lambda *a, **k: pytest.fail("computed although the window cannot fit"))
    out = tmp_path / "out"
    assert run_script(script, *spike_args(dataset, checkpoint, out)) == 2
    err = capsys.readouterr().err
    assert "one 3x64x64 window of this model needs" in err and "0.0 GiB are available RAM" in err
    assert "--tile 2 64" in err  # a 64 px tile cannot shrink: fewer frames per chunk
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# Reported, not dropped


def test_frames_equal_to_their_ground_truth_are_reported_as_infinite_psnr(script, dat_run, dataset, checkpoint,
                                                                        tmp_path, capsys):
    """Ground truth = the restored PNGs, except one changed pixel in the last two frames: the first frame's PSNR is
    infinite; it is listed by name and left out of the average (which says so), not silently dropped."""
    code, out = dat_run
    assert code == 0
    gt = tmp_path / "gt"
    gt.mkdir()
    for name in NAMES:
        image = read_png(out / f"{name}.png").copy()
        if name != NAMES[0]:
            image[0, 0, 0] ^= 1
        save_png(gt / f"{name}.png", image)
    capsys.readouterr()
    assert run_script(script, *spike_args(dataset, checkpoint, tmp_path / "again"), "--gt", gt) == 0
    report = json.loads((tmp_path / "again" / "metrics.json").read_text())
    rows = report["metrics"]["per_frame"]
    assert rows[0]["psnr"] is None and {"psnr", "psnr_y"} <= set(rows[0]["infinite"])
    assert all("infinite" not in row for row in rows[1:])
    average = report["metrics"]["average"]
    assert average["psnr_infinite_frames"] == [f"{NAMES[0]}.png"]
    assert average["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows[1:]]))
    notes = [line for line in capsys.readouterr().err.splitlines() if "infinite PSNR" in line]
    assert any(line.startswith("note: psnr: 1 frame(s)") and "the other 2" in line for line in notes), notes


def test_a_gap_in_the_frame_numbers_is_a_warning(script, dataset, checkpoint, tmp_path):
    root = copy_clip(dataset, tmp_path)
    for folder, suffix in (("blur", ".png"), ("spike_vox", ".npy")):
        (root / "val/clip" / folder / f"000002{suffix}").rename(root / "val/clip" / folder / f"000004{suffix}")
    args = script.parse_args([str(a) for a in spike_args(root, checkpoint, tmp_path / "out", "vox")])
    prep = script.restore.prepare(args)
    assert len(prep.warnings) == 1 and "000001 -> 000004" in prep.warnings[0], prep.warnings
    assert not (tmp_path / "out").exists()
