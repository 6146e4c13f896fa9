// Python bindings of ddfast._C: CPU kernels always, CUDA kernels in a CUDA build
// (DDFAST_WITH_CUDA). CUDA launchers take raw pointers and the caller's stream.
#include <torch/extension.h>

#include "cpu/ghost_products.h"
#include "cpu/label_metagrad.h"
#include "cpu/relu_max_pool2d.h"
#include "cpu/ridge_solve.h"

#ifdef DDFAST_WITH_CUDA
#include "cuda/ghost_products.h"
#include "cuda/label_metagrad.h"
#include "cuda/relu_max_pool2d.h"
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

// A [N, P, K] and G [N, P, O] CUDA tensors of one dtype and device.
void check_ghost_pair(const at::Tensor& A, const char* an, const at::Tensor& G, const char* gn) {
  TORCH_CHECK(A.dim() == 3, an, ": expected layer inputs of shape [N, P, K], got ", A.sizes());
  TORCH_CHECK(G.dim() == 3 && G.size(0) == A.size(0) && G.size(1) == A.size(1), gn,
              ": expected output gradients of shape [N, P, O] with N, P = ", A.size(0), ", ", A.size(1), ", got ",
              G.sizes());
  check_cuda_operand(A, an, A);
  check_cuda_operand(G, gn, A);
}

at::Tensor ghost_bilinear_fwd_cuda(const at::Tensor& A_in, const at::Tensor& G_in, const at::Tensor& V_in,
                                   int64_t stream) {
  check_ghost_pair(A_in, "A", G_in, "G");
  const int64_t N = A_in.size(0), P = A_in.size(1), K = A_in.size(2), O = G_in.size(2);
  TORCH_CHECK(V_in.dim() == 2 && V_in.size(0) == O && V_in.size(1) == K, "V: expected shape [O, K] = [", O, ", ",
              K, "], got ", V_in.sizes());
  check_cuda_operand(V_in, "V", A_in);
  const at::Tensor A = A_in.contiguous(), G = G_in.contiguous(), V = V_in.contiguous();
  at::Tensor out = at::empty({N}, A.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "ghost_bilinear_fwd_cuda", [&] {
    rc = ddfast::cuda::ghost_bilinear_fwd_launch<scalar_t>(A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                                           V.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, P,
                                                           K, O, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "ghost_bilinear_fwd (CUDA): ", ddfast::cuda::ghost_products_error_string(rc));
  return out;
}

at::Tensor ghost_norms_fwd_cuda(const at::Tensor& A_in, const at::Tensor& G_in, bool ghost, int64_t stream) {
  check_ghost_pair(A_in, "A", G_in, "G");
  const at::Tensor A = A_in.contiguous(), G = G_in.contiguous();
  const int64_t N = A.size(0), P = A.size(1), K = A.size(2), O = G.size(2);
  at::Tensor out = at::empty({N}, A.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "ghost_norms_fwd_cuda", [&] {
    rc = ddfast::cuda::ghost_norms_fwd_launch<scalar_t>(A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                                        out.data_ptr<scalar_t>(), N, P, K, O, ghost,
                                                        reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "ghost_norms_fwd (CUDA): ", ddfast::cuda::ghost_products_error_string(rc));
  return out;
}

// ghost: one warp per pair; otherwise W in blocks of at most 2^22 elements per side, multiplied by at::mm.
at::Tensor ghost_inner_fwd_cuda(const at::Tensor& A1_in, const at::Tensor& G1_in, const at::Tensor& A2_in,
                                const at::Tensor& G2_in, bool ghost, int64_t stream) {
  check_ghost_pair(A1_in, "A1", G1_in, "G1");
  check_ghost_pair(A2_in, "A2", G2_in, "G2");
  check_cuda_operand(A2_in, "A2", A1_in);
  TORCH_CHECK(A2_in.size(2) == A1_in.size(2), "A2: expected K = ", A1_in.size(2), " columns, got ", A2_in.sizes());
  TORCH_CHECK(G2_in.size(2) == G1_in.size(2), "G2: expected O = ", G1_in.size(2), " columns, got ", G2_in.sizes());
  const at::Tensor A1 = A1_in.contiguous(), G1 = G1_in.contiguous(), A2 = A2_in.contiguous(), G2 = G2_in.contiguous();
  const int64_t N1 = A1.size(0), P1 = A1.size(1), N2 = A2.size(0), P2 = A2.size(1), K = A1.size(2), O = G1.size(2);
  const auto cs = reinterpret_cast<cudaStream_t>(stream);
  if (ghost) {
    at::Tensor out = at::empty({N1, N2}, A1.options());
    int rc = 0;
    AT_DISPATCH_FLOATING_TYPES(A1.scalar_type(), "ghost_inner_fwd_cuda", [&] {
      rc = ddfast::cuda::ghost_inner_fwd_launch<scalar_t>(
          A1.data_ptr<scalar_t>(), G1.data_ptr<scalar_t>(), A2.data_ptr<scalar_t>(), G2.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), N1, P1, N2, P2, K, O, cs);
    });
    TORCH_CHECK(rc == 0, "ghost_inner_fwd (CUDA): ", ddfast::cuda::ghost_products_error_string(rc));
    return out;
  }
  at::Tensor out = at::zeros({N1, N2}, A1.options());
  const int64_t OK = O * K;
  if (N1 == 0 || N2 == 0 || OK == 0) return out;
  const int64_t b = std::max<int64_t>(1, (int64_t(1) << 22) / OK);
  auto materialize = [&](const at::Tensor& A, const at::Tensor& G, int64_t n0, int64_t nb) {
    at::Tensor W = at::empty({nb, OK}, A.options());
    int rc = 0;
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "ghost_materialize_cuda", [&] {
      rc = ddfast::cuda::ghost_materialize_launch<scalar_t>(A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                                            W.data_ptr<scalar_t>(), n0, nb, A.size(1), K, O, cs);
    });
    TORCH_CHECK(rc == 0, "ghost_inner_fwd (CUDA, materialize): ", ddfast::cuda::ghost_products_error_string(rc));
    return W;
  };
  const bool w2_once = N2 <= b;
  at::Tensor W2_all = w2_once ? materialize(A2, G2, 0, N2) : at::Tensor();
  for (int64_t s1 = 0; s1 < N1; s1 += b) {
    const int64_t n1 = std::min(b, N1 - s1);
    const at::Tensor W1 = materialize(A1, G1, s1, n1);
    for (int64_t s2 = 0; s2 < N2; s2 += b) {
      const int64_t n2 = std::min(b, N2 - s2);
      const at::Tensor W2 = w2_once ? W2_all : materialize(A2, G2, s2, n2);
      out.narrow(0, s1, n1).narrow(1, s2, n2).copy_(at::mm(W1, W2.t()));
    }
  }
  return out;
}

// f(tag) with tag float / double / uint16_t (bfloat16 bits, as the CUDA launchers take it).
template <typename F>
void dispatch_rmp_storage(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(uint16_t{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, float64 or bfloat16, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_fwd_cuda(const at::Tensor& x_in, int64_t stream) {
  TORCH_CHECK(x_in.dim() == 4, "x: expected a 4-D tensor [N, C, H, W], got shape ", x_in.sizes());
  TORCH_CHECK(x_in.is_cuda(), "x: expected a CUDA tensor, got device ", x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(H >= 2 && W >= 2, "x: expected H, W ≥ 2 for a 2×2 pool, got shape ", x_in.sizes());
  const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(fmt));
  at::Tensor code = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte).memory_format(fmt));
  int rc = 0;
  dispatch_rmp_storage(x.scalar_type(), "x", [&](auto tag) {
    using S = decltype(tag);
    rc = ddfast::cuda::relu_max_pool2d_fwd_launch<S>(reinterpret_cast<const S*>(x.data_ptr()),
                                                     reinterpret_cast<S*>(out.data_ptr()), code.data_ptr<uint8_t>(),
                                                     N, C, H, W, cl, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "relu_max_pool2d_fwd (CUDA): ", ddfast::cuda::relu_max_pool2d_error_string(rc));
  return {out, code};
}

at::Tensor relu_max_pool2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& code_in, int64_t H, int64_t W,
                                    bool channels_last, int64_t stream) {
  TORCH_CHECK(code_in.dim() == 4 && code_in.scalar_type() == at::kByte && code_in.size(2) == H / 2 &&
                  code_in.size(3) == W / 2,
              "code: expected the uint8 [N, C, H/2, W/2] codes of relu_max_pool2d_fwd_cuda, got ",
              code_in.scalar_type(), " of shape ", code_in.sizes());
  TORCH_CHECK(grad_out.sizes() == code_in.sizes(), "grad_out: expected shape ", code_in.sizes(), ", got ",
              grad_out.sizes());
  check_cuda_operand(grad_out, "grad_out", grad_out);
  TORCH_CHECK(code_in.device() == grad_out.device(), "code: expected device ", grad_out.device(), ", got ",
              code_in.device());
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad_out.contiguous(fmt), code = code_in.contiguous(fmt);
  const int64_t N = code.size(0), C = code.size(1);
  at::Tensor gi = at::empty({N, C, H, W}, g.options().memory_format(fmt));
  int rc = 0;
  dispatch_rmp_storage(g.scalar_type(), "grad_out", [&](auto tag) {
    using S = decltype(tag);
    rc = ddfast::cuda::relu_max_pool2d_bwd_launch<S>(reinterpret_cast<const S*>(g.data_ptr()),
                                                     code.data_ptr<uint8_t>(), reinterpret_cast<S*>(gi.data_ptr()),
                                                     N, C, H, W, channels_last, reinterpret_cast<cudaStream_t>(stream));
  });
  TORCH_CHECK(rc == 0, "relu_max_pool2d_bwd (CUDA): ", ddfast::cuda::relu_max_pool2d_error_string(rc));
  return gi;
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
  m.def("ghost_bilinear_fwd", &ddfast::cpu::ghost_bilinear_fwd,
        "Ghost bilinear form out[n] = Σ_p G[n,p]ᵀ V A[n,p] (CPU)", py::arg("A"), py::arg("G"), py::arg("V"));
  m.def("ghost_norms_fwd", &ddfast::cpu::ghost_norms_fwd,
        "Per-example squared Frobenius norms ‖Σ_p G[n,p] A[n,p]ᵀ‖² (CPU)", py::arg("A"), py::arg("G"),
        py::arg("ghost"));
  m.def("ghost_inner_fwd", &ddfast::cpu::ghost_inner_fwd,
        "Pairwise inner products of per-example weight gradients (CPU)", py::arg("A1"), py::arg("G1"),
        py::arg("A2"), py::arg("G2"), py::arg("ghost"));
  m.def("cholesky_solve", &ddfast::cpu::cholesky_solve, "(LLᵀ)⁻¹R with a saved factor (CPU)",
        py::arg("R"), py::arg("L"));
  m.def("relu_max_pool2d_fwd", &ddfast::cpu::relu_max_pool2d_fwd,
        "(out, code): out = 2×2 max-pool of relu(x), code = window position of the gradient (CPU)", py::arg("x"));
  m.def("relu_max_pool2d_bwd", &ddfast::cpu::relu_max_pool2d_bwd,
        "grad_in: grad_out scattered to the coded window positions (CPU)", py::arg("grad_out"), py::arg("code"),
        py::arg("H"), py::arg("W"), py::arg("channels_last"));
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
  m.def("ghost_bilinear_fwd_cuda", &ghost_bilinear_fwd_cuda, py::arg("A"), py::arg("G"), py::arg("V"),
        py::arg("stream"));
  m.def("ghost_norms_fwd_cuda", &ghost_norms_fwd_cuda, py::arg("A"), py::arg("G"), py::arg("ghost"),
        py::arg("stream"));
  m.def("ghost_inner_fwd_cuda", &ghost_inner_fwd_cuda, py::arg("A1"), py::arg("G1"), py::arg("A2"), py::arg("G2"),
        py::arg("ghost"), py::arg("stream"));
  m.def("relu_max_pool2d_fwd_cuda", &relu_max_pool2d_fwd_cuda, py::arg("x"), py::arg("stream"));
  m.def("relu_max_pool2d_bwd_cuda", &relu_max_pool2d_bwd_cuda, py::arg("grad_out"), py::arg("code"), py::arg("H"),
        py::arg("W"), py::arg("channels_last"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
