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
void check_krr_predict_bwd(const at::Tensor& G, const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& L,
                           const at::Tensor& alpha, double c, double trace_coef);

// krr_predict_fwd's outputs: P, L, alpha, status.
using KrrFwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The forward / backward as ATen calls on any device (the CUDA route for problems the one-block
// kernel cannot take); same outputs as ddfast::ridge_solve_fwd / _bwd.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_composite(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_composite(const at::Tensor& G, const at::Tensor& Z,
                                                                         const at::Tensor& Y, const at::Tensor& L,
                                                                         const at::Tensor& aux, bool primal,
                                                                         bool need_dz, bool need_dy, bool need_dmu);

// Kernel-ridge prediction and its closed-form backward as ATen calls on any device (the CUDA
// implementations of ddfast::krr_predict_fwd / _bwd, the CPU one of _bwd); same outputs as the CPU kernel.
KrrFwdOut krr_predict_fwd_composite(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                                    int64_t reg, double c, bool via_weights);
std::tuple<at::Tensor, at::Tensor, at::Tensor> krr_predict_bwd_composite(const at::Tensor& G, const at::Tensor& Zq,
                                                                         const at::Tensor& Zs, const at::Tensor& L,
                                                                         const at::Tensor& alpha, double c,
                                                                         double trace_coef, bool need_dzq,
                                                                         bool need_dzs, bool need_dys);

}  // namespace ops
}  // namespace ddfast
