"""CIFAR-10 from the python-pickle batches (``cifar-10-python.tar.gz``, extracted; no download).

Files, in ``root`` or ``root/cifar-10-batches-py``::

    data_batch_1 ... data_batch_5   (train, 5 x 10000 images)
    test_batch                      (test, 10000 images)

Each file is a pickled dict (written by Python 2, protocol 2) with keys ``b"data"`` — a uint8
array ``(N, 3072)``, each row the 1024 red, then green, then blue values of a 32x32 image in
row-major order — and ``b"labels"`` — a list of N ints in 0..9 (``str`` keys are accepted too).

The files are read with a restricted unpickler that only resolves the globals a numpy-array
pickle needs, so a corrupt or hostile file raises ValueError instead of running code.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CIFAR10", "load_cifar_batch"]

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _allowed_globals():
    reconstruct = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module today
    scalar = np.float64(0).__reduce__()[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x names
        allowed[(mod, "_reconstruct")] = reconstruct
        allowed[(mod, "scalar")] = scalar
    # protocol 5 (pickle.HIGHEST_PROTOCOL) stores arrays as _frombuffer(buffer, dtype, shape, order)
    frombuffer = np.empty(1, np.uint8).__reduce_ex__(5)[0]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = frombuffer
    import _codecs
    allowed[("_codecs", "encode")] = _codecs.encode  # Python 3 protocol-2 pickles of bytes
    allowed[("__builtin__", "bytes")] = bytes  # protocol 2 writes b"" as __builtin__.bytes()
    allowed[("builtins", "bytes")] = bytes
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module, name):
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch") from None


def _get(d: dict, key: str):
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def _int_labels(path: str, labels) -> np.ndarray:
    """``labels`` as int64; ValueError naming ``path`` unless they are integers (or integral floats).

    ``np.asarray(x, dtype=np.int64)`` alone would truncate 9.9 to 9 and turn b"3" into 3.
    """
    what = f"CIFAR batch {path}: b'labels' must be integer class indices 0..9"
    try:
        arr = np.asarray(labels)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{what} ({type(e).__name__}: {e})") from None
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < np.iinfo(np.int64).min or arr.max() > np.iinfo(np.int64).max):
            raise ValueError(f"{what}, found {arr.max()}")
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) \
            and (arr.size == 0 or np.abs(arr).max() < 2 ** 62):
        return arr.astype(np.int64)
    bad = arr.reshape(-1)[:3].tolist() if arr.ndim else [arr.item()]
    raise ValueError(f"{what}, got {arr.dtype} values such as {bad}")


def load_cifar_batch(path: str):
    """Read one batch file → ``(data uint8 (N, 3, 32, 32), labels int64 (N,))``.

    ValueError naming ``path`` for an unreadable pickle, missing keys, wrong shapes or labels.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        d = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from a corrupt file
        raise ValueError(f"CIFAR batch {path} is not a readable pickle ({type(e).__name__}: {e}); "
                         "expected a dict with keys b'data' and b'labels'") from e
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR batch {path} holds a {type(d).__name__}, expected a dict with keys "
                         "b'data' and b'labels'")
    try:
        data, labels = _get(d, "data"), _get(d, "labels")
    except KeyError as e:
        raise ValueError(f"CIFAR batch {path} has no key b'{e.args[0]}' (keys: "
                         f"{sorted(map(repr, d))}); expected b'data' and b'labels'") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR batch {path}: b'data' is {data.dtype} {data.shape}, expected uint8 "
                         "(N, 3072)")
    labels = _int_labels(path, labels)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR batch {path}: {data.shape[0]} images but b'labels' has shape "
                         f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR batch {path}: labels outside 0..9 "
                         f"(min {labels.min()}, max {labels.max()})")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10(Dataset):
    """CIFAR-10: ``(x, y)`` with ``x`` float ``(3, 32, 32)`` = byte / 255 in [0, 1], ``y`` int.

    ``data`` keeps the raw bytes as a uint8 tensor ``(N, 3, 32, 32)`` (150 MB for train), converted
    per item; ``targets`` is int64. ``transform`` (optional) is applied to the float tensor, e.g.
    ``jsigr_fast.data.train_transform("cifar10")``.
    """

    classes = CLASSES

    def __init__(self, root: str, train: bool = True, transform: Optional[Callable] = None):
        if root is None:
            raise ValueError("CIFAR10 needs root=<directory with cifar-10-batches-py>")
        root = os.fspath(root)
        files = TRAIN_FILES if train else TEST_FILES
        sub = os.path.join(root, "cifar-10-batches-py")
        expect = (f"expected {'data_batch_1 .. data_batch_5' if train else 'test_batch'} "
                  f"(python-pickle batches from cifar-10-python.tar.gz, extracted) in {root} or {sub}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR10 root {root} is not a directory; {expect}")
        base = sub if os.path.isfile(os.path.join(sub, files[0])) else root
        missing: List[str] = [n for n in files if not os.path.isfile(os.path.join(base, n))]
        if missing:
            hint = ""
            if os.path.isfile(os.path.join(root, "cifar-10-python.tar.gz")):
                hint = f"; found {os.path.join(root, 'cifar-10-python.tar.gz')}: extract it first (tar xzf)"
            raise FileNotFoundError(f"CIFAR10: missing {', '.join(missing)}; {expect}{hint}")
        parts = [load_cifar_batch(os.path.join(base, n)) for n in files]
        self.root, self.train, self.transform = root, train, transform
        self.files = [os.path.join(base, n) for n in files]
        self.data = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
        self.targets = torch.from_numpy(np.concatenate([p[1] for p in parts]))

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int):
        x = self.data[i].to(torch.float32).div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def __repr__(self) -> str:
        return f"CIFAR10(root={self.root!r}, train={self.train}, n={len(self)})"
