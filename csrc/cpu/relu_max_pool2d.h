// Fused ReLU + 2×2 max-pool (stride 2) on the CPU (see relu_max_pool2d.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace ddfast {
namespace cpu {

// Window code of an output whose gradient goes nowhere (window maximum 0); 0..3 otherwise.
constexpr uint8_t kReluMaxPoolNoGrad = 4;

// x [N, C, H, W] float32 / float64 / bfloat16, H, W ≥ 2; channels_last when x is channels_last and
// not contiguous, otherwise contiguous (other strides are copied). Returns (out, code), both [N, C, ⌊H/2⌋, ⌊W/2⌋] in x's memory format:
// out = max over the 2×2 window of relu(x); code (uint8) = the window position (row-major) that
// receives the gradient, or kReluMaxPoolNoGrad.
std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_fwd(const at::Tensor& x);

// grad_out [N, C, OH, OW] (x's dtype, any strides), code from relu_max_pool2d_fwd; H, W the input
// size; channels_last: the layout the forward ran in. Returns grad_in [N, C, H, W] in that layout:
// grad_out at the coded window positions (−0 as +0, as 0 + g), 0 elsewhere.
at::Tensor relu_max_pool2d_bwd(const at::Tensor& grad_out, const at::Tensor& code, int64_t H, int64_t W,
                               bool channels_last);

}  // namespace cpu
}  // namespace ddfast
