"""TFDS builder: the TFDS copy of a prepared root holds the same frames, counts and alignment."""
import json

import numpy as np

from data_pipelines import layout, tfds_builder
from helpers import make_tiny_root


def test_tfds_dataset_matches_prepared_files(tmp_path):
    root = make_tiny_root(tmp_path / "root", train_sequences=1, train_frames=5, val_frames=5)
    path = tfds_builder.build(root, tmp_path / "tfds")
    prepared = json.loads((root / layout.PREPARED_JSON).read_text())
    for split in ("train", "val"):
        frames = {(s["name"], fr[0]): fr for s in prepared["splits"][split] for fr in s["frames"]}
        seen = set()
        for ex in tfds_builder.load(path, split).as_numpy_iterator():
            seq, idx = ex["seq"].decode(), int(ex["frame_idx"])
            frame_idx, stem, t0, t1, event_count, _ = frames[(seq, idx)]
            np.testing.assert_array_equal(ex["blur"], layout.load_png(root / seq / "blur" / f"{stem}.png"))
            np.testing.assert_array_equal(ex["sharp"], layout.load_png(root / seq / "sharp" / f"{stem}.png"))
            counts = np.load(root / seq / "spike_vox" / f"{stem}.npy")
            np.testing.assert_array_equal(ex["spike_counts"], counts)
            assert ex["spike_counts"].dtype == counts.dtype
            assert (ex["t0"], ex["t1"], ex["event_count"]) == (t0, t1, event_count) == (t0, t1, counts.sum())
            seen.add((seq, idx))
        assert seen == set(frames)
