"""The spike-only reference: the sharp frame's luminance from the spikes alone, scored on Y like the restorers.

For every frame of a split of a prepared root, TFP or TFI (data_pipelines/spike_repr.py, SpikeCV's
reconstructions) at the exposure's centre instant gives a firing rate per spike pixel. It is brought to the RGB
frame size (bilinear; spike_scale f > 1) and mapped to a grey level by an affine map `g = a * rate + b`, fitted by
least squares on the val split only (the rate of an integrate-and-fire pixel is its light over the threshold; the
offset absorbs dark spikes). The grey frame is written as R = G = B = g, quantised to 8 bits as a restored frame is,
and scored with the validation metrics on Y (its Y is 16 + 219 g, BT.601). The window (TFP) or search length
(TFI) is chosen on val by PSNR-Y; test is scored with val's choice and val's map, never fitted on test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np

from data_pipelines import layout, prepare, simulate, spike_dat, spike_repr
from vrtspike_jax import metrics as metrics_lib

# Parameters tried on val: TFP half windows h (2h + 1 frames) and TFI search lengths m, in spike frames.
DEFAULT_PARAMS = {"tfp": (0, 1, 2, 4, 8, 16, 32), "tfi": (2, 4, 8, 16, 32)}


def load_frames(root, split: str) -> List[Dict[str, Any]]:
    """The split's frames, read once: [{seq, frame_idx, spikes, times, t0, t1, size, sharp uint8 [H, W, 3]}]."""
    root = Path(root)
    prepared = prepare.read_prepared(root)
    f = int(prepared["spike_scale"])
    rows, _, _ = layout.read_alignment(root / layout.ALIGNMENT_CSV)
    out = []
    for seq in prepared["splits"].get(split, []):
        height, width = int(seq["height"]), int(seq["width"])
        for frame in seq["frames"]:
            frame_idx, stem = int(frame[0]), str(frame[1])
            row = rows[(seq["name"], frame_idx)]
            spikes = spike_dat.read_dat(root / seq["name"] / layout.SPIKE / f"{stem}.dat", height // f, width // f)
            out.append({"seq": seq["name"], "frame_idx": frame_idx, "spikes": spikes,
                        "times": row.frame_times(spikes.shape[0]), "t0": row.t0, "t1": row.t1,
                        "size": (height, width),
                        "sharp": layout.load_png(root / seq["name"] / layout.SHARP / f"{stem}.png")})
    return out


def rates_of(frames: Sequence[Mapping[str, Any]], method: str, param: int) -> List[Dict[str, Any]]:
    """[{seq, frame_idx, rate float32 [H, W] at frame size, sharp}] of `load_frames`' frames."""
    from skimage.transform import resize

    kind_args = {"half_window": param} if method == "tfp" else {"max_search": param}
    out = []
    for fr in frames:
        rate = spike_repr.represent(method, fr["spikes"], fr["times"], fr["t0"], fr["t1"], 1, **kind_args)[0]
        if rate.shape != tuple(fr["size"]):
            rate = resize(rate, fr["size"], order=1, mode="edge", anti_aliasing=False).astype(np.float32)
        out.append({"seq": fr["seq"], "frame_idx": fr["frame_idx"], "rate": rate, "sharp": fr["sharp"]})
    return out


def centre_rates(root, split: str, method: str, param: int) -> List[Dict[str, Any]]:
    """[{seq, frame_idx, rate float32 [H, W] at frame size, sharp uint8 [H, W, 3]}] for the split's frames."""
    return rates_of(load_frames(root, split), method, param)


def fit_grey_map(items: Sequence[Mapping[str, Any]]) -> Tuple[float, float]:
    """Least-squares (a, b) of grey(sharp) ~ a * rate + b over every pixel of `items`."""
    rate = np.concatenate([np.asarray(it["rate"], np.float64).reshape(-1) for it in items])
    grey = np.concatenate([simulate.rgb_to_grey(np.asarray(it["sharp"], np.float32) / 255.0).reshape(-1)
                           for it in items]).astype(np.float64)
    design = np.stack([rate, np.ones_like(rate)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, grey, rcond=None)
    return float(a), float(b)


def grey_frame(rate: np.ndarray, a: float, b: float) -> np.ndarray:
    """R = G = B = a * rate + b, float32 `[H, W, 3]` (the metrics quantise it to 8 bits as any restored frame)."""
    grey = (a * np.asarray(rate, np.float64) + b).astype(np.float32)
    return np.repeat(grey[..., None], 3, axis=-1)


def score(items: Iterable[Mapping[str, Any]], a: float, b: float, *, crop_border: int = 0) -> Dict[str, Any]:
    """{psnr_y, ssim_y, num_frames, per_sequence: {seq: {psnr_y, ssim_y, num_frames}}}: means over frames."""
    sums: Dict[str, List[Dict[str, float]]] = {}
    for it in items:
        values = metrics_lib.frame_metrics(grey_frame(it["rate"], a, b)[None],
                                          (np.asarray(it["sharp"], np.float32) / 255.0)[None], quantize=True,
                                          crop_border=crop_border)
        sums.setdefault(it["seq"], []).append({k: float(values[k][0]) for k in ("psnr_y", "ssim_y")})
    every = [v for values in sums.values() for v in values]
    if not every:
        raise ValueError("no frames to score")

    def means(values):
        return {k: float(np.mean([v[k] for v in values])) for k in ("psnr_y", "ssim_y")} | {"num_frames": len(values)}

    return {**means(every), "per_sequence": {seq: means(values) for seq, values in sorted(sums.items())}}


def reference(root, splits: Sequence[str] = ("val", "test"), params: Mapping[str, Sequence[int]] = DEFAULT_PARAMS,
              *, crop_border: int = 0) -> Dict[str, Any]:
    """For each method: the parameter and grey map chosen on val, and the scores on every split that exists.

    Returns {method: {"param": p, "param_name": ..., "map": [a, b], "val_psnr_y_by_param": {p: dB},
    "splits": {split: score(...)}}}.
    """
    available = prepare.read_prepared(root)["splits"]
    frames = {split: load_frames(root, split) for split in ("val", *splits) if split == "val" or available.get(split)}
    out: Dict[str, Any] = {}
    for method, candidates in params.items():
        tried = {}
        for p in candidates:
            val_items = rates_of(frames["val"], method, p)
            a, b = fit_grey_map(val_items)
            tried[int(p)] = (score(val_items, a, b, crop_border=crop_border), (a, b))
        best = max(tried, key=lambda p: tried[p][0]["psnr_y"])
        a, b = tried[best][1]
        result = {"param": best, "param_name": "half_window" if method == "tfp" else "max_search", "map": [a, b],
                  "val_psnr_y_by_param": {str(p): s["psnr_y"] for p, (s, _) in tried.items()},
                  "splits": {"val": tried[best][0]}}
        for split in splits:
            if split != "val" and split in frames:
                result["splits"][split] = score(rates_of(frames[split], method, best), a, b, crop_border=crop_border)
        out[method] = result
    return out
