// Fused residuals of the per-example label meta-gradient on the CPU.
//
//   fwd (inner-loss residual):  p = softmax(Z), s_i = Σ_c Y_ic
//       R = scale·(p·s − Y)                         = d(scale·Σ_i CE(p_i, Y_i))/dZ
//       loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic
//   bwd (head residual):        v = H GWᵀ + gb + Vb, p = softmax(Z)
//       out = scale·(v − (p·v)1)                     (label-distillation Appendix B, (*))
//
// Seed: label-distillation §3 eq. 1, Appendix B.
// Equivalent PyTorch: ddfast.reference.label_metagrad.soft_cross_entropy (fwd) and
// ddfast.reference.label_metagrad.head_residual_ref (bwd).
//
// One pass per row, rows split over threads by at::parallel_for; softmax is max-subtracted. The
// bwd GEMM (C dot products of length d per row) runs in register tiles of 4 rows of H × 2 rows of
// GW, SIMD over d, with v written straight into the output row and the residual applied in place:
// no N×C intermediate besides the output. Large problems (see use_matmul) instead run one BLAS
// GEMM into the output and the same in-place residual pass.

#include "label_metagrad.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace ddfast {
namespace cpu {
namespace {

constexpr int64_t kGrainWork = 1 << 14;  // ~multiply-adds per parallel chunk (below: one thread)
constexpr int kTileRows = 4;             // rows of H per register tile
constexpr int kTileCols = 2;             // rows of GW per register tile

#if defined(__GNUC__)
// 256-bit vector types (GCC/Clang vector extensions; two 128-bit halves on targets without AVX).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
};

// acc[r·lda + c] += lane-wise Σ_k h_r[k]·g_c[k] over k in [k0, k1) (k1 − k0 a multiple of the width):
// R·K independent vector accumulators in registers (8 for 4×2); each GW load is reused by R rows.
template <int R, int K, typename T, typename V = typename Simd<T>::type>
inline void dot_tile(const T* h, int64_t ldh, const T* g, int64_t ldg, int64_t k0, int64_t k1, V* acc,
                     int64_t lda) {
  constexpr int W = sizeof(V) / sizeof(T);
  V a[R][K];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < K; ++c) a[r][c] = acc[r * lda + c];
  for (int64_t k = k0; k < k1; k += W) {
    V gv[K];
    for (int c = 0; c < K; ++c) std::memcpy(&gv[c], g + c * ldg + k, sizeof(V));
    for (int r = 0; r < R; ++r) {
      V hv;
      std::memcpy(&hv, h + r * ldh + k, sizeof(V));
      for (int c = 0; c < K; ++c) a[r][c] += hv * gv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < K; ++c) acc[r * lda + c] = a[r][c];
}

// v[r·C + c] = <h_r, g_c> for R rows of H against all C rows of GW (rows contiguous over d, row
// strides ldh / ldg). d is walked in chunks so that the R rows of H stay in L1 while every row of GW
// passes over them; the vector partial sums live in acc (R·C vectors) between chunks.
template <int R, typename T, typename V = typename Simd<T>::type>
inline void dot_rows(const T* h, int64_t ldh, const T* gw, int64_t ldg, int64_t d, int64_t C, T* v, V* acc) {
  constexpr int W = sizeof(V) / sizeof(T);
  constexpr int64_t kChunk = 2048 / sizeof(T);  // 2 KiB of each row per pass
  const int64_t dv = d - d % W;
  for (int64_t j = 0; j < R * C; ++j) acc[j] = V{};
  for (int64_t k0 = 0; k0 < dv; k0 += kChunk) {
    const int64_t k1 = std::min(dv, k0 + kChunk);
    int64_t c = 0;
    for (; c + kTileCols <= C; c += kTileCols) dot_tile<R, kTileCols>(h, ldh, gw + c * ldg, ldg, k0, k1, acc + c, C);
    for (; c < C; ++c) dot_tile<R, 1>(h, ldh, gw + c * ldg, ldg, k0, k1, acc + c, C);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const V& a = acc[r * C + c];
      T s = T(0);
      for (int j = 0; j < W; ++j) s += a[j];
      for (int64_t k = dv; k < d; ++k) s += h[r * ldh + k] * gw[c * ldg + k];
      v[r * C + c] = s;
    }
}

// Per-thread scratch for dot_rows: kTileRows·C vector partial sums.
template <typename T>
struct DotScratch {
  std::vector<typename Simd<T>::type> acc;
  explicit DotScratch(int64_t C) : acc(kTileRows * C) {}
  typename Simd<T>::type* data() { return acc.data(); }
};
#else
template <int R, typename T>
inline void dot_rows(const T* h, int64_t ldh, const T* gw, int64_t ldg, int64_t d, int64_t C, T* v, void*) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      T s = T(0);
      for (int64_t k = 0; k < d; ++k) s += h[r * ldh + k] * gw[c * ldg + k];
      v[r * C + c] = s;
    }
}

template <typename T>
struct DotScratch {
  explicit DotScratch(int64_t) {}
  void* data() { return nullptr; }
};
#endif

// v ← scale·(v + gb + Vb_i − (p·(v + gb + Vb_i))1), p = softmax(z), on one row of length C.
template <typename T>
inline void head_residual_row(T* v, const T* gb, int64_t sgb, const T* vb, int64_t svb, const T* z,
                              int64_t sz, int64_t C, T scale) {
  if (gb)
    for (int64_t c = 0; c < C; ++c) v[c] += gb[c * sgb];
  if (vb)
    for (int64_t c = 0; c < C; ++c) v[c] += vb[c * svb];
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < C; ++c) m = std::max(m, z[c * sz]);
  T S = T(0), pv = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T e = std::exp(z[c * sz] - m);
    S += e;
    pv += e * v[c];
  }
  pv /= S;
  for (int64_t c = 0; c < C; ++c) v[c] = scale * (v[c] - pv);
}

// BLAS GEMM (at::mm into the output) or the register-tiled loop, by size. Measured on 2 cores (AVX2
// build, medians, same run): with C = 10 the tiled loop is 1.1–2.5× faster than MKL below ~128 rows
// (call overhead and skinny-GEMM packing dominate there) and up to 1.9× faster for d >= 2048 below
// 512 rows (MKL's skinny path); MKL is 1.2–1.5× faster from 512 rows on, and for C = 100 at most sizes.
bool use_matmul(int64_t N, int64_t d, int64_t C) {
  if (C > 16) return true;
  if (d >= 2048) return N >= 512;
  return N >= 128;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              ": expected float32 or float64, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> label_metagrad_fwd(const at::Tensor& Z, const at::Tensor& Y,
                                                      double scale) {
  TORCH_CHECK(Z.dim() == 2, "Z: expected logits of shape [N, C], got ", Z.sizes());
  TORCH_CHECK(Y.dim() == 2 && Y.sizes() == Z.sizes(), "Y: expected soft labels of shape [N, C] = ",
              Z.sizes(), " (the shape of Z), got ", Y.sizes());
  check_float(Z, "Z");
  check_float(Y, "Y");
  check_same_dtype(Y, "Y", Z, "Z");
  const int64_t N = Z.size(0), C = Z.size(1);
  at::Tensor R = at::empty({N, C}, Z.options());
  at::Tensor loss = at::empty({N}, Z.options());
  if (N == 0) return {R, loss};
  AT_DISPATCH_FLOATING_TYPES(Z.scalar_type(), "label_metagrad_fwd", [&] {
    using T = scalar_t;
    const T* z = Z.const_data_ptr<T>();
    const T* y = Y.const_data_ptr<T>();
    const int64_t szn = Z.stride(0), szc = Z.stride(1), syn = Y.stride(0), syc = Y.stride(1);
    T* r = R.data_ptr<T>();
    T* l = loss.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainWork / (8 * C + 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* zi = z + i * szn;
        const T* yi = y + i * syn;
        T* ri = r + i * C;
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t c = 0; c < C; ++c) m = std::max(m, zi[c * szc]);
        T S = T(0), s = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const T e = std::exp(zi[c * szc] - m);
          ri[c] = e;  // unnormalised probabilities, finished below
          S += e;
          s += yi[c * syc];
        }
        const T logS = std::log(S), ps = s / S;
        T ce = T(0);
        for (int64_t c = 0; c < C; ++c) {
          const T yc = yi[c * syc];
          ce -= yc * ((zi[c * szc] - m) - logS);
          ri[c] = sc * (ri[c] * ps - yc);
        }
        l[i] = ce;
      }
    });
  });
  return {R, loss};
}

at::Tensor label_metagrad_bwd(const at::Tensor& H_in, const at::Tensor& GW_in,
                              const std::optional<at::Tensor>& gb_in,
                              const std::optional<at::Tensor>& Vb_in, const at::Tensor& Z,
                              double scale) {
  TORCH_CHECK(H_in.dim() == 2, "H: expected features of shape [N, d], got ", H_in.sizes());
  const int64_t N = H_in.size(0), d = H_in.size(1);
  TORCH_CHECK(Z.dim() == 2 && Z.size(0) == N, "Z: expected logits of shape [N, C] with N = ", N,
              " (rows of H), got ", Z.sizes());
  const int64_t C = Z.size(1);
  TORCH_CHECK(GW_in.dim() == 2 && GW_in.size(0) == C && GW_in.size(1) == d,
              "GW: expected the head weight gradient of shape [C, d] = [", C, ", ", d, "], got ",
              GW_in.sizes());
  check_float(H_in, "H");
  check_float(GW_in, "GW");
  check_float(Z, "Z");
  check_same_dtype(GW_in, "GW", H_in, "H");
  check_same_dtype(Z, "Z", H_in, "H");
  const bool has_gb = gb_in.has_value() && gb_in->defined();
  const bool has_vb = Vb_in.has_value() && Vb_in->defined();
  if (has_gb) {
    const at::Tensor& gb = *gb_in;
    TORCH_CHECK(gb.dim() == 1 && gb.size(0) == C, "gb: expected the head bias gradient of shape [C] = [",
                C, "], got ", gb.sizes());
    check_float(gb, "gb");
    check_same_dtype(gb, "gb", H_in, "H");
  }
  if (has_vb) {
    const at::Tensor& Vb = *Vb_in;
    TORCH_CHECK(Vb.dim() == 2 && Vb.size(0) == N && Vb.size(1) == C,
                "Vb: expected the body JVP of shape [N, C] = [", N, ", ", C, "], got ", Vb.sizes());
    check_float(Vb, "Vb");
    check_same_dtype(Vb, "Vb", H_in, "H");
  }

  at::Tensor out = at::empty({N, C}, H_in.options());
  if (N == 0 || C == 0) return out;
  const bool blas = use_matmul(N, d, C);
  at::Tensor H = H_in, GW = GW_in;
  if (blas) {
    at::mm_out(out, H_in, GW_in.t());  // BLAS takes either storage order
  } else {
    // The tiled loop reads rows of H and GW as contiguous vectors over d.
    if (d > 1 && H.stride(1) != 1) H = H.contiguous();
    if (d > 1 && GW.stride(1) != 1) GW = GW.contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(H_in.scalar_type(), "label_metagrad_bwd", [&] {
    using T = scalar_t;
    const T* h = H.const_data_ptr<T>();
    const T* gw = GW.const_data_ptr<T>();
    const int64_t ldh = H.stride(0), ldg = GW.stride(0);
    const T* gb = has_gb ? gb_in->const_data_ptr<T>() : nullptr;
    const int64_t sgb = has_gb ? gb_in->stride(0) : 0;
    const T* vb = has_vb ? Vb_in->const_data_ptr<T>() : nullptr;
    const int64_t svn = has_vb ? Vb_in->stride(0) : 0, svc = has_vb ? Vb_in->stride(1) : 0;
    const T* z = Z.const_data_ptr<T>();
    const int64_t szn = Z.stride(0), szc = Z.stride(1);
    T* o = out.data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const int64_t grain = std::max<int64_t>(kTileRows, kGrainWork / (C * (d + 8) + 1));
    at::parallel_for(0, N, grain, [&](int64_t i0, int64_t i1) {
      if (!blas) {
        DotScratch<T> acc(C);
        int64_t i = i0;
        for (; i + kTileRows <= i1; i += kTileRows)
          dot_rows<kTileRows>(h + i * ldh, ldh, gw, ldg, d, C, o + i * C, acc.data());
        for (; i < i1; ++i) dot_rows<1>(h + i * ldh, ldh, gw, ldg, d, C, o + i * C, acc.data());
      }
      for (int64_t i = i0; i < i1; ++i)
        head_residual_row<T>(o + i * C, gb, sgb, vb ? vb + i * svn : nullptr, svc, z + i * szn, szc, C, sc);
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace ddfast
