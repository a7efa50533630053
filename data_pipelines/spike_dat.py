"""Spike camera raw `.dat` files (SpikeCV convention): reading, lazy frame-range reading, writing.

Format (Zyj061/SpikeCV `spkData/load_dat.py` and `save_dat.py`): no header; the file is a sequence of
frames of `H * W / 8` bytes; inside a frame the pixels of the *vertically flipped* image are laid out
row-major and packed 8 to a byte, least-significant bit first (pixel p of the flipped frame is bit
`p % 8` of byte `p // 8`). Bits run on across row ends: a row whose width is not a multiple of 8 shares a
byte with the next row, so only `H * W` (not `W`) has to be a multiple of 8. Nothing in the file gives H
and W; the only check a reader can make is `file size % (H * W / 8) == 0`.

Arrays here are upright `[T, H, W]` bool (row 0 = top of the image), as every other array in the project.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.fileio import atomic_path

PathLike = Union[str, os.PathLike]

# Chunk of raw bytes unpacked per step when rows are not byte-aligned (keeps the unpacked bits in cache).
_DECODE_CHUNK_BYTES = 1 << 18


def frame_bytes(height: int, width: int, path: Optional[PathLike] = None) -> int:
    """Bytes per frame of a `height` x `width` spike stream; raises DataError if H*W is not a multiple of 8."""
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise DataError(path, f"spike frame size must be positive, got {height}x{width} (HxW)", "bad_dat_shape")
    if (height * width) % 8:
        raise DataError(
            path,
            f"spike frame {height}x{width} (HxW) has {height * width} pixels, not a multiple of 8: "
            "the .dat format packs 8 pixels per byte and cannot hold it",
            "bad_dat_shape",
        )
    return height * width // 8


def count_frames(path: PathLike, height: int, width: int) -> int:
    """Number of frames in the .dat file at `path` for frames of `height` x `width`.

    Raises:
      DataError(kind="truncated_dat") if the size is not a whole number of frames,
      DataError(kind="missing_folder") if the file does not exist.
    """
    fb = frame_bytes(height, width, path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(path, "spike file not found", "missing_folder") from None
    if size % fb:
        raise DataError(
            path,
            f".dat size {size} bytes is not a multiple of {fb} bytes per {width}x{height} (WxH) frame "
            f"({size // fb} whole frames + {size % fb} bytes): truncated file or wrong frame size",
            "truncated_dat",
        )
    return size // fb


def _decode(raw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Decodes `raw` uint8 `[n * H*W/8]` (flipped, LSB-first) into upright bool `[n, H, W]`, C-contiguous."""
    fb = height * width // 8
    n = raw.size // fb
    if width % 8 == 0:
        # Whole bytes per row: reverse the byte rows, then unpacking writes upright rows directly
        # (one pass, no extra copy; measured fastest for every range length).
        rows = raw.reshape(n, height, width // 8)
        return np.unpackbits(rows[:, ::-1, :], axis=-1, bitorder="little").view(np.bool_)
    # Rows share bytes: unpack a cache-sized chunk of whole frames, then copy it flipped into place.
    out = np.empty((n, height, width), dtype=np.bool_)
    frames = raw.reshape(n, fb)
    step = max(1, _DECODE_CHUNK_BYTES // fb)
    for s in range(0, n, step):
        e = min(n, s + step)
        bits = np.unpackbits(frames[s:e], axis=-1, bitorder="little").view(np.bool_)
        out[s:e] = bits.reshape(e - s, height, width)[:, ::-1, :]
    return out


def _encode(spikes: np.ndarray) -> bytes:
    """Encodes upright `[n, H, W]` (bool or 0/1) into .dat bytes."""
    n, height, width = spikes.shape
    flipped = np.ascontiguousarray(spikes[:, ::-1, :]).astype(np.bool_, copy=False)
    return np.packbits(flipped.reshape(n, height * width), axis=-1, bitorder="little").tobytes()


class SpikeDatReader:
    """Lazy reader of a (possibly very long) .dat stream: memory-maps the file, decodes frame ranges on demand.

    Usage:
      with SpikeDatReader(path, 250, 400) as reader:
          n = reader.num_frames
          window = reader.read(1000, 1033)      # bool [33, 250, 400], upright
          frame = reader[5]                     # bool [250, 400]

    Only the bytes of the requested frames are touched, so a range costs the same in a 10 MB or a 100 GB file.
    """

    def __init__(self, path: PathLike, height: int, width: int):
        self.path = Path(path)
        self.height, self.width = int(height), int(width)
        self.frame_bytes = frame_bytes(self.height, self.width, self.path)
        self.num_frames = count_frames(self.path, self.height, self.width)
        self._mm = None

    @property
    def shape(self):
        """(num_frames, H, W)."""
        return (self.num_frames, self.height, self.width)

    def __len__(self) -> int:
        return self.num_frames

    def _memmap(self):
        if self._mm is None and self.num_frames:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def read_bytes(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """The raw bytes of frames [start, stop): a uint8 view of the memory map (valid after close())."""
        stop = self.num_frames if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= self.num_frames:
            raise DataError(
                self.path,
                f"frame range [{start}, {stop}) is outside the file's {self.num_frames} frames "
                f"of {self.width}x{self.height} (WxH)",
                "spike_window",
            )
        if start == stop:
            return np.zeros((0,), np.uint8)
        return self._memmap()[start * self.frame_bytes: stop * self.frame_bytes]

    def read(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Frames [start, stop) as upright bool `[stop - start, H, W]` (C-contiguous)."""
        return _decode(self.read_bytes(start, stop), self.height, self.width)

    def __getitem__(self, item):
        """`reader[i]` -> bool `[H, W]`; `reader[a:b:s]` -> bool `[n, H, W]` (reads only frames min..max)."""
        if isinstance(item, slice):
            start, stop, step = item.indices(self.num_frames)
            if step == 1:
                return self.read(start, max(start, stop))
            wanted = np.arange(start, stop, step)
            if wanted.size == 0:
                return np.zeros((0, self.height, self.width), np.bool_)
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            return self.read(lo, hi)[wanted - lo]
        index = int(item)
        if index < 0:
            index += self.num_frames
        return self.read(index, index + 1)[0]

    def close(self) -> None:
        """Drops the reader's memory map; the mapping goes away once no array from `read_bytes` uses it.

        (Closing the mapping itself while a view of it is alive would crash the interpreter on access.)
        """
        self._mm = None

    def __enter__(self) -> "SpikeDatReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_dat(path: PathLike, height: int, width: int, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
    """Reads a spike .dat file (or frames [start, stop) of it) into an upright bool array `[T, H, W]`.

    Args:
      path: the .dat file.
      height, width: the spike frame size (not stored in the file).
      start, stop: optional frame range; only those frames are read (memory-mapped).

    Raises:
      DataError: size not a whole number of frames ("truncated_dat"), H*W not a multiple of 8, range
        outside the file.
    """
    reader = SpikeDatReader(path, height, width)
    try:
        return reader.read(start, stop)
    finally:
        reader.close()


def write_dat(path: PathLike, spikes: np.ndarray) -> None:
    """Writes upright spikes `[T, H, W]` (bool, or integers 0/1) to `path` in the .dat format, atomically.

    Raises:
      ValueError: `spikes` is not 3-D or holds values other than 0/1.
      DataError: H*W is not a multiple of 8 (the format cannot hold the frame).
    """
    spikes = np.asarray(spikes)
    if spikes.ndim != 3:
        raise ValueError(f"{path}: spikes must be [T, H, W], got shape {spikes.shape}")
    if spikes.dtype != np.bool_:
        if spikes.size and (spikes.min() < 0 or spikes.max() > 1):
            raise ValueError(f"{path}: spikes must be 0/1, found values in [{spikes.min()}, {spikes.max()}]")
    frame_bytes(spikes.shape[1], spikes.shape[2], path)
    data = _encode(spikes)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def spike_counts(path: PathLike, height: int, width: int, start: int = 0, stop: Optional[int] = None) -> int:
    """Total number of spikes in frames [start, stop) without unpacking (bit count of the bytes)."""
    reader = SpikeDatReader(path, height, width)
    try:
        raw = np.asarray(reader.read_bytes(start, stop))
        if not raw.size:
            return 0
        if hasattr(np, "bitwise_count"):  # numpy >= 2.0
            return int(np.bitwise_count(raw).sum(dtype=np.int64))
        return int(np.unpackbits(raw).sum(dtype=np.int64))
    finally:
        reader.close()
