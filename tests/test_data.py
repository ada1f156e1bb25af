"""jsigr_fast.data: file formats written here in tmp_path, transforms, registry, loaders.

Nothing is downloaded: every MNIST / CIFAR / ImageFolder file is created by the test itself.
"""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from jsigr_fast import data as D
from jsigr_fast.data import transforms as T

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


# ----------------------------------------------------------------------------------------------
# writers for the real formats
# ----------------------------------------------------------------------------------------------

def write_idx(path, arr, magic=None, gz=False, extra=b"", cut=0):
    arr = np.asarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    payload = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes() + extra
    if cut:
        payload = payload[:-cut]
    path = str(path) + (".gz" if gz else "")
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def make_mnist(directory, n_train=6, n_test=4, gz=False, seed=0):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), imgs, 2051, gz)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels, 2049, gz)
        out[prefix] = (imgs, labels)
    return out


def write_cifar_batch(path, data, labels):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": list(map(int, labels)), b"data": data,
                     b"filenames": [b"f%d.png" % i for i in range(len(labels))]}, f, protocol=2)


def make_cifar(directory, per_batch=3, seed=0):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        write_cifar_batch(os.path.join(directory, name), d, y)
        out[name] = (d, y)
    return out


def py2_cifar_pickle(data, labels):
    """The byte layout Python 2's cPickle (protocol 2) wrote for the real CIFAR batches:
    str keys as SHORT_BINSTRING, the array via numpy.core.multiarray._reconstruct."""
    def s(b):
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in data.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    arr = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
           + b"(K\x01" + shape + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + lab + b"u."


def save_image(path, arr, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


@pytest.fixture
def folder(tmp_path):
    """b_cat (class 1) and a_dog (class 0), PNG / JPG / odd files; returns (root, arrays)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    arrs = {}
    for rel, shape in [("a_dog/1.png", (10, 12, 3)), ("a_dog/sub/0.png", (9, 9, 3)),
                       ("b_cat/x.png", (8, 11, 3)), ("b_cat/grey.png", (7, 6))]:
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        save_image(str(root / rel), a)
        arrs[rel] = a
    save_image(str(root / "b_cat" / "photo.JPG"), rng.integers(0, 256, (16, 20, 3), dtype=np.uint8))
    (root / "a_dog" / "notes.txt").write_text("not an image")
    (root / "b_cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "README.md").write_text("a file next to the class folders")
    (root / ".hidden").mkdir()
    save_image(str(root / ".hidden" / "y.png"), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return root, arrs


def to_u8(x):
    return (x * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------

def test_digits_split_values_and_stratification():
    from sklearn.datasets import load_digits
    full = load_digits()
    tr, te = D.Digits("train"), D.Digits("test")
    assert (len(tr), len(te)) == (1347, 450)
    x, y = tr[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert float(tr.data.max()) == 16 and x.min() >= 0 and x.max() <= 1
    k = int(te.indices[7])
    xt, yt = te[7]
    assert torch.equal(xt[0], torch.tensor(full.images[k] / 16, dtype=torch.float32)) and yt == full.target[k]
    itr, ite = set(tr.indices.tolist()), set(te.indices.tolist())
    assert not itr & ite and len(itr | ite) == 1797
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(te.targets.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * counts) <= 1)
    assert torch.equal(D.Digits("test", seed=0).indices, te.indices)
    assert not torch.equal(D.Digits("test", seed=1).indices, te.indices)
    assert len(D.Digits("test", test_fraction=0.5)) == 899
    with pytest.raises(ValueError, match="split"):
        D.Digits("val")


# ----------------------------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz,sub", [(False, ""), (True, "MNIST/raw")])
def test_mnist_roundtrip(tmp_path, gz, sub):
    raw = make_mnist(tmp_path / sub if sub else tmp_path, gz=gz)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = D.MNIST(tmp_path, train=train)
        imgs, labels = raw[prefix]
        assert len(ds) == len(labels) and ds.data.dtype == torch.uint8
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert 0 <= x.min() and x.max() <= 1
            assert torch.equal(to_u8(x[0]), torch.from_numpy(imgs[i])) and y == labels[i]
        assert ds.image_file.endswith(".gz") == gz


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.MNIST(tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and str(tmp_path) in msg
    assert os.path.join(str(tmp_path), "MNIST", "raw") in msg
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        D.MNIST(missing)
    make_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\]") as e:
        D.MNIST(tmp_path, train=False)
    assert "t10k-images" not in str(e.value)  # only what is missing is listed


@pytest.mark.parametrize("case", ["magic", "truncated", "trailing", "count", "badgz", "label", "short"])
def test_mnist_malformed(tmp_path, case):
    make_mnist(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte"
    lab = tmp_path / "train-labels-idx1-ubyte"
    a = np.zeros((6, 28, 28), np.uint8)
    bad, match = img, None
    if case == "magic":      # a labels header where images belong
        write_idx(img, a, magic=2049); match = "magic number 2049.*expected 2051"
    elif case == "truncated":
        write_idx(img, a, cut=5); match = "truncated"
    elif case == "trailing":
        write_idx(img, a, extra=b"xx"); match = "longer than its header"
    elif case == "count":
        write_idx(lab, np.zeros(5, np.uint8), 2049); bad, match = lab, "6 images but .* 5 labels"
    elif case == "badgz":
        os.remove(img)
        gzpath = write_idx(img, a, gz=True)
        with open(gzpath, "rb") as f:
            blob = f.read()
        with open(gzpath, "wb") as f:
            f.write(blob[: len(blob) // 2])
        bad, match = gzpath, "cannot read idx file"
    elif case == "label":
        write_idx(lab, np.full(6, 12, np.uint8), 2049); bad, match = lab, "label 12"
    elif case == "short":
        img.write_bytes(b"\x00\x00"); match = "truncated"
    with pytest.raises(ValueError, match=match) as e:
        D.MNIST(tmp_path)
    assert str(bad) in str(e.value)


def test_read_idx_rejects_non_ubyte(tmp_path):
    p = write_idx(tmp_path / "f", np.zeros((2, 2), np.uint8), magic=0x0D02)  # float32 idx
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        D.read_idx(p)
    assert D.read_idx(write_idx(tmp_path / "g", np.arange(6).reshape(2, 3))).tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", ["cifar-10-batches-py", ""])
def test_cifar_roundtrip(tmp_path, sub):
    raw = make_cifar(tmp_path / sub if sub else tmp_path)
    tr, te = D.CIFAR10(tmp_path, train=True), D.CIFAR10(tmp_path, train=False)
    assert (len(tr), len(te)) == (15, 3) and tr.data.dtype == torch.uint8
    for ds, names in ((tr, [f"data_batch_{i}" for i in range(1, 6)]), (te, ["test_batch"])):
        d = np.concatenate([raw[n][0] for n in names])
        y = np.concatenate([raw[n][1] for n in names])
        for i in range(len(ds)):
            x, lab = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
            assert lab == y[i]
            u = to_u8(x)
            # row layout: 1024 red (row-major 32x32), then green, then blue
            assert torch.equal(u.reshape(-1), torch.from_numpy(d[i]))
            assert u[1, 2, 3] == d[i][1024 + 2 * 32 + 3]


def test_cifar_python2_pickle(tmp_path):
    d = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
    p = tmp_path / "test_batch"
    p.write_bytes(py2_cifar_pickle(d, [3, 9]))
    with open(p, "rb") as f:  # the layout is what the stdlib makes of a Python 2 pickle
        assert pickle.load(f, encoding="bytes")[b"labels"] == [3, 9]
    ds = D.CIFAR10(tmp_path, train=False)
    assert [ds[i][1] for i in range(2)] == [3, 9]
    assert torch.equal(to_u8(ds[1][0]).reshape(-1), torch.from_numpy(d[1]))


def test_cifar_missing(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        D.CIFAR10(tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and str(tmp_path) in msg and "cifar-10-batches-py" in msg and "extract" in msg
    make_cifar(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        D.CIFAR10(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        D.CIFAR10(tmp_path / "nope")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case", ["truncated", "garbage", "key", "shape", "labels", "evil", "notdict"])
def test_cifar_malformed(tmp_path, case):
    p = tmp_path / "test_batch"
    d = np.zeros((2, 3072), np.uint8)
    if case == "truncated":
        write_cifar_batch(p, d, [0, 1]); p.write_bytes(p.read_bytes()[:100]); match = "not a readable pickle"
    elif case == "garbage":
        p.write_bytes(b"\x00garbage" * 10); match = "not a readable pickle"
    elif case == "key":
        p.write_bytes(pickle.dumps({b"data": d, b"fine_labels": [0, 1]}, protocol=2)); match = "no key b'labels'"
    elif case == "shape":
        write_cifar_batch(p, np.zeros((2, 1024), np.uint8), [0, 1]); match = r"\(N, 3072\)"
    elif case == "labels":
        write_cifar_batch(p, d, [0]); match = "2 images"
    elif case == "evil":
        p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)); match = "not allowed"
    elif case == "notdict":
        p.write_bytes(pickle.dumps([1, 2], protocol=2)); match = "holds a list"
    with pytest.raises(ValueError, match=match) as e:
        D.CIFAR10(tmp_path, train=False)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------

def test_imagefolder_layout_and_pixels(folder):
    root, arrs = folder
    ds = D.ImageFolder(root)
    assert ds.classes == ["a_dog", "b_cat"] and ds.class_to_idx == {"a_dog": 0, "b_cat": 1}
    rel = [os.path.relpath(p, root) for p, _ in ds.samples]
    assert rel == ["a_dog/1.png", "a_dog/sub/0.png", "b_cat/grey.png", "b_cat/photo.JPG", "b_cat/x.png"]
    assert ds.targets.tolist() == [0, 0, 1, 1, 1]
    for i, r in enumerate(rel):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape[0] == 3 and 0 <= x.min() and x.max() <= 1
        assert y == ds.targets[i]
        if r.endswith(".png"):
            a = arrs[r]
            expect = np.repeat(a[:, :, None], 3, 2) if a.ndim == 2 else a  # grey → RGB
            assert torch.equal(to_u8(x), torch.from_numpy(expect).permute(2, 0, 1))
        else:
            assert x.shape == (3, 16, 20)  # lossy JPEG: shape only
    xc, _ = D.ImageFolder(root, T.CenterCrop(6))[0]
    assert torch.equal(to_u8(xc), torch.from_numpy(arrs["a_dog/1.png"][2:8, 3:9]).permute(2, 0, 1))


def test_imagefolder_extensions(tmp_path):
    a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    for name in ("c/a.bmp", "c/b.WEBP", "c/c.jpeg", "c/d.Png", "c/e.gif", "c/f.tiff"):
        fmt = {"webp": "WEBP"}.get(name.rsplit(".", 1)[1].lower())
        save_image(str(tmp_path / name), a, **({"format": fmt, "lossless": True} if fmt else {}))
    ds = D.ImageFolder(tmp_path)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.bmp", "b.WEBP", "c.jpeg", "d.Png"]
    for i in (0, 1, 3):
        assert torch.equal(to_u8(ds[i][0]), torch.from_numpy(a).permute(2, 0, 1))


def test_imagefolder_errors(tmp_path, folder):
    root, _ = folder
    with pytest.raises(FileNotFoundError, match="missing") as e:
        D.ImageFolder(tmp_path / "missing")
    assert "<class>" in str(e.value)
    (root / "c_empty").mkdir()
    (root / "c_empty" / "only.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files") as e:
        D.ImageFolder(root)
    assert str(root / "c_empty") in str(e.value)
    ds = D.ImageFolder(root, allow_empty=True)
    assert ds.classes[-1] == "c_empty" and len(ds) == 5
    flat = tmp_path / "flat"
    save_image(str(flat / "img.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="no class sub-folders") as e:
        D.ImageFolder(flat)
    assert str(flat) in str(e.value)
    bad = tmp_path / "bad"
    (bad / "k").mkdir(parents=True)
    (bad / "k" / "broken.png").write_bytes(b"not a png at all")
    ds = D.ImageFolder(bad)
    with pytest.raises(ValueError, match="cannot decode image") as e:
        ds[0]
    assert str(bad / "k" / "broken.png") in str(e.value)


# ----------------------------------------------------------------------------------------------
# Synthetic, registry
# ----------------------------------------------------------------------------------------------

def test_synthetic():
    ds = D.Synthetic(20, (3, 5, 6), 7, seed=3)
    x, y = ds[4]
    assert x.shape == (3, 5, 6) and x.dtype == torch.float32 and 0 <= x.min() and x.max() < 1
    assert 0 <= y < 7 and len(ds) == 20
    assert torch.equal(D.Synthetic(20, (3, 5, 6), 7, seed=3)[4][0], x)
    assert not torch.equal(D.Synthetic(20, (3, 5, 6), 7, seed=4)[4][0], x)
    assert not torch.equal(ds[5][0], x)
    with pytest.raises(IndexError):
        ds[20]


def test_registry(tmp_path):
    with pytest.raises(ValueError) as e:
        D.build_dataset("svhn")
    assert all(n in str(e.value) for n in ("digits", "mnist", "cifar10", "imagefolder", "imagenet", "synthetic"))
    with pytest.raises(ValueError):
        D.dataset_info("svhn")
    assert D.dataset_info("digits") == ((1, 8, 8), 10)
    assert D.dataset_info("mnist") == ((1, 28, 28), 10)
    assert D.dataset_info("cifar10") == ((3, 32, 32), 10)
    assert D.dataset_info("imagenet") == ((3, 224, 224), 1000)
    assert D.dataset_info("synthetic", shape=(3, 64, 64), num_classes=100) == ((3, 64, 64), 100)
    with pytest.raises(ValueError, match="root"):
        D.build_dataset("mnist")

    make_mnist(tmp_path / "m")
    m = D.build_dataset("mnist", tmp_path / "m", train=False)
    assert len(m) == 4 and m.transform is None
    make_cifar(tmp_path / "c")
    c = D.build_dataset("cifar10", tmp_path / "c")
    assert isinstance(c.transform, T.Compose) and c[0][0].shape == (3, 32, 32)
    assert D.build_dataset("cifar10", tmp_path / "c", train=False).transform is None
    assert D.build_dataset("cifar10", tmp_path / "c", transform=None).transform is None
    assert len(D.build_dataset("digits", train=False)) == 450

    s_tr, s_te = D.build_dataset("synthetic", num_samples=8), D.build_dataset("synthetic", train=False, num_samples=8)
    assert s_tr[0][0].shape == (3, 32, 32) and not torch.equal(s_tr[0][0], s_te[0][0])

    net = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n02", "n01"):
            save_image(str(net / split / wnid / "a.JPEG"), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    tr = D.build_dataset("imagenet", net, size=32)
    va = D.build_dataset("imagenet", net, train=False, size=32)
    assert tr.root == str(net / "train") and va.root == str(net / "val") and tr.classes == ["n01", "n02"]
    assert tr[0][0].shape == va[0][0].shape == (3, 32, 32)
    assert D.dataset_info("imagefolder", root=net / "train") == ((3, 224, 224), 2)
    assert D.build_dataset("imagefolder", net / "val", transform=None)[0][0].shape == (3, 40, 50)
    import shutil
    shutil.rmtree(net / "val")
    with pytest.raises(FileNotFoundError, match="val"):
        D.build_dataset("imagenet", net, train=False)


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------

def test_random_crop_is_window_of_padded():
    x = torch.rand(3, 32, 32) + 0.5  # no zeros inside the image
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    t = T.RandomCrop(32, padding=4)
    offsets = set()
    torch.manual_seed(0)
    for _ in range(40):
        y = t(x)
        assert y.shape == (3, 32, 32)
        hits = [(i, j) for i in range(9) for j in range(9) if torch.equal(y, padded[:, i:i + 32, j:j + 32])]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 10
    # PIL path gives the same window for the same RNG state
    a = (torch.rand(10, 12, 3) * 255).to(torch.uint8).numpy()
    torch.manual_seed(5)
    yt = T.RandomCrop(8, padding=2)(torch.from_numpy(a).permute(2, 0, 1))
    torch.manual_seed(5)
    yp = T.to_tensor(T.RandomCrop(8, padding=2)(Image.fromarray(a)))
    assert torch.equal(to_u8(yp), yt)


def test_flip():
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(T.RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(0.0)(x), x)
    torch.manual_seed(0)
    outs = {T.RandomHorizontalFlip()(x)[0, 0, 0].item() for _ in range(30)}
    assert outs == {0.0, 3.0}
    img = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert np.array_equal(np.asarray(T.RandomHorizontalFlip(1.0)(img)), np.arange(12).reshape(3, 4)[:, ::-1])


def test_random_resized_crop():
    t = T.RandomResizedCrop(24)
    torch.manual_seed(0)
    for h, w in ((50, 80), (80, 50), (30, 30)):
        for _ in range(200):
            i, j, ch, cw = t.get_params(h, w)
            assert 0 <= i and 0 <= j and i + ch <= h and j + cw <= w and ch > 0 and cw > 0
            frac = ch * cw / (h * w)
            assert 0.06 <= frac <= 1.0
    x = torch.rand(3, 50, 80)
    assert t(x).shape == (3, 24, 24)
    assert t(Image.fromarray((np.random.rand(50, 80, 3) * 255).astype(np.uint8))).size == (24, 24)
    # extreme aspect ratio exercises the fallback: central crop with clamped ratio, inside the image
    i, j, ch, cw = T.RandomResizedCrop(8, scale=(0.9, 1.0), ratio=(1.0, 1.0)).get_params(10, 100)
    assert (i, ch) == (0, 10) and cw == 10 and j == 45
    # full-image square crop == plain resize
    sq = torch.rand(3, 40, 40)
    full = T.RandomResizedCrop(20, scale=(1.0, 1.0), ratio=(1.0, 1.0))(sq)
    assert torch.allclose(full, T.Resize((20, 20))(sq))


def test_resize_center_crop_and_eval_recipe():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    assert T.Resize(256)(img).size == (341, 256)
    assert T.Resize(256)(torch.rand(3, 400, 300)).shape == (3, 341, 256)
    x = torch.arange(2 * 7 * 9, dtype=torch.float32).reshape(2, 7, 9)
    assert torch.equal(T.CenterCrop(3)(x), x[:, 2:5, 3:6])
    assert T.CenterCrop(10)(x).shape == (2, 10, 10)  # zero-padded when too small
    ev = D.eval_transform("imagenet")
    a, b = ev(img), ev(img)
    assert a.shape == (3, 224, 224) and torch.equal(a, b)
    tr = D.train_transform("imagenet")
    torch.manual_seed(1)
    assert tr(img).shape == (3, 224, 224)
    assert D.train_transform("digits") is None and D.train_transform("mnist") is None
    assert D.eval_transform("cifar10") is None
    kinds = [type(t) for t in D.train_transform("cifar10").transforms]
    assert kinds == [T.RandomCrop, T.RandomHorizontalFlip]
    with pytest.raises(ValueError):
        D.train_transform("svhn")


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------

class Probe(Dataset):
    """Item i = (index, a torch.rand draw made while fetching): shows order and augmentation RNG."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), torch.rand(2)


def epochs(loader, which):
    out = []
    for e in which:
        loader.set_epoch(e)
        out.append([(i.clone(), r.clone()) for i, r in loader])
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_loader_order_and_resume():
    n, bs = 23, 4
    ld = D.make_loader(Probe(n), bs, train=True, seed=7)
    assert len(ld) == n // bs
    e0, e1, e2 = epochs(ld, [0, 1, 2])
    idx = lambda ep: torch.cat([b[0] for b in ep])  # noqa: E731
    assert torch.equal(idx(e0), D.epoch_permutation(n, 7, 0)[: 5 * bs])
    assert torch.equal(idx(e2), torch.randperm(n, generator=torch.Generator().manual_seed(7 + 2))[: 5 * bs])
    assert not torch.equal(idx(e0), idx(e1))
    fresh = D.make_loader(Probe(n), bs, train=True, seed=7)
    assert same(epochs(fresh, [2])[0], e2)  # resume at epoch 2: same order and same RNG draws
    fresh.set_epoch(2, start_batch=3)
    assert len(fresh) == 2 and same([(i, r) for i, r in fresh], e2[3:])
    other = D.make_loader(Probe(n), bs, train=True, seed=8)
    assert not torch.equal(idx(epochs(other, [0])[0]), idx(e0))
    state = torch.get_rng_state()
    list(ld)
    assert torch.equal(torch.get_rng_state(), state)  # the training loop's RNG is untouched
    ev = D.make_loader(Probe(n), bs, train=False)
    assert len(ev) == 6 and torch.equal(torch.cat([b[0] for b in ev]), torch.arange(n))


def test_loader_augmented_first_batch_reproducible():
    ds = D.Digits("train", transform=T.Compose([T.RandomCrop(8, padding=2), T.RandomHorizontalFlip()]))
    a = next(iter(D.make_loader(ds, 32, train=True, seed=3)))
    b = next(iter(D.make_loader(ds, 32, train=True, seed=3)))
    c = next(iter(D.make_loader(ds, 32, train=True, seed=4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[0].shape == (32, 1, 8, 8) and a[1].dtype == torch.int64


def test_loader_workers_match_single_process():
    serial = epochs(D.make_loader(Probe(12), 3, train=True, seed=1), [0, 1])
    ld = D.make_loader(Probe(12), 3, train=True, seed=1, workers=2)
    assert ld.persistent_workers and ld.num_workers == 2
    par = epochs(ld, [0, 1])  # persistent workers across set_epoch
    assert same(par[0], serial[0]) and same(par[1], serial[1])


@pytest.mark.parametrize("n", [10, 11])
def test_loader_distributed(n):
    parts = [D.make_loader(Probe(n), 2, train=True, distributed=True, num_replicas=2, rank=r, seed=5,
                           drop_last=False) for r in (0, 1)]
    assert all(isinstance(p.sampler.sampler, DistributedSampler) for p in parts)
    got = [torch.cat([b[0] for b in epochs(p, [3])[0]]) for p in parts]
    perm = D.epoch_permutation(n, 5, 3).tolist()
    perm += perm[: (-n) % 2]  # DistributedSampler pads with the head of the permutation
    assert got[0].tolist() == perm[0::2] and got[1].tolist() == perm[1::2]
    evs = [D.make_loader(Probe(n), 4, train=False, distributed=True, num_replicas=2, rank=r) for r in (0, 1)]
    assert all(isinstance(p.sampler.sampler, DistributedSampler) for p in evs)
    seen = [torch.cat([b[0] for b in p]).tolist() for p in evs]
    assert sorted(seen[0] + seen[1]) == list(range(n))  # every sample exactly once, no padding
    with pytest.raises(ValueError, match="process group"):
        D.make_loader(Probe(n), 2, train=True, distributed=True)
    with pytest.raises(ValueError, match="distributed=True"):
        D.make_loader(Probe(n), 2, train=True, rank=0)
