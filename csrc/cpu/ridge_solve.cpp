// Fused batched ridge / kernel-ridge solve on the CPU.
//
//   dual   (N <= d):  A = Z Zᵀ + μI (N×N),  α = A⁻¹Y,        W = Zᵀα        (LD-RR eq. 3, Woodbury)
//   primal (d <  N):  H = Zᵀ Z + μI (d×d),  W = H⁻¹ Zᵀ Y                     (LD-RR eq. 2)
//
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
//
// Small problems (factor size n <= kSmallN) run one fused pass per batch member
// (Gram, Cholesky, triangular solves, output GEMM) with the batch spread over
// threads by at::parallel_for; no LAPACK/BLAS call overhead. Larger problems use
// batched ATen GEMM + Cholesky (MKL), where the GEMMs dominate.
// The factor L (lower) is returned and reused by the backward: never an inverse.

#include "ridge_solve.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ddfast {
namespace cpu {
namespace {

constexpr int64_t kSmallN = 128;       // largest factor size for the fused per-problem path
static_assert(kKrrPredictFwdMaxN == kSmallN, "krr_predict_fwd factors in place up to the small-path size");
constexpr int64_t kSmallWork = 1 << 22;  // and at most this many multiply-adds per problem

// Whether the row-wise triangular solves below beat LAPACK's (potrs) for a factor of order n and C right-hand
// sides. Measured one thread, float32, one problem (µs, own / LAPACK): n = 10: C = 10 19 / 24, C = 64 32 / 31,
// C = 512 138 / 91; n = 32: C = 10 29 / 35, C = 32 49 / 48, C = 128 141 / 103; n = 64: C = 10 58 / 59,
// C = 32 172 / 95; n = 128: C = 1 47 / 30, C = 10 184 / 72, C = 512 7651 / 2313.
inline bool own_solve_is_faster(int64_t n, int64_t C) { return n <= 64 && n * C <= 640; }

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  if (n < 32) {  // short rows (triangular factor/solves): 4 independent chains, no SIMD prologue
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
      s0 += acc_t(a[k]) * acc_t(b[k]);
      s1 += acc_t(a[k + 1]) * acc_t(b[k + 1]);
      s2 += acc_t(a[k + 2]) * acc_t(b[k + 2]);
      s3 += acc_t(a[k + 3]) * acc_t(b[k + 3]);
    }
    for (; k < n; ++k) s0 += acc_t(a[k]) * acc_t(b[k]);
    return (s0 + s1) + (s2 + s3);
  }
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += acc_t(a[k]) * acc_t(b[k]);
  return s;
}

// y += a·x
template <typename acc_t, typename x_t>
inline void axpy(acc_t* y, acc_t a, const x_t* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a * acc_t(x[k]);
}

// out[k] (+)= Σ_r coef[r·cs] · M[r·ld + k] for k < len: a linear combination of `rows` rows, vectorized
// over k with the accumulator in registers (one load per multiply-add; no store traffic per row).
template <typename acc_t, typename m_t>
inline void combine_rows(acc_t* out, const acc_t* coef, int64_t cs, const m_t* M, int64_t ld,
                         int64_t rows, int64_t len, bool accumulate) {
  constexpr int64_t kChunk = 64;
  for (int64_t k0 = 0; k0 < len; k0 += kChunk) {
    const int64_t k1 = std::min(len, k0 + kChunk);
    acc_t acc[kChunk];
    for (int64_t k = k0; k < k1; ++k) acc[k - k0] = accumulate ? out[k] : acc_t(0);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t a = coef[r * cs];
      const m_t* m = M + r * ld;
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) acc[k - k0] += a * acc_t(m[k]);
    }
    for (int64_t k = k0; k < k1; ++k) out[k] = acc[k - k0];
  }
}

// In-place lower Cholesky of the row-major n×n matrix A (lower triangle read, upper zeroed).
// Returns 0 or the 1-based order of the first leading minor that is not positive definite.
template <typename acc_t>
int cholesky_inplace(acc_t* A, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t* Aj = A + j * n;
    const acc_t s = Aj[j] - dot<acc_t>(Aj, Aj, j);
    if (!(s > acc_t(0)) || !std::isfinite(s)) return static_cast<int>(j + 1);
    const acc_t d = std::sqrt(s);
    Aj[j] = d;
    const acc_t inv = acc_t(1) / d;
    for (int64_t i = j + 1; i < n; ++i) {
      acc_t* Ai = A + i * n;
      Ai[j] = (Ai[j] - dot<acc_t>(Ai, Aj, j)) * inv;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) A[i * n + j] = acc_t(0);
  return 0;
}

// x ← (LLᵀ)⁻¹x for one contiguous right-hand side of length n: both sweeps read rows of L.
template <typename acc_t>
void cholesky_solve_vec(const acc_t* L, acc_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] - dot<acc_t>(L + i * n, x, i)) / L[i * n + i];
  for (int64_t i = n - 1; i >= 0; --i) {
    x[i] /= L[i * n + i];
    axpy<acc_t>(x, -x[i], L + i * n, i);
  }
}

// Rows of X (c rows of length n, i.e. the right-hand sides stored transposed) ← (LLᵀ)⁻¹.
template <typename acc_t>
void cholesky_solve_rows(const acc_t* L, acc_t* Xt, int64_t n, int64_t c) {
  for (int64_t j = 0; j < c; ++j) cholesky_solve_vec(L, Xt + j * n, n);
}

// out[r][c] = in[c][r] for in c×r  (small transposes between row- and column-major right-hand sides)
template <typename out_t, typename in_t>
void transpose(out_t* out, const in_t* in, int64_t rows_in, int64_t cols_in) {
  for (int64_t a = 0; a < rows_in; ++a)
    for (int64_t b = 0; b < cols_in; ++b) out[b * rows_in + a] = static_cast<out_t>(in[a * cols_in + b]);
}

// One dual or primal forward problem; arrays contiguous row-major. Right-hand sides are kept
// transposed (C rows) so every inner loop runs over a contiguous N- or d-long vector.
template <typename scalar_t, typename acc_t>
void small_fwd_one(const scalar_t* Z, const scalar_t* Y, acc_t mu, int64_t N, int64_t d, int64_t C,
                   bool primal, bool compute_w, scalar_t* W, acc_t* L, acc_t* aux, int* info) {
  const int64_t n = primal ? d : N;
  std::vector<acc_t> Xt(C * n, acc_t(0));  // right-hand sides / solutions, transposed
  for (int64_t i = 0; i < n * n; ++i) L[i] = acc_t(0);
  if (!primal) {
    // Rows split over threads when the batch itself is not (nested parallel_for runs inline).
    at::parallel_for(0, N, std::max<int64_t>(1, 8192 / (d * N + 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = 0; j <= i; ++j) L[i * n + j] = dot<acc_t>(Z + i * d, Z + j * d, d);
    });
    transpose(Xt.data(), Y, N, C);
  } else {
    // Columns of Z and Y as contiguous rows: H_ab = <Z_:a, Z_:b>, (ZᵀY)ᵀ_ca = <Y_:c, Z_:a> over N.
    std::vector<scalar_t> Zt(d * N), Yt(C * N);
    transpose(Zt.data(), Z, N, d);
    transpose(Yt.data(), Y, N, C);
    at::parallel_for(0, d, std::max<int64_t>(1, 8192 / (d * N + 1)), [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a)
        for (int64_t b = 0; b <= a; ++b) L[a * n + b] = dot<acc_t>(Zt.data() + a * N, Zt.data() + b * N, N);
    });
    for (int64_t c = 0; c < C; ++c)
      for (int64_t a = 0; a < d; ++a) Xt[c * n + a] = dot<acc_t>(Yt.data() + c * N, Zt.data() + a * N, N);
  }
  for (int64_t i = 0; i < n; ++i) L[i * n + i] += mu;
  *info = cholesky_inplace(L, n);
  if (*info != 0) return;
  cholesky_solve_rows(L, Xt.data(), n, C);
  transpose(aux, Xt.data(), C, n);
  if (primal) {
    transpose(W, Xt.data(), C, n);
  } else if (compute_w) {
    std::vector<acc_t> Wt(C * d);
    for (int64_t c = 0; c < C; ++c) combine_rows<acc_t>(Wt.data() + c * d, Xt.data() + c * n, 1, Z, d, N, d, false);
    transpose(W, Wt.data(), C, d);
  }
}

// One backward problem (see ridge_solve_bwd for the equations).
template <typename scalar_t, typename acc_t>
void small_bwd_one(const scalar_t* G, const scalar_t* Z, const scalar_t* Y, const acc_t* L,
                   const acc_t* aux, int64_t N, int64_t d, int64_t C, bool primal,
                   scalar_t* dZ, scalar_t* dY, acc_t* dmu) {
  std::vector<acc_t> Gt(C * d), At(C * (primal ? d : N));
  transpose(Gt.data(), G, d, C);
  transpose(At.data(), aux, primal ? d : N, C);  // αᵀ (dual) or Wᵀ (primal)
  if (!primal) {
    // Bmᵀ = (A⁻¹ Z G)ᵀ
    std::vector<acc_t> Bt(C * N);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < N; ++i) Bt[c * N + i] = dot<acc_t>(Z + i * d, Gt.data() + c * d, d);
    cholesky_solve_rows(L, Bt.data(), N, C);
    if (dY) transpose(dY, Bt.data(), C, N);
    if (dmu) *dmu = -dot<acc_t>(Bt.data(), At.data(), N * C);
    if (dZ) {
      // Tᵀ = (G − ZᵀBm)ᵀ, Wᵀ = (Zᵀα)ᵀ;  dZ_i = Σ_c α_ic Tᵀ_c − Bm_ic Wᵀ_c
      // Stacked as [Tᵀ; −Wᵀ] (2C rows of d) against coefficients [α; Bm] per row i of dZ.
      std::vector<acc_t> TW(2 * C * d), negB(C * N), coef(2 * C * N);
      for (int64_t i = 0; i < C * N; ++i) negB[i] = -Bt[i];
      for (int64_t c = 0; c < C; ++c) {
        acc_t* t = TW.data() + c * d;  // Tᵀ_c = G_c − Σ_i Bm_ic Z_i
        std::copy(Gt.data() + c * d, Gt.data() + (c + 1) * d, t);
        combine_rows<acc_t>(t, negB.data() + c * N, 1, Z, d, N, d, true);
        acc_t* w = TW.data() + (C + c) * d;  // −Wᵀ_c = −Σ_i α_ic Z_i
        combine_rows<acc_t>(w, At.data() + c * N, 1, Z, d, N, d, false);
        for (int64_t k = 0; k < d; ++k) w[k] = -w[k];
      }
      std::copy(At.begin(), At.end(), coef.begin());
      std::copy(Bt.begin(), Bt.end(), coef.begin() + C * N);
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (2 * C * d + 1)), [&](int64_t i0, int64_t i1) {
        std::vector<acc_t> row(d);
        for (int64_t i = i0; i < i1; ++i) {
          combine_rows<acc_t>(row.data(), coef.data() + i, N, TW.data(), d, 2 * C, d, false);
          for (int64_t k = 0; k < d; ++k) dZ[i * d + k] = static_cast<scalar_t>(row[k]);
        }
      });
    }
  } else {
    // Vᵀ = (H⁻¹G)ᵀ; dY = Z V; dZ_r = Σ_c (Y − ZW)_rc Vᵀ_c − (ZV)_rc Wᵀ_c; dmu = −Σ V∘W
    std::vector<acc_t>& Vt = Gt;
    cholesky_solve_rows(L, Vt.data(), d, C);
    if (dmu) *dmu = -dot<acc_t>(Vt.data(), At.data(), d * C);
    if (dY || dZ) {
      std::vector<acc_t> zv(C), res(C), row(d);
      for (int64_t r = 0; r < N; ++r) {
        const scalar_t* zr = Z + r * d;
        for (int64_t c = 0; c < C; ++c) {
          zv[c] = dot<acc_t>(zr, Vt.data() + c * d, d);
          res[c] = acc_t(Y[r * C + c]) - dot<acc_t>(zr, At.data() + c * d, d);
        }
        if (dY)
          for (int64_t c = 0; c < C; ++c) dY[r * C + c] = static_cast<scalar_t>(zv[c]);
        if (dZ) {
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t c = 0; c < C; ++c) {
            axpy<acc_t>(row.data(), res[c], Vt.data() + c * d, d);
            axpy<acc_t>(row.data(), -zv[c], At.data() + c * d, d);
          }
          for (int64_t a = 0; a < d; ++a) dZ[r * d + a] = static_cast<scalar_t>(row[a]);
        }
      }
    }
  }
}

bool use_small_path(int64_t N, int64_t d, int64_t C, bool primal) {
  const int64_t n = primal ? d : N;
  return n <= kSmallN && N * d * (n + C) <= kSmallWork;
}

void check_inputs(const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu) {
  TORCH_CHECK(Z.dim() == 3, "Z: expected shape [B, N, d], got ", Z.sizes());
  TORCH_CHECK(Y.dim() == 3 && Y.size(0) == Z.size(0) && Y.size(1) == Z.size(1),
              "Y: expected shape [", Z.size(0), ", ", Z.size(1), ", C], got ", Y.sizes());
  TORCH_CHECK(mu.dim() == 1 && mu.size(0) == Z.size(0), "mu: expected shape [", Z.size(0),
              "], got ", mu.sizes());
  TORCH_CHECK(Z.device().is_cpu() && Y.device().is_cpu() && mu.device().is_cpu(),
              "ddfast._C CPU kernels take CPU tensors");
  TORCH_CHECK(Z.scalar_type() == Y.scalar_type(), "Z and Y: expected one dtype, got ",
              Z.scalar_type(), " and ", Y.scalar_type());
  TORCH_CHECK(Z.scalar_type() == at::kFloat || Z.scalar_type() == at::kDouble,
              "Z: expected float32 or float64, got ", Z.scalar_type());
  TORCH_CHECK(mu.scalar_type() == at::kFloat || mu.scalar_type() == at::kDouble,
              "mu: expected float32 or float64 (the solve dtype), got ", mu.scalar_type());
  TORCH_CHECK(at::promote_types(Z.scalar_type(), mu.scalar_type()) == mu.scalar_type(),
              "mu: the solve dtype must be at least as wide as Z's dtype");
}

// Lower block triangle of X Xᵀ for X [B,n,k] (the only part the Cholesky reads): for large n the
// symmetric Gram is formed from the ~(m+1)/2m share of m×m blocks on or below the diagonal.
at::Tensor gram_lower(const at::Tensor& X) {
  const int64_t n = X.size(1);
  constexpr int64_t kBlocks = 4;
  if (n < 512) return at::matmul(X, X.transpose(1, 2));
  const int64_t bs = (n + kBlocks - 1) / kBlocks;
  at::Tensor A = at::zeros({X.size(0), n, n}, X.options());
  for (int64_t i0 = 0; i0 < n; i0 += bs) {
    const int64_t ni = std::min(bs, n - i0);
    const at::Tensor Xi = X.narrow(1, i0, ni);
    for (int64_t j0 = 0; j0 <= i0; j0 += bs) {
      const int64_t nj = std::min(bs, n - j0);
      A.narrow(1, i0, ni).narrow(2, j0, nj).copy_(at::matmul(Xi, X.narrow(1, j0, nj).transpose(1, 2)));
    }
  }
  return A;
}

// A [B,m,k] @ X [B,k,c] for a thin right factor (c = targets): formed as (Xᵀ Aᵀ)ᵀ, a [B,c,m] product
// viewed transposed. MKL runs the thin-output orientation slowly: one thread, float32, B=1,
// Zᵀα with Z 100×2048, C=10: 0.96 ms as A@X vs 0.18 ms as (XᵀAᵀ)ᵀ; Z·G with Z 128×8192:
// 6.8 ms vs 1.4 ms; Z·G with Z 500×512: 0.66 ms vs 0.32 ms.
at::Tensor mm_thin(const at::Tensor& A, const at::Tensor& X) {
  return at::matmul(X.transpose(1, 2), A.transpose(1, 2)).transpose(1, 2);
}

// Batched ATen path for large problems.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> large_fwd(
    const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& mu, bool primal, bool compute_w) {
  const auto acc = mu.scalar_type();
  const auto Zt = Z.transpose(1, 2);
  at::Tensor A = gram_lower(primal ? Zt : Z);
  A = A.to(acc);
  A.diagonal(0, 1, 2).add_(mu.unsqueeze(1));
  auto [L, info] = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  at::Tensor rhs = primal ? mm_thin(Zt, Y).to(acc) : Y.to(acc);
  at::Tensor aux = at::cholesky_solve(rhs, L, /*upper=*/false);
  at::Tensor W;
  if (primal) {
    W = aux.to(Z.scalar_type());
  } else if (compute_w) {
    W = mm_thin(Zt, aux.to(Z.scalar_type())).contiguous();
  } else {
    W = at::empty({0}, Z.options());
  }
  return {W, L, aux, info.to(at::kInt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> large_bwd(
    const at::Tensor& G, const at::Tensor& Z, const at::Tensor& Y, const at::Tensor& L,
    const at::Tensor& aux, bool primal, bool need_dz, bool need_dy, bool need_dmu) {
  const auto acc = L.scalar_type();
  const auto dt = Z.scalar_type();
  const auto Zt = Z.transpose(1, 2);
  at::Tensor dZ, dY, dmu;
  if (!primal) {
    at::Tensor Bm = at::cholesky_solve(mm_thin(Z, G).to(acc), L, /*upper=*/false);
    if (need_dmu) dmu = -(Bm * aux).sum({1, 2});
    const at::Tensor Bm_s = Bm.to(dt);
    if (need_dy) dY = Bm_s;
    if (need_dz) {
      const at::Tensor alpha = aux.to(dt);
      const int64_t N = Z.size(1), d = Z.size(2), C = G.size(2);
      if (2 * N * C + N * d < 3 * d * C) {
        // (dA + dAᵀ)Z with dA = −Bm αᵀ, formed as an N×N matrix: cheaper when C is large.
        at::Tensor S = at::matmul(Bm_s, alpha.transpose(1, 2));
        S = S + S.transpose(1, 2);
        dZ = at::matmul(alpha, G.transpose(1, 2)) - at::matmul(S, Z);
      } else {
        const at::Tensor W = mm_thin(Zt, alpha);
        const at::Tensor T = G - mm_thin(Zt, Bm_s);
        dZ = at::matmul(alpha, T.transpose(1, 2)) - at::matmul(Bm_s, W.transpose(1, 2));
      }
    }
  } else {
    at::Tensor V = at::cholesky_solve(G.to(acc), L, /*upper=*/false);
    if (need_dmu) dmu = -(V * aux).sum({1, 2});
    if (need_dy || need_dz) {
      const at::Tensor V_s = V.to(dt), W = aux.to(dt);
      const at::Tensor zv = mm_thin(Z, V_s);
      if (need_dy) dY = zv.contiguous();
      if (need_dz) {
        const at::Tensor res = Y - mm_thin(Z, W);
        dZ = at::matmul(res, V_s.transpose(1, 2)) - at::matmul(zv, W.transpose(1, 2));
      }
    }
  }
  return {dZ, dY, dmu};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> ridge_solve_fwd(
    const at::Tensor& Z_in, const at::Tensor& Y_in, const at::Tensor& mu_in, bool primal,
    bool compute_w) {
  check_inputs(Z_in, Y_in, mu_in);
  const int64_t B = Z_in.size(0), N = Z_in.size(1), d = Z_in.size(2), C = Y_in.size(2);
  if (!use_small_path(N, d, C, primal)) {
    auto [W, L, aux, info] = large_fwd(Z_in, Y_in, mu_in, primal, compute_w);
    int64_t status = info.ne(0).any().item<bool>() ? 1 : 0;
    if (status == 0 && W.numel() > 0 && !at::isfinite(W).all().item<bool>()) status = 2;
    return {W, L, aux, info, status};
  }

  const at::Tensor Z = Z_in.contiguous(), Y = Y_in.contiguous(), mu = mu_in.contiguous();
  const int64_t n = primal ? d : N;
  const auto acc = mu.scalar_type();
  at::Tensor W = at::empty({B, d, C}, Z.options());
  at::Tensor L = at::empty({B, n, n}, Z.options().dtype(acc));
  at::Tensor aux = at::empty({B, n, C}, Z.options().dtype(acc));
  at::Tensor info = at::zeros({B}, Z.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_fwd", [&] {
    using io_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(acc, "ridge_solve_fwd_acc", [&] {
      using acc_t = scalar_t;
      const io_t* z = Z.data_ptr<io_t>();
      const io_t* y = Y.data_ptr<io_t>();
      const acc_t* m = mu.data_ptr<acc_t>();
      io_t* w = W.data_ptr<io_t>();
      acc_t* l = L.data_ptr<acc_t>();
      acc_t* a = aux.data_ptr<acc_t>();
      int* inf = info.data_ptr<int>();
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          small_fwd_one<io_t, acc_t>(z + b * N * d, y + b * N * C, m[b], N, d, C, primal,
                                     compute_w, w + b * d * C, l + b * n * n, a + b * n * C,
                                     inf + b);
      });
    });
  });
  int64_t status = 0;
  const int* inf = info.data_ptr<int>();
  for (int64_t b = 0; b < B; ++b) status |= inf[b] != 0 ? 1 : 0;
  if (status == 0 && compute_w) {
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "ridge_solve_fwd_finite", [&] {
      const scalar_t* w = W.data_ptr<scalar_t>();
      bool finite = true;
      for (int64_t i = 0; i < W.numel(); ++i) finite &= std::isfinite(w[i]);
      if (!finite) status = 2;
    });
  }
  return {W, L, aux, info, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ridge_solve_bwd(
    const at::Tensor& G_in, const at::Tensor& Z_in, const at::Tensor& Y_in, const at::Tensor& L_in,
    const at::Tensor& aux_in, bool primal, bool need_dz, bool need_dy, bool need_dmu) {
  TORCH_CHECK(Z_in.dim() == 3, "Z: expected shape [B, N, d], got ", Z_in.sizes());
  TORCH_CHECK(Y_in.dim() == 3 && Y_in.size(0) == Z_in.size(0) && Y_in.size(1) == Z_in.size(1),
              "Y: expected shape [", Z_in.size(0), ", ", Z_in.size(1), ", C], got ", Y_in.sizes());
  TORCH_CHECK(Z_in.device().is_cpu() && Y_in.device().is_cpu() && G_in.device().is_cpu() &&
                  L_in.device().is_cpu() && aux_in.device().is_cpu(),
              "ddfast._C CPU kernels take CPU tensors");
  TORCH_CHECK(Z_in.scalar_type() == Y_in.scalar_type() &&
                  (Z_in.scalar_type() == at::kFloat || Z_in.scalar_type() == at::kDouble),
              "Z and Y: expected one dtype, float32 or float64, got ", Z_in.scalar_type(), " and ",
              Y_in.scalar_type());
  TORCH_CHECK((L_in.scalar_type() == at::kFloat || L_in.scalar_type() == at::kDouble) &&
                  aux_in.scalar_type() == L_in.scalar_type() &&
                  at::promote_types(Z_in.scalar_type(), L_in.scalar_type()) == L_in.scalar_type(),
              "L and aux: expected one solve dtype at least as wide as Z's, got ", L_in.scalar_type(),
              " and ", aux_in.scalar_type());
  {
    const int64_t nf = primal ? Z_in.size(2) : Z_in.size(1);
    TORCH_CHECK(L_in.dim() == 3 && L_in.size(0) == Z_in.size(0) && L_in.size(1) == nf && L_in.size(2) == nf,
                "L: expected shape [", Z_in.size(0), ", ", nf, ", ", nf, "], got ", L_in.sizes());
    TORCH_CHECK(aux_in.dim() == 3 && aux_in.size(0) == Z_in.size(0) && aux_in.size(1) == nf &&
                    aux_in.size(2) == Y_in.size(2),
                "aux: expected shape [", Z_in.size(0), ", ", nf, ", ", Y_in.size(2), "], got ", aux_in.sizes());
  }
  const int64_t B = Z_in.size(0), N = Z_in.size(1), d = Z_in.size(2), C = Y_in.size(2);
  TORCH_CHECK(G_in.dim() == 3 && G_in.size(0) == B && G_in.size(1) == d && G_in.size(2) == C,
              "grad_W: expected shape [", B, ", ", d, ", ", C, "], got ", G_in.sizes());
  const at::Tensor G = G_in.to(Z_in.scalar_type());
  if (!use_small_path(N, d, C, primal))
    return large_bwd(G, Z_in, Y_in, L_in, aux_in, primal, need_dz, need_dy, need_dmu);

  const at::Tensor Gc = G.contiguous(), Z = Z_in.contiguous(), Y = Y_in.contiguous();
  const at::Tensor L = L_in.contiguous(), aux = aux_in.contiguous();
  const int64_t n = primal ? d : N;
  at::Tensor dZ = need_dz ? at::empty({B, N, d}, Z.options()) : at::Tensor();
  at::Tensor dY = need_dy ? at::empty({B, N, C}, Z.options()) : at::Tensor();
  at::Tensor dmu = need_dmu ? at::empty({B}, L.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "ridge_solve_bwd", [&] {
    using io_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "ridge_solve_bwd_acc", [&] {
      using acc_t = scalar_t;
      const io_t* g = Gc.data_ptr<io_t>();
      const io_t* z = Z.data_ptr<io_t>();
      const io_t* y = Y.data_ptr<io_t>();
      const acc_t* l = L.data_ptr<acc_t>();
      const acc_t* a = aux.data_ptr<acc_t>();
      io_t* dz = need_dz ? dZ.data_ptr<io_t>() : nullptr;
      io_t* dy = need_dy ? dY.data_ptr<io_t>() : nullptr;
      acc_t* dm = need_dmu ? dmu.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b)
          small_bwd_one<io_t, acc_t>(g + b * d * C, z + b * N * d, y + b * N * C,
                                     l + b * n * n, a + b * n * C, N, d, C, primal,
                                     dz ? dz + b * N * d : nullptr,
                                     dy ? dy + b * N * C : nullptr, dm ? dm + b : nullptr);
      });
    });
  });
  return {dZ, dY, dmu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> krr_predict_fwd(const at::Tensor& Zq_in,
                                                                        const at::Tensor& Zs_in,
                                                                        const at::Tensor& Ys_in, double lam,
                                                                        int64_t reg, double c, bool via_weights) {
  TORCH_CHECK(Zq_in.dim() == 3 && Zs_in.dim() == 3 && Ys_in.dim() == 3 && Zq_in.size(0) == Zs_in.size(0) &&
                  Ys_in.size(0) == Zs_in.size(0) && Ys_in.size(1) == Zs_in.size(1) && Zq_in.size(2) == Zs_in.size(2),
              "krr_predict_fwd: Zq [B, M, d], Zs [B, N, d] and Ys [B, N, C] expected, got ", Zq_in.sizes(), ", ",
              Zs_in.sizes(), " and ", Ys_in.sizes());
  TORCH_CHECK(Zq_in.device().is_cpu() && Zs_in.device().is_cpu() && Ys_in.device().is_cpu(),
              "krr_predict_fwd: expected CPU tensors");
  TORCH_CHECK((Zs_in.scalar_type() == at::kFloat || Zs_in.scalar_type() == at::kDouble) &&
                  Zq_in.scalar_type() == Zs_in.scalar_type() &&
                  (Ys_in.scalar_type() == Zs_in.scalar_type() || Ys_in.scalar_type() == at::kDouble),
              "krr_predict_fwd: expected float32 or float64 features of one dtype and targets of that dtype or "
              "float64, got ", Zq_in.scalar_type(), ", ", Zs_in.scalar_type(), " and ", Ys_in.scalar_type());
  const at::Tensor Zq = Zq_in.contiguous(), Zs = Zs_in.contiguous(), Ys = Ys_in.contiguous();
  const int64_t B = Zs.size(0), N = Zs.size(1), C = Ys.size(2);
  TORCH_CHECK(N <= kKrrPredictFwdMaxN, "krr_predict_fwd: the in-place factor takes N ≤ ", kKrrPredictFwdMaxN,
              ", got N = ", N, " (larger support sets: ddfast::ops::krr_predict_fwd_composite)");
  // One problem runs as 2-D GEMMs (MKL's batched path costs more at these sizes).
  const at::Tensor q = B == 1 ? Zq.select(0, 0) : Zq, z = B == 1 ? Zs.select(0, 0) : Zs;
  // The Gram in the features' dtype (MKL), factored in the targets' (the solve dtype).
  at::Tensor K = at::matmul(z, z.transpose(-1, -2)).to(Ys.scalar_type()).contiguous();  // [(B,) N, N]
  at::Tensor alpha;
  {  // factored in place, one problem per task
    alpha = at::empty({B, N, C}, Ys.options());
    std::vector<int> info(B, 0);
    const bool own = own_solve_is_faster(N, C);  // else LAPACK solves with the factor, below
    AT_DISPATCH_FLOATING_TYPES(Ys.scalar_type(), "krr_predict_fwd", [&] {
      scalar_t* k = K.data_ptr<scalar_t>();
      const scalar_t* y = Ys.data_ptr<scalar_t>();
      scalar_t* a = alpha.data_ptr<scalar_t>();
      const scalar_t cc = static_cast<scalar_t>(c);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> Xt(C * N);
        for (int64_t b = begin; b < end; ++b) {
          scalar_t* A = k + b * N * N;
          scalar_t trace = 0;
          for (int64_t i = 0; i < N; ++i) {
            for (int64_t j = 0; j <= i; ++j) A[i * N + j] += cc;
            trace += A[i * N + i];
          }
          const scalar_t mu = static_cast<scalar_t>(reg == 0   ? lam
                                                    : reg == 1 ? lam * (double(trace) / double(N))
                                                               : lam * double(trace));
          for (int64_t i = 0; i < N; ++i) A[i * N + i] += mu;
          info[b] = cholesky_inplace<scalar_t>(A, N);
          if (info[b] != 0 || !own) continue;
          transpose(Xt.data(), y + b * N * C, N, C);
          cholesky_solve_rows<scalar_t>(A, Xt.data(), N, C);
          transpose(a + b * N * C, Xt.data(), C, N);
        }
      });
    });
    for (int64_t b = 0; b < B; ++b)
      if (info[b] != 0) return {at::empty({0}, Ys.options()), B == 1 ? K.unsqueeze(0) : K, alpha, 1};
    if (!own) alpha = at::cholesky_solve(Ys, K.view({B, N, N}), /*upper=*/false);
  }
  const at::Tensor a = B == 1 ? alpha.select(0, 0) : alpha;
  at::Tensor P;
  const auto sd = Ys.scalar_type();  // P in the solve dtype; products in the features' dtype
  if (via_weights) {  // P = Zq·(Zsᵀα) (+ c·1ᵀα), formed transposed: Pᵀ = (αᵀZs)Zqᵀ (thin factor on the left)
    const at::Tensor Wt = at::matmul(a.transpose(-1, -2).to(z.scalar_type()), z);
    P = at::matmul(Wt, q.transpose(-1, -2)).transpose(-1, -2).to(sd);
    if (c != 0.0) P = P + a.sum(-2, /*keepdim=*/true).mul_(c);
  } else {  // P = (ZqZsᵀ + c)·α
    at::Tensor Kq = at::matmul(q, z.transpose(-1, -2)).to(sd);
    if (c != 0.0) Kq.add_(c);
    P = at::matmul(Kq, a);
  }
  if (B == 1) P = P.unsqueeze(0);
  P = P.contiguous();
  int64_t status = 0;
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "krr_predict_fwd_finite", [&] {
    const scalar_t* p = P.data_ptr<scalar_t>();
    bool finite = true;
    for (int64_t i = 0; i < P.numel(); ++i) finite &= std::isfinite(p[i]);
    if (!finite) status = 2;
  });
  return {P, B == 1 ? K.unsqueeze(0) : K, alpha, status};
}

at::Tensor cholesky_solve(const at::Tensor& R, const at::Tensor& L) {
  TORCH_CHECK(R.dim() == 3 && L.dim() == 3 && R.size(0) == L.size(0) && R.size(1) == L.size(1) &&
                  L.size(2) == L.size(1),
              "cholesky_solve: R [B, n, C] and L [B, n, n] expected, got ", R.sizes(), " and ",
              L.sizes());
  TORCH_CHECK(R.device().is_cpu() && L.device().is_cpu(), "cholesky_solve: expected CPU tensors");
  TORCH_CHECK((L.scalar_type() == at::kFloat || L.scalar_type() == at::kDouble) &&
                  (R.scalar_type() == at::kFloat || R.scalar_type() == at::kDouble),
              "cholesky_solve: expected float32/float64, got ", R.scalar_type(), " and ", L.scalar_type());
  const int64_t B = R.size(0), n = R.size(1), C = R.size(2);
  if (n > kSmallN || !own_solve_is_faster(n, C))
    return at::cholesky_solve(R.to(L.scalar_type()), L, /*upper=*/false);
  // Right-hand sides transposed to rows so each solve runs over contiguous vectors.
  // Always a fresh buffer: `.to()` / `.contiguous()` return R itself when n == 1 or C == 1, and the
  // solve below works in place, so reusing them would overwrite the caller's right-hand sides.
  at::Tensor Xt = at::empty({B, C, n}, L.options());
  Xt.copy_(R.transpose(1, 2));
  const at::Tensor Lc = L.contiguous();
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "cholesky_solve", [&] {
    scalar_t* x = Xt.data_ptr<scalar_t>();
    const scalar_t* l = Lc.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) cholesky_solve_rows<scalar_t>(l + b * n * n, x + b * n * C, n, C);
    });
  });
  return Xt.transpose(1, 2);
}

}  // namespace cpu
}  // namespace ddfast
