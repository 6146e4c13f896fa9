// ddfast::ridge_solve_fwd / ridge_solve_bwd / cholesky_solve: schema, CPU, CUDA and Meta
// implementations. Kernels: csrc/cpu/ridge_solve.cpp, csrc/cuda/ridge_solve.cu.
//
//   ridge_solve_fwd(Z[B,N,d], Y[B,N,C], mu[B], primal, compute_w) -> W, L[B,n,n], aux[B,n,C], info[B], status[]
//       dual (n = N):  A = ZZᵀ+μI, L = chol(A), aux = α = A⁻¹Y, W = Zᵀα   ([B,d,C]; [0] when !compute_w)
//       primal (n = d): H = ZᵀZ+μI, L = chol(H), aux = W = H⁻¹ZᵀY          (W always [B,d,C])
//       L and aux in mu's dtype (the solve dtype, at least Z's); status (int32, 0-d): 0 ok, 1 a factor
//       failed (info[b] > 0), 2 non-finite W.
//   ridge_solve_bwd(G[B,d,C], Z, Y, L, aux, primal, need_dz, need_dy, need_dmu) -> dZ, dY, dmu
//       (undefined where not needed)
//   cholesky_solve(R[B,n,C], L[B,n,n]) -> (LLᵀ)⁻¹R in L's dtype
//   krr_predict_fwd(Zq[...,M,d], Zs[...,N,d], Ys[...,N,C], lam, reg, c, via_weights)
//           -> P[...,M,C], L[...,N,N], alpha[...,N,C], status[]
//       dual; Zq, Zs of one dtype, Ys of that dtype or float64 (the solve dtype: K is formed in the
//       features' dtype and factored in Ys's; P, L, α in Ys's): P = (ZqZsᵀ + c)α,
//       α = (K + μI)⁻¹Ys = (LLᵀ)⁻¹Ys, K = ZsZsᵀ + c, μ = λ (reg 0), λ·tr(K)/N (1), λ·tr(K) (2);
//       status 0 ok, 1 a factor failed (P zeros), 2 non-finite P.
//       The whole small-support prediction in one call (no per-op overhead); L and α are what the
//       backward reuses.
//   krr_predict_bwd(G[...,M,C], Zq, Zs, L, alpha, c, trace_coef, need_dzq, need_dzs, need_dys) -> dZq, dZs, dYs
//       the closed-form backward of krr_predict_fwd (undefined where not needed; G, L, α in the solve dtype,
//       dZq, dZs in the features', dYs in the solve dtype), with H = GᵀZq,
//       β = (LLᵀ)⁻¹(HZsᵀ + c·1ᵀG)ᵀ:  dYs = β,  dZq = G(αᵀZs),
//       dZs = αH − (βαᵀ + αβᵀ)Zs + 2·trace_coef·dμ·Zs,  dμ = −Σ β∘α
//       (trace_coef = ∂μ/∂tr(K): 0 for reg 0 or a detached regulariser, λ/N for reg 1, λ for reg 2).
//
// The CUDA forward / backward run one block per problem with the factor in shared memory; when the
// problem does not fit (n > ridge_solve_max_n(), shared memory above the device's opt-in limit, or
// a solve dtype wider than the inputs) they run the same math as ATen calls (cuBLAS Gram and
// products, linalg_cholesky_ex, cholesky_solve): ridge_solve_fwd_composite / _bwd_composite below.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu/ridge_solve.h"
#include "ops_common.h"
#include "ridge_solve_ops.h"

#ifdef DDFAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/ridge_solve.h"
#endif

namespace ddfast {
namespace ops {
namespace {

constexpr const char* kFwd = "ridge_solve_fwd";
constexpr const char* kBwd = "ridge_solve_bwd";

int64_t factor_size(const at::Tensor& Z, bool primal) { return primal ? Z.size(2) : Z.size(1); }

}  // namespace

void check_ridge_fwd(const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu) {
  check_rank(Z, 3, kFwd, "Z", "[B, N, d]");
  const int64_t B = Z.size(0), N = Z.size(1);
  check_rank(Y, 3, kFwd, "Y", "[B, N, C]");
  check_sizes(Y, {B, N, -1}, kFwd, "Y", "[B, N, C]");
  check_rank(mu, 1, kFwd, "mu", "[B]");
  check_sizes(mu, {B}, kFwd, "mu", "[B]");
  check_float(Z, kFwd, "Z");
  check_same_dtype(Y, "Y", Z, "Z", kFwd);
  check_float(mu, kFwd, "mu");
  TORCH_CHECK(at::promote_types(Z.scalar_type(), mu.scalar_type()) == mu.scalar_type(), kFwd,
              ": mu: the solve dtype must be at least as wide as Z's dtype ", Z.scalar_type(), ", got ",
              mu.scalar_type());
  check_same_device(Y, "Y", Z, "Z", kFwd);
  check_same_device(mu, "mu", Z, "Z", kFwd);
  TORCH_CHECK(Z.size(1) > 0 && Z.size(2) > 0, kFwd, ": Z: expected N, d ≥ 1, got ", Z.sizes());
}

void check_ridge_bwd(const at::Tensor& G, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& L,
                     const at::Tensor& aux, bool primal) {
  check_rank(Z, 3, kBwd, "Z", "[B, N, d]");
  const int64_t B = Z.size(0), N = Z.size(1), d = Z.size(2);
  check_rank(Y, 3, kBwd, "Y", "[B, N, C]");
  check_sizes(Y, {B, N, -1}, kBwd, "Y", "[B, N, C]");
  const int64_t C = Y.size(2), n = primal ? d : N;
  check_rank(G, 3, kBwd, "G", "[B, d, C]");
  check_sizes(G, {B, d, C}, kBwd, "G", "[B, d, C]");
  check_rank(L, 3, kBwd, "L", "[B, n, n]");
  check_sizes(L, {B, n, n}, kBwd, "L", "[B, n, n] (n = d primal, N dual)");
  check_rank(aux, 3, kBwd, "aux", "[B, n, C]");
  check_sizes(aux, {B, n, C}, kBwd, "aux", "[B, n, C] (n = d primal, N dual)");
  check_float(Z, kBwd, "Z");
  check_same_dtype(Y, "Y", Z, "Z", kBwd);
  check_float(G, kBwd, "G");
  check_float(L, kBwd, "L");
  check_same_dtype(aux, "aux", L, "L", kBwd);
  TORCH_CHECK(at::promote_types(Z.scalar_type(), L.scalar_type()) == L.scalar_type(), kBwd,
              ": L: the solve dtype must be at least as wide as Z's dtype ", Z.scalar_type(), ", got ",
              L.scalar_type());
  for (auto [t, name] : {std::pair{&G, "G"}, {&Y, "Y"}, {&L, "L"}, {&aux, "aux"}})
    check_same_device(*t, name, Z, "Z", kBwd);
}

void check_cholesky_solve(const at::Tensor& R, const at::Tensor& L) {
  constexpr const char* op = "cholesky_solve";
  check_rank(L, 3, op, "L", "[B, n, n]");
  check_sizes(L, {-1, L.size(1), L.size(1)}, op, "L", "[B, n, n]");
  check_rank(R, 3, op, "R", "[B, n, C]");
  check_sizes(R, {L.size(0), L.size(1), -1}, op, "R", "[B, n, C]");
  check_float(L, op, "L");
  check_float(R, op, "R");
  check_same_device(R, "R", L, "L", op);
}

namespace {

// The operands both krr_predict operators share: Zq [..., M, d], Zs [..., N, d] (N, d ≥ 1) and the
// [..., N, C] tensor `T` (the targets Ys, or α), in the features' dtype or float64 (the solve dtype).
void check_krr_operands(const char* op, const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& T,
                        const char* t_name) {
  TORCH_CHECK(Zs.defined() && Zs.dim() >= 2, op, ": Zs: expected shape [..., N, d], got ",
              Zs.defined() ? Zs.sizes() : c10::IntArrayRef{});
  const int64_t r = Zs.dim(), N = Zs.size(r - 2), d = Zs.size(r - 1);
  const auto lead = Zs.sizes().slice(0, r - 2);
  TORCH_CHECK(Zq.defined() && Zq.dim() == r && Zq.sizes().slice(0, r - 2) == lead && Zq.size(r - 1) == d, op,
              ": Zq: expected shape [..., M, d] with the batch dims and d of Zs ", Zs.sizes(), ", got ",
              Zq.defined() ? Zq.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(T.defined() && T.dim() == r && T.sizes().slice(0, r - 2) == lead && T.size(r - 2) == N, op, ": ",
              t_name, ": expected shape [..., N, C] with the batch dims and N of Zs ", Zs.sizes(), ", got ",
              T.defined() ? T.sizes() : c10::IntArrayRef{});
  check_float(Zs, op, "Zs");
  check_same_dtype(Zq, "Zq", Zs, "Zs", op);
  TORCH_CHECK(T.scalar_type() == Zs.scalar_type() || T.scalar_type() == at::kDouble, op, ": ", t_name,
              ": expected dtype ", Zs.scalar_type(), " (the dtype of Zs) or float64 (a wider solve), got ",
              T.scalar_type());
  check_same_device(Zq, "Zq", Zs, "Zs", op);
  check_same_device(T, t_name, Zs, "Zs", op);
  TORCH_CHECK(N > 0 && d > 0, op, ": Zs: expected N, d ≥ 1, got ", Zs.sizes());
}

}  // namespace

void check_krr_predict_fwd(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                           int64_t reg, double c) {
  constexpr const char* op = "krr_predict_fwd";
  check_krr_operands(op, Zq, Zs, Ys, "Ys");
  TORCH_CHECK(std::isfinite(lam) && lam > 0, op, ": lam: expected a finite λ > 0, got ", lam);
  TORCH_CHECK(reg >= 0 && reg <= 2, op, ": reg: expected 0 (absolute), 1 (trace_mean) or 2 (trace), got ", reg);
  TORCH_CHECK(std::isfinite(c) && c >= 0, op, ": c: expected a finite kernel constant ≥ 0, got ", c);
}

std::vector<int64_t> krr_predict_fwd_shape(const at::Tensor& Zq, const at::Tensor& Ys) {
  std::vector<int64_t> shape(Zq.sizes().begin(), Zq.sizes().end());
  shape.back() = Ys.size(-1);
  return shape;
}

void check_krr_predict_bwd(const at::Tensor& G, const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& L,
                           const at::Tensor& alpha, double c, double trace_coef) {
  constexpr const char* op = "krr_predict_bwd";
  check_krr_operands(op, Zq, Zs, alpha, "alpha");
  const int64_t r = Zs.dim(), N = Zs.size(r - 2), M = Zq.size(r - 2), C = alpha.size(r - 1);
  const auto lead = Zs.sizes().slice(0, r - 2);
  TORCH_CHECK(L.defined() && L.dim() == r && L.sizes().slice(0, r - 2) == lead && L.size(r - 2) == N &&
                  L.size(r - 1) == N,
              op, ": L: expected shape [..., N, N] with the batch dims and N of Zs ", Zs.sizes(), ", got ",
              L.defined() ? L.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(G.defined() && G.dim() == r && G.sizes().slice(0, r - 2) == lead && G.size(r - 2) == M &&
                  G.size(r - 1) == C,
              op, ": G: expected shape [..., M, C] like P, got ", G.defined() ? G.sizes() : c10::IntArrayRef{});
  check_same_dtype(L, "L", alpha, "alpha", op);
  check_same_dtype(G, "G", alpha, "alpha", op);
  check_same_device(L, "L", Zs, "Zs", op);
  check_same_device(G, "G", Zs, "Zs", op);
  TORCH_CHECK(std::isfinite(c) && c >= 0, op, ": c: expected a finite kernel constant ≥ 0, got ", c);
  TORCH_CHECK(std::isfinite(trace_coef) && trace_coef >= 0, op, ": trace_coef: expected a finite value ≥ 0, got ",
              trace_coef);
}

namespace {

// Forward outputs allocated like the kernels do (also the Meta implementation).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_fwd_outputs(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  const int64_t B = Z.size(0), d = Z.size(2), C = Y.size(2), n = factor_size(Z, primal);
  const auto acc = Z.options().dtype(mu.scalar_type());
  at::Tensor W = (primal || compute_w) ? at::empty({B, d, C}, Z.options()) : at::empty({0}, Z.options());
  return {W, at::empty({B, n, n}, acc), at::empty({B, n, C}, acc), at::empty({B}, Z.options().dtype(at::kInt)),
          at::empty({}, Z.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_meta(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  check_ridge_fwd(Z, Y, mu);
  return ridge_fwd_outputs(Z, Y, mu, primal, compute_w);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_meta(const at::Tensor& G, const at::Tensor& Z,
                                                                    const at::Tensor& Y, const at::Tensor& L,
                                                                    const at::Tensor& aux, bool primal, bool need_dz,
                                                                    bool need_dy, bool need_dmu) {
  check_ridge_bwd(G, Z, Y, L, aux, primal);
  return {need_dz ? at::empty_like(Z, at::MemoryFormat::Contiguous) : at::Tensor(),
          need_dy ? at::empty_like(Y, at::MemoryFormat::Contiguous) : at::Tensor(),
          need_dmu ? at::empty({Z.size(0)}, L.options()) : at::Tensor()};
}

at::Tensor cholesky_solve_meta(const at::Tensor& R, const at::Tensor& L) {
  check_cholesky_solve(R, L);
  // Column-major per batch member, as the kernel and at::cholesky_solve return it.
  return at::empty({R.size(0), R.size(2), R.size(1)}, L.options()).transpose(1, 2);
}

// The shape of L [..., N, N] as the forward returns it (α has the shape of Ys).
std::vector<int64_t> krr_factor_shape(const at::Tensor& Zs) {
  std::vector<int64_t> shape(Zs.sizes().begin(), Zs.sizes().end());
  shape.back() = Zs.size(-2);
  return shape;
}

KrrFwdOut krr_predict_fwd_meta(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                               int64_t reg, double c, bool via_weights) {
  check_krr_predict_fwd(Zq, Zs, Ys, lam, reg, c);
  return {at::empty(krr_predict_fwd_shape(Zq, Ys), Ys.options()), at::empty(krr_factor_shape(Zs), Ys.options()),
          at::empty(Ys.sizes(), Ys.options()), at::empty({}, Zs.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> krr_predict_bwd_meta(const at::Tensor& G, const at::Tensor& Zq,
                                                                    const at::Tensor& Zs, const at::Tensor& L,
                                                                    const at::Tensor& alpha, double c,
                                                                    double trace_coef, bool need_dzq, bool need_dzs,
                                                                    bool need_dys) {
  check_krr_predict_bwd(G, Zq, Zs, L, alpha, c, trace_coef);
  return {need_dzq ? at::empty(Zq.sizes(), Zs.options()) : at::Tensor(),
          need_dzs ? at::empty(Zs.sizes(), Zs.options()) : at::Tensor(),
          need_dys ? at::empty(alpha.sizes(), alpha.options()) : at::Tensor()};
}

// ---------------------------------------------------------------- CPU

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_cpu(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  check_ridge_fwd(Z, Y, mu);
  TORCH_CHECK(Z.device().is_cpu(), kFwd, ": expected CPU tensors, got ", Z.device());
  auto [W, L, aux, info, status] = ddfast::cpu::ridge_solve_fwd(Z, Y, mu, primal, compute_w);
  if (!primal && !compute_w && W.numel() != 0) W = at::empty({0}, Z.options());
  return {W, L, aux, info, at::scalar_tensor(status, Z.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_cpu(const at::Tensor& G, const at::Tensor& Z,
                                                                   const at::Tensor& Y, const at::Tensor& L,
                                                                   const at::Tensor& aux, bool primal, bool need_dz,
                                                                   bool need_dy, bool need_dmu) {
  check_ridge_bwd(G, Z, Y, L, aux, primal);
  TORCH_CHECK(Z.device().is_cpu(), kBwd, ": expected CPU tensors, got ", Z.device());
  return ddfast::cpu::ridge_solve_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu);
}

at::Tensor cholesky_solve_cpu(const at::Tensor& R, const at::Tensor& L) {
  check_cholesky_solve(R, L);
  TORCH_CHECK(L.device().is_cpu(), "cholesky_solve: expected CPU tensors, got ", L.device());
  return ddfast::cpu::cholesky_solve(R, L);
}

KrrFwdOut krr_predict_fwd_cpu(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                              int64_t reg, double c, bool via_weights) {
  check_krr_predict_fwd(Zq, Zs, Ys, lam, reg, c);
  TORCH_CHECK(Zs.device().is_cpu(), "krr_predict_fwd: expected CPU tensors, got ", Zs.device());
  const int64_t N = Zs.size(-2), d = Zs.size(-1), M = Zq.size(-2), C = Ys.size(-1);
  if (N > ddfast::cpu::kKrrPredictFwdMaxN)  // LAPACK factor: the same ATen calls as on CUDA
    return krr_predict_fwd_composite(Zq, Zs, Ys, lam, reg, c, via_weights);
  auto [P, L, alpha, status] = ddfast::cpu::krr_predict_fwd(Zq.reshape({-1, M, d}), Zs.reshape({-1, N, d}),
                                                            Ys.reshape({-1, N, C}), lam, reg, c, via_weights);
  // A failed factor is reported by the status alone; the outputs keep their shapes.
  P = status == 1 ? at::zeros(krr_predict_fwd_shape(Zq, Ys), Ys.options()) : P.view(krr_predict_fwd_shape(Zq, Ys));
  return {P, L.reshape(krr_factor_shape(Zs)), alpha.reshape(Ys.sizes()),
          at::scalar_tensor(status, Zs.options().dtype(at::kInt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> krr_predict_bwd_cpu(const at::Tensor& G, const at::Tensor& Zq,
                                                                   const at::Tensor& Zs, const at::Tensor& L,
                                                                   const at::Tensor& alpha, double c,
                                                                   double trace_coef, bool need_dzq, bool need_dzs,
                                                                   bool need_dys) {
  TORCH_CHECK(Zs.device().is_cpu(), "krr_predict_bwd: expected CPU tensors, got ", Zs.device());
  return krr_predict_bwd_composite(G, Zq, Zs, L, alpha, c, trace_coef, need_dzq, need_dzs, need_dys);
}

}  // namespace

// ---------------------------------------------------------------- ATen composite (any device)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_composite(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  check_ridge_fwd(Z, Y, mu);
  const auto acc = mu.scalar_type();
  const at::Tensor Za = Z.to(acc), Ya = Y.to(acc);
  const at::Tensor Zt = Za.transpose(1, 2);
  at::Tensor A = primal ? at::matmul(Zt, Za) : at::matmul(Za, Zt);
  A.diagonal(0, 1, 2).add_(mu.unsqueeze(1));
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  // A failed factor holds garbage past the failing minor: keep the solve finite for those members.
  const at::Tensor ok = info.eq(0).view({-1, 1, 1});
  const at::Tensor Ls = at::where(ok, L, at::eye(A.size(1), A.options()).expand_as(A));
  at::Tensor aux = at::cholesky_solve(primal ? at::matmul(Zt, Ya) : Ya, Ls, /*upper=*/false);
  at::Tensor W;
  if (primal)
    W = aux.to(Z.scalar_type());
  else if (compute_w)
    W = at::matmul(Zt, aux).to(Z.scalar_type());
  else
    W = at::empty({0}, Z.options());
  at::Tensor failed = info.ne(0).any();
  at::Tensor status = failed.to(at::kInt);
  if (W.numel() > 0)
    status = at::where(failed, status, at::isfinite(W).all().logical_not().to(at::kInt).mul(2));
  return {W, L, aux, info.to(at::kInt), status.to(at::kInt).reshape({})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_composite(const at::Tensor& G, const at::Tensor& Z,
                                                                         const at::Tensor& Y, const at::Tensor& L,
                                                                         const at::Tensor& aux, bool primal,
                                                                         bool need_dz, bool need_dy, bool need_dmu) {
  check_ridge_bwd(G, Z, Y, L, aux, primal);
  const auto acc = L.scalar_type(), io = Z.scalar_type();
  const at::Tensor Za = Z.to(acc), Ga = G.to(acc);
  const at::Tensor Zt = Za.transpose(1, 2);
  at::Tensor dZ, dY, dmu;
  if (!primal) {
    // Bm = A⁻¹ZG, dY = Bm, dZ = α(G − ZᵀBm)ᵀ − BmWᵀ, dμ = −Σ Bm∘α   (α = aux, W = Zᵀα)
    const at::Tensor Bm = at::cholesky_solve(at::matmul(Za, Ga), L, false);
    if (need_dy) dY = Bm.to(io);
    if (need_dmu) dmu = (Bm * aux).sum({1, 2}).neg();
    if (need_dz) {
      const at::Tensor T = Ga - at::matmul(Zt, Bm);
      const at::Tensor W = at::matmul(Zt, aux);
      dZ = (at::matmul(aux, T.transpose(1, 2)) - at::matmul(Bm, W.transpose(1, 2))).to(io);
    }
  } else {
    // V = H⁻¹G, dY = ZV, dZ = (Y − ZW)Vᵀ − dY Wᵀ, dμ = −Σ V∘W   (W = aux)
    const at::Tensor V = at::cholesky_solve(Ga, L, false);
    const at::Tensor ZV = at::matmul(Za, V);
    if (need_dy) dY = ZV.to(io);
    if (need_dmu) dmu = (V * aux).sum({1, 2}).neg();
    if (need_dz) {
      const at::Tensor R = Y.to(acc) - at::matmul(Za, aux);
      dZ = (at::matmul(R, V.transpose(1, 2)) - at::matmul(ZV, aux.transpose(1, 2))).to(io);
    }
  }
  return {dZ, dY, dmu};
}

KrrFwdOut krr_predict_fwd_composite(const at::Tensor& Zq_in, const at::Tensor& Zs_in, const at::Tensor& Ys_in,
                                    double lam, int64_t reg, double c, bool via_weights) {
  check_krr_predict_fwd(Zq_in, Zs_in, Ys_in, lam, reg, c);
  const int64_t N = Zs_in.size(-2), d = Zs_in.size(-1), M = Zq_in.size(-2), C = Ys_in.size(-1);
  const at::Tensor Zq = Zq_in.reshape({-1, M, d}), Zs = Zs_in.reshape({-1, N, d}), Ys = Ys_in.reshape({-1, N, C});
  const at::Tensor Zst = Zs.transpose(1, 2);
  const auto sd = Ys.scalar_type();  // the solve dtype (Zs's or wider); products in the features' dtype
  at::Tensor K = at::matmul(Zs, Zst).to(sd);
  if (c != 0.0) K.add_(c);
  at::Tensor mu = at::full({Zs.size(0)}, lam, K.options());
  if (reg != 0) mu = mu * K.diagonal(0, 1, 2).sum(1) / (reg == 1 ? double(Zs.size(1)) : 1.0);
  K.diagonal(0, 1, 2).add_(mu.unsqueeze(1));
  auto [L, info] = at::linalg_cholesky_ex(K, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor failed = info.ne(0).any();
  const at::Tensor ok = info.eq(0).view({-1, 1, 1});
  const at::Tensor alpha =
      at::cholesky_solve(Ys, at::where(ok, L, at::eye(K.size(1), K.options()).expand_as(K)), /*upper=*/false);
  at::Tensor P;
  if (via_weights) {  // formed transposed, Pᵀ = (αᵀZs)Zqᵀ: the thin factor on the left (MKL's fast orientation)
    const at::Tensor Wt = at::matmul(alpha.transpose(1, 2).to(Zs.scalar_type()), Zs);
    P = at::matmul(Wt, Zq.transpose(1, 2)).transpose(1, 2).to(sd);
    if (c != 0.0) P = P + alpha.sum(1, /*keepdim=*/true) * c;
  } else {
    at::Tensor Kq = at::matmul(Zq, Zst).to(sd);
    if (c != 0.0) Kq.add_(c);
    P = at::matmul(Kq, alpha);
  }
  P = at::where(failed, at::zeros_like(P), P).reshape(krr_predict_fwd_shape(Zq_in, Ys_in));
  const at::Tensor status =
      at::where(failed, failed.to(at::kInt), at::isfinite(P).all().logical_not().to(at::kInt).mul(2)).to(at::kInt);
  return {P, L.reshape(krr_factor_shape(Zs_in)), alpha.reshape(Ys_in.sizes()), status.reshape({})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> krr_predict_bwd_composite(const at::Tensor& G_in, const at::Tensor& Zq_in,
                                                                         const at::Tensor& Zs_in, const at::Tensor& L_in,
                                                                         const at::Tensor& alpha_in, double c,
                                                                         double trace_coef, bool need_dzq,
                                                                         bool need_dzs, bool need_dys) {
  check_krr_predict_bwd(G_in, Zq_in, Zs_in, L_in, alpha_in, c, trace_coef);
  const int64_t N = Zs_in.size(-2), d = Zs_in.size(-1), M = Zq_in.size(-2), C = alpha_in.size(-1);
  const int64_t B = Zs_in.numel() / (N * d);
  at::Tensor dZq, dZs, dYs;
  if (!(need_dzq || need_dzs || need_dys)) return {dZq, dZs, dYs};
  // One problem runs as 2-D GEMMs (MKL's batched path costs more at these sizes).
  const auto view = [B](const at::Tensor& x, int64_t r, int64_t k) {
    return B == 1 ? x.reshape({r, k}) : x.reshape({-1, r, k});
  };
  // G, L, α in the solve dtype sd (the features' or wider); the products with the features run in theirs (io).
  const auto io = Zs_in.scalar_type();
  const at::Tensor Gs = view(G_in, M, C), Zq = view(Zq_in, M, d), Zs = view(Zs_in, N, d);
  const at::Tensor L = view(L_in, N, N), alpha = view(alpha_in, N, C);
  const at::Tensor G = Gs.to(io), alpha_io = alpha.to(io);
  const auto T = [](const at::Tensor& x) { return x.transpose(-1, -2); };
  if (need_dzq)  // dZq = G(αᵀZs)
    dZq = at::matmul(G, at::matmul(T(alpha_io), Zs)).reshape(Zq_in.sizes());
  if (!(need_dzs || need_dys)) return {dZq, dZs, dYs};
  const at::Tensor H = at::matmul(T(G), Zq);  // GᵀZq [C, d]: the only pass over the queries
  at::Tensor galpha_t = at::matmul(H, T(Zs)).to(L.scalar_type());  // (K_qsᵀG)ᵀ = HZsᵀ (+ c·1ᵀG) [C, N]
  if (c != 0.0) galpha_t.add_(Gs.sum(-2).unsqueeze(-1), c);
  // β = (LLᵀ)⁻¹ K_qsᵀG: the CPU kernel's solve (row-wise or LAPACK, whichever is faster), cuSOLVER on CUDA.
  const at::Tensor R = B == 1 ? T(galpha_t).unsqueeze(0) : T(galpha_t), L3 = B == 1 ? L.unsqueeze(0) : L;
  at::Tensor beta = L.is_cpu() ? ddfast::cpu::cholesky_solve(R, L3) : at::cholesky_solve(R, L3, /*upper=*/false);
  if (B == 1) beta = beta.squeeze(0);
  if (need_dys) dYs = beta.contiguous().reshape(alpha_in.sizes());
  if (need_dzs) {
    // S = −(βαᵀ + αβᵀ) + 2·trace_coef·dμ·I, dμ = −Σ β∘α;  dZs = αH + S·Zs
    const at::Tensor BA = at::matmul(beta, T(alpha));
    at::Tensor S = BA + T(BA);
    S.neg_();
    if (trace_coef != 0.0) {
      const at::Tensor dmu = (beta * alpha).sum({-2, -1}).neg();
      S.diagonal(0, -2, -1).add_(dmu.unsqueeze(-1).mul(2.0 * trace_coef));
    }
    dZs = at::matmul(alpha_io, H);
    if (B == 1)
      dZs.addmm_(S.to(io), Zs);
    else
      dZs.baddbmm_(S.to(io), Zs);
    dZs = dZs.reshape(Zs_in.sizes());
  }
  return {dZq, dZs, dYs};
}

// ---------------------------------------------------------------- CUDA

#ifdef DDFAST_WITH_CUDA
namespace {

// Whether the one-block kernel can take this problem: n within ridge_solve_max_n() and its shared
// memory (ridge_solve_smem_bytes, the same for forward and backward, independent of C) within the
// device's opt-in maximum.
bool cuda_kernel_fits(const at::Tensor& Z, const at::Tensor& Y, at::ScalarType solve_dtype, bool primal) {
  const int64_t n = factor_size(Z, primal), C = Y.size(2);
  if (solve_dtype != Z.scalar_type() || n > ddfast::cuda::ridge_solve_max_n()) return false;
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, Z.get_device()) != cudaSuccess)
    return false;
  return ddfast::cuda::ridge_solve_smem_bytes(n, C, Z.element_size()) <= static_cast<size_t>(optin);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ridge_solve_fwd_cuda(
    const at::Tensor& Z_in, const at::Tensor& Y_in, const at::Tensor& mu_in, bool primal, bool compute_w) {
  check_ridge_fwd(Z_in, Y_in, mu_in);
  TORCH_CHECK(Z_in.is_cuda(), kFwd, ": expected CUDA tensors, got ", Z_in.device());
  const c10::cuda::CUDAGuard guard(Z_in.device());
  if (!cuda_kernel_fits(Z_in, Y_in, mu_in.scalar_type(), primal))
    return ridge_solve_fwd_composite(Z_in, Y_in, mu_in, primal, compute_w);
  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous(), mu = mu_in.contiguous();
  const int64_t B = Z.size(0), N = Z.size(1), d = Z.size(2), C = Y.size(2);
  auto [W, L, aux, info, status] = ridge_fwd_outputs(Z, Y, mu, primal, compute_w);
  const bool write_w = primal || compute_w;  // dual without compute_w: the kernel skips W = Zᵀα
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_fwd_cuda", [&] {
    rc = ddfast::cuda::ridge_solve_fwd_launch<scalar_t>(
        Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), mu.data_ptr<scalar_t>(),
        write_w ? W.data_ptr<scalar_t>() : nullptr,
        L.data_ptr<scalar_t>(), aux.data_ptr<scalar_t>(), info.data_ptr<int>(), B, N, d, C, primal,
        c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "ridge_solve_fwd (CUDA): ", ddfast::cuda::ridge_solve_error_string(rc));
  const at::Tensor failed = info.ne(0).any();
  status = at::where(failed, failed.to(at::kInt),
                     at::isfinite(write_w ? W : aux).all().logical_not().to(at::kInt).mul(2))
               .to(at::kInt)
               .reshape({});
  if (!primal && !compute_w) W = at::empty({0}, Z.options());
  return {W, L, aux, info, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd_cuda(const at::Tensor& G_in, const at::Tensor& Z_in,
                                                                    const at::Tensor& Y_in, const at::Tensor& L_in,
                                                                    const at::Tensor& aux_in, bool primal,
                                                                    bool need_dz, bool need_dy, bool need_dmu) {
  check_ridge_bwd(G_in, Z_in, Y_in, L_in, aux_in, primal);
  TORCH_CHECK(Z_in.is_cuda(), kBwd, ": expected CUDA tensors, got ", Z_in.device());
  const c10::cuda::CUDAGuard guard(Z_in.device());
  if (!cuda_kernel_fits(Z_in, Y_in, L_in.scalar_type(), primal))
    return ridge_solve_bwd_composite(G_in, Z_in, Y_in, L_in, aux_in, primal, need_dz, need_dy, need_dmu);
  const at::Tensor G = G_in.to(Z_in.scalar_type()).contiguous(), Z = Z_in.contiguous(), Y = Y_in.contiguous();
  const at::Tensor L = L_in.contiguous(), aux = aux_in.contiguous();
  const int64_t B = Z.size(0), N = Z.size(1), d = Z.size(2), C = Y.size(2);
  at::Tensor dZ = need_dz ? at::empty({B, N, d}, Z.options()) : at::Tensor();
  at::Tensor dY = need_dy ? at::empty({B, N, C}, Z.options()) : at::Tensor();
  at::Tensor dmu = need_dmu ? at::empty({B}, Z.options()) : at::Tensor();
  int rc = 0;
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_bwd_cuda", [&] {
    rc = ddfast::cuda::ridge_solve_bwd_launch<scalar_t>(
        G.data_ptr<scalar_t>(), Z.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(),
        aux.data_ptr<scalar_t>(), need_dz ? dZ.data_ptr<scalar_t>() : nullptr,
        need_dy ? dY.data_ptr<scalar_t>() : nullptr, need_dmu ? dmu.data_ptr<scalar_t>() : nullptr,
        B, N, d, C, primal, c10::cuda::getCurrentCUDAStream());
  });
  TORCH_CHECK(rc == 0, "ridge_solve_bwd (CUDA): ", ddfast::cuda::ridge_solve_error_string(rc));
  return {dZ, dY, dmu};
}

KrrFwdOut krr_predict_fwd_cuda(const at::Tensor& Zq, const at::Tensor& Zs, const at::Tensor& Ys, double lam,
                               int64_t reg, double c, bool via_weights) {
  TORCH_CHECK(Zs.is_cuda(), "krr_predict_fwd: expected CUDA tensors, got ", Zs.device());
  const c10::cuda::CUDAGuard guard(Zs.device());
  return krr_predict_fwd_composite(Zq, Zs, Ys, lam, reg, c, via_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> krr_predict_bwd_cuda(const at::Tensor& G, const at::Tensor& Zq,
                                                                    const at::Tensor& Zs, const at::Tensor& L,
                                                                    const at::Tensor& alpha, double c,
                                                                    double trace_coef, bool need_dzq, bool need_dzs,
                                                                    bool need_dys) {
  TORCH_CHECK(Zs.is_cuda(), "krr_predict_bwd: expected CUDA tensors, got ", Zs.device());
  const c10::cuda::CUDAGuard guard(Zs.device());
  return krr_predict_bwd_composite(G, Zq, Zs, L, alpha, c, trace_coef, need_dzq, need_dzs, need_dys);
}

at::Tensor cholesky_solve_cuda(const at::Tensor& R, const at::Tensor& L) {
  check_cholesky_solve(R, L);
  const c10::cuda::CUDAGuard guard(L.device());
  return at::cholesky_solve(R.to(L.scalar_type()), L, /*upper=*/false);
}

}  // namespace
#endif

}  // namespace ops
}  // namespace ddfast

TORCH_LIBRARY_FRAGMENT(ddfast, m) {
  m.def("ridge_solve_fwd(Tensor Z, Tensor Y, Tensor mu, bool primal, bool compute_w=True) -> "
        "(Tensor W, Tensor L, Tensor aux, Tensor info, Tensor status)");
  m.def("ridge_solve_bwd(Tensor G, Tensor Z, Tensor Y, Tensor L, Tensor aux, bool primal, bool need_dz, "
        "bool need_dy, bool need_dmu) -> (Tensor dZ, Tensor dY, Tensor dmu)");
  m.def("cholesky_solve(Tensor R, Tensor L) -> Tensor");
  m.def("krr_predict_fwd(Tensor Zq, Tensor Zs, Tensor Ys, float lam, int reg, float c, bool via_weights) -> "
        "(Tensor P, Tensor L, Tensor alpha, Tensor status)");
  m.def("krr_predict_bwd(Tensor G, Tensor Zq, Tensor Zs, Tensor L, Tensor alpha, float c, float trace_coef, "
        "bool need_dzq, bool need_dzs, bool need_dys) -> (Tensor dZq, Tensor dZs, Tensor dYs)");
}

TORCH_LIBRARY_IMPL(ddfast, CPU, m) {
  m.impl("ridge_solve_fwd", &ddfast::ops::ridge_solve_fwd_cpu);
  m.impl("ridge_solve_bwd", &ddfast::ops::ridge_solve_bwd_cpu);
  m.impl("cholesky_solve", &ddfast::ops::cholesky_solve_cpu);
  m.impl("krr_predict_fwd", &ddfast::ops::krr_predict_fwd_cpu);
  m.impl("krr_predict_bwd", &ddfast::ops::krr_predict_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddfast, Meta, m) {
  m.impl("ridge_solve_fwd", &ddfast::ops::ridge_solve_fwd_meta);
  m.impl("ridge_solve_bwd", &ddfast::ops::ridge_solve_bwd_meta);
  m.impl("cholesky_solve", &ddfast::ops::cholesky_solve_meta);
  m.impl("krr_predict_fwd", &ddfast::ops::krr_predict_fwd_meta);
  m.impl("krr_predict_bwd", &ddfast::ops::krr_predict_bwd_meta);
}

#ifdef DDFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(ddfast, CUDA, m) {
  m.impl("ridge_solve_fwd", &ddfast::ops::ridge_solve_fwd_cuda);
  m.impl("ridge_solve_bwd", &ddfast::ops::ridge_solve_bwd_cuda);
  m.impl("cholesky_solve", &ddfast::ops::cholesky_solve_cuda);
  m.impl("krr_predict_fwd", &ddfast::ops::krr_predict_fwd_cuda);
  m.impl("krr_predict_bwd", &ddfast::ops::krr_predict_bwd_cuda);
}
#endif
