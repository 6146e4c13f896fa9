// ddfast::label_metagrad_fwd / label_metagrad_bwd: schema, CPU, CUDA and Meta implementations.
// Kernels: csrc/cpu/label_metagrad.cpp, csrc/cuda/label_metagrad.cu.
//
//   label_metagrad_fwd(Z[N,C], Y[N,C], scale) -> R[N,C], loss[N]
//       R = scale·(softmax(Z)·s − Y), s_i = Σ_c Y_ic;  loss_i = −Σ_c Y_ic log_softmax(Z)_ic
//   label_metagrad_bwd(H[N,d], GW[C,d], gb[C]?, Vb[N,C]?, Z[N,C], scale) -> out[N,C]
//       v = H GWᵀ + gb + Vb, p = softmax(Z), out = scale·(v − (p·v)1)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/label_metagrad.h"
#include "ops_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/label_metagrad.h"
#endif

namespace ddfast {
namespace ops {
namespace {

constexpr const char* kFwd = "label_metagrad_fwd";
constexpr const char* kBwd = "label_metagrad_bwd";

void check_fwd(const at::Tensor& Z, const at::Tensor& Y) {
  check_rank(Z, 2, kFwd, "Z", "[N, C]");
  check_rank(Y, 2, kFwd, "Y", "[N, C]");
  check_sizes(Y, {Z.size(0), Z.size(1)}, kFwd, "Y", "[N, C] (the shape of Z)");
  check_float(Z, kFwd, "Z");
  check_same_dtype(Y, "Y", Z, "Z", kFwd);
  check_same_device(Y, "Y", Z, "Z", kFwd);
}

void check_bwd(const at::Tensor& H, const at::Tensor& GW, const std::optional<at::Tensor>& gb,
               const std::optional<at::Tensor>& Vb, const at::Tensor& Z) {
  check_rank(H, 2, kBwd, "H", "[N, d]");
  const int64_t N = H.size(0), d = H.size(1);
  check_rank(Z, 2, kBwd, "Z", "[N, C]");
  check_sizes(Z, {N, -1}, kBwd, "Z", "[N, C] (N: rows of H)");
  const int64_t C = Z.size(1);
  check_rank(GW, 2, kBwd, "GW", "[C, d]");
  check_sizes(GW, {C, d}, kBwd, "GW", "[C, d]");
  check_float(H, kBwd, "H");
  for (auto [t, name] : {std::pair{&GW, "GW"}, {&Z, "Z"}}) {
    check_same_dtype(*t, name, H, "H", kBwd);
    check_same_device(*t, name, H, "H", kBwd);
  }
  if (gb.has_value() && gb->defined()) {
    check_rank(*gb, 1, kBwd, "gb", "[C]");
    check_sizes(*gb, {C}, kBwd, "gb", "[C]");
    check_same_dtype(*gb, "gb", H, "H", kBwd);
    check_same_device(*gb, "gb", H, "H", kBwd);
  }
  if (Vb.has_value() && Vb->defined()) {
    check_rank(*Vb, 2, kBwd, "Vb", "[N, C]");
    check_sizes(*Vb, {N, C}, kBwd, "Vb", "[N, C]");
    check_same_dtype(*Vb, "Vb", H, "H", kBwd);
    check_same_device(*Vb, "Vb", H, "H", kBwd);
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_meta(const at::Tensor& Z, const at::Tensor& Y, double scale) {
  check_fwd(Z, Y);
  return {at::empty(Z.sizes(), Z.options()), at::empty({Z.size(0)}, Z.options())};
}

at::Tensor bwd_meta(const at::Tensor& H, const at::Tensor& GW, const std::optional<at::Tensor>& gb,
                    const std::optional<at::Tensor>& Vb, const at::Tensor& Z, double scale) {
  check_bwd(H, GW, gb, Vb, Z);
  return at::empty(Z.sizes(), Z.options());
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& Z, const at::Tensor& Y, double scale) {
  check_fwd(Z, Y);
  return ddfast::cpu::label_metagrad_fwd(Z, Y, scale);
}

at::Tensor bwd_cpu(const at::Tensor& H, const at::Tensor& GW, const std::optional<at::Tensor>& gb,
                   const std::optional<at::Tensor>& Vb, const at::Tensor& Z, double scale) {
  check_bwd(H, GW, gb, Vb, Z);
  return ddfast::cpu::label_metagrad_bwd(H, GW, gb, Vb, Z, scale);
}

#ifdef DDFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& Z_in, const at::Tensor& Y_in, double scale) {
  check_fwd(Z_in, Y_in);
  TORCH_CHECK(Z_in.is_cuda(), kFwd, ": expected CUDA tensors, got ", Z_in.device());
  const c10::cuda::CUDAGuard guard(Z_in.device());
  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous();
  const int64_t N = Z.size(0), C = Z.size(1);
  at::Tensor R = at::empty({N, C}, Z.options());
  at::Tensor loss = at::empty({N}, Z.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "label_metagrad_fwd_cuda", [&] {
    rc = ddfast::cuda::label_metagrad_fwd_launch<scalar_t>(Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(),
                                                           R.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), N, C,
                                                           scale, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "label_metagrad_fwd (CUDA): ", ddfast::cuda::label_metagrad_error_string(rc));
  return {R, loss};
}

at::Tensor bwd_cuda(const at::Tensor& H_in, const at::Tensor& GW_in, const std::optional<at::Tensor>& gb_in,
                    const std::optional<at::Tensor>& Vb_in, const at::Tensor& Z_in, double scale) {
  check_bwd(H_in, GW_in, gb_in, Vb_in, Z_in);
  TORCH_CHECK(H_in.is_cuda(), kBwd, ": expected CUDA tensors, got ", H_in.device());
  const c10::cuda::CUDAGuard guard(H_in.device());
  const bool has_gb = gb_in.has_value() && gb_in->defined();
  const bool has_vb = Vb_in.has_value() && Vb_in->defined();
  const at::Tensor gb = has_gb ? gb_in->contiguous() : at::Tensor();
  const at::Tensor Vb = has_vb ? Vb_in->contiguous() : at::Tensor();
  const at::Tensor H = H_in.contiguous(), GW = GW_in.contiguous(), Z = Z_in.contiguous();
  const int64_t N = H.size(0), d = H.size(1), C = Z.size(1);
  at::Tensor out = at::empty({N, C}, H.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "label_metagrad_bwd_cuda", [&] {
    rc = ddfast::cuda::label_metagrad_bwd_launch<scalar_t>(
        H.data_ptr<scalar_t>(), GW.data_ptr<scalar_t>(), has_gb ? gb.data_ptr<scalar_t>() : nullptr,
        has_vb ? Vb.data_ptr<scalar_t>() : nullptr, Z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, d, C,
        scale, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "label_metagrad_bwd (CUDA): ", ddfast::cuda::label_metagrad_error_string(rc));
  return out;
}
#endif

}  // namespace
}  // namespace ops
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("label_metagrad_fwd(Tensor Z, Tensor Y, float scale) -> (Tensor R, Tensor loss)");
  m.def("label_metagrad_bwd(Tensor H, Tensor GW, Tensor? gb, Tensor? Vb, Tensor Z, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("label_metagrad_fwd", &ddfast::ops::fwd_cpu);
  m.impl("label_metagrad_bwd", &ddfast::ops::bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddfast, Meta, m) {
  m.impl("label_metagrad_fwd", &ddfast::ops::fwd_meta);
  m.impl("label_metagrad_bwd", &ddfast::ops::bwd_meta);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("label_metagrad_fwd", &ddfast::ops::fwd_cuda);
  m.impl("label_metagrad_bwd", &ddfast::ops::bwd_cuda);
}
#endif
