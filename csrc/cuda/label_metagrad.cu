// Fused residuals of the per-example label meta-gradient on CUDA, max-subtracted softmax, warp-shuffle
// reductions.
//
//   fwd: p = softmax(Z), s_i = Σ_c Y_ic, R = scale·(p·s − Y), loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic
//        one warp per row, kRowsPerBlock rows (warps) per block.
//   bwd: v = H GWᵀ + gb + Vb, p = softmax(Z), out = scale·(v − (p·v)1)
//        one block per kBwdRows rows. H is read once: 64 of its columns at a time are staged in shared
//        memory for the block's rows, and every 32-class tile of GW is staged against them; each
//        thread accumulates its (row, class) entries of v into the output rows (which start as
//        gb + Vb). Then one warp per row turns v into the residual in place. No N×C intermediate
//        besides the output.
//
// Seed: label-distillation §3 eq. 1, Appendix B.
// Equivalent PyTorch: ddfast.reference.label_metagrad (soft_cross_entropy, head_residual_ref).
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile_label_metagrad.py) the kernels compile
// as host C++ and run under tests/cuda_host_emulation_runtime.h (cooperative threads, warps of 32).
#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>

#include <cmath>
#endif

#include "label_metagrad.h"

namespace ddfast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;   // fwd: warps (rows) per block
constexpr int kBwdThreads = 256;   // bwd: threads per block
constexpr int kBwdWarps = kBwdThreads / kWarp;
constexpr int kBwdRows = 16;       // bwd: rows of H per block
constexpr int kBwdClasses = 32;    // bwd: classes per staged tile of GW (one per lane)
constexpr int kBwdDepth = 64;      // bwd: columns of H and GW staged per step
constexpr int kBwdRowsPerWarp = kBwdRows / kBwdWarps;
static_assert(kBwdClasses == kWarp && kBwdRows % kBwdWarps == 0, "bwd tile shape");

enum LabelMetagradError : int {
  kLmgOk = 0,
  kLmgTooLarge = 1,
  kLmgLaunch = 2,
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Row of this warp (rows beyond N: the whole warp returns, so shuffles stay full-warp).
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
}

template <typename T>
__global__ void label_metagrad_fwd_kernel(const T* __restrict__ Z, const T* __restrict__ Y,
                                          T* __restrict__ R, T* __restrict__ loss, int64_t N, int C,
                                          T scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = warp_row();
  if (row >= N) return;
  const T* z = Z + row * C;
  const T* y = Y + row * C;
  T* r = R + row * C;

  T m = -static_cast<T>(INFINITY);
  for (int c = lane; c < C; c += kWarp) m = z[c] > m ? z[c] : m;
  m = warp_max(m);
  T S = T(0), s = T(0);
  for (int c = lane; c < C; c += kWarp) {
    S += exp(z[c] - m);
    s += y[c];
  }
  S = warp_sum(S);
  s = warp_sum(s);
  const T logS = log(S), ps = s / S;
  T ce = T(0);
  for (int c = lane; c < C; c += kWarp) {
    const T zc = z[c] - m, yc = y[c];
    ce -= yc * (zc - logS);
    r[c] = scale * (exp(zc) * ps - yc);
  }
  ce = warp_sum(ce);
  if (lane == 0) loss[row] = ce;
}

// out doubles as the accumulator of v: entry (row0 + warp + 8q, c0 + lane) belongs to one thread
// until the barrier before the epilogue.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
label_metagrad_bwd_kernel(const T* __restrict__ H, const T* __restrict__ GW, const T* __restrict__ gb,
                          const T* __restrict__ Vb, const T* __restrict__ Z, T* __restrict__ out, int64_t N,
                          int64_t d, int C, T scale) {
  __shared__ T Hs[kBwdRows][kBwdDepth + 1];     // odd row stride: Gs[lane][k] hits 32 banks
  __shared__ T Gs[kBwdClasses][kBwdDepth + 1];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int rows = N - row0 < kBwdRows ? static_cast<int>(N - row0) : kBwdRows;

  for (int c0 = 0; c0 < C; c0 += kBwdClasses) {
    const int c = c0 + lane;
    if (c >= C) continue;
#pragma unroll
    for (int q = 0; q < kBwdRowsPerWarp; ++q) {
      const int r = warp + kBwdWarps * q;
      if (r < rows) {
        const int64_t o = (row0 + r) * C + c;
        out[o] = (gb != nullptr ? gb[c] : T(0)) + (Vb != nullptr ? Vb[o] : T(0));
      }
    }
  }
  for (int64_t k0 = 0; k0 < d; k0 += kBwdDepth) {
    const int kc = d - k0 < kBwdDepth ? static_cast<int>(d - k0) : kBwdDepth;
    __syncthreads();  // the previous Hs and Gs are consumed
    for (int e = tid; e < kBwdRows * kc; e += kBwdThreads) {
      const int r = e / kc, k = e % kc;
      Hs[r][k] = r < rows ? H[(row0 + r) * d + k0 + k] : T(0);
    }
    for (int c0 = 0; c0 < C; c0 += kBwdClasses) {
      const int cc = C - c0 < kBwdClasses ? C - c0 : kBwdClasses;
      if (c0 > 0) __syncthreads();  // the previous Gs is consumed
      for (int e = tid; e < cc * kc; e += kBwdThreads) {
        const int c = e / kc, k = e % kc;
        Gs[c][k] = GW[static_cast<int64_t>(c0 + c) * d + k0 + k];
      }
      __syncthreads();
      if (lane < cc) {
        T acc[kBwdRowsPerWarp];
#pragma unroll
        for (int q = 0; q < kBwdRowsPerWarp; ++q) acc[q] = T(0);
        for (int k = 0; k < kc; ++k) {
          const T g = Gs[lane][k];
#pragma unroll
          for (int q = 0; q < kBwdRowsPerWarp; ++q) acc[q] += Hs[warp + kBwdWarps * q][k] * g;
        }
#pragma unroll
        for (int q = 0; q < kBwdRowsPerWarp; ++q) {
          const int r = warp + kBwdWarps * q;
          if (r < rows) out[(row0 + r) * C + c0 + lane] += acc[q];
        }
      }
    }
  }
  __syncthreads();  // v of every row is complete and visible to the block

  for (int r = warp; r < rows; r += kBwdWarps) {
    const int64_t row = row0 + r;
    const T* z = Z + row * C;
    T* o = out + row * C;
    T m = -static_cast<T>(INFINITY);
    for (int c = lane; c < C; c += kWarp) m = z[c] > m ? z[c] : m;
    m = warp_max(m);
    T S = T(0), pv = T(0);
    for (int c = lane; c < C; c += kWarp) {
      const T e = exp(z[c] - m);
      S += e;
      pv += e * o[c];
    }
    S = warp_sum(S);
    pv = warp_sum(pv) / S;
    for (int c = lane; c < C; c += kWarp) o[c] = scale * (o[c] - pv);
  }
}

// Grids of the launchers (also used by the host emulation).
inline unsigned label_metagrad_fwd_blocks(int64_t N) {
  return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock);
}
inline unsigned label_metagrad_bwd_blocks(int64_t N) { return static_cast<unsigned>((N + kBwdRows - 1) / kBwdRows); }

}  // namespace

#ifndef DDFAST_HOST_EMULATION

const char* label_metagrad_error_string(int code) {
  switch (code) {
    case kLmgOk: return "ok";
    case kLmgTooLarge: return "number of classes C exceeds 2^31 - 1 or a size is negative";
    case kLmgLaunch: return "kernel launch failed";
    default: return "unknown error";
  }
}

namespace {

bool sizes_ok(int64_t N, int64_t d, int64_t C) {
  return N >= 0 && d >= 0 && C >= 0 && C <= 0x7fffffff && (N + kRowsPerBlock - 1) / kRowsPerBlock <= 0x7fffffff;
}

}  // namespace

template <typename T>
int label_metagrad_fwd_launch(const T* Z, const T* Y, T* R, T* loss_rows, int64_t N, int64_t C,
                              double scale, cudaStream_t stream) {
  if (!sizes_ok(N, 0, C)) return kLmgTooLarge;
  if (N == 0) return kLmgOk;
  label_metagrad_fwd_kernel<T><<<label_metagrad_fwd_blocks(N), kRowsPerBlock * kWarp, 0, stream>>>(
      Z, Y, R, loss_rows, N, static_cast<int>(C), static_cast<T>(scale));
  return cudaGetLastError() == cudaSuccess ? kLmgOk : kLmgLaunch;
}

template <typename T>
int label_metagrad_bwd_launch(const T* H, const T* GW, const T* gb, const T* Vb, const T* Z, T* out,
                              int64_t N, int64_t d, int64_t C, double scale, cudaStream_t stream) {
  if (!sizes_ok(N, d, C)) return kLmgTooLarge;
  if (N == 0 || C == 0) return kLmgOk;
  label_metagrad_bwd_kernel<T><<<label_metagrad_bwd_blocks(N), kBwdThreads, 0, stream>>>(
      H, GW, gb, Vb, Z, out, N, d, static_cast<int>(C), static_cast<T>(scale));
  return cudaGetLastError() == cudaSuccess ? kLmgOk : kLmgLaunch;
}

template int label_metagrad_fwd_launch<float>(const float*, const float*, float*, float*, int64_t, int64_t,
                                              double, cudaStream_t);
template int label_metagrad_fwd_launch<double>(const double*, const double*, double*, double*, int64_t,
                                               int64_t, double, cudaStream_t);
template int label_metagrad_bwd_launch<float>(const float*, const float*, const float*, const float*,
                                              const float*, float*, int64_t, int64_t, int64_t, double,
                                              cudaStream_t);
template int label_metagrad_bwd_launch<double>(const double*, const double*, const double*, const double*,
                                               const double*, double*, int64_t, int64_t, int64_t, double,
                                               cudaStream_t);

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
