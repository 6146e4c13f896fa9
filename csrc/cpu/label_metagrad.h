// Fused residuals of the per-example label meta-gradient on the CPU (see label_metagrad.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace ddfast {
namespace cpu {

// Inner-loss residual. Z logits [N, C], Y soft labels [N, C] (rows need not sum to 1).
// Returns (R, loss_rows): R = scale·(softmax(Z)·s − Y) with s_i = Σ_c Y_ic, i.e.
// d(scale·Σ_i CE_i)/dZ, [N, C]; loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic, [N].
std::tuple<at::Tensor, at::Tensor> label_metagrad_fwd(const at::Tensor& Z, const at::Tensor& Y,
                                                      double scale);

// Head residual. H [N, d], GW [C, d], gb [C] or none, Vb [N, C] or none, Z [N, C]:
// v = H GWᵀ + gb + Vb, p = softmax(Z), out = scale·(v − (p·v)1), [N, C].
at::Tensor label_metagrad_bwd(const at::Tensor& H, const at::Tensor& GW,
                              const std::optional<at::Tensor>& gb,
                              const std::optional<at::Tensor>& Vb, const at::Tensor& Z,
                              double scale);

}  // namespace cpu
}  // namespace ddfast
