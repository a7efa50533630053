"""Spike .dat I/O: exact round trip, the SpikeCV bit layout, lazy ranges, and clear errors."""
import numpy as np
import pytest

from data_pipelines import spike_dat
from data_pipelines.errors import DataError


def _spikecv_style_decode(raw: np.ndarray, n: int, height: int, width: int) -> np.ndarray:
    """Independent reference of the format: pixel p of the flipped frame is bit p % 8 of byte p // 8."""
    fb = height * width // 8
    pix = np.arange(height * width).reshape(height, width)
    out = np.zeros((n, height, width), bool)
    for i in range(n):
        frame = raw[i * fb:(i + 1) * fb]
        flipped = (frame[pix // 8] >> (pix % 8)) & 1
        out[i] = flipped[::-1].astype(bool)
    return out


# Widths that are multiples of 8 (byte-aligned rows) and widths that are not (rows share bytes).
@pytest.mark.parametrize("height,width", [(250, 400), (3, 8), (4, 10), (6, 12), (2, 4), (5, 24), (8, 7)])
def test_round_trip_exact_and_matches_reference_layout(tmp_path, height, width):
    rng = np.random.default_rng(height * 1000 + width)
    spikes = rng.random((9, height, width)) < 0.37
    path = tmp_path / "s.dat"
    spike_dat.write_dat(path, spikes)
    assert path.stat().st_size == 9 * height * width // 8
    back = spike_dat.read_dat(path, height, width)
    assert back.dtype == np.bool_ and back.shape == spikes.shape and back.flags.c_contiguous
    np.testing.assert_array_equal(back, spikes)
    raw = np.fromfile(path, np.uint8)
    np.testing.assert_array_equal(_spikecv_style_decode(raw, 9, height, width), spikes)


def test_bit_order_and_vertical_flip_by_hand(tmp_path):
    # One spike at the top-left pixel of the upright image = bottom row of the stored (flipped) frame.
    spikes = np.zeros((1, 2, 8), bool)
    spikes[0, 0, 0] = True      # top-left upright -> stored row 1, col 0 -> byte 1, bit 0
    spikes[0, 1, 3] = True      # bottom row upright -> stored row 0, col 3 -> byte 0, bit 3
    path = tmp_path / "hand.dat"
    spike_dat.write_dat(path, spikes)
    assert list(path.read_bytes()) == [0b00001000, 0b00000001]


def test_lazy_reader_ranges_and_indexing(tmp_path):
    rng = np.random.default_rng(0)
    spikes = rng.random((40, 6, 12)) < 0.5
    path = tmp_path / "long.dat"
    spike_dat.write_dat(path, spikes)
    with spike_dat.SpikeDatReader(path, 6, 12) as reader:
        assert reader.num_frames == 40 and reader.shape == (40, 6, 12)
        np.testing.assert_array_equal(reader.read(13, 21), spikes[13:21])
        np.testing.assert_array_equal(reader[5], spikes[5])
        np.testing.assert_array_equal(reader[-1], spikes[-1])
        np.testing.assert_array_equal(reader[3:30:7], spikes[3:30:7])
        assert reader.read(7, 7).shape == (0, 6, 12)
        with pytest.raises(DataError) as err:
            reader.read(38, 41)
        assert err.value.kind == "spike_window" and "40 frames" in str(err.value)
    np.testing.assert_array_equal(spike_dat.read_dat(path, 6, 12, start=2, stop=4), spikes[2:4])
    # Raw byte views stay valid after the reader is closed (no dangling memory map).
    reader = spike_dat.SpikeDatReader(path, 6, 12)
    raw = reader.read_bytes(3, 5)
    reader.close()
    assert raw.tobytes() == path.read_bytes()[3 * 9:5 * 9]
    assert spike_dat.spike_counts(path, 6, 12, 10, 20) == int(spikes[10:20].sum())


def test_truncated_file_names_file_size_and_frame_size(tmp_path):
    path = tmp_path / "cut.dat"
    spike_dat.write_dat(path, np.ones((3, 250, 400), bool))
    with open(path, "r+b") as f:
        f.truncate(3 * 12500 - 1)
    with pytest.raises(DataError) as err:
        spike_dat.read_dat(path, 250, 400)
    msg = str(err.value)
    assert err.value.kind == "truncated_dat"
    assert str(path) in msg and "37499" in msg and "12500 bytes per 400x250" in msg


def test_frame_size_the_format_cannot_hold(tmp_path):
    with pytest.raises(DataError) as err:
        spike_dat.write_dat(tmp_path / "odd.dat", np.zeros((2, 3, 5), bool))
    assert err.value.kind == "bad_dat_shape" and "15 pixels" in str(err.value)


def test_write_rejects_non_binary_values(tmp_path):
    with pytest.raises(ValueError, match="0/1"):
        spike_dat.write_dat(tmp_path / "x.dat", np.full((1, 2, 4), 2, np.uint8))
    spike_dat.write_dat(tmp_path / "ok.dat", np.ones((1, 2, 4), np.uint8))
    assert spike_dat.read_dat(tmp_path / "ok.dat", 2, 4).all()


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError) as err:
        spike_dat.read_dat(tmp_path / "nope.dat", 2, 4)
    assert "not found" in str(err.value)
