// Ghost products of per-example layer gradients on CUDA: every product is formed in 32×32 tiles staged
// through shared memory (two 32×33 tiles, odd row stride), 256 threads per block, each thread owning
// four entries (rows ty, ty+8, ty+16, ty+24 of a tile, column tx = lane) accumulated in registers, and
// one deterministic block reduction per output.
//
//   bilinear:    out[n]    = Σ_p G[n,p]ᵀ V A[n,p]           one block per example: tiles of
//                                                          T = G_n V (P × K, contraction over O) times A_n
//   norms ghost: out[n]    = Σ (A_n A_nᵀ) ⊙ (G_n G_nᵀ)        one block per example: the upper-triangular
//                                                          32×32 tiles of both P × P Grams (weight 2 off
//                                                          the diagonal)
//   norms mat.:  out[n]    = ‖G_nᵀ A_n‖_F²                  one block per example: tiles of W_n (O × K,
//                                                          contraction over P), squared
//   inner ghost: out[n, m] = Σ (A1_n A2_mᵀ) ⊙ (G1_n G2_mᵀ)    one block per pair, all P1 × P2 tiles
//   materialize: W[i]      = G_{n0+i}ᵀ A_{n0+i}              one block per 32×32 tile of W_i
//
// Nothing of size N·P·K or N·O·K is written except the caller's W block of the materialized inner
// product (which the caller multiplies with a GEMM). Work per block grows with P² (ghost) or O·K·P
// (materialized); the caller chooses between them (ghost when 2P² < O·K, opacus' rule).
// Seed: ghost clipping (Goodfellow 2015; Li et al. 2022; opacus).
// Equivalent PyTorch: ddfast.reference.ghost_products (ghost_bilinear_ref, ghost_norms_ref, ghost_inner_ref).
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile_ghost_products.py) the kernels compile as
// host C++ and run under tests/cuda_host_emulation_runtime.h (cooperative threads, warps of 32, the
// launchers' grids).
#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>
#endif

#include "ghost_products.h"

namespace ddfast {
namespace cuda {
namespace {

constexpr int kGpThreads = 256;
constexpr int kGpTile = 32;                         // tile edge = warp width
constexpr int kGpRows = kGpThreads / kGpTile;       // 8: thread rows of a tile
constexpr int kGpPer = kGpTile / kGpRows;           // 4 entries per thread
constexpr int kGpLd = kGpTile + 1;                  // odd row stride of the staged tiles
constexpr unsigned kGpFull = 0xffffffffu;

enum GhostProductsError : int {
  kGpOk = 0,
  kGpTooLarge = 1,
  kGpLaunch = 2,
};

template <typename T>
struct GpTiles {
  T a[kGpTile * kGpLd];
  T b[kGpTile * kGpLd];
  T red[kGpRows];
};

__device__ __forceinline__ int64_t gp_min(int64_t a, int64_t b) { return a < b ? a : b; }

// acc[s] += Σ_k X[(p0 + ty + 8s)·K + k] · Y[(q0 + tx)·K + k]: a 32×32 tile of X Yᵀ (rows of X, Y of
// length K; np, nq rows valid from p0, q0). Out-of-range rows are staged as zeros.
template <typename T>
__device__ void gp_gram_tile(const T* __restrict__ X, int64_t p0, int64_t np, const T* __restrict__ Y, int64_t q0,
                             int64_t nq, int64_t K, GpTiles<T>& sh, T (&acc)[kGpPer]) {
  const int tid = threadIdx.x, tx = tid % kGpTile, ty = tid / kGpTile;
  for (int64_t k0 = 0; k0 < K; k0 += kGpTile) {
    const int kc = static_cast<int>(gp_min(kGpTile, K - k0));
    __syncthreads();  // the previous tiles are consumed
    for (int e = tid; e < kGpTile * kGpTile; e += kGpThreads) {
      const int r = e / kGpTile, k = e % kGpTile;
      const bool in = k < kc;
      sh.a[r * kGpLd + k] = in && r < np ? X[(p0 + r) * K + k0 + k] : T(0);
      sh.b[r * kGpLd + k] = in && r < nq ? Y[(q0 + r) * K + k0 + k] : T(0);
    }
    __syncthreads();
    for (int k = 0; k < kc; ++k) {
      const T y = sh.b[tx * kGpLd + k];
#pragma unroll
      for (int s = 0; s < kGpPer; ++s) acc[s] += sh.a[(ty + kGpRows * s) * kGpLd + k] * y;
    }
  }
}

// acc[s] += Σ_p G[p·O + o0 + ty + 8s] · A[p·K + k0 + tx], p < P: a 32×32 tile (o0, k0) of Gᵀ A.
template <typename T>
__device__ void gp_outer_tile(const T* __restrict__ G, const T* __restrict__ A, int64_t P, int64_t O, int64_t K,
                              int64_t o0, int64_t k0, GpTiles<T>& sh, T (&acc)[kGpPer]) {
  const int tid = threadIdx.x, tx = tid % kGpTile, ty = tid / kGpTile;
  for (int64_t p0 = 0; p0 < P; p0 += kGpTile) {
    const int pc = static_cast<int>(gp_min(kGpTile, P - p0));
    __syncthreads();
    for (int e = tid; e < kGpTile * kGpTile; e += kGpThreads) {
      const int r = e / kGpTile, c = e % kGpTile;
      const bool in = r < pc;
      sh.a[r * kGpLd + c] = in && o0 + c < O ? G[(p0 + r) * O + o0 + c] : T(0);
      sh.b[r * kGpLd + c] = in && k0 + c < K ? A[(p0 + r) * K + k0 + c] : T(0);
    }
    __syncthreads();
    for (int r = 0; r < pc; ++r) {
      const T a = sh.b[r * kGpLd + tx];
#pragma unroll
      for (int s = 0; s < kGpPer; ++s) acc[s] += sh.a[r * kGpLd + ty + kGpRows * s] * a;
    }
  }
}

// Sum over the block (every thread passes its part); the result is valid in thread 0.
template <typename T>
__device__ T gp_block_sum(T v, GpTiles<T>& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kGpFull, v, o);
  if (threadIdx.x % 32 == 0) sh.red[threadIdx.x / 32] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kGpRows; ++w) total += sh.red[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kGpThreads)
ghost_bilinear_fwd_kernel(const T* __restrict__ A, const T* __restrict__ G, const T* __restrict__ V,
                          T* __restrict__ out, int64_t N, int64_t P, int64_t K, int64_t O) {
  __shared__ GpTiles<T> sh;
  const int tid = threadIdx.x, tx = tid % kGpTile, ty = tid / kGpTile;
  const int64_t n = blockIdx.x;
  const T* a = A + n * P * K;
  const T* g = G + n * P * O;
  T part = T(0);
  for (int64_t p0 = 0; p0 < P; p0 += kGpTile)
    for (int64_t k0 = 0; k0 < K; k0 += kGpTile) {
      // t[s] = (G_n V)[p0 + ty + 8s, k0 + tx]
      T t[kGpPer] = {};
      for (int64_t o0 = 0; o0 < O; o0 += kGpTile) {
        const int oc = static_cast<int>(gp_min(kGpTile, O - o0));
        __syncthreads();
        for (int e = tid; e < kGpTile * kGpTile; e += kGpThreads) {
          const int r = e / kGpTile, c = e % kGpTile;
          sh.a[r * kGpLd + c] = c < oc && p0 + r < P ? g[(p0 + r) * O + o0 + c] : T(0);   // G[p][o]
          sh.b[r * kGpLd + c] = r < oc && k0 + c < K ? V[(o0 + r) * K + k0 + c] : T(0);   // V[o][k]
        }
        __syncthreads();
        for (int o = 0; o < oc; ++o) {
          const T v = sh.b[o * kGpLd + tx];
#pragma unroll
          for (int s = 0; s < kGpPer; ++s) t[s] += sh.a[(ty + kGpRows * s) * kGpLd + o] * v;
        }
      }
      if (k0 + tx < K)
#pragma unroll
        for (int s = 0; s < kGpPer; ++s) {
          const int64_t p = p0 + ty + kGpRows * s;
          if (p < P) part += t[s] * a[p * K + k0 + tx];
        }
    }
  const T total = gp_block_sum(part, sh);
  if (tid == 0) out[n] = total;
}

template <typename T>
__global__ void __launch_bounds__(kGpThreads)
ghost_norms_fwd_kernel(const T* __restrict__ A, const T* __restrict__ G, T* __restrict__ out, int64_t N,
                       int64_t P, int64_t K, int64_t O, bool ghost) {
  __shared__ GpTiles<T> sh;
  const int tid = threadIdx.x, tx = tid % kGpTile, ty = tid / kGpTile;
  const int64_t n = blockIdx.x;
  const T* a = A + n * P * K;
  const T* g = G + n * P * O;
  T part = T(0);
  if (ghost) {
    for (int64_t p0 = 0; p0 < P; p0 += kGpTile)
      for (int64_t q0 = p0; q0 < P; q0 += kGpTile) {
        T ga[kGpPer] = {}, gg[kGpPer] = {};
        const int64_t np = gp_min(kGpTile, P - p0), nq = gp_min(kGpTile, P - q0);
        gp_gram_tile(a, p0, np, a, q0, nq, K, sh, ga);
        gp_gram_tile(g, p0, np, g, q0, nq, O, sh, gg);
#pragma unroll
        for (int s = 0; s < kGpPer; ++s) {
          const int i = ty + kGpRows * s;  // p = p0 + i, q = q0 + tx
          const T w = q0 > p0 ? T(2) : (tx > i ? T(2) : (tx == i ? T(1) : T(0)));
          part += w * ga[s] * gg[s];
        }
      }
  } else {
    for (int64_t o0 = 0; o0 < O; o0 += kGpTile)
      for (int64_t k0 = 0; k0 < K; k0 += kGpTile) {
        T m[kGpPer] = {};
        gp_outer_tile(g, a, P, O, K, o0, k0, sh, m);
#pragma unroll
        for (int s = 0; s < kGpPer; ++s) part += m[s] * m[s];
      }
  }
  const T total = gp_block_sum(part, sh);
  if (tid == 0) out[n] = total;
}

template <typename T>
__global__ void __launch_bounds__(kGpThreads)
ghost_inner_fwd_kernel(const T* __restrict__ A1, const T* __restrict__ G1, const T* __restrict__ A2,
                       const T* __restrict__ G2, T* __restrict__ out, int64_t N1, int64_t P1, int64_t N2,
                       int64_t P2, int64_t K, int64_t O) {
  __shared__ GpTiles<T> sh;
  const int64_t idx = blockIdx.x;
  const int64_t n = idx / N2, m = idx % N2;
  const T* a1 = A1 + n * P1 * K;
  const T* g1 = G1 + n * P1 * O;
  const T* a2 = A2 + m * P2 * K;
  const T* g2 = G2 + m * P2 * O;
  T part = T(0);
  for (int64_t p0 = 0; p0 < P1; p0 += kGpTile)
    for (int64_t q0 = 0; q0 < P2; q0 += kGpTile) {
      T ga[kGpPer] = {}, gg[kGpPer] = {};
      const int64_t np = gp_min(kGpTile, P1 - p0), nq = gp_min(kGpTile, P2 - q0);
      gp_gram_tile(a1, p0, np, a2, q0, nq, K, sh, ga);
      gp_gram_tile(g1, p0, np, g2, q0, nq, O, sh, gg);
#pragma unroll
      for (int s = 0; s < kGpPer; ++s) part += ga[s] * gg[s];
    }
  const T total = gp_block_sum(part, sh);
  if (threadIdx.x == 0) out[idx] = total;
}

template <typename T>
__global__ void __launch_bounds__(kGpThreads)
ghost_materialize_kernel(const T* __restrict__ A, const T* __restrict__ G, T* __restrict__ W, int64_t n0,
                         int64_t NB, int64_t P, int64_t K, int64_t O) {
  __shared__ GpTiles<T> sh;
  const int tx = threadIdx.x % kGpTile, ty = threadIdx.x / kGpTile;
  const int64_t tiles_k = (K + kGpTile - 1) / kGpTile, tiles_o = (O + kGpTile - 1) / kGpTile;
  const int64_t idx = blockIdx.x;
  const int64_t i = idx / (tiles_o * tiles_k), rest = idx % (tiles_o * tiles_k);
  const int64_t o0 = (rest / tiles_k) * kGpTile, k0 = (rest % tiles_k) * kGpTile;
  T m[kGpPer] = {};
  gp_outer_tile(G + (n0 + i) * P * O, A + (n0 + i) * P * K, P, O, K, o0, k0, sh, m);
  if (k0 + tx < K)
#pragma unroll
    for (int s = 0; s < kGpPer; ++s) {
      const int64_t o = o0 + ty + kGpRows * s;
      if (o < O) W[(i * O + o) * K + k0 + tx] = m[s];
    }
}

// Grids of the launchers (also used by the host emulation); 0 when a count is not positive.
inline int64_t ghost_per_example_blocks(int64_t N) { return N; }
inline int64_t ghost_inner_blocks(int64_t N1, int64_t N2) { return N1 * N2; }
inline int64_t ghost_materialize_blocks(int64_t NB, int64_t O, int64_t K) {
  return NB * ((O + kGpTile - 1) / kGpTile) * ((K + kGpTile - 1) / kGpTile);
}

}  // namespace

#ifndef DDFAST_HOST_EMULATION

const char* ghost_products_error_string(int code) {
  switch (code) {
    case kGpOk: return "ok";
    case kGpTooLarge:
      return "too many blocks for one launch (examples, pairs or 32×32 tiles of W exceed 2^31 - 1) or a size is "
             "negative";
    case kGpLaunch: return "kernel launch failed";
    default: return "unknown error";
  }
}

namespace {

// The grid for `count` blocks, or 0 when it would be too large.
int64_t gp_blocks(int64_t count) { return count > 0 && count <= 0x7fffffff ? count : 0; }

bool gp_nonneg(int64_t a, int64_t b, int64_t c, int64_t d) { return a >= 0 && b >= 0 && c >= 0 && d >= 0; }

int gp_status() { return cudaGetLastError() == cudaSuccess ? kGpOk : kGpLaunch; }

}  // namespace

template <typename T>
int ghost_bilinear_fwd_launch(const T* A, const T* G, const T* V, T* out, int64_t N, int64_t P, int64_t K,
                              int64_t O, cudaStream_t stream) {
  if (!gp_nonneg(N, P, K, O)) return kGpTooLarge;
  if (N == 0) return kGpOk;
  const int64_t blocks = gp_blocks(ghost_per_example_blocks(N));
  if (blocks == 0) return kGpTooLarge;
  ghost_bilinear_fwd_kernel<T><<<static_cast<unsigned>(blocks), kGpThreads, 0, stream>>>(
      A, G, V, out, N, P, K, O);
  return gp_status();
}

template <typename T>
int ghost_norms_fwd_launch(const T* A, const T* G, T* out, int64_t N, int64_t P, int64_t K, int64_t O, bool ghost,
                           cudaStream_t stream) {
  if (!gp_nonneg(N, P, K, O)) return kGpTooLarge;
  if (N == 0) return kGpOk;
  const int64_t blocks = gp_blocks(ghost_per_example_blocks(N));
  if (blocks == 0) return kGpTooLarge;
  ghost_norms_fwd_kernel<T><<<static_cast<unsigned>(blocks), kGpThreads, 0, stream>>>(
      A, G, out, N, P, K, O, ghost);
  return gp_status();
}

template <typename T>
int ghost_inner_fwd_launch(const T* A1, const T* G1, const T* A2, const T* G2, T* out, int64_t N1, int64_t P1,
                           int64_t N2, int64_t P2, int64_t K, int64_t O, cudaStream_t stream) {
  if (!gp_nonneg(N1, P1, N2, P2) || !gp_nonneg(K, O, 0, 0)) return kGpTooLarge;
  if (N1 == 0 || N2 == 0) return kGpOk;
  if (N1 > (int64_t(1) << 62) / N2) return kGpTooLarge;
  const int64_t blocks = gp_blocks(ghost_inner_blocks(N1, N2));
  if (blocks == 0) return kGpTooLarge;
  ghost_inner_fwd_kernel<T><<<static_cast<unsigned>(blocks), kGpThreads, 0, stream>>>(
      A1, G1, A2, G2, out, N1, P1, N2, P2, K, O);
  return gp_status();
}

template <typename T>
int ghost_materialize_launch(const T* A, const T* G, T* W, int64_t n0, int64_t NB, int64_t P, int64_t K, int64_t O,
                             cudaStream_t stream) {
  if (!gp_nonneg(n0, NB, P, K) || O < 0) return kGpTooLarge;
  if (NB == 0 || O == 0) return kGpOk;
  if (K == 0) return kGpOk;
  if (O > 0x7fffffff || K > 0x7fffffff) return kGpTooLarge;
  const int64_t tiles = ((O + kGpTile - 1) / kGpTile) * ((K + kGpTile - 1) / kGpTile);
  if (NB > 0x7fffffff / tiles) return kGpTooLarge;
  const int64_t blocks = gp_blocks(ghost_materialize_blocks(NB, O, K));
  if (blocks == 0) return kGpTooLarge;
  ghost_materialize_kernel<T><<<static_cast<unsigned>(blocks), kGpThreads, 0, stream>>>(
      A, G, W, n0, NB, P, K, O);
  return gp_status();
}

#define DDFAST_GP_INSTANTIATE(T)                                                                                  \
  template int ghost_bilinear_fwd_launch<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                            cudaStream_t);                                                        \
  template int ghost_norms_fwd_launch<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, bool,        \
                                         cudaStream_t);                                                           \
  template int ghost_inner_fwd_launch<T>(const T*, const T*, const T*, const T*, T*, int64_t, int64_t, int64_t,   \
                                         int64_t, int64_t, int64_t, cudaStream_t);                                \
  template int ghost_materialize_launch<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                           cudaStream_t);

DDFAST_GP_INSTANTIATE(float)
DDFAST_GP_INSTANTIATE(double)
#undef DDFAST_GP_INSTANTIATE

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
