// ddfast::ghost_bilinear_fwd / ghost_norms_fwd / ghost_inner_fwd: schema, CPU, CUDA and Meta
// implementations. Kernels: csrc/cpu/ghost_products.cpp, csrc/cuda/ghost_products.cu.
//
//   A [N, P, K] layer inputs, G [N, P, O] output gradients, W_n = Σ_p G[n,p] A[n,p]ᵀ  [O, K]
//   ghost_bilinear_fwd(A, G, V[O,K])              -> out[N]      = ⟨V, W_n⟩
//   ghost_norms_fwd(A, G, ghost)                  -> out[N]      = ‖W_n‖_F²
//   ghost_inner_fwd(A1, G1, A2, G2, ghost)        -> out[N1, N2] = ⟨W1_n, W2_m⟩
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/ghost_products.h"
#include "ops_common.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/ghost_products.h"
#endif

namespace ddfast {
namespace ops {
namespace {

// A [N, P, K], G [N, P, O] of one float dtype and device.
void check_pair(const at::Tensor& A, const char* an, const at::Tensor& G, const char* gn, const char* op) {
  check_rank(A, 3, op, an, "[N, P, K]");
  check_rank(G, 3, op, gn, "[N, P, O]");
  check_sizes(G, {A.size(0), A.size(1), -1}, op, gn, "[N, P, O] (N, P from the layer inputs)");
  check_float(A, op, an);
  check_same_dtype(G, gn, A, an, op);
  check_same_device(G, gn, A, an, op);
}

void check_bilinear(const at::Tensor& A, const at::Tensor& G, const at::Tensor& V) {
  constexpr const char* op = "ghost_bilinear_fwd";
  check_pair(A, "A", G, "G", op);
  check_rank(V, 2, op, "V", "[O, K]");
  check_sizes(V, {G.size(2), A.size(2)}, op, "V", "[O, K]");
  check_same_dtype(V, "V", A, "A", op);
  check_same_device(V, "V", A, "A", op);
}

void check_inner(const at::Tensor& A1, const at::Tensor& G1, const at::Tensor& A2, const at::Tensor& G2) {
  constexpr const char* op = "ghost_inner_fwd";
  check_pair(A1, "A1", G1, "G1", op);
  check_pair(A2, "A2", G2, "G2", op);
  check_sizes(A2, {-1, -1, A1.size(2)}, op, "A2", "[N2, P2, K] (K from A1)");
  check_sizes(G2, {-1, -1, G1.size(2)}, op, "G2", "[N2, P2, O] (O from G1)");
  check_same_dtype(A2, "A2", A1, "A1", op);
  check_same_device(A2, "A2", A1, "A1", op);
}

at::Tensor bilinear_meta(const at::Tensor& A, const at::Tensor& G, const at::Tensor& V) {
  check_bilinear(A, G, V);
  return at::empty({A.size(0)}, A.options());
}

at::Tensor norms_meta(const at::Tensor& A, const at::Tensor& G, bool ghost) {
  check_pair(A, "A", G, "G", "ghost_norms_fwd");
  return at::empty({A.size(0)}, A.options());
}

at::Tensor inner_meta(const at::Tensor& A1, const at::Tensor& G1, const at::Tensor& A2, const at::Tensor& G2,
                      bool ghost) {
  check_inner(A1, G1, A2, G2);
  return at::empty({A1.size(0), A2.size(0)}, A1.options());
}

at::Tensor bilinear_cpu(const at::Tensor& A, const at::Tensor& G, const at::Tensor& V) {
  check_bilinear(A, G, V);
  return ddfast::cpu::ghost_bilinear_fwd(A, G, V);
}

at::Tensor norms_cpu(const at::Tensor& A, const at::Tensor& G, bool ghost) {
  check_pair(A, "A", G, "G", "ghost_norms_fwd");
  return ddfast::cpu::ghost_norms_fwd(A, G, ghost);
}

at::Tensor inner_cpu(const at::Tensor& A1, const at::Tensor& G1, const at::Tensor& A2, const at::Tensor& G2,
                     bool ghost) {
  check_inner(A1, G1, A2, G2);
  return ddfast::cpu::ghost_inner_fwd(A1, G1, A2, G2, ghost);
}

#ifdef DDFAST_WITH_CUDA
void check_cuda(const at::Tensor& A, const char* op) {
  TORCH_CHECK(A.is_cuda(), op, ": expected CUDA tensors, got ", A.device());
}

at::Tensor bilinear_cuda(const at::Tensor& A_in, const at::Tensor& G_in, const at::Tensor& V_in) {
  check_bilinear(A_in, G_in, V_in);
  check_cuda(A_in, "ghost_bilinear_fwd");
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), G = G_in.contiguous(), V = V_in.contiguous();
  const int64_t N = A.size(0), P = A.size(1), K = A.size(2), O = G.size(2);
  at::Tensor out = at::empty({N}, A.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "ghost_bilinear_fwd_cuda", [&] {
    rc = ddfast::cuda::ghost_bilinear_fwd_launch<scalar_t>(A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                                           V.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, P,
                                                           K, O, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "ghost_bilinear_fwd (CUDA): ", ddfast::cuda::ghost_products_error_string(rc));
  return out;
}

at::Tensor norms_cuda(const at::Tensor& A_in, const at::Tensor& G_in, bool ghost) {
  check_pair(A_in, "A", G_in, "G", "ghost_norms_fwd");
  check_cuda(A_in, "ghost_norms_fwd");
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor A = A_in.contiguous(), G = G_in.contiguous();
  const int64_t N = A.size(0), P = A.size(1), K = A.size(2), O = G.size(2);
  at::Tensor out = at::empty({N}, A.options());
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "ghost_norms_fwd_cuda", [&] {
    rc = ddfast::cuda::ghost_norms_fwd_launch<scalar_t>(A.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(),
                                                        out.data_ptr<scalar_t>(), N, P, K, O, ghost,
                                                        c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "ghost_norms_fwd (CUDA): ", ddfast::cuda::ghost_products_error_string(rc));
  return out;
}

// ghost: one warp per pair; otherwise W in blocks of at most 2^22 elements per side, multiplied by at::mm.
at::Tensor inner_cuda(const at::Tensor& A1_in, const at::Tensor& G1_in, const at::Tensor& A2_in,
                      const at::Tensor& G2_in, bool ghost) {
  check_inner(A1_in, G1_in, A2_in, G2_in);
  check_cuda(A1_in, "ghost_inner_fwd");
  const c10::cuda::CUDAGuard guard(A1_in.device());
  const at::Tensor A1 = A1_in.contiguous(), G1 = G1_in.contiguous(), A2 = A2_in.contiguous(), G2 = G2_in.contiguous();
  const int64_t N1 = A1.size(0), P1 = A1.size(1), N2 = A2.size(0), P2 = A2.size(1), K = A1.size(2), O = G1.size(2);
  const cudaStream_t cs = c10::cuda::getCurrentCUDAStream();
  if (ghost) {
    at::Tensor out = at::empty({N1, N2}, A1.options());
    int rc = 0;
    AT_DISPATCH_FLOATING_TYPES(A1.scalar_type(), "ghost_inner_fwd_cuda", [&] {
      rc = ddfast::cuda::ghost_inner_fwd_launch<scalar_t>(A1.data_ptr<scalar_t>(), G1.data_ptr<scalar_t>(),
                                                          A2.data_ptr<scalar_t>(), G2.data_ptr<scalar_t>(),
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
#endif

}  // namespace
}  // namespace ops
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("ghost_bilinear_fwd(Tensor A, Tensor G, Tensor V) -> Tensor");
  m.def("ghost_norms_fwd(Tensor A, Tensor G, bool ghost) -> Tensor");
  m.def("ghost_inner_fwd(Tensor A1, Tensor G1, Tensor A2, Tensor G2, bool ghost) -> Tensor");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("ghost_bilinear_fwd", &ddfast::ops::bilinear_cpu);
  m.impl("ghost_norms_fwd", &ddfast::ops::norms_cpu);
  m.impl("ghost_inner_fwd", &ddfast::ops::inner_cpu);
}

TORCH_LIBRARY_IMPL(ddfast, Meta, m) {
  m.impl("ghost_bilinear_fwd", &ddfast::ops::bilinear_meta);
  m.impl("ghost_norms_fwd", &ddfast::ops::norms_meta);
  m.impl("ghost_inner_fwd", &ddfast::ops::inner_meta);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("ghost_bilinear_fwd", &ddfast::ops::bilinear_cuda);
  m.impl("ghost_norms_fwd", &ddfast::ops::norms_cuda);
  m.impl("ghost_inner_fwd", &ddfast::ops::inner_cuda);
}
#endif
