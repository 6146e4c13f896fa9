// Checks and the ATen composite route of the ridge operators (csrc/ridge_solve_ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace ddfast {
namespace ops {

void check_ridge_fwd(const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu);
void check_ridge_bwd(const at::Tensor& G, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& L,
                     const at::Tensor& aux, bool primal);
void check_cholesky_solve(const at::Tensor& R, const at::Tensor& L);
void check_krr_predict_fwd(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                           int64_t reg, double c);

// The forward / backward as ATen calls on any device (the CUDA route for problems the one-block
// kernel cannot take); same outputs as ddfast::ridge_solve_fwd / _bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_composite(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_composite(const at::Tensor& G, const at::Tensor& Z,
                                                                         const at::Tensor& Y, const at::Tensor& L,
                                                                         const at::Tensor& aux, bool primal,
                                                                         bool need_dz, bool need_dy, bool need_dmu);

// Forward-only kernel-ridge prediction as ATen calls on any device (the CUDA implementation of
// ddfast::krr_predict_fwd); same outputs as the CPU kernel.
std::tuple<at::Tensor, at::Tensor> krr_predict_fwd_composite(const at::Tensor& Zq, const at::Tensor& Zs,
                                                             const at::Tensor& Ys, double lam, int64_t reg, double c,
                                                             bool via_weights);

}  // namespace ops
}  // namespace ddfast
