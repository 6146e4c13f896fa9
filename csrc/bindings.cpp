// Python bindings of ddfast._C: CPU kernels always, CUDA kernels in a CUDA build
// (DDFAST_WITH_CUDA). CUDA launchers take raw pointers and the caller's stream.
#include <torch/extension.h>

#include "cpu/label_metagrad.h"
#include "cpu/ridge_solve.h"

#ifdef DDFAST_WITH_CUDA
#include "cuda/label_metagrad.h"
#include "cuda/ridge_solve.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_cuda(
    const at::Tensor& Z_in, const at::Tensor& Y_in, const at::Tensor& mu_in, bool primal,
    int64_t stream) {
  TORCH_CHECK(Z_in.is_cuda() && Y_in.is_cuda() && mu_in.is_cuda(), "CUDA tensors expected");
  TORCH_CHECK(Z_in.scalar_type() == Y_in.scalar_type() && Z_in.scalar_type() == mu_in.scalar_type(),
              "Z, Y, mu: one dtype expected");
  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous(), mu = mu_in.contiguous();
  const int64_t B = Z.size(0), N = Z.size(1), d = Z.size(2), C = Y.size(2);
  const int64_t n = primal ? d : N;
  at::Tensor W = at::empty({B, d, C}, Z.options());
  at::Tensor L = at::empty({B, n, n}, Z.options());
  at::Tensor aux = at::empty({B, n, C}, Z.options());
  at::Tensor info = at::empty({B}, Z.options().dtype(at::kInt));
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_fwd_cuda", [&] {
    rc = ddfast::cuda::ridge_solve_fwd_launch<scalar_t>(
        Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
        W.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), aux.data_ptr<scalar_t>(),
        info.data_ptr<int>(), B, N, d, C, primal, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "ridge_solve_fwd (CUDA): ", ddfast::cuda::ridge_solve_error_string(rc));
  return {W, L, aux, info};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_cuda(
    const at::Tensor& G_in, const at::Tensor& Z_in, const at::Tensor& Y_in, const at::Tensor& L_in,
    const at::Tensor& aux_in, bool primal, bool need_dz, bool need_dy, bool need_dmu,
    int64_t stream) {
  const at::Tensor G = G_in.contiguous(), Z = Z_in.contiguous(), Y = Y_in.contiguous();
  const at::Tensor L = L_in.contiguous(), aux = aux_in.contiguous();
  const int64_t B = Z.size(0), N = Z.size(1), d = Z.size(2), C = Y.size(2);
  at::Tensor dZ = need_dz ? at::empty({B, N, d}, Z.options()) : at::Tensor();
  at::Tensor dY = need_dy ? at::empty({B, N, C}, Z.options()) : at::Tensor();
  at::Tensor dmu = need_dmu ? at::empty({B}, Z.options()) : at::Tensor();
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_bwd_cuda", [&] {
    rc = ddfast::cuda::ridge_solve_bwd_launch<scalar_t>(
        G.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(),
        L.data_ptr<scalar_t>(), aux.data_ptr<scalar_t>(),
        need_dz ? dZ.data_ptr<scalar_t>() : nullptr, need_dy ? dY.data_ptr<scalar_t>() : nullptr,
        need_dmu ? dmu.data_ptr<scalar_t>() : nullptr, B, N, d, C, primal,
        reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "ridge_solve_bwd (CUDA): ", ddfast::cuda::ridge_solve_error_string(rc));
  return {dZ, dY, dmu};
}

void check_cuda_operand(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), ", got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> label_metagrad_fwd_cuda(const at::Tensor& Z_in, const at::Tensor& Y_in,
                                                           double scale, int64_t stream) {
  TORCH_CHECK(Z_in.dim() == 2, "Z: expected logits of shape [N, C], got ", Z_in.sizes());
  TORCH_CHECK(Y_in.sizes() == Z_in.sizes(), "Y: expected soft labels of shape ", Z_in.sizes(),
              " (the shape of Z), got ", Y_in.sizes());
  check_cuda_operand(Z_in, "Z", Z_in);
  check_cuda_operand(Y_in, "Y", Z_in);
  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous();
  const int64_t N = Z.size(0), C = Z.size(1);
  at::Tensor R = at::empty({N, C}, Z.options());
  at::Tensor loss = at::empty({N}, Z.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "label_metagrad_fwd_cuda", [&] {
    rc = ddfast::cuda::label_metagrad_fwd_launch<scalar_t>(
        Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), N,
        C, scale, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "label_metagrad_fwd (CUDA): ", ddfast::cuda::label_metagrad_error_string(rc));
  return {R, loss};
}

at::Tensor label_metagrad_bwd_cuda(const at::Tensor& H_in, const at::Tensor& GW_in,
                                   const std::optional<at::Tensor>& gb_in, const std::optional<at::Tensor>& Vb_in,
                                   const at::Tensor& Z_in, double scale, int64_t stream) {
  TORCH_CHECK(H_in.dim() == 2, "H: expected features of shape [N, d], got ", H_in.sizes());
  const int64_t N = H_in.size(0), d = H_in.size(1);
  TORCH_CHECK(Z_in.dim() == 2 && Z_in.size(0) == N, "Z: expected logits of shape [N, C] with N = ", N,
              ", got ", Z_in.sizes());
  const int64_t C = Z_in.size(1);
  TORCH_CHECK(GW_in.dim() == 2 && GW_in.size(0) == C && GW_in.size(1) == d, "GW: expected shape [", C, ", ",
              d, "], got ", GW_in.sizes());
  check_cuda_operand(H_in, "H", H_in);
  check_cuda_operand(GW_in, "GW", H_in);
  check_cuda_operand(Z_in, "Z", H_in);
  const bool has_gb = gb_in.has_value() && gb_in->defined();
  const bool has_vb = Vb_in.has_value() && Vb_in->defined();
  at::Tensor gb, Vb;
  if (has_gb) {
    TORCH_CHECK(gb_in->dim() == 1 && gb_in->size(0) == C, "gb: expected shape [", C, "], got ", gb_in->sizes());
    check_cuda_operand(*gb_in, "gb", H_in);
    gb = gb_in->contiguous();
  }
  if (has_vb) {
    TORCH_CHECK(Vb_in->dim() == 2 && Vb_in->size(0) == N && Vb_in->size(1) == C, "Vb: expected shape [", N,
                ", ", C, "], got ", Vb_in->sizes());
    check_cuda_operand(*Vb_in, "Vb", H_in);
    Vb = Vb_in->contiguous();
  }
  const at::Tensor H = H_in.contiguous(), GW = GW_in.contiguous(), Z = Z_in.contiguous();
  at::Tensor out = at::empty({N, C}, H.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(H.scalar_type(), "label_metagrad_bwd_cuda", [&] {
    rc = ddfast::cuda::label_metagrad_bwd_launch<scalar_t>(
        H.data_ptr<scalar_t>(), GW.data_ptr<scalar_t>(), has_gb ? gb.data_ptr<scalar_t>() : nullptr,
        has_vb ? Vb.data_ptr<scalar_t>() : nullptr, Z.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, d, C,
        scale, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "label_metagrad_bwd (CUDA): ", ddfast::cuda::label_metagrad_error_string(rc));
  return out;
}

}  // namespace
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddfast fused kernels";
  m.def("ridge_solve_fwd", &ddfast::cpu::ridge_solve_fwd, "Fused ridge solve forward (CPU)",
        py::arg("Z"), py::arg("Y"), py::arg("mu"), py::arg("primal"), py::arg("compute_w") = true);
  m.def("ridge_solve_bwd", &ddfast::cpu::ridge_solve_bwd, "Fused ridge solve backward (CPU)",
        py::arg("G"), py::arg("Z"), py::arg("Y"), py::arg("L"), py::arg("aux"), py::arg("primal"),
        py::arg("need_dz"), py::arg("need_dy"), py::arg("need_dmu"));
  m.def("label_metagrad_fwd", &ddfast::cpu::label_metagrad_fwd,
        "Label meta-gradient inner residual and per-row soft CE (CPU)", py::arg("Z"), py::arg("Y"),
        py::arg("scale"));
  m.def("label_metagrad_bwd", &ddfast::cpu::label_metagrad_bwd,
        "Label meta-gradient head residual scale·(v − (p·v)1), v = H GWᵀ + gb + Vb (CPU)", py::arg("H"),
        py::arg("GW"), py::arg("gb") = py::none(), py::arg("Vb") = py::none(), py::arg("Z"),
        py::arg("scale"));
  m.def("cholesky_solve", &ddfast::cpu::cholesky_solve, "(LLᵀ)⁻¹R with a saved factor (CPU)",
        py::arg("R"), py::arg("L"));
#ifdef DDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("ridge_solve_fwd_cuda", &ridge_solve_fwd_cuda);
  m.def("ridge_solve_bwd_cuda", &ridge_solve_bwd_cuda);
  m.def("ridge_solve_cuda_max_n", &ddfast::cuda::ridge_solve_max_n);
  m.def("label_metagrad_fwd_cuda", &label_metagrad_fwd_cuda, py::arg("Z"), py::arg("Y"), py::arg("scale"),
        py::arg("stream"));
  m.def("label_metagrad_bwd_cuda", &label_metagrad_bwd_cuda, py::arg("H"), py::arg("GW"),
        py::arg("gb") = py::none(), py::arg("Vb") = py::none(), py::arg("Z"), py::arg("scale"),
        py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
