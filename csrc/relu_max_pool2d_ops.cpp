// ddfast::relu_max_pool2d_fwd / relu_max_pool2d_bwd: schema, CPU, CUDA and Meta implementations.
// Kernels: csrc/cpu/relu_max_pool2d.cpp, csrc/cuda/relu_max_pool2d.cu.
//
//   relu_max_pool2d_fwd(x[N,C,H,W]) -> out, code   [N, C, ⌊H/2⌋, ⌊W/2⌋] (uint8 code), channels_last when x is
//       (and is not contiguous), else contiguous
//   relu_max_pool2d_bwd(grad_out, code, H, W, channels_last) -> grad_in [N, C, H, W] in that layout
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/relu_max_pool2d.h"
#include "ops_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/relu_max_pool2d.h"
#endif

namespace ddfast {
namespace ops {
namespace {

constexpr const char* kFwd = "relu_max_pool2d_fwd";
constexpr const char* kBwd = "relu_max_pool2d_bwd";

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble || t == at::kBFloat16; }

void check_fwd(const at::Tensor& x) {
  check_rank(x, 4, kFwd, "x", "[N, C, H, W]");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), kFwd, ": x: expected float32, float64 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, kFwd, ": x: expected H, W ≥ 2 for a 2×2 pool, got shape ",
              x.sizes());
}

void check_bwd(const at::Tensor& grad_out, const at::Tensor& code, int64_t H, int64_t W) {
  check_rank(code, 4, kBwd, "code", "[N, C, OH, OW]");
  TORCH_CHECK(code.scalar_type() == at::kByte, kBwd, ": code: expected the uint8 codes of relu_max_pool2d_fwd, got ",
              code.scalar_type());
  TORCH_CHECK(H >= 2 && W >= 2 && code.size(2) == H / 2 && code.size(3) == W / 2, kBwd,
              ": H, W: expected the input size (⌊H/2⌋, ⌊W/2⌋ = ", code.size(2), ", ", code.size(3), "), got ", H,
              ", ", W);
  check_rank(grad_out, 4, kBwd, "grad_out", "[N, C, OH, OW]");
  TORCH_CHECK(grad_out.sizes() == code.sizes(), kBwd, ": grad_out: expected shape ", code.sizes(),
              " (the codes'), got ", grad_out.sizes());
  TORCH_CHECK(is_kernel_dtype(grad_out.scalar_type()), kBwd, ": grad_out: expected float32, float64 or bfloat16, got ",
              grad_out.scalar_type());
  check_same_device(code, "code", grad_out, "grad_out", kBwd);
}

bool channels_last_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

std::tuple<at::Tensor, at::Tensor> fwd_meta(const at::Tensor& x) {
  check_fwd(x);
  const auto fmt = format_of(channels_last_of(x));
  const std::vector<int64_t> shape = {x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2};
  return {at::empty(shape, x.options().memory_format(fmt)),
          at::empty(shape, x.options().dtype(at::kByte).memory_format(fmt))};
}

at::Tensor bwd_meta(const at::Tensor& grad_out, const at::Tensor& code, int64_t H, int64_t W, bool channels_last) {
  check_bwd(grad_out, code, H, W);
  return at::empty({code.size(0), code.size(1), H, W}, grad_out.options().memory_format(format_of(channels_last)));
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x) {
  check_fwd(x);
  return ddfast::cpu::relu_max_pool2d_fwd(x);
}

at::Tensor bwd_cpu(const at::Tensor& grad_out, const at::Tensor& code, int64_t H, int64_t W, bool channels_last) {
  check_bwd(grad_out, code, H, W);
  return ddfast::cpu::relu_max_pool2d_bwd(grad_out, code, H, W, channels_last);
}

#ifdef DDFAST_WITH_CUDA
// f(tag) with tag float / double / uint16_t (bfloat16 bits, as the CUDA launchers take it).
template <typename F>
void dispatch_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(uint16_t{}); break;
    default: TORCH_CHECK(false, "relu_max_pool2d (CUDA): expected float32, float64 or bfloat16, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x_in) {
  check_fwd(x_in);
  TORCH_CHECK(x_in.is_cuda(), kFwd, ": x: expected a CUDA tensor, got device ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = channels_last_of(x_in);
  const at::Tensor x = x_in.contiguous(format_of(cl));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto [out, code] = fwd_meta(x);
  if (out.numel() == 0) return {out, code};
  int rc = 0;
  dispatch_storage(x.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    rc = ddfast::cuda::relu_max_pool2d_fwd_launch<S>(reinterpret_cast<const S*>(x.data_ptr()),
                                                     reinterpret_cast<S*>(out.data_ptr()), code.data_ptr<uint8_t>(),
                                                     N, C, H, W, cl, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "relu_max_pool2d_fwd (CUDA): ", ddfast::cuda::relu_max_pool2d_error_string(rc));
  return {out, code};
}

at::Tensor bwd_cuda(const at::Tensor& grad_out, const at::Tensor& code_in, int64_t H, int64_t W, bool channels_last) {
  check_bwd(grad_out, code_in, H, W);
  TORCH_CHECK(grad_out.is_cuda(), kBwd, ": grad_out: expected a CUDA tensor, got device ", grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = format_of(channels_last);
  const at::Tensor g = grad_out.contiguous(fmt), code = code_in.contiguous(fmt);
  const int64_t N = code.size(0), C = code.size(1);
  at::Tensor gi = at::empty({N, C, H, W}, g.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  int rc = 0;
  dispatch_storage(g.scalar_type(), [&](auto tag) {
    using S = decltype(tag);
    rc = ddfast::cuda::relu_max_pool2d_bwd_launch<S>(reinterpret_cast<const S*>(g.data_ptr()),
                                                     code.data_ptr<uint8_t>(), reinterpret_cast<S*>(gi.data_ptr()),
                                                     N, C, H, W, channels_last, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "relu_max_pool2d_bwd (CUDA): ", ddfast::cuda::relu_max_pool2d_error_string(rc));
  return gi;
}
#endif

}  // namespace
}  // namespace ops
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("relu_max_pool2d_fwd(Tensor x) -> (Tensor out, Tensor code)");
  m.def("relu_max_pool2d_bwd(Tensor grad_out, Tensor code, int H, int W, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("relu_max_pool2d_fwd", &ddfast::ops::fwd_cpu);
  m.impl("relu_max_pool2d_bwd", &ddfast::ops::bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddfast, Meta, m) {
  m.impl("relu_max_pool2d_fwd", &ddfast::ops::fwd_meta);
  m.impl("relu_max_pool2d_bwd", &ddfast::ops::bwd_meta);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("relu_max_pool2d_fwd", &ddfast::ops::fwd_cuda);
  m.impl("relu_max_pool2d_bwd", &ddfast::ops::bwd_cuda);
}
#endif
