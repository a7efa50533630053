"""Spike camera simulation (integrate-and-fire) and blur synthesis from sharp sub-frames.

Integrate-and-fire, as the spike camera and SpikeCV's `convert_video.py` simulator work: every pixel adds its
light intensity I (grey level in [0, 1], times `gain`) to a charge once per spike frame; when the charge
reaches `threshold` the pixel fires (one spike in that frame) and the threshold is subtracted (reset by
subtraction, so the remainder carries over). The initial charge is uniform in [0, threshold) (random
phase), so the expected number of spikes in n frames of a static pixel is exactly `n * I * gain /
threshold` and the count is its floor or ceiling. A pixel fires at most once per frame (the sensor reads
out one bit per pixel per frame), so the rate saturates at 1 when `I * gain >= threshold`.

Options closer to a real sensor (all off by default; each option draws its random numbers from its own
stream, so turning one on leaves the others' draws unchanged). The noise sources are those of the spike
camera's circuit-level noise model (Hu et al., "Spike Stream Denoising via Spike Camera Simulation", 2023):
- `noise_std`: Gaussian read / photon noise on each frame's charge increment.
- `dark_rate`: dark current as random spurious spikes: in each frame every pixel independently receives a
  dark event with probability `dark_rate` (Bernoulli), which adds one (its own) threshold of charge. On a
  black scene a pixel therefore fires at exactly `dark_rate` spikes per frame; a pixel below half scale gains
  about `dark_rate` spikes per frame, a brighter one less (a dark event then often meets a frame in which the
  pixel fires anyway, and a pixel fires at most once per frame).
- `threshold_std`: per-pixel threshold mismatch (fixed-pattern noise): pixel p's threshold is
  `threshold * (1 + threshold_std * z_p)`, z_p standard normal, clipped to [0.25, 4] x threshold, fixed for
  the camera's life (drawn from its seed); a static pixel fires at `I * gain / threshold_p`.

Blur synthesis: a blurry frame is the mean of L consecutive sharp sub-frames; its ground truth is the
centre sub-frame (index L // 2), as Spk-X4K1000FPS (L = 33 or 65) and Spk-GoPro build theirs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

# ITU-R BT.601 luma weights, the weights of OpenCV's RGB->GRAY that SpikeCV's simulator uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def rgb_to_grey(frames) -> np.ndarray:
    """Grey level of RGB frames: float32 `[..., H, W]` from `[..., H, W, 3]` in [0, 1]."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [..., H, W, 3], got shape {frames.shape}")
    w = np.asarray(LUMA_WEIGHTS, np.float32)
    return frames @ w


def downscale(frames, factor: int) -> np.ndarray:
    """Area (box) down-scaling of `[..., H, W]` by an integer factor; H and W must be multiples of it."""
    frames = np.asarray(frames, dtype=np.float32)
    factor = int(factor)
    if factor == 1:
        return frames
    h, w = frames.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"frame {h}x{w} (HxW) is not divisible by the down-scaling factor {factor}")
    shaped = frames.reshape(frames.shape[:-2] + (h // factor, factor, w // factor, factor))
    return shaped.mean(axis=(-3, -1))


class IntegrateAndFire:
    """A stateful integrate-and-fire spike camera: feed grey frames in chunks, get spikes; state carries over.

    Args:
      height, width: pixel grid.
      threshold: firing threshold (Spk-X4K1000FPS used 2.0).
      seed: seeds the initial charge and the noise; equal seeds give equal streams.
      random_initial_charge: initial charge uniform in [0, threshold) (else 0).
      gain: intensity multiplier (light level).
      noise_std: standard deviation of Gaussian noise added to each frame's increment (0 = none).
      dark_current: constant added to each frame's increment (a deterministic leakage charge).
      dark_rate: probability per pixel and frame of a dark event that adds one threshold of charge (random
        dark spikes, Bernoulli; a black scene fires at exactly this rate). 0 = none.
      threshold_std: relative standard deviation of the per-pixel threshold (fixed-pattern noise); the
        thresholds are in `self.threshold` (an `[H, W]` array when > 0, else a scalar).
    """

    def __init__(self, height: int, width: int, threshold: float = 2.0, *, seed: int = 0,
                 random_initial_charge: bool = True, gain: float = 1.0, noise_std: float = 0.0,
                 dark_current: float = 0.0, dark_rate: float = 0.0, threshold_std: float = 0.0):
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if not 0.0 <= dark_rate <= 1.0:
            raise ValueError(f"dark_rate must be in [0, 1] (spikes per pixel per frame), got {dark_rate}")
        if threshold_std < 0 or noise_std < 0:
            raise ValueError(f"threshold_std and noise_std must be >= 0, got {threshold_std}, {noise_std}")
        self.threshold = np.float32(threshold)
        if threshold_std > 0:
            # Own stream (not the noise stream), so that enabling it leaves the other draws unchanged.
            z = np.random.default_rng([seed, 1]).standard_normal((height, width))
            factor = np.clip(1.0 + threshold_std * z, 0.25, 4.0)
            self.threshold = (factor * float(threshold)).astype(np.float32)
        self.gain = np.float32(gain)
        self.noise_std = float(noise_std)
        self.dark_current = np.float32(dark_current)
        self.dark_rate = float(dark_rate)
        self._dark_rng = np.random.default_rng([seed, 2]) if self.dark_rate > 0 else None
        self._rng = np.random.default_rng(seed)
        if random_initial_charge:
            self.charge = (self._rng.random((height, width), dtype=np.float32) * self.threshold).astype(np.float32)
        else:
            self.charge = np.zeros((height, width), np.float32)

    def __call__(self, grey_frames) -> np.ndarray:
        """Spikes for `[n, H, W]` grey frames in [0, 1]: bool `[n, H, W]`."""
        grey_frames = np.asarray(grey_frames, dtype=np.float32)
        if grey_frames.ndim != 3 or grey_frames.shape[1:] != self.charge.shape:
            raise ValueError(f"expected grey frames [n, {self.charge.shape[0]}, {self.charge.shape[1]}], "
                             f"got {grey_frames.shape}")
        spikes = np.empty(grey_frames.shape, np.bool_)
        charge = self.charge
        for i, frame in enumerate(grey_frames):
            increment = frame * self.gain + self.dark_current
            if self.noise_std > 0:
                increment = increment + self._rng.standard_normal(frame.shape, dtype=np.float32) * \
                    np.float32(self.noise_std)
            charge += increment
            if self._dark_rng is not None:
                charge += (self._dark_rng.random(frame.shape) < self.dark_rate) * self.threshold
            np.maximum(charge, 0, out=charge)
            fire = charge >= self.threshold
            charge -= fire * self.threshold
            # A saturated pixel (I * gain >= threshold) fires every frame; its charge does not pile up.
            np.minimum(charge, self.threshold, out=charge)
            spikes[i] = fire
        return spikes


def simulate_spikes(frames, threshold: float = 2.0, *, seed: int = 0, scale: int = 1,
                    random_initial_charge: bool = True, gain: float = 1.0, noise_std: float = 0.0,
                    dark_current: float = 0.0, dark_rate: float = 0.0, threshold_std: float = 0.0) -> np.ndarray:
    """Spike stream of a clip.

    Args:
      frames: `[n, H, W, 3]` RGB or `[n, H, W]` grey, values in [0, 1] (float) or uint8.
      threshold, seed, random_initial_charge, gain, noise_std, dark_current, dark_rate, threshold_std: see
        `IntegrateAndFire`.
      scale: spatial down-scaling factor of the spike sensor (area averaging), e.g. 2 for Spk-X4K1000FPS.

    Returns:
      bool `[n, H // scale, W // scale]`, one spike frame per input frame.
    """
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        frames = frames.astype(np.float32) / 255.0
    grey = rgb_to_grey(frames) if frames.ndim == 4 else np.asarray(frames, np.float32)
    grey = downscale(grey, scale)
    camera = IntegrateAndFire(grey.shape[1], grey.shape[2], threshold, seed=seed,
                              random_initial_charge=random_initial_charge, gain=gain,
                              noise_std=noise_std, dark_current=dark_current, dark_rate=dark_rate,
                              threshold_std=threshold_std)
    return camera(grey)


def synthesize_blur(subframes) -> Tuple[np.ndarray, np.ndarray]:
    """Blurry frame and its ground truth from L sharp sub-frames `[L, H, W, C]` (float in [0, 1]).

    Returns:
      (blur float32 `[H, W, C]` = mean of the L sub-frames, sharp float32 `[H, W, C]` = sub-frame L // 2).
    """
    subframes = np.asarray(subframes, dtype=np.float32)
    if subframes.ndim != 4 or subframes.shape[0] < 1:
        raise ValueError(f"expected sub-frames [L, H, W, C] with L >= 1, got {subframes.shape}")
    return subframes.mean(axis=0), subframes[subframes.shape[0] // 2].copy()


def expected_count(intensity: float, num_frames: int, threshold: float, gain: float = 1.0,
                   initial_charge: Optional[float] = None) -> float:
    """Expected spikes of a static pixel in `num_frames` frames (rate = min(I * gain / threshold, 1)).

    With `initial_charge` given, the exact count `floor((q0 + n * I * gain) / threshold)` (rate below 1).
    """
    rate = min(intensity * gain / threshold, 1.0)
    if initial_charge is None:
        return num_frames * rate
    return float(np.floor((initial_charge + num_frames * intensity * gain) / threshold))
