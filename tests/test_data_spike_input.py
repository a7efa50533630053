"""data.spike_representation: prepare caches TFP / TFI / raw windows with train-only statistics; both loaders feed
exactly spike_repr's values, normalised; a representation's cache is never read for another one; bad values are
one line."""
import json
import shutil

import numpy as np
import pytest

from data_pipelines import input_pipeline as ip
from data_pipelines import layout, prepare, spike_dat, spike_input, spike_repr, voxelize
from data_pipelines.errors import DataError
from helpers import make_tiny_root

KINDS = ("tfp", "tfi", "raw")
PARAMS = {"tfp_half_window": 3, "tfi_max_search": 5}   # not the defaults: the parameters must reach every stage


@pytest.fixture(scope="module")
def voxel_root(tmp_path_factory):
    """The tiny root (32x32 frames, spikes at f = 2, 32 spike frames per exposure) prepared with voxels only."""
    return make_tiny_root(tmp_path_factory.mktemp("rep") / "root", spike_scale=2)


@pytest.fixture(scope="module")
def root(voxel_root, tmp_path_factory):
    """A copy prepared with every representation in turn."""
    root = tmp_path_factory.mktemp("reps") / "root"
    shutil.copytree(voxel_root, root)
    for kind in KINDS:
        result = prepare.prepare_root(prepare.PrepareOptions(root=root, progress=False, spike_representation=kind,
                                                             **PARAMS), log=lambda line: None)
        assert result.exit_code == 0, [p.message for p in result.problems]
    return root


def _representation(kind):
    return spike_input.Representation(kind, 32, PARAMS["tfp_half_window"], PARAMS["tfi_max_search"])


def _expected(root, kind):
    """{split: {(seq, frame_idx): spike_repr.represent(...) float32 [K, h, w]}}, computed from the .dat files."""
    prepared = json.loads((root / layout.PREPARED_JSON).read_text())
    rows, _, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    out = {}
    for split, seqs in prepared["splits"].items():
        for seq in seqs:
            for frame in seq["frames"]:
                row = rows[(seq["name"], frame[0])]
                spikes = spike_dat.read_dat(root / seq["name"] / "spike" / f"{frame[1]}.dat", 16, 16)
                out.setdefault(split, {})[(seq["name"], frame[0])] = spike_repr.represent(
                    kind, spikes, row.frame_times(len(spikes)), row.t0, row.t1, 32,
                    half_window=PARAMS["tfp_half_window"], max_search=PARAMS["tfi_max_search"], length=32)
    return out


def _cached(values):
    """What the cache holds (float16), as float64."""
    return np.asarray(values).astype(np.float16).astype(np.float64)


def _config(root, kind, **kw):
    cfg = ip.default_data_config()
    cfg.update(dict(dict(root=str(root), spike_scale=2, crop_size=16, vflip=True, num_parallel_calls=1,
                         spike_representation=kind, **PARAMS), **kw))
    return cfg


@pytest.mark.parametrize("kind", KINDS)
def test_both_loaders_feed_the_representation_normalised_with_train_statistics(root, kind):
    expected = _expected(root, kind)
    # The statistics: mean / std of the cached (float16) values of the train split only.
    train = np.concatenate([_cached(v).ravel() for v in expected["train"].values()])
    saved = json.loads((root / _representation(kind).stats_name).read_text())
    assert saved["split"] == "train" and saved["num_frames"] == 21 and saved["num_values"] == train.size
    assert (saved["mean"], saved["std"]) == pytest.approx((train.mean(), train.std()), rel=1e-9)
    every = np.concatenate([train] + [v.ravel() for v in expected["val"].values()])
    assert saved["mean"] != pytest.approx(every.mean(), rel=1e-6)        # val is not in them
    # The train iterator (tf.data) against load_clip (NumPy) and spike_repr, on the same crops and flips.
    it = ip.create_train_iterator(_config(root, kind), global_batch_size=2, seed=1, process_index=0, process_count=1)
    assert it.stats == (saved["mean"], saved["std"]) and it.representation == _representation(kind)
    batch = next(it)
    for j in range(2):
        clip, y, x, hf, vf = it.planner.plan(j)
        ref = ip.load_clip(it.index, clip, *it.stats, y=y, x=x, crop_size=16, hflip=hf, vflip=vf)
        np.testing.assert_array_equal(batch["spike_vox"][j], ref["spike_vox"])   # one definition: exactly equal
        full = ip.load_clip(it.index, clip, *it.stats)["spike_vox"]
        seq = it.index.seq_names[it.index.row_seq[it.index.clip_start[clip]]]
        frames = it.index.row_frame_idx[it.index.clip_rows(clip)]
        assert len(frames) == 5
        for t, frame_idx in enumerate(frames):
            want = np.transpose(expected["train"][(seq, int(frame_idx))], (1, 2, 0))
            np.testing.assert_allclose(full[t], (_cached(want) - saved["mean"]) / saved["std"], atol=2e-6)
            # float16 caching moves a value by at most 2^-11 of it (values <= 1)
            np.testing.assert_allclose(full[t], (want - train.mean()) / train.std(), atol=2 ** -11 / train.std())
    # Evaluation (NumPy): full frames of val.
    batch = next(iter(ip.create_eval_iterator(_config(root, kind), process_index=0, process_count=1)))
    want = _cached(expected["val"][(batch["seq"], int(batch["frame_idx"][0, 0]))])
    np.testing.assert_allclose(batch["spike_vox"][0, 0], (np.transpose(want, (1, 2, 0)) - saved["mean"]) / saved["std"],
                               atol=2e-6)


KEYS = ("blur", "sharp", "spike_vox", "sample_id", "frame_idx", "t0", "t1")
ALL_FLIPS = {(False, False), (False, True), (True, False), (True, True)}


def _assert_loaders_agree(it, steps, crop):
    """Every sample of the train iterator's first `steps` batches is load_clip's for the same plan, bit for bit
    (same dtypes); returns the (hflip, vflip) pairs seen."""
    flips = set()
    for step in range(steps):
        batch = next(it)
        for j in range(it.local_batch_size):
            clip, y, x, hf, vf = it.planner.plan(step * it.global_batch_size + j)
            flips.add((hf, vf))
            ref = ip.load_clip(it.index, clip, *it.stats, y=y, x=x, crop_size=crop, hflip=hf, vflip=vf)
            for key in KEYS:
                assert batch[key][j].dtype == ref[key].dtype, key
                np.testing.assert_array_equal(batch[key][j], ref[key], err_msg=f"step {step} sample {j} {key}")
    return flips


@pytest.mark.parametrize("kind", ("voxel",) + KINDS)
@pytest.mark.parametrize("crop", [16, None])
def test_both_loaders_give_the_same_bits_with_flips(root, kind, crop):
    # tf.data reads and crops, then calls input_pipeline.finish_sample (tf.numpy_function); load_clip calls it too.
    cfg = _config(root, kind, crop_size=crop, hflip=True, vflip=True, num_parallel_calls=2)
    it = ip.create_train_iterator(cfg, global_batch_size=4, seed=3, process_index=0, process_count=1)
    assert _assert_loaders_agree(it, steps=3, crop=crop) == ALL_FLIPS
    assert all(spec.shape.is_fully_defined() for spec in it.element_spec.values())
    size = crop or 32
    assert it.element_spec["spike_vox"].shape == (4, 5, size // 2, size // 2, 32)


def test_both_loaders_give_the_same_bits_for_large_counts(voxel_root, tmp_path):
    # Counts up to 255: from 20 up TensorFlow's log1p and NumPy's can differ in the last bit, so one definition
    # of the spike input (spike_input.Representation.normalize) is what keeps the two loaders equal.
    work = tmp_path / "root"
    shutil.copytree(voxel_root, work)
    rng = np.random.default_rng(0)
    for path in sorted((work / "train").glob(f"*/{layout.SPIKE_VOX}/*.npy")):
        counts = np.load(path)
        np.save(path, rng.integers(0, 256, counts.shape).astype(counts.dtype))
    it = ip.create_train_iterator(_config(work, "voxel"), global_batch_size=4, seed=3, process_index=0,
                                  process_count=1)
    _assert_loaders_agree(it, steps=2, crop=16)
    assert it.index.voxel_dtype == "uint8"


def test_normalize_is_the_voxel_normalisation_bit_for_bit():
    # Representation.normalize (in place) against voxelize.normalize: every uint8 / uint16 count, odd offsets.
    voxel = spike_input.Representation("voxel", 32)
    for dtype in (np.uint8, np.uint16):
        counts = np.arange(np.iinfo(dtype).max + 1).astype(dtype)
        for start in (0, 1, 3):
            got = voxel.normalize(counts[start:], 0.37, 0.61)
            assert got.dtype == np.float32 and got.shape == counts[start:].shape
            np.testing.assert_array_equal(got, voxelize.normalize(counts[start:], 0.37, 0.61))
    rates = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
    rates = rates[np.isfinite(rates)]
    want = (rates.astype(np.float32) - np.float32(0.2)) / np.float32(0.3)
    np.testing.assert_array_equal(spike_input.Representation("tfp", 32).normalize(rates, 0.2, 0.3), want)
    cached = rates.copy()
    spike_input.Representation("tfi", 32).normalize(cached, 0.2, 0.3)
    np.testing.assert_array_equal(cached.view(np.uint16), rates.view(np.uint16))      # the input is left alone


def test_no_spike_input_is_the_normalised_representation_of_an_empty_stream():
    assert spike_input.Representation("voxel", 4).no_spike_input(0.3, 0.5) == pytest.approx(-0.6)
    assert spike_input.Representation("tfp", 4).no_spike_input(0.3, 0.5) == pytest.approx(-0.6)
    assert spike_input.Representation("raw", 4).no_spike_input(0.3, 0.5) == pytest.approx(-0.6)
    tfi = spike_input.Representation("tfi", 4, tfi_max_search=5).no_spike_input(0.3, 0.5)
    assert tfi == pytest.approx((float(np.float16(1 / 10)) - 0.3) / 0.5)     # SpikeCV's fallback interval 2m


def test_switching_representation_builds_its_own_cache_and_leaves_the_others(voxel_root, root, tmp_path):
    work = tmp_path / "root"
    shutil.copytree(voxel_root, work)
    before = {p.relative_to(work): p.read_bytes() for p in work.rglob("*") if p.is_file() and "journal" not in p.name
              and p.name != layout.PREPARE_LOG}
    # Not prepared for TFP yet: one line with the command that prepares it.
    with pytest.raises(DataError, match=r"tfp statistics not found: run `python scripts/prepare_data.py --root .* "
                                        r"--num_bins 32 --spike_representation tfp --tfp_half_window 3`"):
        ip.create_train_iterator(_config(work, "tfp"), global_batch_size=2, seed=0, process_index=0, process_count=1)
    def run(**kw):
        return prepare.prepare_root(prepare.PrepareOptions(root=work, progress=False, **kw), log=lambda line: None)

    assert run(spike_representation="tfp", tfp_half_window=3).exit_code == 0
    assert run(spike_representation="tfp", tfp_half_window=1).exit_code == 0
    seq = work / "train" / "00_astronaut"
    assert {p.name for p in seq.iterdir()} == {"blur", "sharp", "spike", "spike_vox", "spike_tfp_k32_h3",
                                               "spike_tfp_k32_h1"}
    # The voxel outputs are byte for byte those of a voxel-only prepare.
    for rel, data in before.items():
        assert (work / rel).read_bytes() == data, rel
    # h = 1 reads its own cache and statistics (another h gives other values).
    h1 = json.loads((work / "spike_stats_tfp_k32_h1.json").read_text())
    h3 = json.loads((work / "spike_stats_tfp_k32_h3.json").read_text())
    assert h1["tag"] == "tfp_k32_h1" and h1["mean"] != h3["mean"]
    it = ip.create_eval_iterator(_config(work, "tfp", tfp_half_window=1), process_index=0, process_count=1)
    assert it.stats == (h1["mean"], h1["std"]) and all("spike_tfp_k32_h1" in p for p in it.index.vox_paths)
    # Another representation's statistics file is refused, not read.
    with pytest.raises(DataError, match="statistics of the tfp_k32_h3 representation, the config asks for "
                                        "tfp_k32_h1"):
        other = str(root / "spike_stats_tfp_k32_h3.json")
        ip.create_eval_iterator(_config(work, "tfp", tfp_half_window=1, stats_file=other), process_index=0,
                                process_count=1)
    # A changed spike file rebuilds that frame only; a stale statistics file (another index) is refused.
    cache = seq / "spike_tfp_k32_h1"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    dat = seq / "spike" / "000002.dat"
    spikes = spike_dat.read_dat(dat, 16, 16)
    spike_dat.write_dat(dat, ~spikes.astype(bool))
    stats_file = work / "spike_stats_tfp_k32_h1.json"
    saved = json.loads(stats_file.read_text())
    stats_file.write_text(json.dumps(dict(saved, index_digest="0" * 16)))
    with pytest.raises(DataError, match="stale: built for another prepared.json"):
        ip.create_eval_iterator(_config(work, "tfp", tfp_half_window=1), process_index=0, process_count=1)
    assert run(spike_representation="tfp", tfp_half_window=1).exit_code == 0
    assert [p.name for p in cache.iterdir() if p.stat().st_mtime_ns != stamps[p.name]] == ["000002.npy"]
    assert json.loads(stats_file.read_text())["mean"] != saved["mean"]


def test_a_representation_that_cannot_be_built_writes_no_statistics(voxel_root, tmp_path):
    work = tmp_path / "root"
    shutil.copytree(voxel_root, work)
    result = prepare.prepare_root(prepare.PrepareOptions(root=work, num_bins=33, progress=False,
                                                         spike_representation="raw"), log=lambda line: None)
    assert result.exit_code == 2 and result.stats_written and len(result.problems) == 27
    assert "raw representation: a raw window of 33 frames centred on frame 16 does not fit the 32 spike frames" \
        in result.problems[0].message and result.problems[0].path.endswith("000000.dat")
    assert not (work / "spike_stats_raw_k33.json").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"spike_representation": "tpf"}, "data.spike_representation='tpf': expected one of voxel, tfp, tfi, raw"),
    ({"spike_representation": "tfp", "tfp_half_window": -1}, "data.tfp_half_window=-1: expected an integer >= 0"),
])
def test_a_bad_representation_is_a_one_line_error(root, overrides, message):
    with pytest.raises(DataError, match=message) as err:
        ip.create_train_iterator(_config(root, "voxel", **overrides), global_batch_size=2, seed=0, process_index=0,
                                 process_count=1)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=message):
        spike_input.check_config(overrides)
