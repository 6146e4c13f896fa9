// Python bindings of ddfast._C: CPU kernels always, CUDA kernels in a CUDA build
// (DDFAST_WITH_CUDA). CUDA launchers take raw pointers and the caller's stream.
#include <torch/extension.h>

#include "cpu/ridge_solve.h"

#ifdef DDFAST_WITH_CUDA
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

}  // namespace
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddfast fused kernels";
  m.def("ridge_solve_fwd", &ddfast::cpu::ridge_solve_fwd, "Fused ridge solve forward (CPU)",
        py::arg("Z"), py::arg("Y"), py::arg("mu"), py::arg("primal"), py::arg("compute_w") = true);
  m.def("ridge_solve_bwd", &ddfast::cpu::ridge_solve_bwd, "Fused ridge solve backward (CPU)",
        py::arg("G"), py::arg("Z"), py::arg("Y"), py::arg("L"), py::arg("aux"), py::arg("primal"),
        py::arg("need_dz"), py::arg("need_dy"), py::arg("need_dmu"));
  m.def("cholesky_solve", &ddfast::cpu::cholesky_solve, "(LLᵀ)⁻¹R with a saved factor (CPU)",
        py::arg("R"), py::arg("L"));
#ifdef DDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("ridge_solve_fwd_cuda", &ridge_solve_fwd_cuda);
  m.def("ridge_solve_bwd_cuda", &ridge_solve_bwd_cuda);
  m.def("ridge_solve_cuda_max_n", &ddfast::cuda::ridge_solve_max_n);
#else
  m.attr("with_cuda") = false;
#endif
}
