"""Run folders: one folder is one run, its artifacts prove they are intact, every load names the file.

A run folder (``ddfast distill ... --out R``, ``ddfast trajectory``, ``ddfast ssl``) holds a
``manifest.json`` written when the run starts:

- ``config``: the whole configuration of the run (every field, not a chosen few);
- ``inputs``: the identity of what it reads: the data set (name, absolute path, sha256 of every split's
  tensors), a trajectory or a target model (absolute path and sha256);
- ``versions`` (python, torch, numpy, ddfast) and the git ``commit`` of the ddfast source when known;
- ``status`` (``running`` / ``done``) and, once done, ``artifacts``: each file's sha256, size and the
  value checks it must pass (finite, probability rows, non-negative step counts, a known variant).

The policy, the same for every subcommand (:meth:`RunFolder.begin`):

- a second process writing the same folder fails at once (advisory ``fcntl`` lock on ``R/.lock``; the
  message names the holder's PID);
- a finished run is never overwritten without ``overwrite=True`` (``--overwrite``), which deletes the
  run's own files first; an unfinished one needs ``resume=True`` (``--resume``) or ``overwrite=True``;
- ``resume`` compares the whole configuration and every input identity with the manifest and refuses
  any difference before writing anything; only a run's length (``growable`` fields: epochs, steps,
  iterations) may grow;
- stale ``.tmp-*`` files of a killed atomic write are removed when a run starts.

Loading (:func:`verify_run`, :func:`read_json`, :func:`read_safetensors`) raises
:class:`ddfast.errors.ArtifactError` naming the file, the check that failed and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import subprocess
import sys

import torch

from ddfast.errors import ArtifactError, RunFolderError

try:  # advisory locks need POSIX
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

__all__ = ["MANIFEST", "RunFolder", "sha256_file", "sha256_tensors", "dataset_identity", "file_identity",
           "environment", "read_json", "read_manifest", "read_safetensors", "check_tensors", "check_values", "verify_run",
           "verify_file", "TENSOR_CHECKS", "clean_stale_tmp",
           "maybe_run_folder", "dataset_spec", "write_run_artifacts"]

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "ddfast.run/1"
# Files of a run that --overwrite may delete (besides those the manifest lists). Never anything else.
OWNED = ("manifest.json", "meta.json", "eval.json", "checkpoint.safetensors", "distilled.safetensors", "*.png")


# ------------------------------------------------------------------------------------------ hashing


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise ArtifactError(path, f"cannot read the file ({e.strerror or e})") from None
    return h.hexdigest()


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """sha256 over each tensor's dtype, shape and bytes (CPU, contiguous), in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.dtype == torch.bfloat16
                     else memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def dataset_spec(name: str, root: str | None = None) -> tuple[str, str | None]:
    """``(name, root)`` with paths made absolute: ``npz:rel.npz`` → ``npz:/abs/rel.npz``, so that a run
    can be evaluated from any working directory."""
    if name.startswith("npz:"):
        path = name[4:] if root is None else os.path.join(root, name[4:])
        return "npz:" + os.path.abspath(os.path.expanduser(path)), None
    return name, (os.path.abspath(os.path.expanduser(str(root))) if root is not None else None)


def dataset_identity(ds, name: str, root: str | None = None) -> dict:
    """Identity of a loaded :class:`~ddfast.data.ImageDataset`: spec (absolute path), sizes, and the
    sha256 of each split's tensors (images as loaded, i.e. after resizing and normalisation)."""
    spec, root = dataset_spec(name, root)
    return {
        "name": spec, "root": root, "image_size": int(ds.image_size), "channels": int(ds.channels),
        "num_classes": int(ds.num_classes),
        "sha256": {part: sha256_tensors(getattr(ds, f"{part}_x"), getattr(ds, f"{part}_y"))
                   for part in ("train", "val", "test")},
    }


def file_identity(path: str) -> dict:
    return {"path": os.path.abspath(path), "sha256": sha256_file(path)}


_ENV = None


def environment() -> dict:
    """Versions and the git commit of the ddfast source (None outside a git checkout)."""
    global _ENV
    if _ENV is None:
        import numpy

        from ddfast import __version__

        commit = None
        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(src, ".git")):
            with contextlib.suppress(Exception):
                r = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
                commit = r.stdout.strip() or None
                if commit:
                    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                                           capture_output=True, text=True, timeout=5).stdout.strip()
                    commit += "+dirty" if dirty else ""
        _ENV = {"versions": {"ddfast": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
                             "python": platform.python_version()}, "commit": commit}
    return json.loads(json.dumps(_ENV))


def _content_sha256(manifest: dict) -> str:
    """sha256 of a manifest's content without its own ``sha256`` field (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: str, hint: str = "") -> dict:
    """A run manifest, its format and its own checksum verified."""
    manifest = read_json(path, "run manifest", hint)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(path, "not a ddfast run manifest", hint)
    if manifest.get("sha256") != _content_sha256(manifest):
        raise ArtifactError(path, "check 'sha256' failed: the manifest's content does not match its checksum "
                                  "(edited or damaged)", hint)
    return manifest


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj):
    """Tuples → lists, non-JSON values → str, so that a config compares equal to its stored form."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


# ------------------------------------------------------------------------------------------ loading


def read_json(path: str, what: str = "JSON file", hint: str = ""):
    """Parse a JSON file; a missing, unreadable or damaged one raises :class:`ArtifactError` naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ArtifactError(path, f"missing {what}", hint) from None
    except OSError as e:
        raise ArtifactError(path, f"cannot read the {what} ({e.strerror or e})", hint) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(path, f"not a readable {what} ({type(e).__name__}: {e})", hint) from None


def read_safetensors(path: str, hint: str = "") -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file; damage raises :class:`ArtifactError` naming it."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise ArtifactError(path, "missing file", hint)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, MemoryError) as e:
        raise ArtifactError(path, f"not a readable safetensors file ({type(e).__name__}: {e})", hint) from None
    return tensors, meta


# ------------------------------------------------------------------------------------------ value checks


def _finite(t):
    return None if not t.is_floating_point() or bool(torch.isfinite(t).all()) else "non-finite values"


def _probability_rows(t):
    if t.dim() != 2 or not t.is_floating_point():
        return f"expected a 2-D float matrix, got {t.dtype} {list(t.shape)}"
    if not bool(torch.isfinite(t).all()):
        return "non-finite values"
    if bool((t < -1e-6).any()) or bool((t > 1 + 1e-6).any()):
        return f"entries outside [0, 1] (range [{t.min().item():.4g}, {t.max().item():.4g}])"
    err = (t.double().sum(1) - 1).abs().max().item() if t.shape[0] else 0.0
    return None if err <= 1e-3 else f"rows do not sum to 1 (max deviation {err:.3g})"


def _nonnegative(t):
    return None if t.numel() == 0 or bool((t >= 0).all()) else f"negative values (min {t.min().item():.4g})"


def _integer(t):
    if t.is_floating_point():
        return f"expected integers, got {t.dtype}"
    return None


def _scalar(t):
    return None if t.dim() == 0 else f"expected a scalar, got shape {list(t.shape)}"


TENSOR_CHECKS = {"finite": _finite, "probability_rows": _probability_rows, "nonnegative": _nonnegative,
                 "integer": _integer, "scalar": _scalar}


def check_tensors(path: str, tensors: dict, spec: dict, hint: str = "") -> None:
    """Run the checks of ``spec`` (tensor name → check names; ``"*"`` for every tensor) on ``tensors``."""
    for name, checks in spec.items():
        names = list(tensors) if name == "*" else [name]
        for n in names:
            if n not in tensors:
                raise ArtifactError(path, f"check 'present': tensor {n!r} is missing (holds {sorted(tensors)})", hint)
            for check in checks:
                fn = TENSOR_CHECKS.get(check)
                if fn is None:
                    raise ArtifactError(path, f"unknown value check {check!r} recorded for {n!r}", hint)
                problem = fn(tensors[n])
                if problem:
                    raise ArtifactError(path, f"check '{check}' failed for {n!r}: {problem}", hint)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def check_values(path: str, obj: dict, spec: dict, hint: str = "") -> None:
    """JSON value checks: ``spec`` maps a dotted key to the list of allowed values, or to ``"present"``,
    ``"nonnegative"`` or ``"finite"``."""
    if not isinstance(obj, dict):
        raise ArtifactError(path, f"expected a JSON object, got {type(obj).__name__}", hint)
    for key, allowed in spec.items():
        try:
            value = _get(obj, key)
        except KeyError:
            raise ArtifactError(path, f"check 'present' failed: no {key!r}", hint) from None
        if allowed == "present":
            continue
        if allowed in ("nonnegative", "finite"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (allowed == "nonnegative" and value < 0):
                raise ArtifactError(path, f"check '{allowed}' failed: {key} = {value!r}", hint)
        elif value not in allowed:
            raise ArtifactError(path, f"check 'known value' failed: {key} = {value!r}, expected one of {allowed}", hint)


def verify_file(path: str, record: dict | None, hint: str = ""):
    """Load one artifact, compare its sha256 with ``record`` (when given) and run the recorded value
    checks; returns ``(tensors, metadata)`` for safetensors, the parsed object for JSON, else None."""
    if not os.path.exists(path):
        raise ArtifactError(path, "missing file (listed in the run's manifest)", hint)
    if record and record.get("sha256"):
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ArtifactError(path, f"check 'sha256' failed: the file changed after the run wrote it "
                                      f"(sha256 {digest[:12]}…, manifest {record['sha256'][:12]}…)", hint)
    record = record or {}
    if path.endswith(".safetensors"):
        tensors, meta = read_safetensors(path, hint)
        check_tensors(path, tensors, record.get("tensors", {}), hint)
        return tensors, meta
    if path.endswith(".json"):
        obj = read_json(path, hint=hint)
        check_values(path, obj, record.get("values", {}), hint)
        return obj
    return None


def verify_run(run_dir: str, kind: str | None = None, *, defaults: dict | None = None,
               command: str = "") -> tuple[dict, dict]:
    """``(tensors, meta)`` of a finished run folder, every artifact verified.

    With a manifest: its ``kind`` must match, ``status`` must be ``done``, and every listed artifact must
    have its recorded sha256 and pass its recorded checks. Without one (a folder written by an older
    ddfast): ``defaults`` (artifact → record without sha256) supply the value checks.
    """
    hint = (f"re-run it with `{command} --out {run_dir} --overwrite`" if command else
            "re-create the run with --overwrite") + " or restore the file from a copy"
    first = f"distil first with `{command} ... --out {run_dir}`" if command else "distil first"
    if not os.path.isdir(run_dir):
        raise ArtifactError(run_dir, "no such run folder", first)
    man_path = os.path.join(run_dir, MANIFEST)
    if os.path.exists(man_path):
        manifest = read_manifest(man_path, hint)
        if kind is not None and manifest.get("kind") != kind:
            raise ArtifactError(man_path, f"this is a {manifest.get('kind')!r} run, expected {kind!r}")
        if manifest.get("status") != "done":
            raise ArtifactError(man_path, f"the run is not finished (status {manifest.get('status')!r})",
                                f"continue it with `{command} ... --out {run_dir} --resume`" if command else
                                "continue it with --resume")
        records = manifest.get("artifacts") or {}
    else:
        records = defaults or {}
    for name in ("distilled.safetensors", "meta.json", *records):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            raise ArtifactError(path, "missing" + (" (listed in the run's manifest)" if name in records and
                                                   os.path.exists(man_path) else ""),
                                hint if os.path.exists(man_path) else first)
    out = {}
    for name, record in records.items():
        out[name] = verify_file(os.path.join(run_dir, name), record, hint)
    tensors, _ = out.get("distilled.safetensors") or read_safetensors(os.path.join(run_dir, "distilled.safetensors"), hint)
    meta = out.get("meta.json") or read_json(os.path.join(run_dir, "meta.json"), "run meta.json", hint)
    return tensors, meta


# ------------------------------------------------------------------------------------------ the folder


def clean_stale_tmp(folder: str) -> list[str]:
    """Remove ``.tmp-*`` files left by a killed atomic write (call only while holding the folder's lock)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(name)
    return removed


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


class RunFolder:
    """The run folder ``path`` of kind ``kind`` (``ld``, ``krr-st``, ``ead``, ``trajectory``, ``ssl``).

    Use as a context manager: entering takes the folder's lock (failing at once if another process holds
    it); :meth:`begin` applies the resume / overwrite policy and writes the manifest; :meth:`finish`
    records the artifacts. ``owned`` adds glob patterns of files the run writes (deleted by overwrite).
    """

    def __init__(self, path: str, kind: str, *, owned: tuple[str, ...] = (), command: str = ""):
        self.path = os.path.abspath(path)
        self.kind = kind
        self.owned = OWNED + tuple(owned)
        self.command = command or f"ddfast {kind}"
        self.manifest: dict | None = None
        self._fd = None
        self._created = False

    # lock ----------------------------------------------------------------------------------------
    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.release(failed=exc_type is not None)
        return False

    def lock(self) -> None:
        if self._fd is not None:
            return
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f"{self.path}: exists and is not a folder; choose another --out")
        self._created = not os.path.exists(self.path)
        os.makedirs(self.path, exist_ok=True)
        lock_path = os.path.join(self.path, LOCK)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                with contextlib.suppress(OSError):
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"PID {holder}" if holder else "another process"
                raise RunFolderError(f"{self.path}: {who} is writing this run folder (lock {lock_path}); wait for "
                                     "it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self.path)

    def release(self, failed: bool = False) -> None:
        if self._fd is None:
            return
        if failed and self._created and self.manifest is None:
            # Nothing was started: leave no empty folder behind.
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, LOCK))
                os.rmdir(self.path)
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None
        _HELD.discard(self.path)

    # policy --------------------------------------------------------------------------------------
    def existing(self) -> dict | None:
        path = os.path.join(self.path, MANIFEST)
        if not os.path.exists(path):
            return None
        return read_manifest(path, "start the run again with --overwrite")

    def _owned_files(self, manifest) -> list[str]:
        names = set((manifest or {}).get("artifacts", {}) or {})
        for name in os.listdir(self.path):
            if any(fnmatch.fnmatch(name, pat) for pat in self.owned):
                names.add(name)
        return sorted(n for n in names if os.path.isfile(os.path.join(self.path, n)))

    def begin(self, config: dict, *, inputs: dict | None = None, resume: bool = False, overwrite: bool = False,
              growable: tuple[str, ...] = ()) -> bool:
        """Apply the policy; returns True when an existing run is continued (the caller passes it as
        ``resume`` to ``fit``). Raises :class:`RunFolderError` before writing anything when refused."""
        if self._fd is None:
            self.lock()
        if resume and overwrite:
            raise RunFolderError("resume and overwrite: choose one (--resume continues the run, --overwrite "
                                 "starts it again)")
        config, inputs = _jsonable(config), _jsonable(inputs or {})
        old = self.existing()
        leftovers = self._owned_files(old)
        continuing = False
        if old is not None and old.get("kind") != self.kind:
            if not overwrite:
                raise RunFolderError(f"{self.path}: holds a {old.get('kind')!r} run, not a {self.kind!r} one; "
                                     "choose another --out (or --overwrite to replace it)")
        elif old is not None and resume:
            self._compare(old, config, inputs, growable)
            continuing = True
        elif old is not None and not overwrite:
            if old.get("status") == "done":
                raise RunFolderError(f"{self.path}: holds a finished {self.kind} run; pass --overwrite to replace "
                                     "it, --resume to continue it (e.g. with more epochs / steps / iterations), "
                                     "or choose another --out")
            raise RunFolderError(f"{self.path}: holds an unfinished {self.kind} run; pass --resume to continue it "
                                 "or --overwrite to start it again")
        elif old is None and leftovers and not overwrite:
            raise RunFolderError(f"{self.path}: holds run files without a {MANIFEST} ({', '.join(leftovers[:4])}"
                                 f"{', ...' if len(leftovers) > 4 else ''}), written by an older ddfast or another "
                                 "tool; its configuration cannot be checked, so it is not resumed or replaced "
                                 "silently: pass --overwrite to replace it, or choose another --out")
        # Accepted: from here on the folder is written.
        clean_stale_tmp(self.path)
        if overwrite:
            for name in leftovers:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, name))
        now = _now()
        manifest = {"format": FORMAT, "kind": self.kind, "status": "running", "created": now, "config": config,
                    "inputs": inputs, **environment(), "artifacts": {}}
        if continuing:
            manifest["created"] = old.get("created", now)
            manifest["resumed"] = list(old.get("resumed", [])) + [now]
        self.manifest = manifest
        self._write()
        return continuing

    def _compare(self, old: dict, config: dict, inputs: dict, growable) -> None:
        diffs = []
        mine = {**{f"config.{k}": v for k, v in _flatten(config).items()},
                **{f"inputs.{k}": v for k, v in _flatten(inputs).items()}}
        theirs = {**{f"config.{k}": v for k, v in _flatten(old.get("config", {})).items()},
                  **{f"inputs.{k}": v for k, v in _flatten(old.get("inputs", {})).items()}}
        grow = {f"config.{g}" for g in growable}
        for key in sorted(set(mine) | set(theirs)):
            a, b = theirs.get(key, "<absent>"), mine.get(key, "<absent>")
            if key in grow and isinstance(a, (int, float)) and isinstance(b, (int, float)):
                if b < a:
                    diffs.append(f"{key[7:]}: {a!r} in the run, {b!r} now (a run may grow, not shrink)")
            elif a != b:
                label = key[7:] if key.startswith("config.") else key
                diffs.append(f"{label}: {_short(a)} in the run, {_short(b)} now")
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise RunFolderError(f"{self.path}: --resume refused, this is not the same run ({shown}). Resume with the "
                                 "run's settings, start a new run in another folder, or pass --overwrite to replace it")

    # recording -----------------------------------------------------------------------------------
    def _write(self) -> None:
        from ddfast.artifacts import write_json_atomic

        self.manifest["sha256"] = _content_sha256(self.manifest)
        write_json_atomic(os.path.join(self.path, MANIFEST), self.manifest)

    def finish(self, artifacts: dict[str, dict], **extra) -> dict:
        """Verify and record ``artifacts`` (file name → ``{"tensors": {...}}`` / ``{"values": {...}}``
        checks, or ``{}``); the run becomes ``done``. An artifact that fails its own checks raises
        :class:`ArtifactError` and the run stays ``running``."""
        if self.manifest is None:
            raise RuntimeError("finish() before begin()")
        records = {}
        for name, record in artifacts.items():
            path = os.path.join(self.path, name)
            verify_file(path, None)  # readable
            record = dict(record)
            verify_file(path, record, "the run produced an invalid result; check its settings")
            record.update(sha256=sha256_file(path), bytes=os.path.getsize(path))
            records[name] = record
        self.manifest.update(status="done", finished=_now(), artifacts=records, **_jsonable(extra))
        self._write()
        return self.manifest


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 1] + "…"


@contextlib.contextmanager
def maybe_run_folder(path: str | None, kind: str, enabled: bool = True, **kwargs):
    """A locked :class:`RunFolder` when ``path`` and ``enabled``, else None (distributed non-main ranks,
    runs without an output folder)."""
    if not path or not enabled:
        yield None
        return
    with RunFolder(path, kind, **kwargs) as run:
        yield run


# ------------------------------------------------------------------------------------------ fit(out_dir=...)

_HELD: set[str] = set()  # run folders this process holds the lock of (the CLI / experiments write those)
_KINDS = {"LabelDistiller": "ld", "KRRSTDistiller": "krr-st", "EffectAlignmentDistiller": "ead"}


def _kind_of(distiller) -> str:
    name = type(distiller).__name__
    return _KINDS.get(name) or name.lower().removesuffix("distiller") or "distill"


def _tensor_checks(name: str, t: torch.Tensor, kind: str) -> list[str]:
    if kind == "ld" and name == "soft_labels":
        return ["probability_rows"]
    if name == "steps_to_overfit":
        return ["integer", "nonnegative", "scalar"]
    if t.is_floating_point():
        return ["finite"]
    return ["integer", "nonnegative"] if name.endswith(("indices", "labels")) else ["integer"]


def write_run_artifacts(out_dir: str, distiller, result) -> dict | None:
    """Write what ``ddfast distill ...`` writes for a finished ``fit(out_dir=...)`` called from Python:
    ``distilled.safetensors`` (every tensor of ``result``; LD adds ``base_images`` and stores
    ``steps_to_overfit`` / ``calibration`` as tensors, as the CLI does), ``meta.json`` (configuration,
    scalars and histories of ``result``) and ``manifest.json`` (configuration, training-data hash,
    versions, each artifact's sha256 and value checks). Returns the manifest.

    Does nothing (returns None) for a folder this process already holds as a :class:`RunFolder`: the
    command line and :mod:`ddfast.experiments` write their own, richer artifacts there."""
    import dataclasses

    from safetensors.torch import save_file

    from ddfast.artifacts import _atomic_write, write_json_atomic

    if not out_dir or os.path.abspath(out_dir) in _HELD:
        return None
    kind = _kind_of(distiller)
    config = dataclasses.asdict(distiller.config) if dataclasses.is_dataclass(getattr(distiller, "config", None)) else {}
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)} if dataclasses.is_dataclass(result) \
        else dict(vars(result))
    tensors = {k: v.detach().cpu().contiguous() for k, v in fields.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in fields.items() if not isinstance(v, torch.Tensor)}
    if kind == "ld":
        tensors["base_images"] = distiller.base_images.detach().cpu().contiguous()
        tensors["steps_to_overfit"] = torch.tensor(int(result.steps_to_overfit))
        tensors["calibration"] = torch.tensor(float(result.calibration))
    data = [getattr(distiller, a) for a in ("x_train", "y_train", "x_val", "y_val", "x", "y")
            if isinstance(getattr(distiller, a, None), torch.Tensor)]
    inputs = {"train_sha256": sha256_tensors(*data)} if data else {}
    with RunFolder(out_dir, kind) as run:
        run.manifest = {"format": FORMAT, "kind": kind, "status": "running", "created": _now(), "written_by": "fit",
                        "config": _jsonable(config), "inputs": inputs, **environment(), "artifacts": {}}
        _atomic_write(os.path.join(run.path, "distilled.safetensors"),
                      lambda tmp: save_file(tensors, tmp, metadata={"method": kind}))
        meta = {"format": f"ddfast.{kind}/1", "method": kind, "status": "done", "written_by": "fit",
                "config": config, **scalars}
        if kind == "ld":
            meta["inner_batch"] = getattr(distiller, "inner_batch", None)
        write_json_atomic(os.path.join(run.path, "meta.json"), _jsonable(meta))
        checks = {k: _tensor_checks(k, v, kind) for k, v in tensors.items()}
        return run.finish({"distilled.safetensors": {"tensors": checks},
                           "meta.json": {"values": {"status": ["done"], "method": [kind]}}})
