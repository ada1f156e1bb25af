"""Image transforms and the standard augmentation recipes, torch + PIL only (no torchvision).

Every transform is a small callable class. Geometric transforms accept either a CHW tensor or a
PIL image and return the same kind; :class:`ToTensor` turns a PIL image into a float CHW tensor in
[0, 1]. Random transforms draw from torch's *global* RNG (``torch.randint`` / ``torch.rand`` with no
``generator``), never from ``random`` or numpy, so that the loader's per-sample seeding
(:mod:`jsigr_fast.data.loader`) makes the augmentation of sample ``i`` in epoch ``e`` a fixed
function of ``(seed, e, i)``, independent of worker count, rank and ``persistent_workers``.

Models are fed [0, 1] images (normalisation is the model's first layer), so there is no
``Normalize`` here.

Standard recipes (:func:`train_transform` / :func:`eval_transform`):

===========  =====================================================  ==============================
dataset      train                                                  eval
===========  =====================================================  ==============================
digits       none (8x8 tensors)                                     none
mnist        none (28x28 tensors)                                   none
cifar10      ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``  none
imagenet     ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip``    ``Resize(256)`` + ``CenterCrop(224)``
             + ``ToTensor`` (on the decoded PIL image)              + ``ToTensor``
synthetic    none                                                   none
===========  =====================================================  ==============================
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

try:  # Pillow is optional for tensor-only use (digits / mnist / cifar)
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow ships with matplotlib in the dev venv
    Image = None

__all__ = [
    "Compose", "ToTensor", "to_tensor", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
    "Resize", "CenterCrop", "train_transform", "eval_transform", "reduce_16bit",
]

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _is_pil(img) -> bool:
    return Image is not None and isinstance(img, Image.Image)


def _hw(img) -> Tuple[int, int]:
    if _is_pil(img):
        w, h = img.size
        return h, w
    if not isinstance(img, torch.Tensor) or img.dim() < 2:
        raise TypeError(f"expected a PIL image or a (..., H, W) tensor, got {type(img).__name__}")
    return int(img.shape[-2]), int(img.shape[-1])


def _pil_filter(name: str):
    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[name]


def _resize_tensor(x: torch.Tensor, size: Tuple[int, int], interpolation: str) -> torch.Tensor:
    """Resize the last two dims of a float tensor (antialiased like PIL when downsampling)."""
    squeeze = x.dim() == 3
    xb = x.unsqueeze(0) if squeeze else x
    if interpolation == "nearest":
        out = F.interpolate(xb, size=size, mode="nearest")
    else:
        out = F.interpolate(xb, size=size, mode=interpolation, align_corners=False, antialias=True)
        if interpolation == "bicubic":
            out = out.clamp_(0.0, 1.0)
    return out.squeeze(0) if squeeze else out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        body = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{body}\n])"


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _grey16(img) -> np.ndarray:
    """uint16 array of a 16-bit greyscale image (``I`` is clipped to 0..65535, the PNG range)."""
    return np.clip(np.asarray(img).astype(np.int64), 0, 65535).astype(np.uint16)


def reduce_16bit(img):
    """16-bit greyscale PIL image → 8-bit ``L`` with the high byte of each value; others unchanged.

    Pillow's own ``convert`` clips such values to 255 (an all-white image) instead of scaling them.
    """
    if _is_pil(img) and img.mode in _MODES_16BIT:
        return Image.fromarray((_grey16(img) >> 8).astype(np.uint8), "L")
    return img


def to_tensor(img) -> torch.Tensor:
    """PIL image (any mode; converted to RGB unless it is ``L``) → contiguous float CHW in [0, 1].

    Tensors pass through unchanged. uint8 values ``v`` map to exactly ``v / 255``; 16-bit greyscale
    (``I;16``, e.g. a 16-bit PNG) gives one channel ``v / 65535``.
    """
    if isinstance(img, torch.Tensor):
        return img
    if not _is_pil(img):
        raise TypeError(f"to_tensor expects a PIL image or a tensor, got {type(img).__name__}")
    if img.mode in _MODES_16BIT:  # convert("RGB") would clip these to 255
        out = _grey16(img).astype(np.float32)[None]
        out /= np.float32(65535.0)
        return torch.from_numpy(np.ascontiguousarray(out))
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # numpy, not torch, for the conversion: it is a single-threaded loop, while torch's
    # intra-op threads make this small op slower in a loaded main process. Exactly v / 255 in fp32.
    out = arr.transpose(2, 0, 1).astype(np.float32, order="C")  # new contiguous writable array
    out /= np.float32(255.0)
    return torch.from_numpy(out)


class ToTensor:
    """Callable form of :func:`to_tensor`."""

    def __call__(self, img) -> torch.Tensor:
        return to_tensor(img)

    def __repr__(self) -> str:
        return "ToTensor()"


class RandomCrop:
    """Zero-pad each side by ``padding`` then take a uniformly random ``size`` window.

    The CIFAR standard is ``RandomCrop(32, padding=4)``: the output is the window
    ``pad(x)[:, i:i+32, j:j+32]`` with ``i, j`` uniform in ``0..8``.
    """

    def __init__(self, size: Size, padding: int = 0, fill: float = 0.0):
        self.size = _pair(size)
        self.padding = int(padding)
        self.fill = fill
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")

    def get_params(self, height: int, width: int) -> Tuple[int, int]:
        """Top-left corner ``(i, j)`` of the window in the *padded* image."""
        th, tw = self.size
        ph, pw = height + 2 * self.padding, width + 2 * self.padding
        if th > ph or tw > pw:
            raise ValueError(f"RandomCrop size {self.size} larger than padded image {(ph, pw)}")
        i = int(torch.randint(0, ph - th + 1, ()).item())
        j = int(torch.randint(0, pw - tw + 1, ()).item())
        return i, j

    def __call__(self, img):
        h, w = _hw(img)
        i, j = self.get_params(h, w)
        th, tw = self.size
        p = self.padding
        if _is_pil(img):
            if self.fill != 0:
                raise ValueError("RandomCrop on PIL images supports fill=0 only")
            return img.crop((j - p, i - p, j - p + tw, i - p + th))  # PIL fills outside with 0
        if p:
            img = F.pad(img, (p, p, p, p), value=float(self.fill))
        return img[..., i:i + th, j:j + tw]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror left↔right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, img):
        if torch.rand(()).item() < self.p:
            if _is_pil(img):
                return img.transpose(Image.FLIP_LEFT_RIGHT)
            return img.flip(-1)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResizedCrop:
    """Inception-style crop: random area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), resized to ``size``. Same sampling as the usual ImageNet recipe: 10 attempts,
    then a fallback central crop with the ratio clamped into range.

    On PIL images the crop and resize are one ``Image.resize(..., box=...)`` call (antialiased).
    """

    def __init__(self, size: Size, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), interpolation: str = "bilinear"):
        self.size = _pair(size)
        if scale[0] > scale[1] or ratio[0] > ratio[1] or scale[0] <= 0 or ratio[0] <= 0:
            raise ValueError(f"invalid scale {scale} or ratio {ratio}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.interpolation = interpolation

    def get_params(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop; always inside the ``height x width`` image."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * torch.empty(()).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(()).uniform_(log_lo, log_hi).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, ()).item())
                j = int(torch.randint(0, width - w + 1, ()).item())
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        height, width = _hw(img)
        i, j, h, w = self.get_params(height, width)
        th, tw = self.size
        if _is_pil(img):
            return img.resize((tw, th), _pil_filter(self.interpolation), box=(j, i, j + w, i + h))
        return _resize_tensor(img[..., i:i + h, j:j + w], (th, tw), self.interpolation)

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class Resize:
    """``Resize(256)``: scale so the *shorter* side is 256, keeping the aspect ratio (the long side
    becomes ``int(256 * long / short)``). ``Resize((h, w))`` resizes to exactly ``h x w``."""

    def __init__(self, size: Size, interpolation: str = "bilinear"):
        self.size = size if isinstance(size, int) else _pair(size)
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.interpolation = interpolation

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        if not isinstance(self.size, int):
            return self.size
        s = self.size
        if height <= width:
            return s, int(s * width / height)
        return int(s * height / width), s

    def __call__(self, img):
        h, w = _hw(img)
        oh, ow = self.output_size(h, w)
        if (oh, ow) == (h, w):
            return img
        if _is_pil(img):
            return img.resize((ow, oh), _pil_filter(self.interpolation))
        return _resize_tensor(img, (oh, ow), self.interpolation)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


class CenterCrop:
    """Central ``size`` window (top-left ``round((H - h) / 2), round((W - w) / 2)``); zero-pads
    images smaller than ``size``."""

    def __init__(self, size: Size):
        self.size = _pair(size)

    def __call__(self, img):
        h, w = _hw(img)
        th, tw = self.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        if _is_pil(img):
            return img.crop((left, top, left + tw, top + th))  # out-of-range area is filled with 0
        if th > h or tw > w:
            # pad so that the window keeps the documented corner (as PIL's crop does)
            pt, pl = max(-top, 0), max(-left, 0)
            pb, pr = max(top + th - h, 0), max(left + tw - w, 0)
            img = F.pad(img, (pl, pr, pt, pb))
            top, left = top + pt, left + pl
        return img[..., top:top + th, left:left + tw]

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


_NO_AUG = ("digits", "mnist", "synthetic")
_IMAGENET = ("imagenet", "imagefolder")


def train_transform(dataset: str, *, size: int = 224) -> Callable | None:
    """The standard training augmentation for ``dataset`` (see the module table); ``None`` = none.

    ``size`` is the ImageNet crop size (ignored for the other datasets).
    """
    name = dataset.lower()
    if name in _NO_AUG:
        return None
    if name == "cifar10":
        return Compose([RandomCrop(32, padding=4), RandomHorizontalFlip()])
    if name in _IMAGENET:
        return Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor()])
    raise ValueError(f"no standard transform for dataset {dataset!r}; "
                     f"choices: {', '.join(_NO_AUG + ('cifar10',) + _IMAGENET)}")


def eval_transform(dataset: str, *, size: int = 224, resize: int | None = None) -> Callable | None:
    """The standard deterministic evaluation transform; ``None`` = none.

    ImageNet: ``Resize(resize)`` then ``CenterCrop(size)``; ``resize`` defaults to
    ``round(size * 256 / 224)`` (256 for 224).
    """
    name = dataset.lower()
    if name in _NO_AUG or name == "cifar10":
        return None
    if name in _IMAGENET:
        resize = int(round(size * 256 / 224)) if resize is None else int(resize)
        return Compose([Resize(resize), CenterCrop(size), ToTensor()])
    raise ValueError(f"no standard transform for dataset {dataset!r}; "
                     f"choices: {', '.join(_NO_AUG + ('cifar10',) + _IMAGENET)}")
