"""The embedded dataset: deterministic, blur visibly strong, spikes from the same sub-frames, safe concurrent build."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np

from data_pipelines import layout, simulate, spike_dat, synthetic
from data_pipelines.testing import TINY_SPEC

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
    code = ("import sys, dataclasses; from data_pipelines import synthetic; from data_pipelines.testing import "
            "TINY_SPEC; spec = dataclasses.replace(TINY_SPEC, train_frames=5, val_frames=5); "
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
