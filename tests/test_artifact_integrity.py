"""Artifacts prove they are intact: recorded sha256 and value checks, named errors for every damage, and
bounded loading of hostile data files (pickle / gzip / npz bombs)."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import random
import shutil
import struct
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ddfast.errors import ArtifactError, DatasetFormatError
from ddfast.experiments.ld import distill, evaluate_run, load_distilled
from ddfast.runs import MANIFEST, read_manifest

FILES = ("distilled.safetensors", "meta.json", MANIFEST)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("integrity") / "ld")
    distill("digits", 10, "second_order", out=out, epochs=1, outer_batch=256, val_every=1, model="mlp")
    return out


def _copy(run, tmp_path, name="copy"):
    out = str(tmp_path / name)
    shutil.copytree(run, out)
    return out


def _flip_soft_label_exponent(path):
    """Flip the top exponent bit of the first soft label (float32) in place."""
    raw = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header["soft_labels"]["data_offsets"][0]
    raw[start + 3] ^= 0x40  # bit 30 of a little-endian float32: the exponent's MSB
    open(path, "wb").write(bytes(raw))


def test_intact_run_loads(run):
    tensors, meta = load_distilled(run)
    assert tensors["soft_labels"].shape == (10, 10) and meta["config"]["variant"] == "second_order"


def test_flipped_exponent_bit_is_caught_by_name(run, tmp_path):
    out = _copy(run, tmp_path)
    path = os.path.join(out, "distilled.safetensors")
    _flip_soft_label_exponent(path)
    with pytest.raises(ArtifactError, match="sha256") as e:
        evaluate_run(out, models=1)
    assert path in str(e.value) and "--overwrite" in str(e.value)
    assert not os.path.exists(os.path.join(out, "eval.json"))
    # Without the manifest (an older run folder) the value checks still catch it.
    os.unlink(os.path.join(out, MANIFEST))
    with pytest.raises(ArtifactError, match="probability_rows.*soft_labels"):
        load_distilled(out)


@pytest.mark.parametrize("damage, check", [
    ("nan_labels", "probability_rows"), ("negative_steps", "nonnegative"), ("unknown_variant", "known value"),
])
def test_value_checks(run, tmp_path, damage, check):
    out = _copy(run, tmp_path)
    path = os.path.join(out, "distilled.safetensors")
    tensors = load_file(path)
    meta = json.load(open(os.path.join(out, "meta.json")))
    if damage == "nan_labels":
        tensors["soft_labels"][0, 0] = float("nan")
    elif damage == "negative_steps":
        tensors["steps_to_overfit"] = torch.tensor(-5)
    else:
        meta["config"]["variant"] = "third_order"
    save_file(tensors, path)
    json.dump(meta, open(os.path.join(out, "meta.json"), "w"))
    with pytest.raises(ArtifactError, match="sha256"):  # with the manifest: the file changed
        load_distilled(out)
    os.unlink(os.path.join(out, MANIFEST))
    with pytest.raises(ArtifactError, match=check):  # without: the value check names what is wrong
        load_distilled(out)


def _corrupt(rng, path):
    raw = bytearray(open(path, "rb").read())
    kind = rng.choice(["flip", "truncate", "garbage", "empty", "delete", "splice"])
    if kind == "flip":
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        raw = raw[: rng.randrange(len(raw))]
    elif kind == "garbage":
        i = rng.randrange(len(raw))
        raw[i:i + 16] = bytes(rng.randrange(256) for _ in range(16))
    elif kind == "empty":
        raw = bytearray()
    elif kind == "splice":
        i, j = sorted(rng.randrange(len(raw)) for _ in range(2))
        raw = raw[:i] + raw[j:]
    if kind == "delete":
        os.unlink(path)
    else:
        open(path, "wb").write(bytes(raw))
    return kind


def test_100_random_corruptions_give_named_errors(run, tmp_path):
    rng = random.Random(0)
    reference = load_distilled(run)
    harmless = 0
    for trial in range(100):
        out = _copy(run, tmp_path, f"c{trial}")
        name = rng.choice(FILES)
        path = os.path.join(out, name)
        kind = _corrupt(rng, path)
        try:
            tensors, meta = load_distilled(out)
        except ArtifactError as e:
            assert os.path.join(out, "") in str(e) or out in str(e), (trial, kind, str(e))
            assert len(str(e).splitlines()) == 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"trial {trial} ({kind} in {name}): raw {type(e).__name__}: {e}")
        # Only a change that leaves the parsed content identical may load (e.g. JSON whitespace).
        assert meta == reference[1] and all(torch.equal(tensors[k], reference[0][k]) for k in tensors), (trial, kind)
        harmless += 1
        shutil.rmtree(out)
    assert harmless <= 5


def test_damaged_checkpoint_names_the_file(run, tmp_path):
    out = _copy(run, tmp_path)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    open(ckpt, "r+b").write(b"\xff" * 12)
    with pytest.raises(ArtifactError, match="checkpoint.safetensors"):
        distill("digits", 10, "second_order", out=out, epochs=2, outer_batch=256, val_every=1, model="mlp",
                resume=True)


# ------------------------------------------------------------------------------ hostile data files


def _timed(fn, limit=5.0):
    t0 = time.perf_counter()
    with pytest.raises(DatasetFormatError) as e:
        fn()
    assert time.perf_counter() - t0 < limit
    return str(e.value)


def test_shared_nested_list_pickle_fails_fast(tmp_path):
    from ddfast.data import read_cifar_batches

    deep = [0]
    for _ in range(60):  # 2^60 elements when walked, a few hundred bytes on disk
        deep = [deep, deep]
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": deep, b"labels": [0]}, protocol=2))
    assert p.stat().st_size < 1200
    assert str(p) in _timed(lambda: read_cifar_batches([p]))
    row = list(range(1000))
    wide = tmp_path / "wide"
    wide.write_bytes(pickle.dumps({b"data": [row] * 100000, b"labels": [0]}, protocol=2))
    assert "referenced more than once" in _timed(lambda: read_cifar_batches([wide]))


def test_declared_sizes_are_checked_before_allocating(tmp_path):
    from ddfast.data import read_cifar_batches

    class Huge:
        def __reduce__(self):
            return (np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (800_000_000,), b"b"))

    p = tmp_path / "huge"
    p.write_bytes(pickle.dumps({b"data": Huge(), b"labels": [0]}, protocol=2))
    assert p.stat().st_size < 900
    assert "placeholder" in _timed(lambda: read_cifar_batches([p]), limit=2.0)


def test_gzip_bomb_is_bounded(tmp_path):
    from ddfast.data import read_idx

    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb", compresslevel=9) as f:
        f.write(b"\x00\x00\x08\x03" + (100_000).to_bytes(4, "big") + (1000).to_bytes(4, "big") * 2)
        zeros = bytes(1 << 22)
        for _ in range(100):  # 400 MiB of zeros in ~400 KiB
            f.write(zeros)
    assert "decompression bomb" in _timed(lambda: read_idx(p), limit=20.0)  # stops after ~40 MB, not 400


def test_npz_bomb_and_lying_header_are_bounded(tmp_path):
    from ddfast.data import read_npz

    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x_train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (1 << 31,)})
            zeros = bytes(1 << 22)
            for _ in range(100):
                f.write(zeros)
    assert "decompression bomb" in _timed(lambda: read_npz(bomb, ["x_train"]), limit=2.0)  # declared size
    liar = tmp_path / "liar.npz"
    with zipfile.ZipFile(liar, "w") as z:
        with z.open("x_train.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**8,)})
            f.write(bytes(64))
    assert "header declares" in _timed(lambda: read_npz(liar, ["x_train"]), limit=1.0)
