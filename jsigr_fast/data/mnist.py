"""MNIST from the original idx files (no download).

Files, plain or gzip-compressed (``.gz``), looked up in ``root`` and then ``root/MNIST/raw``
(the layout other libraries leave behind)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte     (60000 images)
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte      (10000 images)

idx format: a big-endian header ``0x00 0x00 <dtype> <ndim>`` (for unsigned bytes and 3 / 1 dims
this reads as the uint32 magic 2051 for images, 2049 for labels), then ``ndim`` big-endian uint32
sizes, then the raw uint8 values row-major. The same reader works for Fashion-MNIST / KMNIST,
which use the same file names.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MNIST", "read_idx", "IMAGES_MAGIC", "LABELS_MAGIC"]

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated / not-gzip .gz files
        raise ValueError(f"cannot read idx file {path}: {e}") from e


def read_idx(path: str, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse an idx file of unsigned bytes (plain or ``.gz``) into a uint8 array.

    Raises ValueError naming ``path`` if the magic number differs from ``expected_magic`` (or is not
    an unsigned-byte idx magic at all), the header is short, or the payload size does not equal the
    product of the header dims (truncated file or trailing bytes).
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"idx file {path} is truncated: {len(raw)} bytes, no 4-byte magic number")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"idx file {path} has magic number {magic} (0x{magic:08x}), expected "
                         f"{expected_magic} (0x{expected_magic:08x}); wrong file or corrupt header")
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise ValueError(f"idx file {path} has magic number {magic} (0x{magic:08x}): not an "
                         "unsigned-byte idx file (expected 0x000008NN)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {path} is truncated: header needs {header} bytes for {ndim} "
                         f"dims, file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)  # Python int: np.prod wraps at 2**64, so a bogus header could pass
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise ValueError(f"idx file {path} is {what}: header dims {tuple(dims)} need {expected} "
                         f"data bytes, found {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(root: str, name: str) -> Optional[str]:
    for d in (root, os.path.join(root, "MNIST", "raw")):
        for candidate in (name, name + ".gz"):
            p = os.path.join(d, candidate)
            if os.path.isfile(p):
                return p
    return None


class MNIST(Dataset):
    """MNIST digits: ``(x, y)`` with ``x`` float ``(1, 28, 28)`` = byte / 255 in [0, 1], ``y`` int.

    The raw bytes stay in memory as a uint8 tensor ``data`` ``(N, H, W)`` (47 MB for the
    training set); each item is converted to float when it is fetched. ``targets`` is int64.
    ``transform`` (optional) is applied to the float tensor.
    """

    classes = [str(i) for i in range(10)]

    def __init__(self, root: str, train: bool = True, transform: Optional[Callable] = None):
        if root is None:
            raise ValueError("MNIST needs root=<directory with the idx files>")
        root = os.fspath(root)
        prefix = "train" if train else "t10k"
        names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        where = f"in {root} or {os.path.join(root, 'MNIST', 'raw')}"
        if not os.path.isdir(root):
            raise FileNotFoundError(f"MNIST root {root} is not a directory; expected "
                                    f"{names[0]}[.gz] and {names[1]}[.gz] {where}")
        paths: List[Optional[str]] = [_find(root, n) for n in names]
        missing = [n for n, p in zip(names, paths) if p is None]
        if missing:
            raise FileNotFoundError(f"MNIST ({prefix}): expected {' and '.join(n + '[.gz]' for n in missing)} "
                                    f"{where} (the original idx files, uncompressed or .gz)")
        images = read_idx(paths[0], IMAGES_MAGIC)
        labels = read_idx(paths[1], LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"MNIST: {paths[0]} has {images.shape[0]} images but {paths[1]} has "
                             f"{labels.shape[0]} labels")
        if labels.size and int(labels.max()) > 9:
            raise ValueError(f"MNIST: {paths[1]} contains label {int(labels.max())}, expected 0..9")
        self.root, self.train, self.transform = root, train, transform
        self.image_file, self.label_file = paths
        self.data = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (1, int(self.data.shape[1]), int(self.data.shape[2]))

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int):
        x = self.data[i].unsqueeze(0).to(torch.float32).div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def __repr__(self) -> str:
        return f"MNIST(root={self.root!r}, train={self.train}, n={len(self)})"
