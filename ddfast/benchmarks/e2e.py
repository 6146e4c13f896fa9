"""End-to-end distiller steps in four modes, shared by ``bench/bench_e2e.py`` and ``ddfast bench e2e``.

Workloads (one meta-iteration / meta-step of the real distiller, all its network passes included):

* ``ld-rr``, ``ld-second-order``: LD on MNIST, LeNet, 100 base examples, N_i = 50, N_o = 1024
  (label-distillation §4.1);
* ``krr-st-m100-b256``, ``krr-st-m1000-b1024``: KRR-ST with ConvNet-D3 128-256-512-BN on 3×32×32,
  d_y = 512 (krr-st-selfsup §4.1); images are random (the step's cost does not depend on them);
* ``ead-tm5``: EAD on MNIST, ConvNet 32-32-32 (instance norm), IPC 10, |D_p| = |D_t| = 256, t_m = 5
  checkpoints (effect-alignment Algorithm 1); the checkpoints are in memory.

Modes: ``reference-fp32`` (eager reference ops, NCHW, float32: the baseline), ``fused-fp32`` (fused ops
plus the memory-format choice of :data:`CHANNELS_LAST`; KRR-ST folds eval-mode BatchNorm), ``fused-bf16`` (+ bf16 autocast of the network
passes), ``fused-bf16-compile`` (+ ``torch.compile``; compilation is in the warm-up, not the timing).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from ddfast.benchmarks.ridge_solve import peak_memory_bytes

__all__ = ["WORKLOADS", "MODES", "CHANNELS_LAST", "make_step", "time_step", "run_table", "format_table",
           "peak_memory_bytes"]

WORKLOADS = ("ld-rr", "ld-second-order", "krr-st-m100-b256", "krr-st-m1000-b1024", "ead-tm5")
MODES = ("reference-fp32", "fused-fp32", "fused-bf16", "fused-bf16-compile")
# Memory format of the fused modes, per distiller (measured: NHWC helps KRR-ST's wide BatchNorm ConvNet;
# LeNet's 1- and 6-channel convolutions gain nothing, and EAD's instance norm (GroupNorm) is slower in it).
CHANNELS_LAST = {"ld": False, "krr-st": True, "ead": False}


def mode_options(mode: str, family: str) -> dict:
    """Distiller config fields of ``mode`` for a distiller family ("ld", "krr-st", "ead")."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    reference = mode == "reference-fp32"
    opts = dict(backend="reference" if reference else "auto", precision="fp32",
                channels_last=False if reference else CHANNELS_LAST[family], compile=mode == "fused-bf16-compile")
    if family == "krr-st":
        opts["fold_bn"] = not reference
    if mode in ("fused-bf16", "fused-bf16-compile"):
        opts["precision"] = "bf16"
    return opts


@dataclasses.dataclass
class Step:
    fn: Callable[[], object]
    warmup: int  # calls before timing (compile: more)
    description: str


def _mnist(n_train: int | None = None, data: str = "mnist", device=None):
    """(val_x, val_y, train_x, train_y): MNIST, or random tensors of MNIST's shapes (``data="random"``:
    the step's cost does not depend on the pixels; no data set needed, e.g. on a GPU machine)."""
    if data == "random":
        g = torch.Generator().manual_seed(0)
        n = n_train or 20480
        x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        vx, vy = torch.rand(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
    else:
        from ddfast.data import load_dataset

        ds = load_dataset("mnist")
        x, y, vx, vy = ds.train_x, ds.train_y, ds.val_x[:512], ds.val_y[:512]
        if n_train is not None:
            x, y = x[:n_train], y[:n_train]
    if device is not None:
        x, y, vx, vy = (t.to(device) for t in (x, y, vx, vy))
    return vx, vy, x, y


def _on(device, make):
    """``make`` with its module moved to ``device`` (None: left where it is built, on the CPU)."""
    return None if device is None else (lambda: make().to(device))


def _ld_step(variant: str, mode: str, device=None, data: str = "mnist", small: bool = False) -> Step:
    from ddfast.data import balanced_subset
    from ddfast.distill.ld import LDConfig, LabelDistiller
    from ddfast.models import build_model

    n_base, n_inner, n_outer = (20, 10, 128) if small else (100, 50, 1024)
    vx, vy, x, y = _mnist(2048 if small else 20480, data, device)
    base = x[balanced_subset(y.cpu(), n_base // 10, seed=0, num_classes=10)]
    cfg = LDConfig(variant=variant, model="lenet", outer_batch=n_outer, inner_batch=n_inner, seed=0,
                   **mode_options(mode, "ld"))
    ld = LabelDistiller(base, (x, y), (vx, vy), 10, cfg, make_model=_on(device, lambda: build_model("lenet", 1, 10, 28)))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0)).to(x.device)
    batches = [(ld.x_train[perm[s : s + n_outer]], y[perm[s : s + n_outer]]) for s in range(0, x.shape[0], n_outer)]
    state = {"i": 0}

    def step():
        xb, yb = batches[state["i"] % len(batches)]
        state["i"] += 1
        return ld.step(xb, yb)

    return Step(step, 8 if cfg.compile else 3,
                f"LD {variant}: LeNet, MNIST, N={n_base}, N_i={n_inner}, N_o={n_outer}")


def _krr_step(m: int, b: int, mode: str, device=None) -> Step:
    from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
    from ddfast.models import build_model

    g = torch.Generator().manual_seed(0)
    n = max(4 * b, 2 * m)
    x = torch.randn(n, 3, 32, 32, generator=g)
    targets = torch.randn(n, 512, generator=g)
    if device is not None:
        x, targets = x.to(device), targets.to(device)
    cfg = KRRSTConfig(m=m, batch_size=b, steps=10_000, pool_size=2, pool_steps=1000, widths=(128, 256, 512),
                      norm="batch", seed=0, **mode_options(mode, "krr-st"))
    make = _on(device, lambda: build_model(cfg.arch, 3, 512, 32, widths=cfg.widths, norm=cfg.norm))
    krr = KRRSTDistiller(x, train_targets=targets, config=cfg, make_model=make)
    krr.pool.max_steps = 1  # pool initialisation (1 SGD step per model) is not part of a meta-step
    krr.initialize_pool()
    krr.pool.max_steps = cfg.pool_steps
    return Step(krr.step, 3 if cfg.compile else 1, f"KRR-ST: ConvNet-D3 128-256-512-BN, 3×32×32, m={m}, b={b}")


class MemoryTrajectory:
    """Trajectory checkpoints held in memory (the interface EffectAlignmentDistiller reads)."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], count: int, seed: int = 0):
        self._make = make_model
        self.states = []
        for t in range(count):
            torch.manual_seed(seed + t)
            self.states.append({k: v.detach().clone() for k, v in make_model().state_dict().items()})
        self.lrs = [0.05] * count

    def __len__(self):
        return len(self.states)

    def build_model(self):
        return self._make()

    def check_model(self, model):
        return None

    def final(self):
        return self.states[-1]

    def load(self, t: int):
        return self.states[t]

    def sample(self, m: int, generator: torch.Generator, weights: str = "lr"):
        w = torch.tensor(self.lrs, dtype=torch.float64) if weights == "lr" else torch.ones(len(self.states), dtype=torch.float64)
        return torch.multinomial(w, m, replacement=False, generator=generator).sort().values.tolist()


def _ead_step(mode: str, device=None, data: str = "mnist") -> Step:
    from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
    from ddfast.models import build_model

    _, _, x, y = _mnist(20000, data, device)
    make = lambda: build_model("convnet", 1, 10, 28, widths=(32, 32, 32), norm="instance")  # noqa: E731
    traj = MemoryTrajectory(_on(device, make) or make, 10)
    cfg = EADConfig(ipc=10, iterations=10_000, t_m=5, probe_batch=256, real_batch=256, seed=0,
                    **mode_options(mode, "ead"))
    ead = EffectAlignmentDistiller(traj, (x, y), cfg)
    return Step(ead.step, 3 if cfg.compile else 1, "EAD: ConvNet 32-32-32 instance norm, MNIST, IPC 10, P=D=256, t_m=5")


def supported(workload: str, mode: str) -> bool:
    """EAD cannot be compiled: it differentiates the network twice (see EADConfig.compile)."""
    return not (workload.startswith("ead") and mode == "fused-bf16-compile")


def make_step(workload: str, mode: str, device=None, data: str = "mnist", small: bool = False) -> Step:
    """A zero-argument callable running one meta-iteration / meta-step of ``workload`` in ``mode``.

    ``device``: where the data and the networks live (default: the CPU, as built). ``data``: ``"mnist"``
    or ``"random"`` (random tensors of the same shapes). ``small``: LD with N=20, N_i=10, N_o=128 (a
    quick CPU cell).
    """
    torch.manual_seed(0)
    if data not in ("mnist", "random"):
        raise ValueError(f"data: expected 'mnist' or 'random', got {data!r}")
    if workload == "ld-rr":
        return _ld_step("rr", mode, device, data, small)
    if workload == "ld-second-order":
        return _ld_step("second_order", mode, device, data, small)
    if workload == "krr-st-m100-b256":
        return _krr_step(100, 256, mode, device)
    if workload == "krr-st-m1000-b1024":
        return _krr_step(1000, 1024, mode, device)
    if workload == "ead-tm5":
        return _ead_step(mode, device, data)
    raise ValueError(f"workload: expected one of {WORKLOADS}, got {workload!r}")


def time_step(step: Step, reps: int) -> tuple[float, list[float]]:
    """Median seconds per call over ``reps`` calls after the warm-up calls."""
    for _ in range(step.warmup):
        step.fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step.fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_table(workloads=WORKLOADS, modes=MODES, reps: int = 10, memory: bool = True, progress=print) -> list[dict]:
    """Every workload × mode in one process: median time, ratio to ``reference-fp32``, peak memory."""
    rows = []
    for w in workloads:
        base = None
        for mode in modes:
            if not supported(w, mode):
                continue
            step = make_step(w, mode)
            n = reps if not w.startswith("krr-st-m1000") else max(3, reps // 3)
            med, times = time_step(step, n)
            peak = peak_memory_bytes(step.fn) / 2**20 if memory else float("nan")
            base = med if mode == "reference-fp32" else base
            row = dict(workload=w, mode=mode, seconds=med, min=min(times), reps=n, peak_mib=peak,
                       speedup=(base / med) if base else float("nan"), description=step.description)
            rows.append(row)
            if progress:
                progress(f"{w:20s} {mode:20s} {med:8.4f} s  ×{row['speedup']:.2f}  {peak:8.1f} MiB")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per workload, seconds per step (speed-up over reference-fp32) per mode."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    out = ["| workload | " + " | ".join(modes) + " | peak MiB (ref → best) |",
           "|---|" + "---|" * len(modes) + "---|"]
    for w in dict.fromkeys(r["workload"] for r in rows):
        cells, peaks = [], []
        for m in modes:
            r = next((r for r in rows if r["workload"] == w and r["mode"] == m), None)
            cells.append("–" if r is None else f"{r['seconds']:.3f} s (×{r['speedup']:.2f})")
            if r is not None:
                peaks.append((r["seconds"], r["peak_mib"], m))
        ref = next((p for p in peaks if p[2] == "reference-fp32"), None)
        best = min(peaks)
        mem = f"{ref[1]:.0f} → {best[1]:.0f}" if ref else f"{best[1]:.0f}"
        out.append(f"| {w} | " + " | ".join(cells) + f" | {mem} |")
    return "\n".join(out)
