"""Run one cell in its run folder, resumably.

Layout of ``<root>/cells/<id>/``::

    cell.json            the cell's configuration (its id is the hash of it)
    meta.json            versions (python, torch, numpy, ddfast), git commit, host, device, attempts
    distill/             the distiller's own checkpoint (checkpoint.safetensors), resumed bit-identically
    set.safetensors      the set (images, labels, soft_labels, targets): written once it is made
    evals/<regime>-<augmentation>.json   one evaluation each, written when it finishes
    results.json         all evaluations, time, peak memory, status "done" (written last)
    failure.json         the error and traceback of the last failed attempt (removed when a retry succeeds)

Every file is written atomically (temp file + ``os.replace``), so a killed cell leaves only complete files
and the next run continues from them: a finished set is not made again, finished evaluations are not run
again, and a distiller resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback

import torch

from ddfast.artifacts import write_json_atomic

__all__ = ["run_cell", "cell_dir", "write_cell", "read_json", "versions", "CellTask"]


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def cell_dir(root: str, cell_id: str) -> str:
    return os.path.join(root, "cells", cell_id)


def write_cell(root: str, cell) -> str:
    """Create the cell's folder with ``cell.json`` (kept if it is already there) and return the folder."""
    d = cell_dir(root, cell.id)
    path = os.path.join(d, "cell.json")
    if not os.path.exists(path):
        write_json_atomic(path, cell.to_json())
    return d


_COMMIT = None


def _commit() -> str | None:
    global _COMMIT
    if _COMMIT is None:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            _COMMIT = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                     timeout=10).stdout.strip() or ""
        except (OSError, subprocess.SubprocessError):
            _COMMIT = ""
    return _COMMIT or None


def versions() -> dict:
    import numpy

    import ddfast

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "ddfast": getattr(ddfast, "__version__", None), "commit": _commit(), "host": socket.gethostname(),
            "platform": platform.platform()}


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _peak_memory_mib(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _transfer_settings(cfg: dict, augment: str):
    from ddfast.evaluate.transfer import TransferSettings

    ev, tr = cfg["evaluation"], dict(cfg["transfer"])
    tr.pop("target", None)
    base = {"arch": ev["arch"]}
    widths = (ev.get("model_options") or {}).get("widths")
    if widths is not None and ev["arch"] == "convnet":
        base["widths"] = tuple(widths)
    names = set(TransferSettings.__dataclass_fields__)
    unknown = sorted(set(tr) - names)
    if unknown:
        raise ValueError(f"[transfer]: unknown key(s) {unknown}; TransferSettings fields are {sorted(names)}")
    s = TransferSettings(**{**base, **{k: tuple(v) if isinstance(v, list) else v for k, v in tr.items()}})
    if augment == "none":
        s = s.__class__(**{**s.__dict__, "augment": False, "label_pretrain_augment": False})
    return s


def _evaluate(ctx, s, regime: str, augment: str, device: str) -> dict:
    """One evaluation of the set ``s`` → ``{"accuracies", "label_source", "seconds", ...}``."""
    cfg = ctx.config
    ev = cfg["evaluation"]
    seed, models = int(cfg["seed"]), int(ev["models"])
    t0 = time.perf_counter()
    if regime in ("hl", "sl", "sl+kd"):
        from ddfast.evaluate.regimes import RegimeSettings, evaluate

        if regime == "hl" and s.labels is None:
            raise ValueError(f"regime 'hl': the set of method {cfg['method']!r} has no hard labels")
        settings = RegimeSettings(epochs=int(ev["epochs"]), batch_size=int(ev["batch_size"]),
                                  temperature=float(ev["temperature"]), cutmix=bool(ev["cutmix"]) and regime == "sl+kd",
                                  augment="none" if augment == "none" else None)
        teacher, labels, source = None, None, "hard"
        if regime == "hl":
            labels = s.labels
        elif regime == "sl" and s.soft_labels is not None:
            labels, source = s.soft_labels, "own"
        else:
            teacher, source = ctx.teacher, ("teacher" if regime == "sl" else "teacher-kd")
        data, images = ctx.data, s.images
        if device != "cpu":
            data = _to_device(data, device)
            images = images.to(device)
            labels = labels.to(device) if labels is not None else None
            teacher = teacher.to(device) if teacher is not None else None
        res = evaluate(images, labels, regime, teacher=teacher, data=data, arch=ev["arch"],
                       model_options={k: tuple(v) if isinstance(v, list) else v for k, v in (ev["model_options"] or {}).items()},
                       settings=settings, models=models, seed=seed)
        out = {"accuracies": [float(a) for a in res.accuracies], "label_source": source, "epochs": res.epochs,
               "steps": res.steps, "compute": res.compute}
    else:
        from ddfast.data import load_dataset
        from ddfast.evaluate.transfer import finetune, linear_eval, pretrain_classification, pretrain_regression

        settings = _transfer_settings(cfg, augment)
        target_name = cfg["transfer"]["target"]
        target = ctx.data if target_name == cfg["dataset"] else load_dataset(target_name, cfg.get("root"))
        accs = []
        for i in range(models):
            if s.targets is not None:
                net, source = pretrain_regression(s.images, s.targets, settings, seed=seed + i), "regression"
            else:
                net, source = pretrain_classification(s.images, s.labels, ctx.data.num_classes, settings,
                                                      seed=seed + i), "hard"
            fn = finetune if regime == "finetune" else linear_eval
            accs.append(float(fn(net, target, settings, seed=seed + i)))
        out = {"accuracies": accs, "label_source": source, "target": target_name}
    out["seconds"] = time.perf_counter() - t0
    return out


def _to_device(data, device):
    import dataclasses

    fields = {f: getattr(data, f).to(device) for f in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
    return dataclasses.replace(data, **fields)


def _maybe_distributed():
    """A process group when launched with several ranks (torchrun, or Slurm tasks through submitit)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from ddfast.distributed import init_from_env

    return init_from_env()


def run_cell(run_dir: str, *, progress: bool = False, device: str | None = None) -> dict:
    """Run (or finish) the cell in ``run_dir`` (made by :func:`write_cell`); returns its results.

    A cell whose ``results.json`` says ``done`` returns at once. Errors are recorded in ``failure.json`` and
    raised again."""
    from ddfast.suite.methods import CellContext, load_set, method_spec, save_set

    results_path = os.path.join(run_dir, "results.json")
    if os.path.exists(results_path):
        res = read_json(results_path)
        if res.get("status") == "done":
            return res
    cell = read_json(os.path.join(run_dir, "cell.json"))
    cfg = cell["config"]
    device = device or os.environ.get("DDFAST_SUITE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    meta_path = os.path.join(run_dir, "meta.json")
    meta = read_json(meta_path) if os.path.exists(meta_path) else {"attempts": 0}
    meta.update(versions())
    meta.update({"attempts": int(meta.get("attempts", 0)) + 1, "device": device_name(device),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cell_id": cell["id"],
                 "argv": sys.argv})
    group = _maybe_distributed() if method_spec(cfg["method"]).distributed else None
    if group is None and int(os.environ.get("RANK", "0")) != 0:
        # several ranks (torchrun, Slurm tasks) on a method that runs in one process: rank 0 does the work
        return {"status": "done", "rank": int(os.environ["RANK"]), "skipped": "single-process method"}
    main = group is None or torch.distributed.get_rank() == 0
    if main:
        write_json_atomic(meta_path, meta)
    t_start = time.perf_counter()
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
        ctx = CellContext(cfg, run_dir, os.path.join(root, "shared"), progress=progress, process_group=group)
        set_path = os.path.join(run_dir, "set.safetensors")
        if os.path.exists(set_path):
            s = load_set(set_path, ctx.data)
        else:
            t0 = time.perf_counter()
            s = method_spec(cfg["method"]).build(ctx)
            if not s.seconds:
                s.seconds = time.perf_counter() - t0
            if main:
                save_set(set_path, s)
        if not main:
            return {"status": "done", "rank": torch.distributed.get_rank()}
        rows = []
        bar = None
        todo = [(r, a) for r in cfg["regimes"] for a in cfg["augmentations"]]
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"{cfg['method']} ipc{cfg['ipc']} s{cfg['seed']}", unit="eval",
                       leave=False, dynamic_ncols=True)
        for regime, augment in todo:
            path = os.path.join(run_dir, "evals", f"{regime}-{augment}.json")
            if os.path.exists(path):
                row = read_json(path)
            else:
                row = {"regime": regime, "augmentation": augment, **_evaluate(ctx, s, regime, augment, device)}
                write_json_atomic(path, row)
            rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        result = {"status": "done", "id": cell["id"], "config": cfg, "evaluations": rows,
                  "set_seconds": float(s.seconds), "n_images": int(s.images.shape[0]),
                  "seconds_this_attempt": time.perf_counter() - t_start,
                  "peak_memory_mib": _peak_memory_mib(device), "device": meta["device"],
                  "versions": versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json_atomic(results_path, result)
        fail = os.path.join(run_dir, "failure.json")
        if os.path.exists(fail):
            os.remove(fail)
        return result
    except BaseException as e:
        if main and not isinstance(e, KeyboardInterrupt):
            write_json_atomic(os.path.join(run_dir, "failure.json"),
                              {"status": "failed", "id": cell["id"], "error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc(), "attempt": meta["attempts"],
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        raise


class CellTask:
    """A picklable callable running one cell: what the process pool and submitit execute.

    On Slurm preemption or timeout submitit calls :meth:`checkpoint`, which requeues the same task; the
    rerun continues from the cell's folder (distiller checkpoint, set, finished evaluations)."""

    def __init__(self, run_dir: str, progress: bool = False, threads: int | None = None):
        self.run_dir = run_dir
        self.progress = progress
        self.threads = threads

    def __call__(self) -> dict:
        if self.threads:
            torch.set_num_threads(self.threads)
        if "SUBMITIT_EXECUTOR" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        try:
            return run_cell(self.run_dir, progress=self.progress)
        except Exception as e:  # the failure record is in the folder; report it without a traceback dump
            return {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": self.run_dir}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(CellTask(self.run_dir, self.progress, self.threads))
