"""One exception type for bad input data, with the file, the expected and the found value.

Every check in `data_pipelines` raises (or, in `prepare_data`, records) a `DataError`. Its message is one
line that names the file, says what was expected and what was found, e.g.

    /data/train/seq0/spike/000003.dat: size 1234 bytes is not a multiple of 12500 bytes per 400x250 frame

`kind` is a short, stable code for the class of problem (tests and tools match on it; people read the
message).
"""
from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

# The classes of bad input the data path recognises (documented in docs/DATA.md).
KINDS = (
    "missing_root",        # the root folder does not exist
    "unknown_layout",      # a folder that is none of the layouts we read
    "bad_manifest",        # dataset.json / prepared.json / voxel_stats.json unreadable or inconsistent
    "missing_sharp",       # no sharp/ folder or no sharp frame: ground truth is never fabricated
    "missing_folder",      # another required folder (blur/, spike/) is missing
    "empty_sequence",      # a sequence folder without frames
    "bad_name",            # a frame file whose name is not a frame number (e.g. 000012.png)
    "frame_size",          # a frame whose size differs from its partners or from the sequence
    "bad_image",           # corrupt / unreadable PNG, or not 8-bit RGB
    "truncated_dat",       # .dat size is not a whole number of frames
    "bad_dat_shape",       # spike frame size that the .dat format cannot hold (H*W not a multiple of 8)
    "missing_alignment",   # a frame with no alignment entry, or an alignment entry without files
    "bad_alignment",       # t1 <= t0, non-finite times, duplicate rows, unparsable values
    "spike_window",        # the spike file does not cover the exposure window
    "frame_count",         # blur/ and spike/ (or sharp/) hold different sets of frames
    "bad_voxels",          # voxel cache with non-finite values, wrong shape or wrong dtype
    "config",              # the configuration disagrees with the data
)


class DataError(ValueError):
    """Bad input data. `str(err)` is a one-line message: `<file>: <reason>`.

    Attributes:
      path: the offending file or folder (str, may be None for a purely logical problem).
      reason: what is wrong, with the expected and found values.
      kind: one of `KINDS`.
    """

    def __init__(self, path: Optional[PathLike], reason: str, kind: str = "bad_manifest"):
        if kind not in KINDS:
            raise ValueError(f"unknown DataError kind {kind!r}")
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        self.kind = kind
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason

    def __reduce__(self):  # picklable across worker processes
        return (DataError, (self.path, self.reason, self.kind))
