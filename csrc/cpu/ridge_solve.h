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

// (LLᵀ)⁻¹R with a saved lower factor: two triangular solves.
at::Tensor cholesky_solve(const at::Tensor& R, const at::Tensor& L);

}  // namespace cpu
}  // namespace ddfast
