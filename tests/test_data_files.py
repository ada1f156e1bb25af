"""Regression tests for data files a user may have on disk (found by fuzzing the loaders).

Fixtures are written in tmp_path; expected values come from independent decodings (struct /
zlib / numpy), not from the code under test.
"""
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from jsigr_fast import data as D
from jsigr_fast.data import transforms as T

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ---------------------------------------------------------------------------------------------
# MNIST idx
# ---------------------------------------------------------------------------------------------

def test_idx_header_dims_whose_product_wraps_at_2_64(tmp_path):
    # 2**22 * 2**21 * 2**21 == 2**64: an int64 product wraps to 0 and matched the empty payload
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 2 ** 22, 2 ** 21, 2 ** 21))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, 0))
    with pytest.raises(ValueError, match="truncated") as e:
        D.MNIST(tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte") in str(e.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickles
# ---------------------------------------------------------------------------------------------

def _batch(tmp_path, labels, data=None, protocol=2, extra=None):
    data = np.zeros((len(labels), 3072), np.uint8) if data is None else data
    p = tmp_path / "test_batch"
    p.write_bytes(pickle.dumps({b"data": data, b"labels": labels, **(extra or {})}, protocol=protocol))
    return p


@pytest.mark.parametrize("labels", [
    [1.7, 2.2, 3.0, 9.9],            # was silently truncated to [1, 2, 3, 9]
    np.array([0.5, 1.0, 2.0, 3.0]),
    [True, False, True, False],
    ["cat", "dog", "cat", "dog"],    # was a bare numpy ValueError without the path
    [b"1", b"2", b"3", b"4"],        # was parsed as digits
    None,                            # was a bare TypeError
    [1, 2, 3, 2 ** 70],              # was a bare OverflowError
])
def test_cifar_non_integer_labels_are_refused_naming_the_file(tmp_path, labels):
    p = _batch(tmp_path, labels, data=np.zeros((4, 3072), np.uint8))
    with pytest.raises(ValueError, match="labels") as e:
        D.CIFAR10(tmp_path, train=False)
    assert str(p) in str(e.value)


def test_cifar_integral_float_labels_still_load(tmp_path):
    _batch(tmp_path, np.array([3.0, 0.0, 9.0]))
    assert D.CIFAR10(tmp_path, train=False).targets.tolist() == [3, 0, 9]


@pytest.mark.parametrize("protocol,extra", [(5, {}), (pickle.HIGHEST_PROTOCOL, {}),
                                            (2, {b"batch_label": b""})])
def test_cifar_pickles_written_by_python3(tmp_path, protocol, extra):
    # protocol 5 stores arrays via numpy's _frombuffer; protocol 2 writes b"" as __builtin__.bytes()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    _batch(tmp_path, [4, 0, 9], data=data, protocol=protocol, extra=extra)
    ds = D.CIFAR10(tmp_path, train=False)
    assert ds.targets.tolist() == [4, 0, 9]
    for i in range(3):  # oracle: row = 1024 red, 1024 green, 1024 blue, each 32x32 row-major
        expect = torch.from_numpy(data[i].reshape(3, 32, 32).astype(np.float32) / np.float32(255))
        assert torch.equal(ds[i][0], expect)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def _png_grey16(path, values):
    """A 16-bit greyscale PNG written byte by byte (colour type 0, bit depth 16, no filter)."""
    values = np.asarray(values, dtype=">u2")
    h, w = values.shape

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + values[r].tobytes() for r in range(h))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_16bit_greyscale_png_is_not_clipped_to_white(tmp_path):
    v = np.array([[0x0000, 0x1234, 0x80FF], [0xFF01, 0xFFFF, 0x00FF]], dtype=np.uint16)
    _png_grey16(str(tmp_path / "k" / "g16.png"), v)
    x, y = D.ImageFolder(tmp_path)[0]
    # the high byte, as Pillow reduces 16-bit RGB PNGs; grey replicated to RGB
    expect = torch.from_numpy((v >> 8).astype(np.float32) / np.float32(255)).expand(3, -1, -1)
    assert y == 0 and x.shape == (3, 2, 3) and torch.equal(x, expect)
    with Image.open(tmp_path / "k" / "g16.png") as im:
        t = T.to_tensor(im)
    assert t.shape == (1, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.from_numpy(v.astype(np.float64) / 65535).float(), atol=0, rtol=1e-6)


def test_corrupt_header_claiming_huge_size_is_a_value_error_naming_the_file(tmp_path):
    p = tmp_path / "k" / "huge.bmp"
    p.parent.mkdir()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(p)
    b = bytearray(p.read_bytes())
    b[18:26] = struct.pack("<ii", 60000, 60000)  # BITMAPINFOHEADER width, height: 3.6e9 pixels
    p.write_bytes(bytes(b))
    ds = D.ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="cannot decode image") as e:
        ds[0]
    assert str(p) in str(e.value)


@pytest.mark.parametrize("hw,size", [((7, 7), (10, 10)), ((5, 6), (8, 9)), ((5, 9), (8, 4)),
                                     ((6, 9), (9, 12)), ((4, 4), (5, 5))])
def test_center_crop_of_small_tensor_matches_documented_corner_and_pil(hw, size):
    h, w = hw
    th, tw = size
    a = np.random.default_rng(0).integers(1, 256, (h, w, 3), dtype=np.uint8)
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))  # documented corner
    oracle = np.zeros((th, tw, 3), np.uint8)
    for i in range(th):
        for j in range(tw):
            if 0 <= top + i < h and 0 <= left + j < w:
                oracle[i, j] = a[top + i, left + j]
    oracle_t = torch.from_numpy(oracle.astype(np.float32) / np.float32(255)).permute(2, 0, 1)
    x = torch.from_numpy(a.astype(np.float32) / np.float32(255)).permute(2, 0, 1)
    assert torch.equal(T.CenterCrop(size)(x), oracle_t)
    assert torch.equal(T.to_tensor(T.CenterCrop(size)(Image.fromarray(a))), oracle_t)


# ---------------------------------------------------------------------------------------------
# splits with different class folders
# ---------------------------------------------------------------------------------------------

def _tree(root, split, classes):
    for k, c in enumerate(classes):
        d = root / split / c
        d.mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), 10 * int(c[1:]), np.uint8)).save(d / "a.png")


def test_imagenet_val_lacking_a_class_keeps_train_labels(tmp_path):
    _tree(tmp_path, "train", ["n01", "n02", "n03"])
    _tree(tmp_path, "val", ["n01", "n03"])
    train_idx = {c: i for i, c in enumerate(sorted(os.listdir(tmp_path / "train")))}  # oracle
    tr = D.build_dataset("imagenet", tmp_path, train=True, transform=None)
    assert tr.class_to_idx == train_idx
    # by default a class without validation images is reported, not silently renumbered
    with pytest.raises(ValueError, match="n02") as e:
        D.build_dataset("imagenet", tmp_path, train=False, transform=None)
    assert str(tmp_path / "val") in str(e.value)
    va = D.build_dataset("imagenet", tmp_path, train=False, transform=None, allow_empty=True)
    got = {os.path.basename(os.path.dirname(p)): y for p, y in va.samples}
    assert got == {"n01": train_idx["n01"], "n03": train_idx["n03"]}  # n03 was labelled 1
    x, y = va[1]
    assert y == 2 and torch.equal(to_u8(x), torch.full((3, 4, 4), 30, dtype=torch.uint8))


def test_imagenet_val_with_an_extra_class_is_refused(tmp_path):
    _tree(tmp_path, "train", ["n01", "n02"])
    _tree(tmp_path, "val", ["n01", "n02", "n04"])
    with pytest.raises(ValueError, match="n04") as e:
        D.build_dataset("imagenet", tmp_path, train=False, transform=None)
    assert str(tmp_path / "train") in str(e.value)


def test_imagefolder_explicit_classes(tmp_path):
    _tree(tmp_path, "s", ["n02", "n05"])
    ds = D.ImageFolder(tmp_path / "s", classes=["n05", "n09", "n02"], allow_empty=True)
    assert ds.classes == ["n05", "n09", "n02"]
    assert {os.path.basename(os.path.dirname(p)): y for p, y in ds.samples} == {"n05": 0, "n02": 2}
    with pytest.raises(ValueError, match="n05"):
        D.ImageFolder(tmp_path / "s", classes=["n02"])


def to_u8(x):
    return (x * 255).round().to(torch.uint8)


def test_imagefolder_skips_hidden_files_and_folders_inside_a_class(tmp_path):
    # Hidden class folders were skipped, but hidden names inside a class were scanned: a macOS
    # AppleDouble file "._a.png" (not an image) failed at decode, and ".ipynb_checkpoints/" copies
    # added duplicate samples.
    values = {"cat": 40, "dog": 200}
    for cls, v in values.items():
        d = tmp_path / cls
        (d / ".ipynb_checkpoints").mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(d / "a.png")
        (d / "._a.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble header, garbage as PNG
        Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(d / ".ipynb_checkpoints" / "a-checkpoint.png")
        (d / ".hidden_sub").mkdir()
        Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(d / ".hidden_sub" / "b.png")
    ds = D.ImageFolder(tmp_path)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 2
    assert sorted((os.path.relpath(p, tmp_path), y) for p, y in ds.samples) == [
        (os.path.join("cat", "a.png"), 0), (os.path.join("dog", "a.png"), 1)]
    for i, v in enumerate(values.values()):
        x, y = ds[i]
        assert y == i
        assert torch.equal(to_u8(x), torch.full((3, 4, 4), v, dtype=torch.uint8))
