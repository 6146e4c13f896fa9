"""krr_predict against the eager formulation a user writes, ``K_qs @ torch.linalg.solve(K_ss + λI, Y)``, at
small support sizes, where the per-call cost (not the GEMMs) decides. One CSV row per cell.

    OMP_NUM_THREADS=1 python bench/krr_eager_small_n.py --N 10 16 32 64 128 --d 512 2048 8192

fwd runs under ``torch.no_grad`` (the op's one-call forward); fwd+bwd asks for the gradients of the support
features and targets for a fixed random grad_output (the operators with their closed-form backward at
N ≤ ONE_CALL_GRAD_MAX_N, the fused Functions above). Times are process CPU time per call, the minimum over ``--rounds`` rounds of ``--calls`` calls with
the two providers interleaved (the minimum is the statistic least moved by other load on the machine);
ratio = eager / op (> 1: the op is faster).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import torch

from ddfast.ops import krr_predict


def eager_krr(Zq, Zs, Ys, lam):
    K = Zs @ Zs.T
    A = K + lam * torch.eye(K.shape[0], dtype=K.dtype)
    return (Zq @ Zs.T) @ torch.linalg.solve(A, Ys)


def op_krr(Zq, Zs, Ys, lam):
    return krr_predict(Zq, Zs, Ys, lam)


def _time(fn, calls):
    t = time.process_time_ns()
    for _ in range(calls):
        fn()
    return (time.process_time_ns() - t) / calls / 1e3


def measure(N, d, M, C, mode, rounds, calls, lam=1e-3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Zq = torch.randn(M, d, generator=g, dtype=dtype)
    Zs = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    Ys = torch.randn(N, C, generator=g, dtype=dtype, requires_grad=True)
    G = torch.randn(M, C, generator=g, dtype=dtype)

    def run(f):
        if mode == "fwd":
            with torch.no_grad():
                return f(Zq, Zs, Ys, lam)
        return torch.autograd.grad(f(Zq, Zs, Ys, lam), (Zs, Ys), G)

    want = eager_krr(Zq, Zs, Ys, lam).detach()
    got = op_krr(Zq, Zs, Ys, lam).detach()
    err = float((got - want).abs().max() / want.abs().max())
    best = {"eager": float("inf"), "op": float("inf")}
    for f in (eager_krr, op_krr):  # warm-up (plans, allocator)
        run(f)
    for _ in range(rounds):
        for name, f in (("eager", eager_krr), ("op", op_krr)):
            best[name] = min(best[name], _time(lambda: run(f), calls))
    return {"N": N, "d": d, "M": M, "C": C, "mode": mode, "eager_us": round(best["eager"], 1),
            "op_us": round(best["op"], 1), "ratio": round(best["eager"] / best["op"], 3), "rel_diff": f"{err:.1e}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, nargs="+", default=[10, 16, 32, 64, 128])
    ap.add_argument("--d", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--M", type=int, default=256)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    w = csv.DictWriter(sys.stdout, ["N", "d", "M", "C", "mode", "eager_us", "op_us", "ratio", "rel_diff"])
    w.writeheader()
    for N in args.N:
        for d in args.d:
            for mode in args.modes:
                w.writerow(measure(N, d, args.M, args.C, mode, args.rounds, args.calls))
                sys.stdout.flush()


if __name__ == "__main__":
    main()
