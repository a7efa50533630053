"""Converters, on small replicas of the Spk-X4K1000FPS and Spk-GoPro layouts that these tests write.

Spike frames in the replicas carry their own tick in their first row (bit j of pixel (0, j)), so the tests can
read back which source frame each converted spike frame is: that is the time base, checked exactly.
"""
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import converters, input_pipeline, layout, prepare, spike_dat, voxelize
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


SSDM_TRAIN = ("GOPR0372_07_00", "GOPR0374_11_00")


def make_ssdm_replica(root: Path, raw_indices=(6, 19, 32)):
    """{train,test}/{blur_data,sharp_data,spike_data}/<seq>/<raw index>.png|.dat as S-SDM builds them."""
    for split, seq in [("train", name) for name in SSDM_TRAIN] + [("test", "GOPR0384_11_00")]:
        for raw_index in raw_indices:
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
    assert not report.problems and report.frames == 6
    assert sum("no spikes" in n for n in report.notes) == 3
    info = layout.read_dataset_info(dst)
    assert (info.spike_scale, info.tick_rate_hz, info.shared_clock) == (4, 1920.0, True)
    rows, _, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    # The official test split stays test; val is one of the two train sequences (never a test one).
    assert report.val_sequences == converters.carve_val(list(SSDM_TRAIN), 0.1) and len(report.val_sequences) == 1
    val_seq, = report.val_sequences
    train_seq, = set(SSDM_TRAIN) - {val_seq}
    assert {seq for seq, _ in rows} == {"test/GOPR0384_11_00", f"val/{val_seq}", f"train/{train_seq}"}
    row = rows[("test/GOPR0384_11_00", 2)]                         # raw index 32, third blurry frame
    assert (row.t0, row.t1, row.spike_t0) == (8 * 32 - 48, 8 * 32 + 48, 8 * 32 - 68)
    assert ("test/GOPR0384_11_00", 0) not in rows                  # raw index 6: no spikes, its number stays free
    spikes = spike_dat.read_dat(dst / "test" / "GOPR0384_11_00" / "spike" / "000002.dat", 8, 8)
    # 8 pixels per row hold the tick modulo 256
    assert _ticks_of(spikes) == [t % 256 for t in range(int(row.spike_t0), int(row.t1) + 21)]
    result = prepare.prepare_root(prepare.PrepareOptions(root=dst, progress=False), log=lambda s: None)
    assert result.exit_code == 0
    assert result.kept_sequences == {"train": 1, "val": 1, "test": 1}
    counts = voxelize.count_spikes(spikes, row.frame_times(137), row.t0, row.t1, 32)
    np.testing.assert_array_equal(np.load(dst / "test" / "GOPR0384_11_00" / "spike_vox" / "000002.npy"), counts)
    assert counts.sum() == spikes[20:117].sum()                    # the 20 + 20 margin frames are dropped
    # A spike file of another length is a frame-count mismatch.
    bad = src / "train" / "spike_data" / "GOPR0372_07_00" / "000032.dat"
    spike_dat.write_dat(bad, _stream(120, 8, 8))
    report = converters.convert(src, tmp_path / "ours2", converters.ConvertOptions(progress=False))
    assert [p.kind for p in report.problems] == ["frame_count"]
    assert "120 spike frames of 8x8 (WxH), expected 137 (20 + 97 + 20)" in report.problems[0].message


GOPRO_TRAIN = ("GOPR0372_07_00", "GOPR0374_11_00")


def make_spkdeblurnet_replica(root: Path, names=(1, 2)):
    """GOPRO_Large/{train,test}/<seq>/{blur_gamma,sharp}/<name>.png + GOPRO_Large_spike_seq/.../spike/<name>.dat."""
    for split, seq in [("train", name) for name in GOPRO_TRAIN] + [("test", "GOPR0384_11_00")]:
        for i in names:
            _png(root / "GOPRO_Large" / split / seq / "blur_gamma" / f"{i:06d}.png",
                 RNG.integers(0, 256, size=(32, 32, 3)))
            _png(root / "GOPRO_Large" / split / seq / "sharp" / f"{i:06d}.png", RNG.integers(0, 256, size=(32, 32, 3)))
            spike_dat.write_dat(root / "GOPRO_Large_spike_seq" / split / seq / "spike" / f"{i:06d}.dat",
                                _stream(70, 16, 16))
        (root / "GOPRO_Large" / split / ".DS_Store").write_bytes(b"\0")


def test_spkdeblurnet_gopro_conversion(tmp_path):
    src, dst = tmp_path / "gopro", tmp_path / "ours"
    make_spkdeblurnet_replica(src)
    assert converters.detect_layout(src) == "spk_gopro_spkdeblurnet"
    report = converters.convert(src, dst, converters.ConvertOptions(progress=False, val_from_train=1))
    assert not report.problems and report.frames == 6
    assert report.val_sequences == converters.carve_val(list(GOPRO_TRAIN), 1)
    rows, _, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    assert {seq for seq, _ in rows} == {f"train/{(set(GOPRO_TRAIN) - set(report.val_sequences)).pop()}",
                                         f"val/{report.val_sequences[0]}", "test/GOPR0384_11_00"}
    row = rows[("test/GOPR0384_11_00", 0)]
    assert (row.t0, row.t1, row.spike_t0) == (7, 62, 0)              # SpkDeblurNet's [n//2 - 28, n//2 + 28)
    assert layout.read_dataset_info(dst).shared_clock is False       # ticks are local to each spike file
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


# ------------------------------------------------------------------------ gaps: a frame dropped mid-sequence


def _prepared_clips(root: Path, split: str, spike_scale: int, clip_length: int = 2):
    """Frame numbers of every training clip of `split`, and its index, after prepare_data."""
    result = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False), log=lambda s: None)
    assert not result.fatal, [p.message for p in result.problems]
    index = input_pipeline.build_index(root, split, clip_length, 32, spike_scale)
    return [index.row_frame_idx[index.clip_rows(c)].tolist() for c in range(index.num_clips)], index


def _assert_drop_leaves_a_gap(dst: Path, seq: str, split: str, kept: list, spike_scale: int, caplog, fragment: str):
    rows, _, _ = layout.read_alignment(dst / layout.ALIGNMENT_CSV)
    assert sorted(idx for s, idx in rows if s == f"{split}/{seq}") == kept       # the dropped number stays free
    assert any(fragment in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), \
        "the dropped frame is logged"
    clips, index = _prepared_clips(dst, split, spike_scale)
    ours = [c for c, start in zip(clips, index.clip_start) if index.seq_names[index.row_seq[start]] == f"{split}/{seq}"]
    # Only frames consecutive in the source form a clip: never one across the dropped frame.
    assert ours == [[a, b] for a, b in zip(kept, kept[1:]) if b == a + 1]
    return index


def test_x4k_frame_dropped_mid_sequence_leaves_a_gap(tmp_path, caplog):
    src, dst = tmp_path / "x4k", tmp_path / "ours"
    ticks, size = 78, 16                                  # centres 16, 31, 46, 61 (15 apart, 33-tick windows)
    frames = RNG.integers(0, 256, size=(ticks, size, size, 3))
    for split, scene in (("train", "occ008.320_f2881"), ("val", "Sample_0_f0200")):
        for t in range(ticks):
            _png(src / f"{split}_fullRGB" / "002" / scene / f"{_x4k_name(t)}.png", frames[t])
        for c in (16, 31, 46, 61):
            _png(src / f"{split}_blurry_33" / "002" / scene / f"{_x4k_name(c)}.png", frames[c - 16:c + 17].mean(0))
        spike_dat.write_dat(src / f"{split}_spike_2xds" / "002" / scene / "spike.dat", _stream(ticks, 8, 8))
    missing = src / "train_fullRGB" / "002" / "occ008.320_f2881" / f"{_x4k_name(31)}.png"
    missing.unlink()                                      # no ground truth for the second blurry frame
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        report = converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert [p.kind for p in report.problems] == ["missing_sharp"]
    _assert_drop_leaves_a_gap(dst, "002_occ008.320_f2881", "train", [0, 2, 3], 2, caplog, str(missing))


def test_ssdm_frame_dropped_mid_sequence_leaves_a_gap(tmp_path, caplog):
    src, dst = tmp_path / "ssdm", tmp_path / "ours"
    make_ssdm_replica(src, raw_indices=(6, 19, 32, 45, 58))
    train_seq, = set(SSDM_TRAIN) - set(converters.carve_val(list(SSDM_TRAIN), 0.1))
    missing = src / "train" / "spike_data" / train_seq / "000032.dat"
    missing.unlink()                                      # a spike file missing mid-sequence
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        report = converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert [p.kind for p in report.problems] == ["frame_count"]
    # Raw index 6 (position 0) has no spikes by S-SDM's design; 32 (position 2) lost its spike file.
    _assert_drop_leaves_a_gap(dst, train_seq, "train", [1, 3, 4], 4, caplog, str(missing))


def test_spkdeblurnet_frame_dropped_mid_sequence_leaves_a_gap(tmp_path, caplog):
    src, dst = tmp_path / "gopro", tmp_path / "ours"
    make_spkdeblurnet_replica(src, names=(1, 2, 3, 4))
    bad = src / "GOPRO_Large_spike_seq" / "test" / "GOPR0384_11_00" / "spike" / "000002.dat"
    bad.write_bytes(bad.read_bytes()[:-3])                # a truncated spike file mid-sequence
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        report = converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert [p.kind for p in report.problems] == ["truncated_dat"]
    index = _assert_drop_leaves_a_gap(dst, "GOPR0384_11_00", "test", [0, 2, 3], 2, caplog, str(bad))
    assert index.window_breaks == 0                       # local clocks: the frame numbers alone decide


# ---------------------------------------------------------------------------------- val carved from train


def test_carve_val_is_deterministic_by_whole_sequence():
    names = [f"GOPR{n:04d}_11_00" for n in range(22)]
    tenth = converters.carve_val(names, 0.1)
    assert len(tenth) == 2 and set(tenth) <= set(names)
    assert converters.carve_val(list(reversed(names)), 0.1) == tenth          # independent of listing order
    assert converters.carve_val(names, 0.1) == tenth                           # and of the run
    three = converters.carve_val(names, 3)
    assert len(three) == 3 and set(tenth) <= set(three)                        # a ranking: more takes a superset
    assert set(converters.carve_val(names + ["GOPR9999_00_00"], 3)) - set(three) <= {"GOPR9999_00_00"}
    assert converters.carve_val(names, 0) == [] and converters.carve_val(["a"], 0.5) == []   # train keeps one
    assert len(converters.carve_val(["a", "b", "c"], 0.01)) == 1 and len(converters.carve_val(["a", "b"], 5)) == 1
    for bad in (-1, 2.5, float("nan")):
        with pytest.raises(DataError) as err:
            converters.carve_val(names, bad)
        assert err.value.kind == "config" and "val_from_train" in str(err.value)


def test_gopro_val_from_train_zero_and_bad_values(tmp_path):
    src = tmp_path / "ssdm"
    make_ssdm_replica(src)
    report = converters.convert(src, tmp_path / "ours", converters.ConvertOptions(progress=False, val_from_train=0))
    rows, _, _ = layout.read_alignment(tmp_path / "ours" / layout.ALIGNMENT_CSV)
    assert report.val_sequences == [] and {seq.split("/")[0] for seq, _ in rows} == {"train", "test"}
    assert any("no val split carved" in n for n in report.notes)
    with pytest.raises(DataError, match="val_from_train must be 0, a fraction in \\(0, 1\\) or a whole number"):
        converters.convert(src, tmp_path / "o2", converters.ConvertOptions(progress=False, val_from_train=1.5))
    assert not (tmp_path / "o2").exists()                 # refused before anything is written
    script = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "--noprogress", "--workers", "1"]
    proc = subprocess.run(script + ["--convert_from", str(src), "--root", str(tmp_path / "o3"), "--val_from_train",
                                    "2.5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--val_from_train must be 0" in proc.stderr and "2.5" in proc.stderr


def test_resume_refuses_a_destination_of_another_converter_version(tmp_path):
    src, dst = tmp_path / "ssdm", tmp_path / "ours"
    make_ssdm_replica(src)
    converters.convert(src, dst, converters.ConvertOptions(progress=False))
    raw = json.loads((dst / layout.DATASET_JSON).read_text())
    assert raw["converter_version"] == converters.CONVERTER_VERSION
    del raw["converter_version"]                          # as written before frame numbers kept their gaps
    (dst / layout.DATASET_JSON).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="written by converter version 1, this is version 2") as err:
        converters.convert(src, dst, converters.ConvertOptions(progress=False))
    assert err.value.kind == "bad_manifest"
