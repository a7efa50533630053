"""Our layout: the alignment log (time base), dataset.json, listings and file readers with clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import layout
from data_pipelines.errors import DataError


def test_alignment_round_trip_keeps_exact_times(tmp_path):
    rows = [
        layout.AlignmentRow("train/a", 0, 0.0, 32.0, -4.0, 17, "src/0000.png"),
        layout.AlignmentRow("train/a", 1, 15.5, 47.5, 11.5, None, ""),
        layout.AlignmentRow("val/b", 3, 0.1, 1e9 + 0.25, 0.1, 0, "x"),
    ]
    path = tmp_path / "alignment.csv"
    layout.write_alignment(path, reversed(rows))
    assert path.read_text().splitlines()[0] == "frame_idx,t0,t1,event_count,seq,spike_t0,source"
    back, problems, rejected = layout.read_alignment(path)
    assert not problems and not rejected
    for row in rows:
        got = back[(row.seq, row.frame_idx)]
        assert (got.t0, got.t1, got.spike_t0, got.event_count, got.source) == \
            (row.t0, row.t1, row.spike_t0, row.event_count, row.source)


def test_time_base_frame_times_and_coverage():
    row = layout.AlignmentRow("train/a", 0, t0=100.0, t1=132.0, spike_t0=90.0)
    np.testing.assert_array_equal(row.frame_times(3), [90.0, 91.0, 92.0])
    assert row.covers(43) and not row.covers(42)          # needs frames up to tick 132
    assert not layout.AlignmentRow("train/a", 0, 100.0, 132.0, 101.0).covers(100)


def test_alignment_problems_each_named_with_line(tmp_path):
    path = tmp_path / "alignment.csv"
    path.write_text(
        "frame_idx,t0,t1,event_count,seq,spike_t0\n"
        "0,0,31,,train/a,0\n"
        "1,40,40,,train/a,32\n"          # t1 <= t0
        "2,abc,95,,train/a,64\n"         # not a number
        "3,96,inf,,train/a,96\n"         # not finite
        "4,128,159,,holdout/a,128\n"     # unknown split
        "x,160,191,,train/a,160\n"       # frame_idx not an integer
        "6,192,223,,train/a,192\n"
        "6,192,223,,train/a,192\n"       # duplicate
        "7,224,255,1.5,train/a,224\n")   # event_count not an integer
    rows, problems, rejected = layout.read_alignment(path)
    assert set(rows) == {("train/a", 0)}
    assert rejected == {("train/a", 1), ("train/a", 6)}
    messages = [p.message for p in problems]
    expected = [(3, "t1 > t0"), (4, "t0 must be a number"), (5, "t1 must be finite"), (6, "split in"),
                (7, "frame_idx must be an integer"), (9, "two alignment lines (8 and 9)"),
                (10, "event_count must be an integer")]
    assert len(messages) == len(expected)
    for (line, fragment), message in zip(expected, messages):
        assert message.startswith(f"{path}:{line}: ") and fragment in message, message
    assert all(p.kind == "bad_alignment" for p in problems)


def test_alignment_missing_or_without_time_base_is_an_error(tmp_path):
    with pytest.raises(DataError) as err:
        layout.read_alignment(tmp_path / "none.csv")
    assert err.value.kind == "missing_alignment"
    old = tmp_path / "old.csv"
    old.write_text("frame_idx,t0,t1,event_count,seq\n0,0.0,0.033,5,train/x\n")   # the original's format
    with pytest.raises(DataError) as err:
        layout.read_alignment(old)
    assert "spike_t0" in str(err.value) and "time base" in str(err.value)


def raw_shared(root):
    return json.loads((root / "dataset.json").read_text())["shared_clock"]


def test_dataset_json_checks(tmp_path):
    with pytest.raises(DataError) as err:
        layout.read_dataset_info(tmp_path)
    assert err.value.kind == "unknown_layout"
    layout.write_dataset_info(tmp_path, layout.DatasetInfo(spike_scale=2, tick_rate_hz=4000.0))
    info = layout.read_dataset_info(tmp_path)
    assert info.spike_scale == 2 and info.tick_rate_hz == 4000.0
    raw = json.loads((tmp_path / "dataset.json").read_text())
    assert info.shared_clock is True and raw_shared(tmp_path) is True
    layout.write_dataset_info(tmp_path, layout.DatasetInfo(source_layout="spk_gopro_spkdeblurnet", shared_clock=False))
    assert layout.read_dataset_info(tmp_path).shared_clock is False
    raw = json.loads((tmp_path / "dataset.json").read_text())
    del raw["shared_clock"]                 # written before the field existed: the layout decides
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    assert layout.read_dataset_info(tmp_path).shared_clock is False
    raw["source_layout"] = "spk_x4k1000fps"
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    assert layout.read_dataset_info(tmp_path).shared_clock is True
    raw["shared_clock"] = "yes"
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="shared_clock must be true or false, found 'yes'"):
        layout.read_dataset_info(tmp_path)
    raw["shared_clock"] = True
    raw["spike_scale"] = 1.5
    (tmp_path / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="spike_scale must be a positive integer, found 1.5"):
        layout.read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable JSON"):
        layout.read_dataset_info(tmp_path)


def test_png_readers(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(good)
    assert layout.png_size(good) == (4, 6)
    assert layout.load_png(good).shape == (4, 6, 3)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((4, 6, 4), np.uint8)).save(rgba)
    with pytest.raises(DataError, match="expected an 8-bit RGB PNG, found mode 'RGBA'"):
        layout.png_size(rgba)
    jpeg = tmp_path / "photo.png"
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(jpeg, format="JPEG")
    with pytest.raises(DataError, match="expected a PNG file, found JPEG"):
        layout.png_size(jpeg)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"hello")
    with pytest.raises(DataError) as err:
        layout.load_png(garbage)
    assert err.value.kind == "bad_image" and str(garbage) in str(err.value)


def test_readers_let_bugs_through(tmp_path, monkeypatch):
    """Only decoding errors become "bad file" DataErrors; an error of another kind (a bug) propagates."""
    good = tmp_path / "good.png"
    Image.fromarray(np.full((4, 6, 3), 7, np.uint8)).save(good)
    npy = tmp_path / "good.npy"
    np.save(npy, np.zeros((2, 3, 4), np.uint8))

    def bug(*args, **kwargs):
        raise TypeError("a bug, not bad data")

    monkeypatch.setattr(Image, "open", bug)
    with pytest.raises(TypeError, match="a bug"):
        layout.png_size(good)
    monkeypatch.setattr(np, "load", bug)
    with pytest.raises(TypeError, match="a bug"):
        layout.load_voxel_counts(npy, 2, 3, 4)


def test_voxel_cache_checks(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    assert layout.load_voxel_counts(good, 2, 3, 4).shape == (2, 3, 4)
    shape, dtype, offset = layout.voxel_header(good)
    assert shape == (2, 3, 4) and dtype == np.uint8 and offset == good.stat().st_size - 24
    with pytest.raises(DataError, match=r"shape \(2, 3, 4\), expected \(32, 3, 4\)"):
        layout.load_voxel_counts(good, 32, 3, 4)
    floats = tmp_path / "f.npy"
    np.save(floats, np.ones((2, 3, 4), np.float32))
    with pytest.raises(DataError, match="expected integer spike counts"):
        layout.load_voxel_counts(floats, 2, 3, 4)
    neg = tmp_path / "neg.npy"
    np.save(neg, -np.ones((2, 3, 4), np.int16))
    with pytest.raises(DataError, match="negative spike counts"):
        layout.load_voxel_counts(neg, 2, 3, 4)


def test_listing_reports_folder_problems(tmp_path):
    seq = tmp_path / "train" / "s"
    (seq / "blur").mkdir(parents=True)
    (seq / "spike").mkdir()
    listing = layout.list_sequence("train", seq)
    assert [p.kind for p in listing.problems] == ["missing_sharp"] and not listing.frames
    (seq / "sharp").mkdir()
    listing = layout.list_sequence("train", seq)
    assert [p.kind for p in listing.problems] == ["empty_sequence"]
    img = np.zeros((8, 8, 3), np.uint8)
    for i in range(3):
        Image.fromarray(img).save(seq / "blur" / f"{i:06d}.png")
    Image.fromarray(img).save(seq / "sharp" / "000000.png")
    Image.fromarray(img).save(seq / "sharp" / "000001.png")
    Image.fromarray(img).save(seq / "sharp" / "000009.png")
    (seq / "spike" / "000000.dat").write_bytes(bytes(8))
    (seq / "spike" / "000002.dat").write_bytes(bytes(8))
    listing = layout.list_sequence("train", seq)
    kinds = sorted(p.kind for p in listing.problems)
    assert kinds == ["frame_count", "frame_count", "missing_sharp"]
    assert [f.frame_idx for f in listing.frames] == [0] and sorted(listing.dropped) == [1, 2]
