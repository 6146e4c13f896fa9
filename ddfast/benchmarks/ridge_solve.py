"""Benchmark cases for the ridge / kernel-ridge solve, shared by ``bench/bench_ridge_solve.py``
(pytest-benchmark) and ``ddfast bench ridge`` (a quick table).

Providers: ``reference`` (eager ``torch.linalg.solve`` + autograd), ``cpu`` (fused C++), the peer
formulations the op replaces as their official code writes them (``peer``), and ``gemm`` (only the
GEMMs the op needs, as a floor for large N).
"""

from __future__ import annotations

import dataclasses

import torch

from ddfast.ops.ridge_solve import krr_predict, ridge_weights
from ddfast.reference.ridge_solve import krr_predict_ref, ridge_weights_ref


@dataclasses.dataclass(frozen=True)
class RidgeCase:
    name: str
    op: str  # "ridge_weights" | "krr_predict"
    B: int
    N: int
    d: int
    C: int
    M: int = 0
    reg: str = "absolute"
    lam: float = 1.0
    bias: bool = False
    detach_reg: bool = False
    peer: str | None = None  # "ld_rr_inverse" | "krr_st_solve"

    def flops(self, mode: str) -> float:
        """Multiply-add count ×2 of the dual/primal algorithm the fused op runs (GEMMs + factor + solves)."""
        B, N, d, C, M = self.B, self.N, self.d + self.bias, self.C, self.M
        n = d if d < N else N
        gram = 2 * N * d * n
        fac = n**3 / 3 + 2 * n * n * C
        out = 2 * n * d * C if d >= N else 2 * N * d * C
        if self.op == "krr_predict":
            out += 2 * M * min(N * (d + C), d * C)
        fwd = gram + fac + out
        bwd = 2 * n * n * C + 6 * N * d * C + (4 * M * N * d if self.op == "krr_predict" else 0)
        return B * (fwd + (bwd if mode == "fwd+bwd" else 0))


CASES = [
    RidgeCase("ld_rr_N10", "ridge_weights", 1, 10, 192, 10, bias=True),
    RidgeCase("ld_rr_N100", "ridge_weights", 1, 100, 192, 10, bias=True),
    RidgeCase("fewshot_B64", "ridge_weights", 64, 32, 64, 10),
    RidgeCase("fewshot_B64_krr", "krr_predict", 64, 32, 64, 10, M=16),
    RidgeCase("krr_st_N1000", "krr_predict", 1, 1000, 2048, 512, M=256, reg="trace", lam=1e-6, detach_reg=True),
    RidgeCase("peer_ld_rr_N50", "ridge_weights", 1, 50, 85, 10, bias=True, peer="ld_rr_inverse"),
    RidgeCase("peer_krr_st_m1000", "krr_predict", 1, 1000, 2048, 512, M=1024, reg="trace", lam=1e-6,
              detach_reg=True, peer="krr_st_solve"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def make_inputs(case: RidgeCase, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lead = (case.B,) if case.B > 1 else ()
    Z = torch.randn(*lead, case.N, case.d, generator=g, dtype=dtype).requires_grad_()
    Y = torch.randn(*lead, case.N, case.C, generator=g, dtype=dtype).requires_grad_()
    Zq = torch.randn(*lead, case.M, case.d, generator=g, dtype=dtype).requires_grad_() if case.M else None
    return Z, Y, Zq


def _peer_fn(case: RidgeCase, Z, Y, Zq):
    if case.peer == "ld_rr_inverse":
        def run():  # LD-RR: bias column, torch.inverse, matmuls (float32)
            Zb = torch.cat([Z, torch.ones(Z.shape[0], 1)], 1)
            return Zb.t() @ torch.inverse(Zb @ Zb.t() + case.lam * torch.eye(Zb.shape[0])) @ Y
        return run
    if case.peer == "krr_st_solve":
        def run():  # KRR-ST: K_ts (K_ss + λ tr(K_ss) I)⁻¹ Y_s with torch.linalg.solve
            K_ss = Z @ Z.t()
            K_ts = Zq @ Z.t()
            reg = case.lam * torch.trace(K_ss).detach() * torch.eye(K_ss.shape[0])
            return K_ts @ torch.linalg.solve(K_ss + reg, Y)
        return run
    raise ValueError(case.peer)


def _gemm_fn(case: RidgeCase, Z, Y, Zq, mode):
    """Only the GEMMs the fused op needs (dual K_qs association for krr_predict)."""
    Z, Y = Z.detach(), Y.detach()
    Zq = Zq.detach() if Zq is not None else None
    A = torch.randn(Z.shape[:-2] + (case.N, case.C))
    G = torch.randn(Z.shape[:-2] + ((case.M if Zq is not None else case.d), case.C))

    def run():
        K = Z @ Z.mT
        if Zq is not None:
            Kq = Zq @ Z.mT
            out = Kq @ A
        else:
            out = Z.mT @ A
        if mode == "fwd+bwd":
            if Zq is not None:
                dK = G @ A.mT
                dK @ Z
                dK.mT @ Zq
                S = (Kq.mT @ G) @ A.mT
                S @ Z
            else:
                Z @ G
                (A @ G.mT)
                S = A @ A.mT
                S @ Z
        return K, out
    return run


def make_fn(case: RidgeCase, provider: str, mode: str, dtype=torch.float32):
    """A zero-argument callable running ``case`` on ``provider`` in ``mode`` ("fwd" | "fwd+bwd")."""
    Z, Y, Zq = make_inputs(case, dtype)
    kw = dict(reg=case.reg, detach_reg=case.detach_reg, bias=case.bias)
    if provider == "gemm":
        return _gemm_fn(case, Z, Y, Zq, mode)
    if provider == "peer":
        fwd = _peer_fn(case, Z, Y, Zq)
    elif provider == "reference":
        if case.op == "ridge_weights":
            fwd = lambda: ridge_weights_ref(Z, Y, case.lam, **kw)  # noqa: E731
        else:
            fwd = lambda: krr_predict_ref(Zq, Z, Y, case.lam, **kw)  # noqa: E731
    else:
        if case.op == "ridge_weights":
            fwd = lambda: ridge_weights(Z, Y, case.lam, backend=provider, **kw)  # noqa: E731
        else:
            fwd = lambda: krr_predict(Zq, Z, Y, case.lam, backend=provider, **kw)  # noqa: E731
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd()
        return run
    probe = fwd()
    grad_out = torch.randn_like(probe)
    inputs = [t for t in (Z, Y, Zq) if t is not None]

    def run_bwd():
        return torch.autograd.grad(fwd(), inputs, grad_out)
    return run_bwd


def peak_memory_bytes(fn) -> int:
    """Peak bytes allocated by the CPU allocator while ``fn`` runs (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += ev.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def providers_for(case: RidgeCase) -> list[str]:
    provs = ["reference", "cpu"]
    if case.peer:
        provs.append("peer")
    if case.N >= 1000:
        provs.append("gemm")
    return provs
