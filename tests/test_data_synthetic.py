"""The embedded dataset: deterministic, blur visibly strong, spikes from the same sub-frames, safe concurrent build;
default specs keep their keys and bytes; test split, blur range, spike noise options, the bench variant."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import layout, simulate, spike_dat, synthetic
from helpers import TINY_SPEC

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    spec = dataclasses.replace(TINY_SPEC, train_sequences=2, train_frames=3, val_frames=2)
    a = _files(synthetic.make_dataset(tmp_path / "a", spec))
    b = _files(synthetic.make_dataset(tmp_path / "b", spec))
    c = _files(synthetic.make_dataset(tmp_path / "c", dataclasses.replace(spec, seed=1)))
    assert a == b
    assert a.keys() == c.keys() and any(a[k] != c[k] for k in a if k.suffix in (".png", ".dat"))


def _luma(path):
    return simulate.rgb_to_grey(layout.load_png(path).astype(np.float32) / 255.0)


def test_spikes_come_from_the_same_subframes_as_the_blur(tmp_path):
    for scale in (1, 2):
        spec = dataclasses.replace(TINY_SPEC, train_sequences=1, val_sequences=1, train_frames=4, val_frames=2,
                                   spike_scale=scale, spike_margin=3)
        root = synthetic.make_dataset(tmp_path / f"s{scale}", spec)
        rows, problems, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
        assert not problems and len(rows) == 6
        for (seq, idx), row in rows.items():
            stem = layout.frame_stem(idx)
            assert row.t1 - row.t0 == spec.subframes - 1 and row.spike_t0 == row.t0 - 3
            spikes = spike_dat.read_dat(root / seq / "spike" / f"{stem}.dat", 32 // scale, 32 // scale)
            assert len(spikes) == spec.subframes + 6
            inside = spikes[3:3 + spec.subframes].sum(0)
            # blur = mean of the exposure's sub-frames, so a pixel fires luma(blur) * L / threshold times, +-1.
            expected = simulate.downscale(_luma(root / seq / "blur" / f"{stem}.png"), scale) * spec.subframes
            assert np.abs(inside - expected / spec.threshold).max() <= 1.1
        info = layout.read_dataset_info(root)
        assert info.spike_scale == scale and info.source_layout == "synthetic"


def test_blur_is_strong_and_learnable_motion(tmp_path):
    spec = dataclasses.replace(TINY_SPEC, height=64, width=64, train_sequences=2, val_sequences=1, train_frames=4,
                               val_frames=2, blur_px=14.0)
    root = synthetic.make_dataset(tmp_path / "r", spec)
    psnrs = []
    for blur in sorted(root.glob("*/*/blur/*.png")):
        b = layout.load_png(blur).astype(np.float64) / 255
        s = layout.load_png(blur.parent.parent / "sharp" / blur.name).astype(np.float64) / 255
        psnrs.append(-10 * np.log10(np.mean((b - s) ** 2)))
        # Motion blur removes detail: the blurry frame has less gradient energy than its sharp frame.
        assert np.abs(np.diff(b, axis=1)).mean() < np.abs(np.diff(s, axis=1)).mean()
    assert np.mean(psnrs) < 30.0 and np.min(psnrs) > 12.0, psnrs
    # The camera moves: consecutive ground-truth frames differ.
    seq = sorted((root / "train").iterdir())[0]
    s0, s1 = (layout.load_png(seq / "sharp" / f"{i:06d}.png").astype(float) for i in (0, 1))
    assert np.abs(s0 - s1).mean() > 0.01


def test_concurrent_first_use_builds_once(tmp_path):
    code = (f"import sys, dataclasses; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from data_pipelines import synthetic; from helpers import TINY_SPEC; spec = dataclasses.replace(TINY_SPEC, train_frames=5, val_frames=5); "
            "print(synthetic.ensure_dataset(sys.argv[1], spec))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    root = Path(paths.pop())
    assert (root / "READY").exists() and (root / layout.PREPARED_JSON).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [root.name]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_script_builds_and_prepares(tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_dataset.py"), "--out", str(out),
                           "--height", "32", "--width", "32", "--train_sequences", "1", "--train_frames", "5",
                           "--val_frames", "5", "--subframes", "32", "--seed", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0 problem(s)" in proc.stdout and (out / layout.STATS_JSON).exists()
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_dataset.py"), "--out", str(out),
                          "--height", "30"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "multiples of 8" in bad.stderr and "Traceback" not in bad.stderr


def _digest(root: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# Keys and file digests computed with data_pipelines/synthetic.py before the test split, the blur range and the
# noise options existed: a spec that leaves the new fields at their defaults keeps its folder and its bytes.
_SMALL = dict(train_sequences=2, train_frames=2, val_frames=2, spike_margin=2)


def test_default_specs_keep_their_keys_and_bytes(tmp_path):
    from configs import baseline

    assert synthetic.SyntheticSpec().key() == "f83e9879d163"
    assert TINY_SPEC.key() == "e93c68b47462"
    assert synthetic.SyntheticSpec(**baseline.get_config("").data.embedded).key() == "12f5db12d784"
    assert synthetic.SyntheticSpec(**baseline.get_config("quick").data.embedded).key() == "f83e9879d163"
    assert synthetic.SyntheticSpec(**baseline.get_config("tiny").data.embedded).key() == "994f7a04484f"
    spec = dataclasses.replace(TINY_SPEC, **_SMALL)
    assert spec.key() == "ed8b0c8badaa"
    assert _digest(synthetic.make_dataset(tmp_path / "a", spec)) == \
        "d87bed62a44b422418cdc8669b8cbc143c53ca8ff46d563036a6ba4fab925b15"
    noisy = dataclasses.replace(spec, spike_scale=2, noise_std=0.05)
    assert noisy.key() == "455056483cdc"
    assert _digest(synthetic.make_dataset(tmp_path / "b", noisy)) == \
        "7bc112b270de99281edc9c5bd04dd7de18787dbb479442e2aa63bd446d8ccb12"
    # A new field away from its default is a new dataset.
    for change in (dict(test_sequences=1), dict(test_frames=3), dict(blur_px_max=9.0), dict(dark_current=0.01),
                   dict(threshold_std=0.05), dict(val_sequences=2)):
        assert dataclasses.replace(spec, **change).key() != spec.key(), change


def test_test_split_films_held_out_photos_and_leaves_train_and_val_unchanged(tmp_path):
    from data_pipelines import prepare

    photos = [synthetic.TRAIN_PHOTOS, synthetic.VAL_PHOTOS, synthetic.TEST_PHOTOS]
    assert synthetic.VAL_PHOTOS[0] == "motorcycle_left"
    assert all(not set(a) & set(b) for i, a in enumerate(photos) for b in photos[i + 1:])
    assert "motorcycle_right" not in sum(photos, ()) and "cat" not in sum(photos, ())   # twin / alias of chelsea
    for name in synthetic.VAL_PHOTOS + synthetic.TEST_PHOTOS:
        image = synthetic.load_photo(name)                     # ships with scikit-image: no download
        assert image.ndim == 3 and image.shape[-1] == 3 and image.std() > 0.05, name

    spec = dataclasses.replace(TINY_SPEC, **_SMALL)
    base = _files(synthetic.make_dataset(tmp_path / "base", spec))
    with_test = dataclasses.replace(spec, val_sequences=3, test_sequences=2, test_frames=3)
    root = synthetic.make_dataset(tmp_path / "t", with_test)
    files = _files(root)
    # Each sequence has its own random stream: adding sequences changes none of the existing ones.
    kept = {k: v for k, v in files.items() if k.parts[0] == "train" or k.parts[:2] == ("val", "00_motorcycle_left")}
    assert kept == {k: v for k, v in base.items() if k.parts[0] in ("train", "val")}
    assert sorted(p.name for p in (root / "val").iterdir()) == ["00_motorcycle_left", "01_camera", "02_brick"]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["00_coins", "01_gravel"]
    assert len(list((root / "test" / "00_coins" / "blur").glob("*.png"))) == 3
    rows, problems, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    assert not problems and sum(seq.startswith("test/") for seq, _ in rows) == 6
    result = prepare.prepare_root(prepare.PrepareOptions(root=root, num_bins=4, progress=False), log=lambda s: None)
    assert result.exit_code == 0 and result.kept_sequences.get("test") == 2


def test_blur_range_goes_from_mild_to_severe(tmp_path):
    spec = dataclasses.replace(TINY_SPEC, height=64, width=64, train_sequences=8, val_sequences=1, train_frames=3,
                               val_frames=2, blur_px=3.0)
    ranged = dataclasses.replace(spec, blur_px_max=24.0)
    assert [ranged.blur_level("train", i) for i in (0, 7)] == [3.0, 24.0] and ranged.blur_level("val", 0) == 3.0
    assert ranged.blur_level("train", 1) == pytest.approx(6.0) and spec.blur_level("train", 7) == 3.0
    a = _files(synthetic.make_dataset(tmp_path / "a", spec))
    b = _files(synthetic.make_dataset(tmp_path / "b", ranged))
    # The first sequence of each split keeps blur_px (same bytes); the last one is far blurrier.
    first = [k for k in a if len(k.parts) > 2 and (k.parts[1] == "00_astronaut" or k.parts[0] == "val")]
    assert first and all(a[k] == b[k] for k in first)

    def blur_psnr(files, seq):
        out = []
        for k in files:
            if k.parts[:2] == ("train", seq) and k.parts[2] == "blur":
                blur = np.asarray(_png(files[k]), np.float64) / 255
                sharp = np.asarray(_png(files[k.parent.parent / "sharp" / k.name]), np.float64) / 255
                out.append(-10 * np.log10(np.mean((blur - sharp) ** 2)))
        return np.mean(out)

    # Sequences 0 and 7 both film the astronaut: 3 px vs 24 px of motion per exposure.
    assert blur_psnr(b, "07_astronaut") < blur_psnr(a, "07_astronaut") - 3.0
    assert blur_psnr(b, "07_astronaut") < blur_psnr(b, "00_astronaut") - 3.0


def _png(data: bytes):
    import io

    from PIL import Image
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_spike_noise_options_reach_the_camera(tmp_path):
    base = dataclasses.replace(TINY_SPEC, train_sequences=1, val_sequences=1, train_frames=3, val_frames=2)
    dark = dataclasses.replace(base, dark_current=0.05)
    for spec, extra in ((base, 0.0), (dark, 0.05)):
        root = synthetic.make_dataset(tmp_path / f"d{extra}", spec)
        excess = []
        for dat in sorted(root.glob("*/*/spike/*.dat")):
            spikes = spike_dat.read_dat(dat, 32, 32)
            expected = _luma(dat.parent.parent / "blur" / f"{dat.stem}.png") * spec.subframes / spec.threshold
            darker = expected < 0.5 * spec.subframes      # where a dark event seldom meets a firing tick
            excess.append((spikes.sum(0) - expected)[darker].mean())
        # Dark spikes add about dark_current x L spikes per exposure to a pixel below half scale (1.6 here).
        assert np.mean(excess) == pytest.approx(extra * spec.subframes, abs=0.05 + 0.1 * extra * spec.subframes)
    fpn = synthetic.make_dataset(tmp_path / "fpn", dataclasses.replace(base, threshold_std=0.2))
    plain = synthetic.make_dataset(tmp_path / "plain", base)
    rel = []
    for root in (plain, fpn):
        dat = root / "train" / "00_astronaut" / "spike" / "000001.dat"
        counts = spike_dat.read_dat(dat, 32, 32).sum(0)
        expected = _luma(dat.parent.parent / "blur" / "000001.png") * base.subframes
        rel.append(np.std(counts - expected))
    assert rel[0] < 0.7 and rel[1] > 1.5 * rel[0]     # threshold mismatch: counts off by ~20% of the signal


def test_script_takes_the_new_fields_as_flags():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_synthetic_dataset",
                                                  REPO / "scripts" / "make_synthetic_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, parsed = script.parse_args(["--out", "x", "--test_sequences", "2", "--test_frames", "4", "--blur_px", "6",
                                   "--blur_px_max", "24", "--dark_current", "0.005", "--threshold_std", "0.05"])
    assert (parsed.test_sequences, parsed.test_frames, parsed.blur_px_max, parsed.dark_current,
            parsed.threshold_std) == (2, 4, 24.0, 0.005, 0.05)
    _, default = script.parse_args(["--out", "x"])
    assert default == synthetic.SyntheticSpec()


def test_bench_variant_is_the_fair_benchmark():
    from configs import baseline

    config = baseline.get_config("quick,bench")
    spec = synthetic.SyntheticSpec(**config.data.embedded)
    spec.validate()
    assert (spec.height, spec.width) == (128, 128) and config.data.spike_scale == spec.spike_scale == 2
    assert spec.val_sequences == 3 and spec.test_sequences == 3
    assert spec.blur_px < spec.blur_px_max and spec.noise_std > 0 and spec.dark_current > 0 and spec.threshold_std > 0
    # Data only: the model is quick's (its spike_scale follows config.data.spike_scale).
    quick = baseline.get_config("quick")
    assert config.model.spike_scale == 2
    quick.model.spike_scale = 2
    assert {k: v for k, v in config.items() if k not in ("data", "variant")} == \
        {k: v for k, v in quick.items() if k not in ("data", "variant")}
