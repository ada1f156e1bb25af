"""Class-per-folder image datasets (the ImageNet layout), decoded with PIL.

Layout::

    root/<class_a>/xxx.jpg
    root/<class_a>/sub/yyy.png      (files are found recursively inside a class folder)
    root/<class_b>/zzz.JPEG

Class folders are sorted alphabetically (plain string order) and numbered 0, 1, ...; hidden
names (``.name``) are skipped at every level: hidden class folders, and hidden files and sub-folders
inside a class folder (macOS ``._img.png`` AppleDouble files, ``.ipynb_checkpoints/``). Files with
extensions jpg / jpeg / png / bmp / webp (any case) are images, everything else is ignored. Inside a
class, files are sorted by relative path.
For ImageNet the class folders are the WordNet ids (n01440764, ...), so the indices match the
usual 0..999 order.
"""
from __future__ import annotations

import os
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import reduce_16bit, to_tensor

__all__ = ["ImageFolder", "IMG_EXTENSIONS", "pil_loader", "class_folders"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def pil_loader(path: str):
    """Open ``path`` with PIL and convert to RGB; ValueError naming the path if it cannot be decoded.

    16-bit greyscale (PNG ``I;16``) keeps its high byte, as Pillow itself does for 16-bit RGB and
    grey+alpha PNGs (a plain ``convert("RGB")`` would clip every value above 255 to white).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return reduce_16bit(img).convert("RGB")  # forces the decode while the file is open
    except Image.DecompressionBombError as e:  # a corrupt header can claim billions of pixels
        raise ValueError(f"cannot decode image {path}: {e} (raise PIL.Image.MAX_IMAGE_PIXELS if "
                         "the image is genuine)") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, IndexError,
            EOFError, struct.error) as e:  # what PIL's decoders raise for bad data
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"cannot decode image {path}: {e}") from e


def class_folders(root: str) -> List[str]:
    """The class folder names of an ImageFolder ``root``: non-hidden sub-directories, sorted."""
    with os.scandir(root) as it:
        return sorted(e.name for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _scan_class(class_dir: str, extensions: Tuple[str, ...]) -> List[str]:
    """Relative paths (to ``class_dir``) of image files below it, sorted. Hidden names (``.name``)
    are skipped at every level, files and folders: macOS AppleDouble files (``._img.png``, not images)
    and ``.ipynb_checkpoints/`` copies (duplicate images) are not samples."""
    found: List[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(class_dir, rel)) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                r = os.path.join(rel, entry.name) if rel else entry.name
                if entry.is_dir(follow_symlinks=True):
                    stack.append(r)
                elif entry.name.lower().endswith(extensions) and entry.is_file(follow_symlinks=True):
                    found.append(r)
    found.sort()
    return found


class ImageFolder(Dataset):
    """``root/<class>/<image>`` → ``(transform(pil_rgb_image), class_index)``.

    ``transform`` receives the decoded RGB PIL image (use :func:`jsigr_fast.data.train_transform`
    ("imagenet") / ``eval_transform("imagenet")``). If its result (or the image, without a
    transform) is still a PIL image it is converted with :func:`to_tensor`, so items are always
    float CHW tensors in [0, 1]. Images of different sizes only batch after a cropping transform.

    Raises FileNotFoundError if ``root`` is missing and ValueError if it has no class folders, a
    class folder has no image files (unless ``allow_empty=True``), or there are no images at all.

    ``classes`` (optional) fixes the class list and its order instead of this root's own folders,
    so that another split is labelled like the training split: a folder not in the list is an
    error, a class without a folder here counts as an empty class (see ``allow_empty``).

    The file list is kept as one byte buffer plus offsets (not a list of Python strings), so
    forked DataLoader workers do not copy it page by page through reference counting — it stays
    small for ImageNet's 1.28 M files. ``samples`` materialises the ``[(path, class)]`` list.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, *,
                 extensions: Sequence[str] = IMG_EXTENSIONS, allow_empty: bool = False,
                 loader: Callable[[str], object] = pil_loader, classes: Optional[Sequence[str]] = None):
        if root is None:
            raise ValueError("ImageFolder needs root=<directory with one sub-folder per class>")
        root = os.fspath(root)
        layout = f"expected one sub-folder per class, {root}/<class>/<image>.{{jpg,jpeg,png,bmp,webp}}"
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder root {root} is not a directory; {layout}")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        found = class_folders(root)
        if classes is None:
            classes = found
        else:
            classes = [os.fspath(c) for c in classes]
            if len(set(classes)) != len(classes):
                raise ValueError(f"ImageFolder {root}: classes= lists a class twice")
            extra = sorted(set(found) - set(classes))
            if extra:
                raise ValueError(f"ImageFolder {root}: class folder(s) {', '.join(extra[:5])}"
                                 f"{' ...' if len(extra) > 5 else ''} are not among the "
                                 f"{len(classes)} classes given (their labels would be undefined)")
        if not classes:
            raise ValueError(f"ImageFolder {root} has no class sub-folders; {layout}")
        rel_paths: List[str] = []
        labels: List[int] = []
        empty: List[str] = []
        missing = False
        for idx, cls in enumerate(classes):
            class_dir = os.path.join(root, cls)
            files = _scan_class(class_dir, exts) if os.path.isdir(class_dir) else []
            if not files:
                missing = missing or not os.path.isdir(class_dir)
                empty.append(cls if os.path.isdir(class_dir) else f"{cls} (missing)")
            rel_paths.extend(os.path.join(cls, f) for f in files)
            labels.extend([idx] * len(files))
        if empty and not allow_empty:
            shown = ", ".join(os.path.join(root, c) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise ValueError(f"ImageFolder {root}: {len(empty)} class folder(s) contain no image files "
                             f"({'/'.join(exts)}): {shown}; {'add' if missing else 'remove'} "
                             "them or pass allow_empty=True")
        if not rel_paths:
            raise ValueError(f"ImageFolder {root} contains no image files; {layout}")
        encoded = [p.encode("utf-8", "surrogateescape") for p in rel_paths]
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self.root = root
        self.transform = transform
        self.loader = loader
        self.extensions = exts
        self.classes: List[str] = classes
        self.class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(classes)}
        self.targets = torch.tensor(labels, dtype=torch.int64)

    def path(self, i: int) -> str:
        """Absolute path of sample ``i``."""
        if i < 0:
            i += len(self)
        rel = self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, rel)

    @property
    def samples(self) -> List[Tuple[str, int]]:
        return [(self.path(i), int(self.targets[i])) for i in range(len(self))]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int):
        img = self.loader(self.path(i))
        if self.transform is not None:
            img = self.transform(img)
        if not isinstance(img, torch.Tensor):
            img = to_tensor(img)
        return img, int(self.targets[i])

    def __repr__(self) -> str:
        return f"ImageFolder(root={self.root!r}, classes={len(self.classes)}, n={len(self)})"
