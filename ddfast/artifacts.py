"""Saved state without pickle: tensors in safetensors, everything else as JSON in its metadata.

``save_state`` writes ``path`` atomically (a temporary file in the same folder, fsync, rename), so a
crash leaves either the previous file or the new one. ``load_state`` never unpickles code. Nested
dicts/lists of tensors (optimizer states) are flattened to ``a/b/0/c`` keys and rebuilt on load.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import save_file

__all__ = ["save_state", "load_state", "write_json_atomic", "read_run", "flatten_tensors", "unflatten_tensors"]

_META_KEY = "ddfast"
_SEP = "/"


def flatten_tensors(tree, prefix=""):
    """Split a nested dict/list into ``{path: tensor}`` and a JSON-able skeleton (tensors → path strings)."""
    tensors = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"{path}: dict keys must be str or int")
            return {"__dict__": [[k, walk(v, f"{path}{_SEP}{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [walk(v, f"{path}{_SEP}{i}" if path else str(i)) for i, v in enumerate(node)]}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"{path}: cannot store a {type(node).__name__}")

    skeleton = walk(tree, prefix)
    return tensors, skeleton


def unflatten_tensors(skeleton, tensors):
    def build(node):
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {k: build(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                return [build(v) for v in node["__list__"]]
        return node

    return build(skeleton)


def _atomic_write(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state(path: str, state) -> None:
    """Write a nested dict of tensors / JSON values to ``path`` (safetensors), atomically."""
    tensors, skeleton = flatten_tensors(state)
    meta = {_META_KEY: json.dumps(skeleton)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str):
    """Inverse of :func:`save_state`. A missing, damaged or foreign file raises
    :class:`ddfast.errors.ArtifactError` naming it (a ``FileNotFoundError`` subclass is not used: the
    error says what to do)."""
    from ddfast.errors import ArtifactError
    from ddfast.runs import read_safetensors

    hint = "delete it to start the run again, or restore it from a copy"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    tensors, meta = read_safetensors(path, hint)
    if _META_KEY not in meta:
        raise ArtifactError(path, f"not a ddfast state file (no '{_META_KEY}' metadata)", hint)
    try:
        return unflatten_tensors(json.loads(meta[_META_KEY]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(path, f"damaged state metadata ({type(e).__name__}: {e})", hint) from None


def write_json_atomic(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


def read_run(run_dir: str, method: str) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a distillation run directory: ``distilled.safetensors`` + ``meta.json``
    (no unpickling), verified against the run's manifest when it has one (:func:`ddfast.runs.verify_run`).
    A missing or damaged file raises :class:`ddfast.errors.ArtifactError` naming it and the
    ``ddfast distill <method>`` command that writes it."""
    from ddfast.runs import verify_run

    return verify_run(run_dir, method, command=f"ddfast distill {method}")
