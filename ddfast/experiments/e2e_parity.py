"""Accuracy parity of the network-pass modes: the same short distillation in every mode of
:mod:`ddfast.benchmarks.e2e`, then the method's own evaluation.

* ``ld-digits`` / ``ld-mnist``: LD (second order and RR) with the data set's preset and fewer epochs;
  test accuracy of fresh models trained on the best labels for T steps (label-distillation §4.1).
* ``krr-st``: KRR-ST on MNIST with the preset (fewer steps), then the KRR-ST row of the transfer table
  (linear protocol) on MNIST (krr-st-selfsup §4.1); needs a target model (``ddfast ssl``).
* ``ead``: EAD on digits at IPC 10 with its preset; test accuracy of fresh models trained on the set.

Every mode runs the same seed; ``seconds`` is the distillation's own wall time (evaluation excluded).
The evaluation always trains in float32, so a gap between modes is the distillation's.
"""

from __future__ import annotations

import json
import os
import time

import torch

from ddfast.benchmarks.e2e import MODES, mode_options

__all__ = ["STUDIES", "ld_parity", "krr_st_parity", "ead_parity", "parity", "format_parity"]

STUDIES = ("ld-digits", "ld-mnist", "krr-st", "ead")


def ld_parity(dataset: str, variant: str, mode: str, *, epochs: int, models: int = 10, seed: int = 0) -> dict:
    from ddfast.experiments.ld import distill

    opts = mode_options(mode, "ld")
    backend = opts.pop("backend")
    val_every = max(1, epochs // 5)
    t0 = time.perf_counter()
    ld, result, prepared = distill(dataset, 100 if dataset != "digits" else 10, variant, backend=backend, seed=seed,
                                   epochs=epochs, val_every=val_every, **opts)
    seconds = time.perf_counter() - t0
    t = prepared.target
    ev = ld.evaluate(t.test_x, t.test_y, models=models, seed=seed)
    return dict(study=f"ld-{dataset}", variant=variant, mode=mode, accuracy=ev.mean, std=ev.std,
                val_accuracy=result.val_accuracy, iterations=result.iterations, seconds=seconds,
                seconds_per_iteration=result.seconds / max(result.iterations, 1))


def krr_st_parity(mode: str, target_dir: str, out: str, *, steps: int = 300, runs: int = 2, seed: int = 0) -> dict:
    from ddfast.evaluate.transfer import TransferSettings, transfer_table
    from ddfast.experiments.krr_st import (_targets, distill, load_distilled, load_source, settings_for_run,
                                           transfer_rows)

    opts = mode_options(mode, "krr-st")
    run = os.path.join(out, f"krr-st-{mode}")
    t0 = time.perf_counter()
    krr, result, _ = distill("mnist", target_dir, out=run, steps=steps, seed=seed, overwrite=True, **opts)
    seconds = time.perf_counter() - t0
    _, meta = load_distilled(run)
    settings = settings_for_run(TransferSettings(protocol="linear"), meta)
    rows = transfer_rows(run, settings=settings, kmeans=False)
    src = load_source("mnist", meta["image_size"])
    tds = _targets(["mnist"], meta["image_size"], src.channels)
    table = transfer_table({"KRR-ST": rows["KRR-ST"]}, tds, settings, runs=runs, progress=False, seed=seed)
    acc, std = table["KRR-ST"]["mnist"]
    losses = [h["loss"] for h in result.history]
    return dict(study="krr-st", variant=f"m={krr.config.m}", mode=mode, accuracy=acc, std=std,
                final_loss=sum(losses[-20:]) / max(len(losses[-20:]), 1), iterations=result.steps,
                seconds=seconds, seconds_per_iteration=result.seconds / max(result.steps, 1))


def ead_parity(mode: str, out: str, *, models: int = 5, seed: int = 0) -> dict:
    from ddfast.experiments.ead import _settings, distill, evaluate_set, make_model_factory, preset

    opts = mode_options(mode, "ead")
    t0 = time.perf_counter()
    ead, result, data = distill("digits", 10, out=os.path.join(out, f"ead-{mode}"),
                                trajectory=os.path.join(out, "trajectory-digits"), seed=seed, overwrite=True,
                                **opts)
    seconds = time.perf_counter() - t0
    targets = torch.softmax(result.soft_labels, -1)
    ev = evaluate_set(make_model_factory("digits", data), result.images, targets, data, _settings(preset("digits")),
                      models=models, seed=seed)
    return dict(study="ead", variant="ipc=10", mode=mode, accuracy=ev.mean, std=ev.std, iterations=result.iterations,
                seconds=seconds, seconds_per_iteration=result.seconds / max(result.iterations, 1))


def parity(studies=STUDIES, modes=MODES, *, out: str, target_dir: str | None = None, seed: int = 0,
           ld_epochs: dict | None = None, krr_steps: int = 300, log=print) -> list[dict]:
    """Run each study in each mode; rows are appended to ``out/parity.json`` as they finish."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "parity.json")
    rows = json.load(open(path)) if os.path.exists(path) else []
    done = {(r["study"], r["variant"], r["mode"]) for r in rows}
    epochs = {"digits": 300, "mnist": 5, **(ld_epochs or {})}

    def record(key, fn):
        if key in done:
            return
        row = fn()
        rows.append(row)
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)
        if log:
            log(f"{row['study']:10s} {row['variant']:13s} {row['mode']:20s} {row['accuracy']:6.2f} ± {row['std']:.2f}  "
                f"{row['seconds_per_iteration']:.4f} s/it  ({row['seconds']:.0f} s)")

    for study in studies:
        for mode in modes:
            if study.startswith("ld-"):
                ds = study[3:]
                for variant in ("second_order", "rr"):
                    record((study, variant, mode), lambda: ld_parity(ds, variant, mode, epochs=epochs[ds], seed=seed))
            elif study == "krr-st":
                if target_dir is None:
                    raise ValueError("target_dir: the krr-st study needs a target model (made by `ddfast ssl`)")
                record((study, "m=100", mode), lambda: krr_st_parity(mode, target_dir, out, steps=krr_steps, seed=seed))
            elif study == "ead":
                if mode == "fused-bf16-compile":
                    continue  # EAD cannot be compiled (EADConfig.compile)
                record((study, "ipc=10", mode), lambda: ead_parity(mode, out, seed=seed))
            else:
                raise ValueError(f"studies: expected names from {STUDIES}, got {study!r}")
    return rows


def format_parity(rows: list[dict]) -> str:
    """Markdown: study/variant rows, one 'accuracy ± std' cell per mode (times: ``ddfast bench e2e``)."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    out = ["| study | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for key in dict.fromkeys((r["study"], r["variant"]) for r in rows):
        cells = []
        for m in modes:
            r = next((r for r in rows if (r["study"], r["variant"], r["mode"]) == (*key, m)), None)
            cells.append("–" if r is None else f"{r['accuracy']:.2f} ± {r['std']:.2f}")
        out.append(f"| {key[0]} {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(out)
