"""Results as data: one tidy table of every cell × regime × augmentation, with the fair scores.

One row per evaluation: the cell's configuration columns, the accuracies (mean, std, every value), the
matched random-subset baseline and the scores of :mod:`ddfast.suite.scores`, time, peak memory and device.
Failed or unfinished cells appear with ``status`` ``failed`` / ``pending`` and the error, so the table
says what is missing. Written as CSV (always) and Parquet (only when pandas and pyarrow are installed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

from ddfast.suite import scores as S
from ddfast.suite.config import cell_hash

__all__ = ["COLUMNS", "collect", "write_table", "read_table"]

COLUMNS = [
    "suite", "cell_id", "status", "method", "name", "dataset", "ipc", "n_images", "seed", "regime", "augmentation",
    "label_source", "models", "acc_mean", "acc_std", "accuracies",
    "random_acc_mean", "gain_over_random", "gain_se", "soft_label_gain", "kd_gain", "augmentation_gain",
    "augmentation_robustness", "worst_gain",
    "eval_seconds", "set_seconds", "peak_memory_mib", "device", "torch", "commit", "error",
]


def _read(path):
    with open(path) as f:
        return json.load(f)


def _eval_key(cfg: dict, regime: str) -> str:
    """What an evaluation of a set depends on besides the set: settings, teacher (SL / SL+KD), transfer."""
    k = {"dataset": cfg["dataset"], "root": cfg.get("root"), "ipc": cfg["ipc"], "seed": cfg["seed"],
         "evaluation": cfg["evaluation"]}
    if regime in ("sl", "sl+kd"):
        k["teacher"] = cfg.get("teacher")
    if regime in ("finetune", "linear"):
        k["transfer"] = cfg.get("transfer")
    return cell_hash(k)


def collect(root: str, cells=None, suite: str = "", baseline: str = "random") -> list[dict]:
    """Rows for ``cells`` (the suite's :class:`~ddfast.suite.config.Cell` list; default every folder under
    ``root/cells``), with scores computed against the ``baseline`` method's matching rows."""
    base = os.path.join(root, "cells")
    if cells is None:
        ids = sorted(os.listdir(base)) if os.path.isdir(base) else []
        entries = []
        for i in ids:
            p = os.path.join(base, i, "cell.json")
            if os.path.exists(p):
                c = _read(p)
                entries.append((c["id"], c["config"]))
    else:
        entries = [(c.id, c.config) for c in cells]
    # one order for every table: the baseline first, then by name, data set, IPC, seed
    entries.sort(key=lambda e: (e[1]["method"] != baseline, e[1].get("name") or e[1]["method"], e[1]["dataset"],
                                e[1]["ipc"], e[1]["seed"]))
    rows = []
    for cid, cfg in entries:
        d = os.path.join(base, cid)
        common = {"suite": suite, "cell_id": cid, "method": cfg["method"], "name": cfg.get("name") or cfg["method"],
                  "dataset": cfg["dataset"], "ipc": cfg["ipc"], "seed": cfg["seed"],
                  "models": cfg["evaluation"]["models"]}
        res_path, fail_path = os.path.join(d, "results.json"), os.path.join(d, "failure.json")
        res = _read(res_path) if os.path.exists(res_path) else None
        if res is None or res.get("status") != "done":
            status, error = "pending", ""
            if os.path.exists(fail_path):
                status, error = "failed", _read(fail_path).get("error", "")
            for r in cfg["regimes"]:
                for a in cfg["augmentations"]:
                    rows.append({**common, "status": status, "regime": r, "augmentation": a, "error": error,
                                 "_key": _eval_key(cfg, r)})
            continue
        v = res.get("versions", {})
        for e in res["evaluations"]:
            m, s = S.mean_std(e["accuracies"])
            rows.append({**common, "status": "done", "n_images": res["n_images"], "regime": e["regime"],
                         "augmentation": e["augmentation"], "label_source": e.get("label_source", ""),
                         "models": len(e["accuracies"]), "acc_mean": m, "acc_std": s,
                         "accuracies": ";".join(f"{a:.2f}" for a in e["accuracies"]),
                         "eval_seconds": e.get("seconds"), "set_seconds": res.get("set_seconds"),
                         "peak_memory_mib": res.get("peak_memory_mib"), "device": res.get("device"),
                         "torch": v.get("torch"), "commit": v.get("commit"), "error": "",
                         "_key": _eval_key(cfg, e["regime"])})
    _add_scores(rows, baseline)
    for r in rows:
        r.pop("_key", None)
    return rows


def _add_scores(rows: list[dict], baseline: str) -> None:
    done = [r for r in rows if r["status"] == "done"]
    ref = {(r["_key"], r["regime"], r["augmentation"]): r for r in done if r["method"] == baseline}
    by_cell: dict[str, dict] = {}
    for r in done:
        by_cell.setdefault(r["cell_id"], {})[(r["regime"], r["augmentation"])] = r
        b = ref.get((r["_key"], r["regime"], r["augmentation"]))
        if b is not None:
            r["random_acc_mean"] = b["acc_mean"]
            r["gain_over_random"] = S.gain_over_random(r["acc_mean"], b["acc_mean"])
            r["gain_se"] = S.gain_std(r["acc_std"], r["models"], b["acc_std"], b["models"])
    for cell in by_cell.values():
        for (regime, aug), r in cell.items():
            if regime in ("sl", "sl+kd") and ("hl", aug) in cell:
                if regime == "sl":
                    r["soft_label_gain"] = S.soft_label_gain(r["acc_mean"], cell[("hl", aug)]["acc_mean"])
            if regime == "sl+kd" and ("sl", aug) in cell:
                r["kd_gain"] = S.kd_gain(r["acc_mean"], cell[("sl", aug)]["acc_mean"])
            other = cell.get((regime, "none" if aug == "default" else "default"))
            if other is not None:
                with_aug, without = (r, other) if aug == "default" else (other, r)
                r["augmentation_gain"] = S.augmentation_gain(with_aug["acc_mean"], without["acc_mean"])
                if "gain_over_random" in with_aug and "gain_over_random" in without:
                    r["augmentation_robustness"] = S.augmentation_robustness(with_aug["gain_over_random"],
                                                                             without["gain_over_random"])
        w = S.worst_gain([r.get("gain_over_random") for (reg, a), r in cell.items() if a == "default"])
        if not math.isnan(w):
            for r in cell.values():
                r["worst_gain"] = w


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_table(rows: list[dict], path: str) -> list[str]:
    """Write ``rows`` as CSV at ``path`` (atomically) and, when pandas + pyarrow are installed, Parquet next to it.
    Returns the paths written."""
    from ddfast.artifacts import _atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    text = buf.getvalue()

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    _atomic_write(path, write)
    out = [path]
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        return out
    pq = os.path.splitext(path)[0] + ".parquet"
    df = pd.read_csv(io.StringIO(text))
    _atomic_write(pq, lambda tmp: df.to_parquet(tmp, index=False))
    out.append(pq)
    return out


_NUMERIC = {"ipc", "n_images", "seed", "models", "acc_mean", "acc_std", "random_acc_mean", "gain_over_random",
            "gain_se", "soft_label_gain", "kd_gain", "augmentation_gain", "augmentation_robustness", "worst_gain",
            "eval_seconds", "set_seconds", "peak_memory_mib"}


def read_table(path: str) -> list[dict]:
    """Rows of a suite CSV with numbers parsed (empty cells → None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in _NUMERIC & set(r):
            r[k] = None if r[k] == "" else (int(r[k]) if k in ("ipc", "n_images", "seed", "models") else float(r[k]))
    return rows
