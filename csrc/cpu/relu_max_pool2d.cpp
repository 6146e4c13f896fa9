// Fused ReLU + 2×2 max-pool (stride 2, floor) on the CPU.
//
//   out[n,c,i,j]  = max_{a,b ∈ {0,1}} relu(x[n,c,2i+a,2j+b])
//   code[n,c,i,j] = the first window position k = 2a + b (row-major) holding the maximum when it
//                   is > 0, the last NaN when there is one, else kReluMaxPoolNoGrad
//   grad_in       = grad_out at the coded positions, 0 elsewhere (incl. the last row / column of an
//                   odd H / W)
//
// This is F.max_pool2d(F.relu(x), 2) bit for bit, gradient included: max_pool2d keeps the first
// maximum (strict >) and takes any NaN; relu(−0) = −0 and relu(NaN) = NaN; relu's backward lets
// the gradient through where relu(x) > 0 or is NaN; max_pool2d's backward adds into zeros (−0 → +0).
// Equivalent PyTorch: ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref.
//
// Memory-bound: the forward reads x once and writes out and a uint8 code (no relu(x) and no int64
// indices saved for the backward); the backward reads grad_out and code and writes grad_in once.
// Comparisons run in the input dtype (bfloat16 widened to float: exact); the selected value's bits
// are copied, never recomputed. Eight windows at a time in SIMD lanes (GCC/clang vector extensions),
// branch-free:
//   NCHW, ⌊W/2⌋ ≥ 8       output rows (plane, i) over threads; the two input rows deinterleaved by
//                         shuffles (interleaved back in the backward); the last group of a row
//                         overlaps the previous one
//   channels_last, 8 | C  output rows (n, i) over threads; channels innermost, plain vector loads
//   otherwise             units (a plane / an output row) over threads; the forward gathers windows
//                         into the lanes by a table of offsets shared by all units; the backward
//                         zeroes the unit's input and stores each gradient at its coded position
// Other compilers (or -DDDFAST_RMP_SIMD=0): the same arithmetic one window at a time.

#include "relu_max_pool2d.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifndef DDFAST_RMP_SIMD  // -DDDFAST_RMP_SIMD=0 builds the one-window-at-a-time path
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define DDFAST_RMP_SIMD 1  // vector_size types, __builtin_shufflevector, __builtin_convertvector
#else
#define DDFAST_RMP_SIMD 0
#endif
#endif

namespace ddfast {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 15;  // input elements per parallel chunk (below: one thread)
constexpr uint8_t kNoGrad = kReluMaxPoolNoGrad;
constexpr int kLanes = 8;

inline int64_t grain_for(int64_t in_elems_per_item) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, in_elems_per_item));
}

// A unit of contiguous outputs (an NCHW plane or a channels_last output row) and where the window
// of output m starts in its input: off[m]; the window is p[0], p[dc] / p[dr], p[dr + dc].
struct Gather {
  std::vector<int64_t> off;
  int64_t dc, dr;
};

Gather nchw_plane_gather(int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  Gather g{std::vector<int64_t>(OH * OW), 1, W};
  for (int64_t m = 0; m < OH * OW; ++m) g.off[m] = 2 * (m / OW) * W + 2 * (m % OW);
  return g;
}

Gather nhwc_row_gather(int64_t C, int64_t W) {
  const int64_t OW = W / 2;
  Gather g{std::vector<int64_t>(OW * C), C, W * C};
  for (int64_t m = 0; m < OW * C; ++m) g.off[m] = 2 * (m / C) * C + m % C;
  return g;
}

// Storage S, compared as A; zero_sign(g) = 0 + g (turns −0 into +0, keeps everything else).
template <typename S>
struct Elem {
  using A = S;
  static inline A get(S v) { return v; }
  static inline S zero_sign(S g) { return g + S(0); }
};

template <>
struct Elem<uint16_t> {
  using A = float;
  static inline float get(uint16_t v) {
    const uint32_t u = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline uint16_t zero_sign(uint16_t g) { return g == 0x8000 ? uint16_t(0) : g; }
};

// Backward of a unit by the gather table: the unit's input rows are zeroed first (the caller), then
// each output's gradient goes to its coded position only (one store; none for kNoGrad).
template <typename S>
void bwd_unit_scatter(const S* g, const uint8_t* cd, S* y, const Gather& gt, int64_t U) {
  const int64_t* off = gt.off.data();
  const int64_t pos[4] = {0, gt.dc, gt.dr, gt.dr + gt.dc};
  for (int64_t m = 0; m < U; ++m) {
    const uint8_t k = cd[m];
    if (k < 4) y[off[m] + pos[k]] = Elem<S>::zero_sign(g[m]);
  }
}

#if DDFAST_RMP_SIMD
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors between internal functions: no ABI to keep
#endif

// Eight lanes of storage S: SV; compared as AV, whose bits are IV; SM masks SV lanes. bfloat16 travels as its bits (uint16_t) and is widened to float by a shift.
template <typename S>
struct Vec;
template <>
struct Vec<float> {
  typedef float SV __attribute__((vector_size(32)));
  typedef float AV __attribute__((vector_size(32)));
  typedef int32_t IV __attribute__((vector_size(32)));
  typedef int32_t SM __attribute__((vector_size(32)));
  static inline AV widen(const SV& s) { return s; }
  static inline SV narrow(const IV& bits) { return (SV)bits; }
  static inline SV zero_sign(const SV& g) { return g + SV{}; }  // 0 + g: −0 → +0
};
template <>
struct Vec<double> {
  typedef double SV __attribute__((vector_size(64)));
  typedef double AV __attribute__((vector_size(64)));
  typedef int64_t IV __attribute__((vector_size(64)));
  typedef int64_t SM __attribute__((vector_size(64)));
  static inline AV widen(const SV& s) { return s; }
  static inline SV narrow(const IV& bits) { return (SV)bits; }
  static inline SV zero_sign(const SV& g) { return g + SV{}; }
};
template <>
struct Vec<uint16_t> {
  typedef uint16_t SV __attribute__((vector_size(16)));
  typedef float AV __attribute__((vector_size(32)));
  typedef int32_t IV __attribute__((vector_size(32)));
  typedef int16_t SM __attribute__((vector_size(16)));
  typedef uint32_t U32 __attribute__((vector_size(32)));
  typedef uint16_t U16x16 __attribute__((vector_size(32)));
  static inline AV widen(SV s) { return (AV)(__builtin_convertvector(s, U32) << 16); }
  static inline SV narrow(IV bits) {  // the high halves (little-endian: odd uint16 lanes)
    const U16x16 h = (U16x16)bits;
    return __builtin_shufflevector(h, h, 1, 3, 5, 7, 9, 11, 13, 15);
  }
  static inline SV zero_sign(SV g) { return g & (SV)~(g == 0x8000); }
};

typedef uint8_t Code8 __attribute__((vector_size(8)));
typedef uint8_t Bytes32 __attribute__((vector_size(32)));
typedef int32_t Int32x8 __attribute__((vector_size(32)));
typedef int32_t Int32x16 __attribute__((vector_size(64)));

// Low bytes of eight small integers (as shuffles: __builtin_convertvector narrows lane by lane).
inline Code8 low_bytes(const Int32x8& k) {
  const Bytes32 b = (Bytes32)k;
  return __builtin_shufflevector(b, b, 0, 4, 8, 12, 16, 20, 24, 28);
}

template <typename IV>
inline Code8 to_code8(const IV& k) {
  if constexpr (sizeof(IV) == sizeof(Int32x16)) {  // eight int64 lanes: their low int32 halves
    const Int32x16 w = (Int32x16)k;
    return low_bytes(__builtin_shufflevector(w, w, 0, 2, 4, 6, 8, 10, 12, 14));
  } else {
    return low_bytes(k);
  }
}

template <typename V>
inline V load_v(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store_v(void* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// Eight windows a b / c d: out = relu-max (bits of the selected input), code = its position.
template <typename S>
inline void pool8(const typename Vec<S>::SV& sa, const typename Vec<S>::SV& sb, const typename Vec<S>::SV& sc,
                  const typename Vec<S>::SV& sd, S* out, uint8_t* code) {
  using T = Vec<S>;
  using AV = typename T::AV;
  using IV = typename T::IV;
  const AV zero = {};
  const AV a = T::widen(sa), b = T::widen(sb), c = T::widen(sc), d = T::widen(sd);
  IV best = (IV)a & ~(IV)(a < zero);                 // relu(a): keeps −0 and NaN
  IV k = ~(IV)((a > zero) | (a != a)) & kNoGrad;     // 0 where a gets the gradient
  IV t = (IV)((b > (AV)best) | (b != b));
  best = ((IV)b & t) | (best & ~t);
  k = (t & 1) | (k & ~t);
  t = (IV)((c > (AV)best) | (c != c));
  best = ((IV)c & t) | (best & ~t);
  k = (t & 2) | (k & ~t);
  t = (IV)((d > (AV)best) | (d != d));
  best = ((IV)d & t) | (best & ~t);
  k = (t & 3) | (k & ~t);
  store_v(out, T::narrow(best));
  store_v(code, to_code8(k));
}

// Eight gradients to the four window positions: 0 + g where the code says so, else 0.
template <typename S>
inline void unpool8(const typename Vec<S>::SV& g, Code8 code, typename Vec<S>::SV* p) {
  using T = Vec<S>;
  using SV = typename T::SV;
  using SM = typename T::SM;
  const SM k = __builtin_convertvector(code, SM);
  const SM v = (SM)T::zero_sign(g);
  using E = std::remove_cv_t<std::remove_reference_t<decltype(k[0])>>;
  for (int q = 0; q < 4; ++q) p[q] = (SV)(v & (SM)(k == E(q)));
}

// Sixteen consecutive values → even and odd lanes.
template <typename S>
inline void deinterleave(const S* x, typename Vec<S>::SV* even, typename Vec<S>::SV* odd) {
  using SV = typename Vec<S>::SV;
  const SV lo = load_v<SV>(x), hi = load_v<SV>(x + kLanes);
  *even = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
  *odd = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
}

template <typename S>
inline void interleave(S* y, const typename Vec<S>::SV& even, const typename Vec<S>::SV& odd) {
  store_v(y, __builtin_shufflevector(even, odd, 0, 8, 1, 9, 2, 10, 3, 11));
  store_v(y + kLanes, __builtin_shufflevector(even, odd, 4, 12, 5, 13, 6, 14, 7, 15));
}

// The groups of eight outputs of a row of n ≥ 8: the last one overlaps its predecessor (the shared
// outputs are recomputed to the same values).
template <typename F>
inline void groups_of_8(int64_t n, F&& f) {
  for (int64_t j = 0; j < n; j += kLanes) f(std::min(j, n - kLanes));
}

// NCHW output row (OW ≥ 8) from input rows x0, x1.
template <typename S>
void fwd_row_deint(const S* x0, const S* x1, S* o, uint8_t* cd, int64_t OW) {
  groups_of_8(OW, [&](int64_t j) {
    typename Vec<S>::SV a, b, c, d;
    deinterleave(x0 + 2 * j, &a, &b);
    deinterleave(x1 + 2 * j, &c, &d);
    pool8<S>(a, b, c, d, o + j, cd + j);
  });
}

template <typename S>
void bwd_row_deint(const S* g, const uint8_t* cd, S* y0, S* y1, int64_t OW) {
  groups_of_8(OW, [&](int64_t j) {
    typename Vec<S>::SV p[4];
    unpool8<S>(load_v<typename Vec<S>::SV>(g + j), load_v<Code8>(cd + j), p);
    interleave(y0 + 2 * j, p[0], p[1]);
    interleave(y1 + 2 * j, p[2], p[3]);
  });
}

// channels_last output row (C a multiple of 8) from input rows x0, x1.
template <typename S>
void fwd_row_nhwc8(const S* x0, const S* x1, S* o, uint8_t* cd, int64_t OW, int64_t C) {
  using SV = typename Vec<S>::SV;
  for (int64_t j = 0; j < OW; ++j)
    for (int64_t ch = 0; ch < C; ch += kLanes) {
      const S* a = x0 + 2 * j * C + ch;
      const S* c = x1 + 2 * j * C + ch;
      pool8<S>(load_v<SV>(a), load_v<SV>(a + C), load_v<SV>(c), load_v<SV>(c + C), o + j * C + ch, cd + j * C + ch);
    }
}

template <typename S>
void bwd_row_nhwc8(const S* g, const uint8_t* cd, S* y0, S* y1, int64_t OW, int64_t C) {
  using SV = typename Vec<S>::SV;
  for (int64_t j = 0; j < OW; ++j)
    for (int64_t ch = 0; ch < C; ch += kLanes) {
      SV p[4];
      unpool8<S>(load_v<SV>(g + j * C + ch), load_v<Code8>(cd + j * C + ch), p);
      S* a = y0 + 2 * j * C + ch;
      S* c = y1 + 2 * j * C + ch;
      store_v(a, p[0]);
      store_v(a + C, p[1]);
      store_v(c, p[2]);
      store_v(c + C, p[3]);
    }
}

// Eight lanes of a window position for outputs m0 .. m0+7 of a unit, built in registers (a staged
// copy read back as a vector would stall on store forwarding).
template <typename S>
inline typename Vec<S>::SV gather8(const S* x, const int64_t* off, int64_t d) {
  return typename Vec<S>::SV{x[off[0] + d], x[off[1] + d], x[off[2] + d], x[off[3] + d],
                             x[off[4] + d], x[off[5] + d], x[off[6] + d], x[off[7] + d]};
}

// A unit of U outputs by the gather table, eight at a time (the last group overlaps its
// predecessor); a unit of fewer than eight outputs goes through zero-padded copies.
template <typename S>
void fwd_unit_gather(const S* x, S* o, uint8_t* cd, const Gather& gt, int64_t U) {
  const int64_t* off = gt.off.data();
  const int64_t dc = gt.dc, dr = gt.dr;
  if (U < kLanes) {
    using SV = typename Vec<S>::SV;
    SV w[4] = {};
    for (int64_t q = 0; q < U; ++q) {
      const S* p = x + off[q];
      w[0][q] = p[0], w[1][q] = p[dc], w[2][q] = p[dr], w[3][q] = p[dr + dc];
    }
    S ob[kLanes];
    uint8_t cb[kLanes];
    pool8<S>(w[0], w[1], w[2], w[3], ob, cb);
    std::copy(ob, ob + U, o);
    std::copy(cb, cb + U, cd);
    return;
  }
  groups_of_8(U, [&](int64_t m0) {
    const int64_t* om = off + m0;
    pool8<S>(gather8(x, om, 0), gather8(x, om, dc), gather8(x, om, dr), gather8(x, om, dr + dc), o + m0, cd + m0);
  });
}

#else  // one window at a time

template <typename S>
inline void pool_window(S a, S b, S c, S d, S* out, uint8_t* code) {
  using E = Elem<S>;
  using A = typename E::A;
  const A fa = E::get(a), fb = E::get(b), fc = E::get(c), fd = E::get(d);
  S best = fa < A(0) ? S(0) : a;
  A fbest = fa < A(0) ? A(0) : fa;
  uint8_t k = (fa > A(0) || fa != fa) ? uint8_t(0) : kNoGrad;
  if (fb > fbest || fb != fb) best = b, fbest = fb, k = 1;
  if (fc > fbest || fc != fc) best = c, fbest = fc, k = 2;
  if (fd > fbest || fd != fd) best = d, k = 3;
  *out = best;
  *code = k;
}

template <typename S>
void fwd_unit_gather(const S* x, S* o, uint8_t* cd, const Gather& gt, int64_t U) {
  for (int64_t m = 0; m < U; ++m) {
    const S* p = x + gt.off[m];
    pool_window(p[0], p[gt.dc], p[gt.dr], p[gt.dr + gt.dc], o + m, cd + m);
  }
}

#endif  // DDFAST_RMP_SIMD

// NCHW: planes = N·C. Rows (plane, i) when a row holds ≥ 8 windows (SIMD builds), else planes.
template <typename S>
void fwd_nchw(const S* x, S* out, uint8_t* code, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
#if DDFAST_RMP_SIMD
  if (OW >= kLanes) {
    at::parallel_for(0, planes * OH, grain_for(2 * W), [=](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const S* x0 = x + ((r / OH) * H + 2 * (r % OH)) * W;
        fwd_row_deint<S>(x0, x0 + W, out + r * OW, code + r * OW, OW);
      }
    });
    return;
  }
#endif
  const Gather gt = nchw_plane_gather(H, W);
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      fwd_unit_gather<S>(x + p * H * W, out + p * OH * OW, code + p * OH * OW, gt, OH * OW);
  });
}

// channels_last: rows (n, i).
template <typename S>
void fwd_nhwc(const S* x, S* out, uint8_t* code, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  const bool by8 = DDFAST_RMP_SIMD && C % kLanes == 0;
  const Gather gt = by8 ? Gather{} : nhwc_row_gather(C, W);
  at::parallel_for(0, N * OH, grain_for(2 * W * C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const S* x0 = x + ((r / OH) * H + 2 * (r % OH)) * W * C;
#if DDFAST_RMP_SIMD
      if (by8) {
        fwd_row_nhwc8<S>(x0, x0 + W * C, out + r * OW * C, code + r * OW * C, OW, C);
        continue;
      }
#endif
      fwd_unit_gather<S>(x0, out + r * OW * C, code + r * OW * C, gt, OW * C);
    }
  });
}

// Backward: every input element written (the last row / column of an odd H / W: zeros).
template <typename S>
void bwd_nchw(const S* g, const uint8_t* code, S* gi, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
#if DDFAST_RMP_SIMD
  if (OW >= kLanes) {
    auto edges = [=](S* plane) {
      if (W & 1)
        for (int64_t h = 0; h < 2 * OH; ++h) plane[h * W + W - 1] = S(0);
      if (H & 1) std::fill(plane + (H - 1) * W, plane + H * W, S(0));
    };
    at::parallel_for(0, planes * OH, grain_for(2 * W), [=](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / OH, i = r % OH;
        S* y0 = gi + (p * H + 2 * i) * W;
        bwd_row_deint<S>(g + r * OW, code + r * OW, y0, y0 + W, OW);
        if (i == OH - 1) edges(gi + p * H * W);
      }
    });
    return;
  }
#endif
  const Gather gt = nchw_plane_gather(H, W);
  at::parallel_for(0, planes, grain_for(H * W), [&](int64_t p0, int64_t p1) {
    std::fill(gi + p0 * H * W, gi + p1 * H * W, S(0));
    for (int64_t p = p0; p < p1; ++p)
      bwd_unit_scatter<S>(g + p * OH * OW, code + p * OH * OW, gi + p * H * W, gt, OH * OW);
  });
}

template <typename S>
void bwd_nhwc(const S* g, const uint8_t* code, S* gi, int64_t N, int64_t C, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  const bool by8 = DDFAST_RMP_SIMD && C % kLanes == 0;
  const Gather gt = by8 ? Gather{} : nhwc_row_gather(C, W);
  at::parallel_for(0, N * OH, grain_for(2 * W * C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % OH;
      S* y0 = gi + ((r / OH) * H + 2 * i) * W * C;
      S* y1 = y0 + W * C;
#if DDFAST_RMP_SIMD
      if (by8) {
        bwd_row_nhwc8<S>(g + r * OW * C, code + r * OW * C, y0, y1, OW, C);
      } else
#endif
      {
        std::fill(y0, y1 + W * C, S(0));
        bwd_unit_scatter<S>(g + r * OW * C, code + r * OW * C, y0, gt, OW * C);
      }
      if (W & 1) {
        std::fill(y0 + (W - 1) * C, y0 + W * C, S(0));
        std::fill(y1 + (W - 1) * C, y1 + W * C, S(0));
      }
      if ((H & 1) && i == OH - 1) std::fill(y1 + W * C, y1 + 2 * W * C, S(0));
    }
  });
}

// f.template operator()<S>(ptr cast) for the three dtypes (bfloat16 as its bits).
template <typename F>
void dispatch_storage(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(uint16_t{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, float64 or bfloat16, got ", t);
  }
}

template <typename S>
S* data_as(const at::Tensor& t) {
  return reinterpret_cast<S*>(t.data_ptr());
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-D tensor [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "x: expected float32, float64 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "x: expected H, W ≥ 2 for a 2×2 pool, got shape ", x.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> relu_max_pool2d_fwd(const at::Tensor& x_in) {
  check_input(x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const bool cl = !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, x.options().memory_format(fmt));
  at::Tensor code = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte).memory_format(fmt));
  if (out.numel() == 0) return {out, code};
  dispatch_storage(x.scalar_type(), "x", [&](auto tag) {
    using S = decltype(tag);
    if (cl)
      fwd_nhwc<S>(data_as<const S>(x), data_as<S>(out), code.data_ptr<uint8_t>(), N, C, H, W);
    else
      fwd_nchw<S>(data_as<const S>(x), data_as<S>(out), code.data_ptr<uint8_t>(), N * C, H, W);
  });
  return {out, code};
}

at::Tensor relu_max_pool2d_bwd(const at::Tensor& grad_out, const at::Tensor& code_in, int64_t H, int64_t W,
                               bool channels_last) {
  TORCH_CHECK(code_in.dim() == 4 && code_in.scalar_type() == at::kByte,
              "code: expected the uint8 [N, C, OH, OW] codes of relu_max_pool2d_fwd, got ", code_in.scalar_type(),
              " of shape ", code_in.sizes());
  TORCH_CHECK(H >= 2 && W >= 2 && code_in.size(2) == H / 2 && code_in.size(3) == W / 2, "H, W: expected the input size (",
              "⌊H/2⌋, ⌊W/2⌋ = ", code_in.size(2), ", ", code_in.size(3), "), got ", H, ", ", W);
  TORCH_CHECK(grad_out.sizes() == code_in.sizes(), "grad_out: expected shape ", code_in.sizes(), " (the output's), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device().is_cpu() && code_in.device().is_cpu(), "grad_out, code: expected CPU tensors, got ",
              grad_out.device(), ", ", code_in.device());
  const int64_t N = code_in.size(0), C = code_in.size(1);
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor g = grad_out.contiguous(fmt), code = code_in.contiguous(fmt);
  at::Tensor gi = at::empty({N, C, H, W}, g.options().memory_format(fmt));
  if (gi.numel() == 0) return gi;
  dispatch_storage(g.scalar_type(), "grad_out", [&](auto tag) {
    using S = decltype(tag);
    if (channels_last)
      bwd_nhwc<S>(data_as<const S>(g), code.data_ptr<uint8_t>(), data_as<S>(gi), N, C, H, W);
    else
      bwd_nchw<S>(data_as<const S>(g), code.data_ptr<uint8_t>(), data_as<S>(gi), N * C, H, W);
  });
  return gi;
}

}  // namespace cpu
}  // namespace ddfast
