"""A TFDS builder for a prepared root: one example per blurry frame, splits train and val.

Features:
  blur, sharp     Image uint8 [H, W, 3] (PNG bytes copied, not re-encoded)
  spike_counts    uint8/uint16 [K, H/f, W/f] (the voxel cache: integer counts before log1p)
  seq             Text, "<split>/<sequence>"
  frame_idx       int32
  t0, t1          float64 (ticks, see docs/DATA.md)
  event_count     int64

Build with `python scripts/prepare_data.py --root DIR --build_tfds [--tfds_dir D]` (or `build(...)`), read
with `tfds.builder_from_directory(path).as_dataset(split="train")`. The training pipeline reads the prepared
files directly (random access to clips); the TFDS copy is for tools that consume TFDS, and for moving the
data as a few large files.

TensorFlow Datasets is imported only when a function here is called.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipelines import layout, prepare

NAME = "vrt_spike_frames"
_VERSION = "1.0.0"
_BUILDER_CLASS = None


def _builder_class():
    """Defines the builder class once (TFDS registers builder classes by name)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

    class VrtSpikeFrames(tfds.core.GeneratorBasedBuilder):
        """Frames of a prepared vrtspike-layout root (blur, sharp, spike counts, alignment)."""

        VERSION = tfds.core.Version(_VERSION)
        RELEASE_NOTES = {_VERSION: "First version: per-frame examples of a prepared root."}

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):
            # No checksums file to find next to the code (nothing is downloaded); also spares TFDS's lookup
            # of the module's resource path, which needs the optional importlib_resources package.
            return None

        def __init__(self, *, prepared_root=None, **kwargs):
            self._prepared_root = None if prepared_root is None else Path(prepared_root)
            super().__init__(**kwargs)

        def _prepared(self):
            with open(self._prepared_root / layout.PREPARED_JSON, "r", encoding="utf-8") as f:
                return json.load(f)

        def _info(self):
            prepared = self._prepared()
            k, f = prepared["num_bins"], prepared["spike_scale"]
            return self.dataset_info_from_configs(
                description=f"vrtspike-layout frames of {self._prepared_root} (K={k}, spike_scale={f})",
                features=tfds.features.FeaturesDict({
                    "blur": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "sharp": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "spike_counts": tfds.features.Tensor(shape=(k, None, None),
                                                         dtype=np.dtype(prepared["voxel_dtype"]),
                                                         encoding=tfds.features.Encoding.ZLIB),
                    "seq": tfds.features.Text(),
                    "frame_idx": tfds.features.Scalar(dtype=np.int32),
                    "t0": tfds.features.Scalar(dtype=np.float64),
                    "t1": tfds.features.Scalar(dtype=np.float64),
                    "event_count": tfds.features.Scalar(dtype=np.int64),
                }),
                homepage="https://github.com/S-VRT/S-VRT",
            )

        def _split_generators(self, dl_manager):
            prepared = self._prepared()
            return {split: self._generate_examples(prepared["splits"].get(split, []))
                    for split in layout.SPLITS if prepared["splits"].get(split)}

        def _generate_examples(self, sequences):
            for seq in sequences:
                seq_dir = self._prepared_root / seq["name"]
                for frame_idx, stem, t0, t1, event_count, _ in seq["frames"]:
                    yield f"{seq['name']}/{stem}", {
                        "blur": str(seq_dir / layout.BLUR / f"{stem}.png"),
                        "sharp": str(seq_dir / layout.SHARP / f"{stem}.png"),
                        "spike_counts": np.load(seq_dir / layout.SPIKE_VOX / f"{stem}.npy"),
                        "seq": seq["name"],
                        "frame_idx": int(frame_idx),
                        "t0": float(t0),
                        "t1": float(t1),
                        "event_count": int(event_count),
                    }

    _BUILDER_CLASS = VrtSpikeFrames
    return _BUILDER_CLASS


def build(prepared_root, tfds_dir, num_bins: int = 32) -> Path:
    """Builds the TFDS dataset of a prepared root into `tfds_dir`; returns the dataset's version folder."""
    prepare.read_prepared(prepared_root, num_bins=num_bins)
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):
        pass
    cls = _builder_class()
    builder = cls(prepared_root=prepared_root, data_dir=str(tfds_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)


def load(builder_dir, split: str = "train"):
    """`tf.data.Dataset` of a built dataset folder (as returned by `build`)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(str(builder_dir)).as_dataset(split=split, shuffle_files=False)
