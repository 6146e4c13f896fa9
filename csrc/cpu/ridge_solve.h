// Fused batched ridge solve on the CPU (see ridge_solve.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace ddfast {
namespace cpu {

// W = Zᵀ(ZZᵀ+μI)⁻¹Y (dual) or (ZᵀZ+μI)⁻¹ZᵀY (primal); returns (W, L, aux, info, status) where
// status = 0 all good, bit 1: some factorization failed (see info), bit 2: non-finite W.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> ridge_solve_fwd(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w);

// Gradients of W w.r.t. Z, Y and μ reusing the saved factor L; undefined where not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd(
    const at::Tensor& G, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& L,
    const at::Tensor& aux, bool primal, bool need_dz, bool need_dy, bool need_dmu);

// Largest support size N krr_predict_fwd factors in place (larger: the ATen composite in ridge_solve_ops.cpp).
constexpr int64_t kKrrPredictFwdMaxN = 128;

// Kernel-ridge prediction P = (ZqZsᵀ + c)(ZsZsᵀ + c + μI)⁻¹Ys for Zq [B,M,d], Zs [B,N,d], Ys [B,N,C]
// (dual form; Zq, Zs of one dtype, Ys of that dtype or float64 — the solve dtype, in which L, α and P
// come back): μ = λ (reg 0), λ·tr(K)/N (1) or λ·tr(K) (2) with K = ZsZsᵀ + c;
// via_weights associates the product as Zq·(Zsᵀα). Returns (P [B,M,C], L [B,N,N] (lower factor of
// K + μI), α [B,N,C], status): 0 ok, 1 a factor failed (P empty; L, α unspecified), 2 non-finite P.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> krr_predict_fwd(const at::Tensor& Zq, const at::Tensor& Zs,
                                                                        const at::Tensor& Ys, double lam, int64_t reg,
                                                                        double c, bool via_weights);

// (LLᵀ)⁻¹R with a saved lower factor: two triangular solves.
at::Tensor cholesky_solve(const at::Tensor& R, const at::Tensor& L);

}  // namespace cpu
}  // namespace ddfast
