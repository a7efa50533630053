"""Converters, on small replicas of the Spk-X4K1000FPS and Spk-GoPro layouts that these tests write.

Spike frames in the replicas carry their own tick in their first row (bit j of pixel (0, j)), so the tests can
read back which source frame each converted spike frame is: that is the time base, checked exactly.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import converters, layout, prepare, spike_dat, voxelize
from data_pipelines.errors import DataError

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode="RGB").save(path)


def _stream(num_frames: int, height: int, width: int, first_tick: int = 0) -> np.ndarray:
    """Random spikes whose frame j has the tick first_tick + j written in binary in row 0."""
    spikes = RNG.random((num_frames, height, width)) < 0.3
    for j in range(num_frames):
        tick = first_tick + j
        spikes[j, 0, :] = False
        for bit in range(min(width, 12)):
            spikes[j, 0, bit] = bool((tick >> bit) & 1)
    return spikes


def _ticks_of(spikes: np.ndarray) -> list:
    width = min(spikes.shape[2], 12)
    return [int(sum(int(spikes[j, 0, b]) << b for b in range(width))) for j in range(len(spikes))]


def _x4k_name(tick: int) -> str:
    base, rest = divmod(tick, 4)
    return f"{base:04d}" if rest == 0 else f"{base:04d}_{rest - 1:03d}"


def make_x4k_replica(root: Path, length: int = 33):
    """{train,val}_fullRGB / _blurry_33 / _spike_2xds as SpkDeblurNet reads them; returns the centres written."""
    scenes = {"train": [("002", "occ008.320_f2881", 49, 16), ("003", "occ011.055_f1057", 49, 16)],
              "val": [("001", "Sample_0_f0200", 45, 24)]}
    centres = {}
    for split, items in scenes.items():
        for sub, scene, ticks, size in items:
            frames = RNG.integers(0, 256, size=(ticks, size, size, 3))
            frames[:, 0, 0, 0] = np.arange(ticks)            # the sharp frame knows its tick too
            for t in range(ticks):
                _png(root / f"{split}_fullRGB" / sub / scene / f"{_x4k_name(t)}.png", frames[t])
            wanted = [16, 31, 36] if ticks == 49 else [16, 28]   # 36 runs past the end: must be dropped
            for c in wanted:
                blur = frames[c - length // 2: c + length // 2 + 1].mean(0)
                _png(root / f"{split}_blurry_{length}" / sub / scene / f"{_x4k_name(c)}.png", np.round(blur))
            centres[f"{split}/{sub}_{scene}"] = wanted
            spike_dat.write_dat(root / f"{split}_spike_2xds" / sub / scene / "spike.dat",
                                _stream(ticks, size // 2, size // 2))
    return centres


def test_x4k_names_to_ticks():
    assert [converters.x4k_tick(n) for n in ("0000", "0000_000", "0000_002", "0001", "0007_002")] == [0, 1, 3, 4, 31]


def test_x4k_conversion_time_base_and_ground_truth(tmp_path):
    src, dst = tmp_path / "x4k", tmp_path / "ours"
    centres = make_x4k_replica(src)
    assert converters.detect_layout(src) == "spk_x4k1000fps"
    report = converters.convert(src, dst, converters.ConvertOptions(progress=False, spike_margin=2))
    assert not report.problems, [p.message for p in report.problems]
    assert report.frames == 6 and report.sequences == 3
    assert sum("run past the spike stream" in n for n in report.notes) == 2     # tick 36 in both train scenes
    info = layout.read_dataset_info(dst)
    assert (info.spike_scale, info.tick_rate_hz, info.source_layout) == (2, 4000.0, "spk_x4k1000fps")
    rows, problems, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    assert not problems
    for seq, wanted in centres.items():
        kept = [c for c in wanted if c != 36]
        size = 16 if seq.startswith("train") else 24
        for frame_idx, c in enumerate(kept):
            row = rows[(seq, frame_idx)]
            assert (row.t0, row.t1) == (c - 16, c + 16)
            assert row.source.endswith(f"/{_x4k_name(c)}.png")
            stem = layout.frame_stem(frame_idx)
            spikes = spike_dat.read_dat(dst / seq / "spike" / f"{stem}.dat", size // 2, size // 2)
            first = max(0, c - 16 - 2)
            assert row.spike_t0 == first
            assert _ticks_of(spikes) == list(range(first, min(c + 16 + 2, 48 if size == 16 else 44) + 1))
            sharp = layout.load_png(dst / seq / "sharp" / f"{stem}.png")
            assert sharp[0, 0, 0] == c                       # ground truth = the centre frame
    proc = prepare.prepare_root(prepare.PrepareOptions(root=dst, progress=False), log=lambda s: None)
    assert proc.exit_code == 0, [p.message for p in proc.problems]
    # The voxels count exactly the 33 frames of the window (the margin frames are dropped).
    seq = "train/002_occ008.320_f2881"
    spikes = spike_dat.read_dat(dst / seq / "spike" / "000001.dat", 8, 8)
    vox = np.load(dst / seq / "spike_vox" / "000001.npy")
    np.testing.assert_array_equal(vox.sum(0), spikes[2:35].sum(0))
    # Resume: a second conversion finds every frame written and rewrites none of them.
    written = {p: p.stat().st_mtime_ns for p in dst.rglob("*") if p.suffix in (".png", ".dat")}
    converters.convert(src, dst, converters.ConvertOptions(progress=False, spike_margin=2))
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_x4k_problems_are_reported_not_padded(tmp_path):
    src = tmp_path / "x4k"
    make_x4k_replica(src)
    (src / "train_fullRGB" / "002" / "occ008.320_f2881" / "0007_002.png").unlink()      # GT of centre 31
    dat = src / "train_spike_2xds" / "003" / "occ011.055_f1057" / "spike.dat"
    dat.write_bytes(dat.read_bytes()[:-3])
    report = converters.convert(src, tmp_path / "ours", converters.ConvertOptions(progress=False))
    messages = [p.message for p in report.problems]
    assert len(messages) == 2
    assert any("0007_002.png" in m and "missing ground truth" in m for m in messages)
    assert any(str(dat) in m and "not a multiple of 8 bytes per 8x8" in m for m in messages)
    assert report.frames == 1 + 2


def make_ssdm_replica(root: Path):
    """{train,test}/{blur_data,sharp_data,spike_data}/<seq>/<raw index>.png|.dat as S-SDM builds them."""
    for split, seq in (("train", "GOPR0372_07_00"), ("test", "GOPR0384_11_00")):
        for raw_index in (6, 19, 32):
            image = RNG.integers(0, 256, size=(32, 32, 3))
            _png(root / split / "blur_data" / seq / f"{raw_index:06d}.png", image)
            _png(root / split / "sharp_data" / seq / f"{raw_index:06d}.png", image // 2)
            if raw_index != 6:                     # S-SDM simulates no spikes for the first blurry frame
                centre = 8 * raw_index
                spike_dat.write_dat(root / split / "spike_data" / seq / f"{raw_index:06d}.dat",
                                    _stream(137, 8, 8, first_tick=centre - 48 - 20))


def test_ssdm_gopro_conversion(tmp_path):
    src, dst = tmp_path / "ssdm", tmp_path / "ours"
    make_ssdm_replica(src)
    assert converters.detect_layout(src) == "spk_gopro_ssdm"
    report = converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert not report.problems and report.frames == 4
    assert sum("no spikes" in n for n in report.notes) == 2
    info = layout.read_dataset_info(dst)
    assert (info.spike_scale, info.tick_rate_hz) == (4, 1920.0)
    rows, _, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    row = rows[("val/GOPR0384_11_00", 1)]                          # raw index 32
    assert (row.t0, row.t1, row.spike_t0) == (8 * 32 - 48, 8 * 32 + 48, 8 * 32 - 68)
    spikes = spike_dat.read_dat(dst / "val" / "GOPR0384_11_00" / "spike" / "000001.dat", 8, 8)
    # 8 pixels per row hold the tick modulo 256
    assert _ticks_of(spikes) == [t % 256 for t in range(int(row.spike_t0), int(row.t1) + 21)]
    result = prepare.prepare_root(prepare.PrepareOptions(root=dst, progress=False), log=lambda s: None)
    assert result.exit_code == 0
    counts = voxelize.count_spikes(spikes, row.frame_times(137), row.t0, row.t1, 32)
    np.testing.assert_array_equal(np.load(dst / "val" / "GOPR0384_11_00" / "spike_vox" / "000001.npy"), counts)
    assert counts.sum() == spikes[20:117].sum()                    # the 20 + 20 margin frames are dropped
    # A spike file of another length is a frame-count mismatch.
    bad = src / "train" / "spike_data" / "GOPR0372_07_00" / "000032.dat"
    spike_dat.write_dat(bad, _stream(120, 8, 8))
    report = converters.convert(src, tmp_path / "ours2", converters.ConvertOptions(progress=False))
    assert [p.kind for p in report.problems] == ["frame_count"]
    assert "120 spike frames of 8x8 (WxH), expected 137 (20 + 97 + 20)" in report.problems[0].message


def test_spkdeblurnet_gopro_conversion(tmp_path):
    src, dst = tmp_path / "gopro", tmp_path / "ours"
    for split in ("train", "test"):
        seq = src / "GOPRO_Large" / split / "GOPR0372_07_00"
        for i in (1, 2):
            _png(seq / "blur_gamma" / f"{i:06d}.png", RNG.integers(0, 256, size=(32, 32, 3)))
            _png(seq / "sharp" / f"{i:06d}.png", RNG.integers(0, 256, size=(32, 32, 3)))
            spike_dat.write_dat(src / "GOPRO_Large_spike_seq" / split / "GOPR0372_07_00" / "spike" / f"{i:06d}.dat",
                                _stream(70, 16, 16))
        (src / "GOPRO_Large" / split / ".DS_Store").write_bytes(b"\0")
    assert converters.detect_layout(src) == "spk_gopro_spkdeblurnet"
    report = converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert not report.problems and report.frames == 4
    rows, _, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    row = rows[("train/GOPR0372_07_00", 0)]
    assert (row.t0, row.t1, row.spike_t0) == (7, 62, 0)              # SpkDeblurNet's [n//2 - 28, n//2 + 28)
    assert prepare.prepare_root(prepare.PrepareOptions(root=dst, progress=False), log=lambda s: None).exit_code == 0


def test_layout_detection_and_cli(tmp_path):
    (tmp_path / "weird" / "images").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        converters.detect_layout(tmp_path / "weird")
    assert err.value.kind == "unknown_layout" and "found images" in str(err.value)
    src = tmp_path / "x4k"
    make_x4k_replica(src)
    script = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--noprogress", "--workers", "1"]
    proc = subprocess.run(script + ["--root", str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Spk-X4K1000FPS" in proc.stderr and "--convert_from" in proc.stderr
    proc = subprocess.run(script + ["--convert_from", str(src), "--root", str(tmp_path / "ours")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "converted Spk-X4K1000FPS" in proc.stdout and "0 problem(s)" in proc.stdout
    prepared = json.loads((tmp_path / "ours" / layout.PREPARED_JSON).read_text())
    assert prepared["spike_scale"] == 2 and len(prepared["splits"]["train"]) == 2
    proc = subprocess.run(script + ["--convert_from", str(tmp_path / "weird"), "--root", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown layout" in proc.stderr and "Traceback" not in proc.stderr
