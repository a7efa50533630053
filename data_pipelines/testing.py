"""Small datasets for tests and quick experiments (tiny versions of the embedded dataset)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from data_pipelines import prepare, synthetic

# 32x32 frames, 32 spike frames per exposure (one per bin at K = 32); renders in well under a second.
TINY_SPEC = synthetic.SyntheticSpec(height=32, width=32, train_sequences=3, val_sequences=1, train_frames=7,
                                    val_frames=6, subframes=32, blur_px=5.0, threshold=1.0, seed=0)


def make_tiny_root(path, prepare_it: bool = True, num_bins: int = 32, **overrides) -> Path:
    """Renders TINY_SPEC (with `overrides`) into `path`; prepares it unless `prepare_it` is False."""
    spec = dataclasses.replace(TINY_SPEC, **overrides)
    root = synthetic.make_dataset(Path(path), spec)
    if prepare_it:
        result = prepare.prepare_root(prepare.PrepareOptions(root=root, num_bins=num_bins, progress=False),
                                      log=lambda line: None)
        if result.exit_code != 0:
            raise RuntimeError("; ".join(p.message for p in result.problems))
    return root
