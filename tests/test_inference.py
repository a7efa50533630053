"""Tiled restoration (vrtspike_jax.inference): exactness with one window, small error and no seams with several,
VRT's blending rule, padding, consistent spike tiles, one compilation per window shape, bounded reads.

Real-model tests use a tiny VRTWithSpike (small_fixture widths, depth 2 per stage, K = 4 bins, spikes at half
resolution) with random weights on a 3-frame 160x160 clip; its shapes are shared with tests/test_test_script.py so
the two files compile the same few programs. Logic tests use cheap stand-in apply functions.
"""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from vrtspike_jax import inference
from vrtspike_jax.inference import TileSpec, make_apply_fn, plan_tiles, restore_video

TINY_MODEL = dict(vrt_preset="small_fixture", vrt_overrides=dict(depths=(2,) * 7 + (1, 1)), use_spike=True,
                  spike_bins=4, spike_scale=2)

# Stated error of spatial tiling (64 px tiles, 16 px overlap) against the untiled output of the tiny random model on
# the 160x160 test clip. Measured: mean 0.0087, 99th percentile 0.071, i.e. 2.4% of the model's own mean change of
# its input (0.37); these bounds leave a margin for other BLAS/XLA builds.
TILED_MEAN_ABS_ERROR = 0.015
TILED_P99_ABS_ERROR = 0.12
TILED_RELATIVE_ERROR = 0.05
# Seams: mean error in 4 px bands around every line where the set of contributing tiles changes, over the mean error
# elsewhere (measured 0.88-0.99 for overlaps 8-48 px; 6.9 without overlap), and the error's jump across those lines
# over its mean jump across other lines (measured 1.1-1.5; 10-16 without overlap).
SEAM_BAND_RATIO = 1.25
SEAM_JUMP_RATIO = 2.0


def build_tiny_model(seed: int = 0):
    from vrtspike_jax.models import build_model, model_config_from_dict

    return build_model(model_config_from_dict(TINY_MODEL), rngs=nnx.Rngs(seed))


def make_clip(num_frames=3, height=160, width=160, seed=0):
    """A moving crop of a photograph (so flows and attention see real structure) and random spike voxels."""
    from skimage import data

    image = data.astronaut().astype(np.float32) / 255.0
    frames = np.stack([image[100 + 3 * t:100 + 3 * t + height, 150 + 2 * t:150 + 2 * t + width]
                       for t in range(num_frames)])
    spikes = np.random.default_rng(seed).standard_normal((num_frames, height // 2, width // 2, 4)).astype(np.float32)
    return frames, spikes



@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_model()
    apply_fn = make_apply_fn(model)
    frames, spikes = make_clip()
    direct = np.asarray(apply_fn(frames[None], spikes[None]))[0]
    return model, apply_fn, frames, spikes, direct


# ----------------------------------------------------------------------------------------------------------------
# The real model


def test_one_window_covering_the_clip_is_the_model_output(tiny):
    _, apply_fn, frames, spikes, direct = tiny
    compiles = apply_fn.compiles
    for tile in (TileSpec(), TileSpec(temporal=8, temporal_overlap=2, spatial=160, spatial_overlap=20),
                 TileSpec(temporal=3, temporal_overlap=1, spatial=256, spatial_overlap=20)):
        out = restore_video(apply_fn, frames, spikes, tile=tile, spike_scale=2)
        assert out.shape == direct.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, direct, atol=1e-6, rtol=0, err_msg=str(tile))
    assert apply_fn.compiles == compiles  # the same window shape as the direct call: nothing recompiled


def _contributor_changes(axis: inference.AxisTiling):
    """Positions p where the set of windows contributing to sample p differs from that of p - 1."""
    contributes = np.zeros((axis.count, axis.padded), bool)
    for i, start in enumerate(axis.starts):
        contributes[i, start:start + axis.window] = axis.mask(i) > 0
    contributes = contributes[:, :axis.size]
    return [p for p in range(1, axis.size) if (contributes[:, p] != contributes[:, p - 1]).any()]


def seam_statistics(error: np.ndarray, plan: inference.TilePlan, band: int = 4):
    """(band ratio, jump ratio) of a signed error map [T, H, W, C] for the spatial tiles of `plan` (see above)."""
    rows, cols = _contributor_changes(plan.height), _contributor_changes(plan.width)
    assert rows and cols, "the plan has no interior tile borders"
    in_rows = np.zeros(error.shape[1], bool)
    in_cols = np.zeros(error.shape[2], bool)
    for p in rows:
        in_rows[max(0, p - band):p + band] = True
    for p in cols:
        in_cols[max(0, p - band):p + band] = True
    in_band = in_rows[:, None] | in_cols[None, :]
    magnitude = np.abs(error).mean(axis=(0, 3))
    band_ratio = magnitude[in_band].mean() / magnitude[~in_band].mean()
    jump_ratios = []
    for axis, lines in ((1, rows), (2, cols)):
        reduce = tuple(a for a in range(4) if a != axis)
        jumps = np.abs(np.diff(error, axis=axis)).mean(axis=reduce)  # jumps[p - 1]: between p - 1 and p
        at_lines = jumps[[p - 1 for p in lines]]
        elsewhere = np.delete(jumps, [p - 1 for p in lines])
        jump_ratios.append(at_lines.max() / elsewhere.mean())
    return float(band_ratio), float(max(jump_ratios))


def test_several_tiles_stay_close_to_the_direct_output_without_seams(tiny):
    _, apply_fn, frames, spikes, direct = tiny
    tile = TileSpec(spatial=64, spatial_overlap=16)
    plan = plan_tiles(*frames.shape[:3], tile, spike_scale=2)
    assert plan.num_tiles == 9 and plan.tile_shape == (3, 64, 64)
    compiles = apply_fn.compiles
    out = restore_video(apply_fn, frames, spikes, tile=tile, spike_scale=2)
    assert apply_fn.compiles - compiles <= 1  # nine windows, one program
    error = out - direct
    mean_error = float(np.abs(error).mean())
    assert mean_error <= TILED_MEAN_ABS_ERROR
    assert float(np.percentile(np.abs(error), 99)) <= TILED_P99_ABS_ERROR
    assert mean_error <= TILED_RELATIVE_ERROR * float(np.abs(direct - frames).mean())
    band_ratio, jump_ratio = seam_statistics(error, plan)
    assert band_ratio <= SEAM_BAND_RATIO, band_ratio
    assert jump_ratio <= SEAM_JUMP_RATIO, jump_ratio

    # The seam measure does see seams: the same tiles without overlap (nothing trimmed, hard borders) fail it.
    hard = TileSpec(spatial=64, spatial_overlap=0)
    hard_error = restore_video(apply_fn, frames, spikes, tile=hard, spike_scale=2) - direct
    hard_band, hard_jump = seam_statistics(hard_error, plan_tiles(*frames.shape[:3], hard, spike_scale=2))
    assert hard_band > 2 * SEAM_BAND_RATIO and hard_jump > 2 * SEAM_JUMP_RATIO, (hard_band, hard_jump)


def test_small_frames_are_padded_symmetrically_and_cropped_back(tiny):
    _, apply_fn, frames, spikes, _ = tiny
    frames, spikes = frames[:, :60, :60], spikes[:, :30, :30]  # not a multiple of 8, below 64
    out = restore_video(apply_fn, frames, spikes, tile=TileSpec(spatial=128, spatial_overlap=20), spike_scale=2)
    padded = np.pad(frames, ((0, 0), (0, 4), (0, 4), (0, 0)), mode="symmetric")
    padded_spikes = np.pad(spikes, ((0, 0), (0, 2), (0, 2), (0, 0)), mode="symmetric")
    expected = np.asarray(apply_fn(padded[None], padded_spikes[None]))[0, :, :60, :60]
    assert out.shape == (3, 60, 60, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)


def test_one_compilation_per_window_shape(tiny):
    model, apply_fn, frames, spikes, _ = tiny
    tile = TileSpec(spatial=64, spatial_overlap=16)
    restore_video(apply_fn, frames[:, :64, :64], spikes[:, :32, :32], tile=tile, spike_scale=2)
    first = apply_fn.compiles
    # Another clip size: the end-aligned edge tiles keep the window shape, so nothing is compiled.
    restore_video(apply_fn, frames[:, :136, :112], spikes[:, :68, :56], tile=tile, spike_scale=2)
    assert apply_fn.compiles == first
    # A fresh ApplyFn of a second model of the same structure (e.g. after more training) reuses the program.
    other = make_apply_fn(build_tiny_model(seed=1))
    restore_video(other, frames[:, :112, :112], spikes[:, :56, :56], tile=tile, spike_scale=2)
    assert other.compiles == 0


def test_official_weights_through_the_restorer_match_pytorch(load_fixture, fixture_file):
    from vrtspike_jax.convert import load_official_vrt

    z = load_fixture("vrt_small_seed0.npz")
    vrt = load_official_vrt(fixture_file("vrt_small_seed0.npz"), **json.loads(str(z["config_json"])))
    frames = np.asarray(z["input"])[0].transpose(0, 2, 3, 1)
    reference = np.asarray(z["output"])[0].transpose(0, 2, 3, 1)
    apply_fn = make_apply_fn(vrt)
    assert not apply_fn.uses_spikes and apply_fn.upscale == 1
    out = restore_video(apply_fn, frames, None, tile=TileSpec())
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= 1e-5


def test_apply_fn_requires_spikes_for_a_spike_model(tiny):
    _, apply_fn, frames, _, _ = tiny
    with pytest.raises(ValueError, match="spike voxels are required"):
        apply_fn(frames[None], None)
    assert (apply_fn.spike_scale, apply_fn.spike_bins, apply_fn.upscale) == (2, 4, 1)


# ----------------------------------------------------------------------------------------------------------------
# The tiling logic, with stand-in models


def pointwise_model(f: int, upscale: int = 1, calls=None):
    """out = x/2 + mean over bins of the (nearest-upsampled) spikes, per pixel: tiling must not change it at all,
    and any misplaced spike tile would."""

    def apply(frames, spikes):
        frames = np.asarray(frames)
        if calls is not None:
            calls.append((frames.shape, None if spikes is None else np.shape(spikes)))
        out = frames * 0.5
        if spikes is not None:
            spikes = np.asarray(spikes).mean(-1, keepdims=True)
            out = out + np.repeat(np.repeat(spikes, f, 2), f, 3)
        return np.repeat(np.repeat(out, upscale, 2), upscale, 3)

    return apply


@pytest.mark.parametrize("shape,f,tile,upscale", [
    ((5, 100, 140), 2, TileSpec(3, 1, 64, 16), 1),
    ((7, 200, 72), 4, TileSpec(4, 2, 64, 20), 1),
    ((9, 130, 260), 1, TileSpec(4, 3, 72, 30), 1),
    ((1, 40, 30), 2, TileSpec(), 1),                  # one frame, frames far below 64: padded
    ((2, 66, 90), 2, TileSpec(0, 0, 64, 16), 1),      # not multiples of 8: tiles end-aligned, no padding
    ((4, 96, 80), 2, TileSpec(3, 1, 64, 16), 2),      # a 2x upscaling model
])
def test_pointwise_model_is_unchanged_by_tiling(shape, f, tile, upscale):
    rng = np.random.default_rng(0)
    t, h, w = shape
    frames = rng.random((t, h, w, 3), dtype=np.float32)
    spikes = rng.standard_normal((t, h // f, w // f, 4)).astype(np.float32)
    calls = []
    out = restore_video(pointwise_model(f, upscale, calls), frames, spikes, tile=tile, spike_scale=f)
    expected = pointwise_model(f, upscale)(frames[None], spikes[None])[0]
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)
    plan = plan_tiles(t, h, w, tile, f)
    assert len(calls) == plan.num_tiles
    (frame_shape, spike_shape), = set(calls)  # one window shape for the whole clip
    assert frame_shape == (1,) + plan.tile_shape + (3,) and spike_shape == (1,) + plan.spike_tile_shape + (4,)
    frames_t, frames_h, frames_w = frame_shape[1:4]
    assert frames_t >= 2 and min(frames_h, frames_w) >= 64 and frames_h % 8 == 0 and frames_w % 8 == 0


def window_mean_model(frames, spikes):
    """out = x + the mean of the window: depends on where the window is, so blending weights matter."""
    frames = np.asarray(frames)
    return frames + frames.mean(axis=(1, 2, 3), keepdims=True)


def vrt_test_video(model, lq, tile_d, overlap_d, tile_s, overlap_s):
    """VRT's main_test_vrt.py test_video / test_clip (scale 1) transcribed to NumPy, [D, H, W, C] frames."""

    def test_clip(clip):
        d, h, w, c = clip.shape
        stride = tile_s - overlap_s
        h_idx_list = list(range(0, h - tile_s, stride)) + [max(0, h - tile_s)]
        w_idx_list = list(range(0, w - tile_s, stride)) + [max(0, w - tile_s)]
        E = np.zeros((d, h, w, c))
        W = np.zeros_like(E)
        for h_idx in h_idx_list:
            for w_idx in w_idx_list:
                patch = clip[:, h_idx:h_idx + tile_s, w_idx:w_idx + tile_s]
                out_patch = np.array(model(patch[None], None)[0], np.float64)
                mask = np.ones_like(out_patch)
                half = overlap_s // 2
                if h_idx < h_idx_list[-1]:
                    out_patch[:, -half:] = 0
                    mask[:, -half:] = 0
                if w_idx < w_idx_list[-1]:
                    out_patch[:, :, -half:] = 0
                    mask[:, :, -half:] = 0
                if h_idx > h_idx_list[0]:
                    out_patch[:, :half] = 0
                    mask[:, :half] = 0
                if w_idx > w_idx_list[0]:
                    out_patch[:, :, :half] = 0
                    mask[:, :, :half] = 0
                E[:, h_idx:h_idx + tile_s, w_idx:w_idx + tile_s] += out_patch
                W[:, h_idx:h_idx + tile_s, w_idx:w_idx + tile_s] += mask
        return E / W

    d = lq.shape[0]
    stride = tile_d - overlap_d
    d_idx_list = list(range(0, d - tile_d, stride)) + [max(0, d - tile_d)]
    E = np.zeros(lq.shape)
    W = np.zeros((d, 1, 1, 1))
    for d_idx in d_idx_list:
        E[d_idx:d_idx + tile_d] += test_clip(lq[d_idx:d_idx + tile_d])
        W[d_idx:d_idx + tile_d] += 1
    return E / W


@pytest.mark.parametrize("shape,tile", [((7, 100, 140), TileSpec(4, 2, 64, 20)),
                                        ((12, 200, 264), TileSpec(6, 2, 72, 32)),
                                        ((5, 64, 200), TileSpec(8, 2, 64, 20))])
def test_blending_is_vrts_test_script(shape, tile):
    frames = np.random.default_rng(1).random(shape + (3,), dtype=np.float32)
    out = restore_video(window_mean_model, frames, tile=tile)
    expected = vrt_test_video(window_mean_model, frames, tile.temporal, tile.temporal_overlap, tile.spatial,
                              tile.spatial_overlap)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


class RecordingClip:
    """An array-like clip that records which frame ranges are read."""

    def __init__(self, array, log, name):
        self.array, self.log, self.name = array, log, name
        self.shape = array.shape

    def __getitem__(self, index):
        assert isinstance(index, slice), "the restorer reads whole temporal chunks only"
        self.log.append((self.name, index.start, index.stop))
        return self.array[index]


def test_reads_one_chunk_at_a_time_and_streams_frames_out():
    rng = np.random.default_rng(2)
    frames = rng.random((20, 72, 96, 3), dtype=np.float32)
    spikes = rng.standard_normal((20, 36, 48, 2)).astype(np.float32)
    log = []
    tile = TileSpec(6, 2, 64, 16)
    calls = []
    apply = pointwise_model(2, calls=calls)
    for t, frame in inference.iter_restored_frames(apply, RecordingClip(frames, log, "frames"),
                                                   RecordingClip(spikes, log, "spikes"), tile=tile,
                                                   spike_scale=2):
        log.append(("out", t))
    plan = plan_tiles(20, 72, 96, tile, 2)
    reads = [entry for entry in log if entry[0] == "frames"]
    assert [start for _, start, _ in reads] == list(plan.time.starts)
    assert all(stop - start <= tile.temporal for _, start, stop in reads)
    assert [entry[1] for entry in log if entry[0] == "out"] == list(range(20))
    # Streaming: the first frames are out before the last chunk is read.
    assert log.index(("out", 0)) < log.index(reads[-1])
    assert {shape for shape, _ in calls} == {(1,) + plan.tile_shape + (3,)}


def test_progress_is_called_once_per_window():
    frames = np.zeros((5, 100, 140, 3), np.float32)
    ticks = []
    restore_video(window_mean_model, frames, tile=TileSpec(3, 1, 64, 16), progress=ticks.append)
    assert ticks == [1] * plan_tiles(5, 100, 140, TileSpec(3, 1, 64, 16)).num_tiles


def test_plan_axes_follow_vrts_start_rule():
    plan = plan_tiles(20, 720, 1280, TileSpec(12, 2, 256, 20))
    assert plan.time.starts == (0, 8)
    assert plan.height.starts == (0, 236, 464) and plan.width.starts == (0, 236, 472, 708, 944, 1024)
    assert plan.num_tiles == 36 and plan.tile_shape == (12, 256, 256)
    gopro = plan_tiles(20, 720, 1280, TileSpec(18, 2, 192, 20))
    assert gopro.num_tiles == 2 * 5 * 8
    for axis in (plan.time, plan.height, plan.width, gopro.height, gopro.width):
        assert (axis.coverage() > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(spatial=100), "multiple of 8"),
    (dict(spatial=32), "at least 64"),
    (dict(temporal=1), "at least 2"),
    (dict(temporal=4, temporal_overlap=4), "smaller than temporal"),
    (dict(spatial=64, spatial_overlap=64), "smaller than spatial"),
    (dict(spatial=-8), "non-negative"),
])
def test_tile_spec_rejects_what_the_model_cannot_take(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileSpec(**kwargs)


def test_tile_spec_round_trips_through_a_mapping():
    spec = TileSpec(12, 2, 256, 20)
    assert TileSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown TileSpec field"):
        TileSpec.from_dict({"temporal": 2, "size": 64})


def test_inconsistent_spikes_are_refused_with_the_reason():
    frames = np.zeros((3, 64, 96, 3), np.float32)
    apply = pointwise_model(2)
    with pytest.raises(ValueError, match=r"spike voxels have shape \(3, 32, 32, 4\).*\[3, 32, 48, K\]"):
        restore_video(apply, frames, np.zeros((3, 32, 32, 4), np.float32), tile=TileSpec(), spike_scale=2)
    with pytest.raises(ValueError, match=r"spike voxels have shape \(2, 32, 48, 4\)"):
        restore_video(apply, frames, np.zeros((2, 32, 48, 4), np.float32), tile=TileSpec(), spike_scale=2)
    with pytest.raises(ValueError, match="multiples of spike_scale=16"):
        plan_tiles(3, 160, 160, TileSpec(spatial=72, spatial_overlap=16), spike_scale=16)
    with pytest.raises(ValueError, match="multiples of spike_scale=2"):
        plan_tiles(3, 160, 160, TileSpec(spatial=64, spatial_overlap=15), spike_scale=2)
    with pytest.raises(ValueError, match="not a multiple of spike_scale=4"):
        plan_tiles(3, 66, 64, TileSpec(), spike_scale=4)
    with pytest.raises(ValueError, match=r"frames must be \[T, H, W, C\]"):
        restore_video(apply, np.zeros((64, 64, 3), np.float32), tile=TileSpec())


def test_execution_options_change_how_not_what(tiny):
    model = tiny[0]
    chunked = inference.with_execution_options(model, attention_chunk_windows=4, attention_per_head=True)
    assert chunked.config.vrt.attention_chunk_windows == 4 and chunked.config.vrt.attention_per_head
    assert model.config.vrt.attention_chunk_windows == 0  # the original is untouched
    original, changed = nnx.state(model, nnx.Param), nnx.state(chunked, nnx.Param)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(changed)):
        assert a is b  # the very same parameters
    # (Outputs are identical: measured max |diff| = 0 on a 3x64x64 clip; that costs a compilation, so not here.)
    with pytest.raises(ValueError, match="not execution options"):
        inference.with_execution_options(model, depths=(1,) * 9)
