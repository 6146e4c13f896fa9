"""Distributed distillation: meta-steps/s with R = 1 and R = 2 processes, and bytes all-reduced per step.

    python bench/bench_distributed.py                    # every distiller, markdown table
    python bench/bench_distributed.py --only krr-st --steps 5

For each distiller a fixed CPU-scale workload (random data, float32) runs ``warmup`` + ``steps``
meta-steps in fresh processes: R = 1 is one process without a process group (the single-process code
path), with one thread and with all cores as threads; R = 2 is two gloo processes (FileStore
rendezvous) with cores / 2 threads each. Steps/s is rank 0's wall time between two barriers over the timed steps. Bytes are the
payload handed to ``all_reduce`` per step (``DistContext.bytes_all_reduced``); a ring all-reduce moves
2(R−1)/R of it in and out of each rank.

Workloads: LD-RR / LD second order — LeNet 1×28×28, C = 10, N = 100 base examples (N_i = 50), N_o = 1024;
KRR-ST — ConvNet 32-64-128 1×28×28, m = 100, b = 512, d_y = 128, pool of 4; EAD — ConvNet 16-32
(instance norm) 1×28×28, ipc = 10 (|S| = 100), t_m = 4, |P| = |D_t| = 128.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddfast.distributed import ring_all_reduce_bytes

DISTILLERS = ("ld-rr", "ld-second_order", "krr-st", "ead")


def _data(n, seed=0, classes=10, side=28):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)


def _dataset():
    from ddfast.data.datasets import ImageDataset

    x, y = _data(1024, 1)
    xt, yt = _data(64, 2)
    return ImageDataset("random", x, y, x[:0], y[:0], xt, yt, 10, 1, 28, (0.0,), (1.0,))


def _trajectory(out):
    from ddfast.trajectory import train_trajectory

    train_trajectory(_dataset(), "convnet", out, epochs=1, every=2, lr=0.05, batch_size=128,
                     model_options={"widths": (16, 32), "norm": "instance"}, progress=False)


def _build(name, group, traj_dir):
    """``(distiller, step)``: ``step()`` runs one meta-step on the workload."""
    if name.startswith("ld"):
        from ddfast.distill.ld import LDConfig, LabelDistiller

        x, y = _data(4096, 3)
        xv, yv = _data(256, 4)
        d = LabelDistiller(x[:100], (x, y), (xv, yv), 10,
                           LDConfig(variant=name[3:], model="lenet", outer_batch=1024, seed=0), process_group=group)
        g = torch.Generator().manual_seed(5)

        def step():
            sel = torch.randint(0, x.shape[0], (1024,), generator=g)
            d.step(x[sel], y[sel])

        return d, step
    if name == "krr-st":
        from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller

        x, _ = _data(4096, 6)
        t = torch.randn(4096, 128, generator=torch.Generator().manual_seed(7))
        d = KRRSTDistiller(x, config=KRRSTConfig(m=100, steps=10_000, batch_size=512, pool_size=4, pool_steps=10,
                                                 widths=(32, 64, 128)), train_targets=t, process_group=group)
        d.initialize_pool()
        return d, d.step
    from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
    from ddfast.trajectory import Trajectory

    data = _dataset()
    d = EffectAlignmentDistiller(Trajectory.open(traj_dir), (data.train_x, data.train_y),
                                 EADConfig(ipc=10, iterations=10_000, t_m=4, probe_batch=128, real_batch=128),
                                 process_group=group)
    return d, d.step


def _worker(rank, world, threads, name, steps, warmup, traj_dir, out):
    torch.set_num_threads(threads)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}/store-{name}-{world}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
        group = dist.group.WORLD
    d, step = _build(name, group, traj_dir)
    for _ in range(warmup):
        step()
    before = d.dist.bytes_all_reduced
    d.dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    d.dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        torch.save({"steps_per_s": steps / seconds, "bytes": (d.dist.bytes_all_reduced - before) / steps},
                   os.path.join(out, f"{name}-{world}-{threads}.pt"))
    if group is not None:
        dist.destroy_process_group()


def measure(name, world, threads, steps, warmup, traj_dir, out):
    mp.start_processes(_worker, args=(world, threads, name, steps, warmup, traj_dir, out), nprocs=world,
                       start_method="spawn")
    return torch.load(os.path.join(out, f"{name}-{world}-{threads}.pt"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=DISTILLERS, default=list(DISTILLERS))
    parser.add_argument("--steps", type=int, default=8, help="timed meta-steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads of R = 1 (split over R = 2)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        traj_dir = os.path.join(out, "trajectory")
        if "ead" in args.only:
            _trajectory(traj_dir)
        for name in args.only:
            single = measure(name, 1, 1, args.steps, args.warmup, traj_dir, out)
            full = measure(name, 1, args.cores, args.steps, args.warmup, traj_dir, out)
            two = measure(name, 2, max(args.cores // 2, 1), args.steps, args.warmup, traj_dir, out)
            rows.append((name, single, full, two))
            print(f"{name}: R=1 {single['steps_per_s']:.2f} / {full['steps_per_s']:.2f} steps/s (1 / {args.cores} "
                  f"threads), R=2 {two['steps_per_s']:.2f} steps/s, {two['bytes']:.0f} B all-reduced per step",
                  file=sys.stderr)
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, gloo; {args.steps} timed steps after {args.warmup}")
    print()
    print(f"| distiller | R = 1, 1 thread | R = 1, {args.cores} threads | R = 2, {max(args.cores // 2, 1)} thread(s) each "
          "| all-reduce payload per step | ring traffic per rank, R = 8 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, single, full, two in rows:
        b = two["bytes"]
        print(f"| {name} | {single['steps_per_s']:.2f} | {full['steps_per_s']:.2f} | {two['steps_per_s']:.2f} "
              f"| {b:,.0f} B | {ring_all_reduce_bytes(b, 8):,.0f} B |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
