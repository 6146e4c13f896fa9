// The ddfast._C module: importing it registers the torch.ops.ddfast operators (csrc/<op>_ops.cpp,
// one file per op). The module itself carries the build information and, for code that predates
// the operators, the CPU kernels as plain functions (same argument checks as the operators).
#include <torch/extension.h>

#include "cpu/ghost_products.h"
#include "cpu/label_metagrad.h"
#include "cpu/relu_max_pool2d.h"
#include "cpu/ridge_solve.h"
#include "ridge_solve_ops.h"

#ifndef DDFAST_TORCH_VERSION
#define DDFAST_TORCH_VERSION "unknown"
#endif
#ifndef DDFAST_CUDA_VERSION
#define DDFAST_CUDA_VERSION ""
#endif

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> ridge_solve_fwd_checked(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  ddfast::ops::check_ridge_fwd(Z, Y, mu);
  return ddfast::cpu::ridge_solve_fwd(Z, Y, mu, primal, compute_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_checked(const at::Tensor& G, const at::Tensor& Z,
                                                                       const at::Tensor& Y, const at::Tensor& L,
                                                                       const at::Tensor& aux, bool primal,
                                                                       bool need_dz, bool need_dy, bool need_dmu) {
  ddfast::ops::check_ridge_bwd(G, Z, Y, L, aux, primal);
  return ddfast::cpu::ridge_solve_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu);
}

at::Tensor cholesky_solve_checked(const at::Tensor& R, const at::Tensor& L) {
  ddfast::ops::check_cholesky_solve(R, L);
  return ddfast::cpu::cholesky_solve(R, L);
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = DDFAST_TORCH_VERSION;
  info["cuda_version"] = DDFAST_CUDA_VERSION;
#ifdef DDFAST_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ddfast fused kernels: importing this module registers the torch.ops.ddfast operators";
  m.def("build_info", &build_info, "torch / CUDA versions this extension was built against");
#ifdef DDFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // ATen composite route of the CUDA ridge operators, callable on any device (tests run it on CPU).
  m.def("ridge_solve_fwd_composite", &ddfast::ops::ridge_solve_fwd_composite, py::arg("Z"), py::arg("Y"),
        py::arg("mu"), py::arg("primal"), py::arg("compute_w") = true);
  m.def("ridge_solve_bwd_composite", &ddfast::ops::ridge_solve_bwd_composite, py::arg("G"), py::arg("Z"),
        py::arg("Y"), py::arg("L"), py::arg("aux"), py::arg("primal"), py::arg("need_dz"), py::arg("need_dy"),
        py::arg("need_dmu"));
  m.def("krr_predict_fwd_composite", &ddfast::ops::krr_predict_fwd_composite, py::arg("Zq"), py::arg("Zs"),
        py::arg("Ys"), py::arg("lam"), py::arg("reg"), py::arg("c"), py::arg("via_weights"));
  m.def("krr_predict_bwd_composite", &ddfast::ops::krr_predict_bwd_composite, py::arg("G"), py::arg("Zq"),
        py::arg("Zs"), py::arg("L"), py::arg("alpha"), py::arg("c"), py::arg("trace_coef"), py::arg("need_dzq"),
        py::arg("need_dzs"), py::arg("need_dys"));

  // Plain CPU functions (prefer torch.ops.ddfast.*).
  m.def("ridge_solve_fwd", &ridge_solve_fwd_checked, py::arg("Z"), py::arg("Y"), py::arg("mu"), py::arg("primal"),
        py::arg("compute_w") = true);
  m.def("ridge_solve_bwd", &ridge_solve_bwd_checked, py::arg("G"), py::arg("Z"), py::arg("Y"), py::arg("L"),
        py::arg("aux"), py::arg("primal"), py::arg("need_dz"), py::arg("need_dy"), py::arg("need_dmu"));
  m.def("cholesky_solve", &cholesky_solve_checked, py::arg("R"), py::arg("L"));
  m.def("label_metagrad_fwd", &ddfast::cpu::label_metagrad_fwd, py::arg("Z"), py::arg("Y"), py::arg("scale"));
  m.def("label_metagrad_bwd", &ddfast::cpu::label_metagrad_bwd, py::arg("H"), py::arg("GW"),
        py::arg("gb") = py::none(), py::arg("Vb") = py::none(), py::arg("Z"), py::arg("scale"));
  m.def("ghost_bilinear_fwd", &ddfast::cpu::ghost_bilinear_fwd, py::arg("A"), py::arg("G"), py::arg("V"));
  m.def("ghost_norms_fwd", &ddfast::cpu::ghost_norms_fwd, py::arg("A"), py::arg("G"), py::arg("ghost"));
  m.def("ghost_inner_fwd", &ddfast::cpu::ghost_inner_fwd, py::arg("A1"), py::arg("G1"), py::arg("A2"),
        py::arg("G2"), py::arg("ghost"));
  m.def("relu_max_pool2d_fwd", &ddfast::cpu::relu_max_pool2d_fwd, py::arg("x"));
  m.def("relu_max_pool2d_bwd", &ddfast::cpu::relu_max_pool2d_bwd, py::arg("grad_out"), py::arg("code"),
        py::arg("H"), py::arg("W"), py::arg("channels_last"));
}
