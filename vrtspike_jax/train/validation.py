"""Validation during training: full-size clips through the tiled restorer, literature-convention metrics,
triptychs.

Metric conventions (KAIR / BasicSR, as VRT's `main_test_vrt.py`; implemented in `vrtspike_jax.metrics`):
  * every frame is quantised to 8 bits first (clamp to [0, 1], round(255 x)), as if written to a PNG;
  * PSNR on RGB (`psnr`) and on BT.601 Y (`psnr_y`: Y = 16 + 65.481 R + 128.553 G + 24.966 B, R, G, B in
    [0, 1], not rounded), 10 log10(255^2 / MSE) per frame;
  * SSIM on Y (`ssim_y`) and on RGB (`ssim`, the mean of the three channel SSIMs): 11x11 Gaussian window
    (sigma 1.5), 'valid' filtering, population variances, constants (0.01 x 255)^2 and (0.03 x 255)^2;
  * LPIPS (AlexNet v0.1, inputs mapped to [-1, 1]) when `eval.lpips_weights` is given;
  * no border is cropped (`eval.crop_border`, 0 for deblurring);
  * every value is the mean over frames (each evaluation frame counts once; clips overlap only where the data
    pipeline's `eval_mask` says which copy counts), over all validation sequences and processes.
The same metrics of the blurry input against the ground truth are reported as `input_*` (the baseline to beat).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from data_pipelines import fileio
from vrtspike_jax import metrics as metrics_lib
from vrtspike_jax.metrics import CONVENTIONS, METRIC_NAMES, frame_metrics, quantize_uint8   # noqa: F401 (re-exported)

def triptych(blur: np.ndarray, restored: np.ndarray, sharp: np.ndarray) -> np.ndarray:
    """blur | restored | sharp side by side: uint8 [H, 3W, 3] from three [H, W, 3] frames in [0, 1]."""
    return np.concatenate([quantize_uint8(blur), quantize_uint8(restored), quantize_uint8(sharp)], axis=1)


def save_png(path: Path, image: np.ndarray) -> None:
    """Writes a uint8 RGB image atomically (data_pipelines.fileio: a temporary name, then a rename)."""
    from PIL import Image

    with fileio.atomic_path(path, ".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


class LPIPSScorer:
    """LPIPS-alex from a local weights file, jitted; `scorer(a, b)` on [n, H, W, 3] in [0, 1] -> [n]."""

    def __init__(self, weights_path: str, convention: str = "standard"):
        module = metrics_lib.load_lpips(weights_path, convention=convention)
        self.graphdef, self.state = nnx.split(module)
        graphdef = self.graphdef
        self._fn = jax.jit(lambda state, a, b: nnx.merge(graphdef, state)(a, b))

    def __call__(self, restored: np.ndarray, reference: np.ndarray) -> np.ndarray:
        # 8-bit frames, as for PSNR / SSIM.
        a = quantize_uint8(restored).astype(np.float32) / 255.0
        b = quantize_uint8(reference).astype(np.float32) / 255.0
        return np.asarray(self._fn(self.state, a, b), np.float64)


class MetricSums:
    """Per-metric sums and frame counts (plain sums, reduced over processes by the caller)."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.count = 0

    def add(self, values: Mapping[str, np.ndarray]) -> None:
        n = None
        for name, array in values.items():
            array = np.asarray(array, np.float64)
            self.sums[name] = self.sums.get(name, 0.0) + float(array.sum())
            n = array.size
        self.count += n or 0

    def vector(self, names) -> np.ndarray:
        return np.array([self.sums.get(name, 0.0) for name in names] + [self.count], np.float64)


def allreduce_sums(vector: np.ndarray) -> np.ndarray:
    """Sum of a float64 vector over processes (identity with one process)."""
    if jax.process_count() == 1:
        return vector
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(vector.astype(np.float64), tiled=False)
    return np.asarray(gathered, np.float64).reshape(jax.process_count(), -1).sum(axis=0)


def evaluate(apply_fn: Callable, eval_iterator, *, tile, spike_scale: int, use_spike: bool, quantize: bool = True,
             crop_border: int = 0, lpips: Optional[LPIPSScorer] = None, max_clips: int = -1,
             want_input_metrics: bool = True, triptych_clips: int = 0,
             on_triptych: Optional[Callable[[str, int, np.ndarray], None]] = None) -> Dict[str, Any]:
    """Restores every validation clip of this process with `restore_video` and returns the metrics.

    Args:
      apply_fn: a process-local jitted model function (`vrtspike_jax.inference.make_apply_fn`).
      eval_iterator: `create_eval_iterator(...)` of this process (batch 1, full frames, `eval_mask`).
      tile: an inference.TileSpec; spike_scale: f of the data/model; use_spike: whether spikes go to the model.
      lpips: an LPIPSScorer, or None. max_clips: evaluate at most this many clips per process (-1: all).
      want_input_metrics: also measure the blurry input against the ground truth (`input_*` keys).
      triptych_clips: for the first n clips of this process, `on_triptych(name, frame_idx, image)` gets the
        blur | restored | sharp triptych of the clip's middle evaluated frame.
    Returns:
      {"psnr": ..., "psnr_y": ..., "ssim": ..., "ssim_y": ..., ["lpips"], ["input_psnr", ...], "num_frames": n,
       "per_sequence": {seq: {"psnr": ..., "psnr_y": ..., "ssim": ..., "ssim_y": ..., ["lpips"], "num_frames": ...}}}
      with means over every process's frames.
    """
    from vrtspike_jax.inference import restore_video

    names = list(METRIC_NAMES) + (["lpips"] if lpips is not None else [])
    input_names = [f"input_{n}" for n in names] if want_input_metrics else []
    restored_sums, input_sums = MetricSums(), MetricSums()
    per_sequence: Dict[str, MetricSums] = {}
    for i, batch in enumerate(eval_iterator):
        if 0 <= max_clips <= i:
            break
        mask = np.asarray(batch["eval_mask"][0], bool)
        if not mask.any():  # a padding clip of a multi-process evaluation (nothing of it counts)
            continue
        frames = batch["blur"][0]
        spikes = batch["spike_vox"][0] if use_spike else None
        restored = restore_video(apply_fn, frames, spikes, tile=tile, spike_scale=spike_scale)
        sharp = batch["sharp"][0][mask]
        out = restored[mask]
        values = frame_metrics(out, sharp, quantize=quantize, crop_border=crop_border)
        if lpips is not None:
            values["lpips"] = lpips(out, sharp)
        restored_sums.add(values)
        seq = str(batch["seq"])
        per_sequence.setdefault(seq, MetricSums()).add(values)
        if want_input_metrics:
            blurry = frames[mask]
            base = frame_metrics(blurry, sharp, quantize=quantize, crop_border=crop_border)
            if lpips is not None:
                base["lpips"] = lpips(blurry, sharp)
            input_sums.add({f"input_{k}": v for k, v in base.items()})
        if on_triptych is not None and i < triptych_clips:
            middle = int(np.flatnonzero(mask)[len(np.flatnonzero(mask)) // 2])
            frame_idx = int(batch["frame_idx"][0][middle])
            on_triptych(seq, frame_idx, triptych(frames[middle], restored[middle], batch["sharp"][0][middle]))
    totals = allreduce_sums(np.concatenate([restored_sums.vector(names), input_sums.vector(input_names)]))
    n = int(totals[len(names)])
    result: Dict[str, Any] = {"num_frames": n}
    for j, name in enumerate(names):
        result[name] = float(totals[j] / n) if n else float("nan")
    if want_input_metrics:
        offset = len(names) + 1
        n_in = totals[offset + len(input_names)]
        for j, name in enumerate(input_names):
            result[name] = float(totals[offset + j] / n_in) if n_in else float("nan")
    # Per-sequence PSNR of this process's sequences (each sequence's clips may span processes: a process-local
    # partial view, merged by the host that writes the file; exact with one process).
    result["per_sequence"] = {seq: {**{name: total / s.count for name, total in s.sums.items()}, "num_frames": s.count}
                              for seq, s in sorted(per_sequence.items())}
    return result


def write_metrics_json(workdir: Path, step: int, result: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """`WORKDIR/metrics/val_step_<step>.json` (atomic write); returns the path."""
    path = Path(workdir) / "metrics" / f"val_step_{step:07d}.json"
    payload = {"step": int(step), **dict(result), **dict(extra)}
    fileio.atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_metrics_jsons(workdir: Path) -> List[Dict[str, Any]]:
    """Every `metrics/val_step_*.json` of a workdir, by step."""
    folder = Path(workdir) / "metrics"
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("val_step_*.json"))]


class Validator:
    """A training run's validation at a step: `validator(steps_done, apply_fn) -> metrics`.

    It owns the eval data and what surrounds `evaluate`: the blurry input's metrics (measured by every process at this
    start's first validation, so that their reductions match, and reused afterwards), `psnr_gain_over_input`, the
    triptychs when due (every `eval.triptych_every_steps` and at the last step; process 0's first
    `eval.num_triptychs` clips: PNGs in WORKDIR/triptychs and TensorBoard images), the `val/*` scalars, and
    WORKDIR/metrics/val_step_<N>.json (process 0). `writer` is a CLU metric writer.
    """

    def __init__(self, config, workdir, eval_iter, writer, *, use_spike: bool, total_steps: int, is_main: bool = True,
                 process_count: int = 1, data_counts: Optional[Mapping[str, Any]] = None):
        from vrtspike_jax.train import run_config

        config = run_config.read(config)
        ev = config.eval
        self.workdir, self.eval_iter, self.writer = Path(workdir), eval_iter, writer
        self.use_spike, self.total_steps, self.is_main = bool(use_spike), int(total_steps), bool(is_main)
        self.spike_scale = int(config.data.spike_scale)
        self.tile = ev.tile
        self.quantize, self.crop_border, self.max_clips = ev.quantize, ev.crop_border, ev.max_clips
        self.triptych_every, self.num_triptychs = ev.triptych_every_steps, ev.num_triptychs
        self.lpips = (LPIPSScorer(os.path.expanduser(ev.lpips_weights), ev.lpips_convention)
                      if ev.lpips_weights else None)
        self.extra = {"tile": self.tile.to_dict(), "quantize": self.quantize, "crop_border": self.crop_border,
                      "process_count": int(process_count), "data": dict(data_counts or {}),
                      "conventions": CONVENTIONS}
        self.input_metrics: Dict[str, float] = {}

    def triptychs_due(self, steps_done: int) -> bool:
        return self.triptych_every > 0 and (steps_done % self.triptych_every == 0 or steps_done == self.total_steps)

    def __call__(self, steps_done: int, apply_fn: Callable) -> Dict[str, Any]:
        start = time.perf_counter()
        images: Dict[str, np.ndarray] = {}

        def on_triptych(seq: str, frame_idx: int, image: np.ndarray) -> None:
            name = f"{seq.replace('/', '_')}_{frame_idx:06d}"
            save_png(self.workdir / "triptychs" / f"step_{steps_done:07d}_{name}.png", image)
            images[f"triptych/{name}"] = image[None]

        want_triptychs = self.is_main and self.triptychs_due(steps_done)
        result = evaluate(apply_fn, self.eval_iter, tile=self.tile, spike_scale=self.spike_scale,
                          use_spike=self.use_spike, quantize=self.quantize, crop_border=self.crop_border,
                          lpips=self.lpips, max_clips=self.max_clips, want_input_metrics=not self.input_metrics,
                          triptych_clips=self.num_triptychs if want_triptychs else 0,
                          on_triptych=on_triptych if self.is_main else None)
        if not self.input_metrics:
            self.input_metrics = {k: v for k, v in result.items() if k.startswith("input_")}
        result.update(self.input_metrics)
        result["psnr_gain_over_input"] = result["psnr"] - result.get("input_psnr", float("nan"))
        seconds = time.perf_counter() - start
        scalars = {f"val/{k}": v for k, v in result.items() if isinstance(v, float)}
        self.writer.write_scalars(steps_done, {**scalars, "val/seconds": seconds})
        if images:
            self.writer.write_images(steps_done, images)
        if self.is_main:
            path = write_metrics_json(self.workdir, steps_done, result, {"seconds": seconds, **self.extra})
            logging.info("validation at step %d (%.1f s): PSNR %.3f dB (input %.3f), PSNR-Y %.3f, SSIM-Y %.4f -> %s",
                         steps_done, seconds, result["psnr"], result.get("input_psnr", float("nan")),
                         result["psnr_y"], result["ssim_y"], path)
        return result


__all__ = ["CONVENTIONS", "LPIPSScorer", "METRIC_NAMES", "Validator", "evaluate", "frame_metrics", "quantize_uint8", "read_metrics_jsons",
           "save_png", "triptych", "write_metrics_json"]
