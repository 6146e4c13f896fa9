// Batched small-n ridge solve on CUDA: one thread block (256 threads) per problem, factor in shared memory.
//
//   dual   : A = Z Zᵀ + μI (N×N), L = chol(A), α = A⁻¹Y, W = Zᵀα
//   primal : H = Zᵀ Z + μI (d×d), L = chol(H), W = H⁻¹ZᵀY
//
// Shared memory (ridge_solve_smem_bytes): the factor, n × (n|1) (an odd row stride: the column walks
// of the Cholesky and of the forward substitution hit 32 different banks), two n × 33 tiles and two
// 32 × 33 chunks. Nothing grows with C: right-hand sides go through in tiles of kRidgeColTile columns.
//   Gram      : Z staged through shared memory 32 columns (dual) / rows (primal) at a time; 64 × 64
//               blocks of the lower triangle, 4 × 4 register-blocked entries per thread.
//   Cholesky  : right-looking, one barrier per column (the scaling of column j is deferred to step j+1).
//   solves    : one warp per right-hand-side column, its n values in registers (4 rows per lane),
//               the pivot broadcast by a shuffle: no block barriers.
//   products  : ZᵀY, Wᵀ = αᵀZ, ZG, dZ in 32-wide chunks through shared memory, dZ accumulated in place
//               over column tiles (no global scratch).
//   W         : not computed when the caller passes W = null (dual form).
//
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
// Built with -DDDFAST_HOST_EMULATION (tests/test_cuda_compile.py) the kernels compile as host C++ and
// run under tests/cuda_host_emulation_runtime.h: 256 cooperative threads per block, shuffles and
// barriers as on the device.
#ifndef DDFAST_HOST_EMULATION
#include <cuda_runtime.h>

#define DDFAST_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <climits>

#include "ridge_solve.h"

namespace ddfast {
namespace cuda {
namespace {

constexpr int kMaxN = 128;
constexpr int kThreads = kRidgeThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kColTile = kRidgeColTile;
constexpr int kChunk = kRidgeChunk;
constexpr int kLdx = kColTile + 1;                   // odd row stride of the n × kColTile tiles
constexpr int kLaneRows = kMaxN / 32;                // rows of a column per lane in the solves
constexpr int kAcc = kMaxN * kColTile / kThreads;    // n × kColTile entries per thread
constexpr unsigned kFull = 0xffffffffu;

static_assert(kThreads % 32 == 0 && kChunk == 32 && kColTile == 32, "tile shapes assume 32-wide warps");

enum Error : int {
  kOk = 0,
  kTooLarge = 1,
  kSharedMemory = 2,
  kLaunch = 3,
};

template <typename T>
__device__ __forceinline__ bool finite_positive(T x) {
  return x > T(0) && x < T(INFINITY);
}

template <typename T>
struct Smem {
  T* L;   // n × ldl factor
  T* X;   // n × kLdx: right-hand-side tile (also the staging area of the Gram)
  T* X2;  // n × kLdx: second tile (α / W of the tile, or staged rows of Z)
  T* S1;  // kChunk × kLdx
  T* S2;  // kChunk × kLdx
  T* red; // kWarps
};

template <typename T>
__device__ __forceinline__ Smem<T> carve(unsigned char* raw, int n) {
  Smem<T> s;
  s.L = reinterpret_cast<T*>(raw);
  s.X = s.L + n * (n | 1);
  s.X2 = s.X + n * kLdx;
  s.S1 = s.X2 + n * kLdx;
  s.S2 = s.S1 + kChunk * kLdx;
  s.red = s.S2 + kChunk * kLdx;
  return s;
}

// Lower triangle of A = ZZᵀ + μI (dual) or ZᵀZ + μI (primal), row stride ldl. Zs: staging (≥ 33·n values).
// The n × n square goes in 64 × 64 blocks on or below the diagonal; a thread (ty, tx) of the 16 × 16
// grid accumulates the 4 × 4 entries (ty + 16a, tx + 16b) of a block in registers over 32-wide chunks
// of the contraction (Z's columns in the dual form, its rows in the primal form) staged in shared memory:
// 8 shared loads per 16 FMAs.
template <typename T>
__device__ void block_gram(const T* __restrict__ Z, int N, int d, bool primal, T mu, T* A, int ldl, T* Zs) {
  constexpr int kB = 64, kM = kB / 16;
  const int n = primal ? d : N, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int K = primal ? N : d;  // contraction length
  for (int ib = 0; ib < n; ib += kB)
    for (int jb = 0; jb <= ib; jb += kB) {
      T acc[kM][kM];
#pragma unroll
      for (int a = 0; a < kM; ++a)
#pragma unroll
        for (int c = 0; c < kM; ++c) acc[a][c] = T(0);
      for (int k0 = 0; k0 < K; k0 += kChunk) {
        const int kc = K - k0 < kChunk ? K - k0 : kChunk;
        __syncthreads();  // the previous chunk is consumed
        if (primal) {     // Zs[r·d + a] = Z[k0 + r, a]
          for (int e = tid; e < kc * d; e += kThreads) Zs[e] = Z[static_cast<int64_t>(k0) * d + e];
        } else {          // Zs[i·kLdx + k] = Z[i, k0 + k]
          for (int e = tid; e < N * kc; e += kThreads) {
            const int i = e / kc, k = e % kc;
            Zs[i * kLdx + k] = Z[static_cast<int64_t>(i) * d + k0 + k];
          }
        }
        __syncthreads();
        for (int k = 0; k < kc; ++k) {
          T u[kM], v[kM];
#pragma unroll
          for (int a = 0; a < kM; ++a) {
            const int i = ib + ty + 16 * a, j = jb + tx + 16 * a;
            u[a] = i < n ? (primal ? Zs[k * d + i] : Zs[i * kLdx + k]) : T(0);
            v[a] = j < n ? (primal ? Zs[k * d + j] : Zs[j * kLdx + k]) : T(0);
          }
#pragma unroll
          for (int a = 0; a < kM; ++a)
#pragma unroll
            for (int c = 0; c < kM; ++c) acc[a][c] += u[a] * v[c];
        }
      }
#pragma unroll
      for (int a = 0; a < kM; ++a)
#pragma unroll
        for (int c = 0; c < kM; ++c) {
          const int i = ib + ty + 16 * a, j = jb + tx + 16 * c;
          if (i < n && j <= i) A[i * ldl + j] = acc[a][c] + (i == j ? mu : T(0));
        }
    }
  __syncthreads();
}

// Right-looking in-place Cholesky of the n×n lower triangle of A (row stride ldl), one barrier per
// column: step j updates the trailing triangle with the unscaled column j (times 1/l_jj²) and scales
// column j−1, which step j does not read. Returns 0, or the 1-based order of the first non-positive
// pivot (every thread returns the same). The upper triangle is not touched.
template <typename T>
__device__ int block_cholesky(T* A, int n, int ldl) {
  const int tid = threadIdx.x;
  T prev_l = T(0), prev_inv = T(0);
  for (int j = 0; j < n; ++j) {
    const T s = A[j * ldl + j];
    if (j > 0) {
      for (int i = j + tid; i < n; i += kThreads) A[i * ldl + j - 1] *= prev_inv;
      if (tid == 0) A[(j - 1) * ldl + j - 1] = prev_l;
    }
    if (!finite_positive(s)) return j + 1;
    const T l = sqrt(s), inv = T(1) / l;
    const int m = n - j - 1;
    for (int e = tid; e < m * m; e += kThreads) {
      const int i = j + 1 + e / m, k = j + 1 + e % m;
      if (k <= i) A[i * ldl + k] -= (A[i * ldl + j] * inv) * (A[k * ldl + j] * inv);
    }
    prev_l = l;
    prev_inv = inv;
    __syncthreads();
  }
  if (tid == 0) A[(n - 1) * ldl + n - 1] = prev_l;
  __syncthreads();
  return 0;
}

// X (n × ct, row stride kLdx) ← (LLᵀ)⁻¹X. One warp per column; lane l holds rows l, l+32, l+64, l+96
// in registers; the pivot of row j is broadcast from its lane by a shuffle. Warp-synchronous only.
template <typename T>
__device__ void tile_cholesky_solve(const T* __restrict__ L, int ldl, T* X, int n, int ct) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int c = warp; c < ct; c += kWarps) {
    T x[kLaneRows];
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      const int i = lane + 32 * r;
      x[r] = i < n ? X[i * kLdx + c] : T(0);
    }
    // L y = x
#pragma unroll
    for (int r0 = 0; r0 < kLaneRows; ++r0) {
      const int jend = n - 32 * r0 < 32 ? n - 32 * r0 : 32;
      for (int jj = 0; jj < jend; ++jj) {
        const int j = 32 * r0 + jj;
        const T xj = __shfl_sync(kFull, x[r0], jj) / L[j * ldl + j];
        if (lane == jj) x[r0] = xj;
#pragma unroll
        for (int r = r0; r < kLaneRows; ++r) {
          const int i = lane + 32 * r;
          if (i > j && i < n) x[r] -= L[i * ldl + j] * xj;
        }
      }
    }
    // Lᵀ z = y
#pragma unroll
    for (int r0 = kLaneRows - 1; r0 >= 0; --r0) {
      const int jend = n - 32 * r0 < 32 ? n - 32 * r0 : 32;
      for (int jj = jend - 1; jj >= 0; --jj) {
        const int j = 32 * r0 + jj;
        const T xj = __shfl_sync(kFull, x[r0], jj) / L[j * ldl + j];
        if (lane == jj) x[r0] = xj;
#pragma unroll
        for (int r = 0; r <= r0; ++r) {
          const int i = lane + 32 * r;
          if (i < j) x[r] -= L[j * ldl + i] * xj;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      const int i = lane + 32 * r;
      if (i < n) X[i * kLdx + c] = x[r];
    }
  }
}

template <typename T>
__device__ T block_sum(T v, T* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
ridge_solve_fwd_kernel(const T* __restrict__ Zg, const T* __restrict__ Yg, const T* __restrict__ mu,
                       T* __restrict__ Wg, T* __restrict__ Lg, T* __restrict__ auxg, int* __restrict__ info,
                       int N, int d, int C, bool primal) {
  DDFAST_DYNAMIC_SHARED(smem_raw);
  const int n = primal ? d : N, ldl = n | 1, tid = threadIdx.x;
  const Smem<T> sm = carve<T>(smem_raw, n);
  const int64_t b = blockIdx.x;
  const T* Z = Zg + b * N * d;
  const T* Y = Yg + b * N * C;

  block_gram(Z, N, d, primal, mu[b], sm.L, ldl, sm.X);
  const int flag = block_cholesky(sm.L, n, ldl);
  if (tid == 0) info[b] = flag;
  if (flag) return;
  T* L = Lg + b * n * n;
  for (int e = tid; e < n * n; e += kThreads) {
    const int i = e / n, j = e % n;
    L[e] = j <= i ? sm.L[i * ldl + j] : T(0);
  }
  T* aux = auxg + b * n * C;
  T* W = Wg != nullptr ? Wg + b * d * C : nullptr;

  for (int c0 = 0; c0 < C; c0 += kColTile) {
    const int ct = C - c0 < kColTile ? C - c0 : kColTile;
    if (!primal) {
      for (int e = tid; e < N * ct; e += kThreads) {
        const int i = e / ct, c = e % ct;
        sm.X[i * kLdx + c] = Y[static_cast<int64_t>(i) * C + c0 + c];
      }
    } else {  // X = ZᵀY[:, tile]: rows of Z staged in X2 (kChunk × d), of Y in S1 (kChunk × ct)
      T acc[kAcc];
#pragma unroll
      for (int q = 0; q < kAcc; ++q) acc[q] = T(0);
      for (int r0 = 0; r0 < N; r0 += kChunk) {
        const int rc = N - r0 < kChunk ? N - r0 : kChunk;
        __syncthreads();
        for (int e = tid; e < rc * d; e += kThreads) sm.X2[e] = Z[static_cast<int64_t>(r0) * d + e];
        for (int e = tid; e < rc * ct; e += kThreads) {
          const int r = e / ct, c = e % ct;
          sm.S1[r * kLdx + c] = Y[static_cast<int64_t>(r0 + r) * C + c0 + c];
        }
        __syncthreads();
        for (int r = 0; r < rc; ++r) {
#pragma unroll
          for (int q = 0; q < kAcc; ++q) {
            const int e = tid + q * kThreads;
            if (e < d * ct) acc[q] += sm.X2[r * d + e / ct] * sm.S1[r * kLdx + e % ct];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kAcc; ++q) {
        const int e = tid + q * kThreads;
        if (e < d * ct) sm.X[(e / ct) * kLdx + e % ct] = acc[q];
      }
    }
    __syncthreads();
    tile_cholesky_solve(sm.L, ldl, sm.X, n, ct);
    __syncthreads();
    for (int e = tid; e < n * ct; e += kThreads) {
      const int i = e / ct, c = e % ct;
      aux[static_cast<int64_t>(i) * C + c0 + c] = sm.X[i * kLdx + c];
      if (primal && W != nullptr) W[static_cast<int64_t>(i) * C + c0 + c] = sm.X[i * kLdx + c];
    }
    if (!primal && W != nullptr) {  // W[k, tile] = Σ_i Z[i, k] α[i, tile], 32 rows k at a time via S1
      const int lane = tid % 32, warp = tid / 32;
      for (int k0 = 0; k0 < d; k0 += kChunk) {
        const int k = k0 + lane;
        T acc[kColTile / kWarps];
#pragma unroll
        for (int q = 0; q < kColTile / kWarps; ++q) acc[q] = T(0);
        if (k < d) {
          for (int i = 0; i < N; ++i) {
            const T z = Z[static_cast<int64_t>(i) * d + k];
#pragma unroll
            for (int q = 0; q < kColTile / kWarps; ++q) acc[q] += z * sm.X[i * kLdx + warp + kWarps * q];
          }
        }
#pragma unroll
        for (int q = 0; q < kColTile / kWarps; ++q) sm.S1[lane * kLdx + warp + kWarps * q] = acc[q];
        __syncthreads();
        const int kc = d - k0 < kChunk ? d - k0 : kChunk;
        for (int e = tid; e < kc * ct; e += kThreads) {
          const int kk = e / ct, c = e % ct;
          W[static_cast<int64_t>(k0 + kk) * C + c0 + c] = sm.S1[kk * kLdx + c];
        }
        __syncthreads();
      }
    }
    __syncthreads();  // X is refilled by the next tile
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
ridge_solve_bwd_kernel(const T* __restrict__ Gg, const T* __restrict__ Zg, const T* __restrict__ Yg,
                       const T* __restrict__ Lg, const T* __restrict__ auxg, T* __restrict__ dZg,
                       T* __restrict__ dYg, T* __restrict__ dmu, int N, int d, int C, bool primal) {
  DDFAST_DYNAMIC_SHARED(smem_raw);
  const int n = primal ? d : N, ldl = n | 1, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const Smem<T> sm = carve<T>(smem_raw, n);
  const int64_t b = blockIdx.x;
  const T* G = Gg + b * d * C;
  const T* Z = Zg + b * N * d;
  const T* Y = Yg + b * N * C;
  const T* aux = auxg + b * n * C;
  T* dZ = dZg != nullptr ? dZg + b * N * d : nullptr;
  T* dY = dYg != nullptr ? dYg + b * N * C : nullptr;

  for (int e = tid; e < n * n; e += kThreads) {
    const int i = e / n, j = e % n;
    if (j <= i) sm.L[i * ldl + j] = Lg[b * n * n + e];
  }
  T dmu_part = T(0);
  for (int c0 = 0; c0 < C; c0 += kColTile) {
    const int ct = C - c0 < kColTile ? C - c0 : kColTile;
    if (primal) {
      for (int e = tid; e < d * ct; e += kThreads) {
        const int a = e / ct, c = e % ct;
        sm.X[a * kLdx + c] = G[static_cast<int64_t>(a) * C + c0 + c];
      }
    } else {  // X = Z G[:, tile]: columns of Z staged in X2 (N × kChunk), rows of G in S1 (kChunk × ct)
      T acc[kAcc];
#pragma unroll
      for (int q = 0; q < kAcc; ++q) acc[q] = T(0);
      for (int k0 = 0; k0 < d; k0 += kChunk) {
        const int kc = d - k0 < kChunk ? d - k0 : kChunk;
        __syncthreads();
        for (int e = tid; e < N * kc; e += kThreads) {
          const int i = e / kc, k = e % kc;
          sm.X2[i * kLdx + k] = Z[static_cast<int64_t>(i) * d + k0 + k];
        }
        for (int e = tid; e < kc * ct; e += kThreads) {
          const int k = e / ct, c = e % ct;
          sm.S1[k * kLdx + c] = G[static_cast<int64_t>(k0 + k) * C + c0 + c];
        }
        __syncthreads();
        for (int k = 0; k < kc; ++k) {
#pragma unroll
          for (int q = 0; q < kAcc; ++q) {
            const int e = tid + q * kThreads;
            if (e < N * ct) acc[q] += sm.X2[(e / ct) * kLdx + k] * sm.S1[k * kLdx + e % ct];
          }
        }
      }
      __syncthreads();  // X2 is refilled below
#pragma unroll
      for (int q = 0; q < kAcc; ++q) {
        const int e = tid + q * kThreads;
        if (e < N * ct) sm.X[(e / ct) * kLdx + e % ct] = acc[q];
      }
    }
    __syncthreads();
    tile_cholesky_solve(sm.L, ldl, sm.X, n, ct);  // dual: Bm = A⁻¹ZG;  primal: V = H⁻¹G
    for (int e = tid; e < n * ct; e += kThreads) {  // X2 = aux tile (dual α, primal W)
      const int i = e / ct, c = e % ct;
      sm.X2[i * kLdx + c] = aux[static_cast<int64_t>(i) * C + c0 + c];
    }
    __syncthreads();
    if (dmu != nullptr)
      for (int e = tid; e < n * ct; e += kThreads) {
        const int i = e / ct, c = e % ct;
        dmu_part += sm.X[i * kLdx + c] * sm.X2[i * kLdx + c];
      }
    if (!primal) {
      if (dY != nullptr)
        for (int e = tid; e < N * ct; e += kThreads) {
          const int i = e / ct, c = e % ct;
          dY[static_cast<int64_t>(i) * C + c0 + c] = sm.X[i * kLdx + c];
        }
      if (dZ != nullptr)
        for (int k0 = 0; k0 < d; k0 += kChunk) {
          // S1[kk][c] = G[k0+kk, tile] − Σ_j Z[j, k0+kk] Bm[j][c],  S2[kk][c] = Σ_j Z[j, k0+kk] α[j][c]
          const int k = k0 + lane;
#pragma unroll
          for (int q = 0; q < kColTile / kWarps; ++q) {
            const int c = warp + kWarps * q;
            T t = T(0), w = T(0);
            if (k < d && c < ct) {
              t = G[static_cast<int64_t>(k) * C + c0 + c];
              for (int j = 0; j < N; ++j) {
                const T z = Z[static_cast<int64_t>(j) * d + k];
                t -= z * sm.X[j * kLdx + c];
                w += z * sm.X2[j * kLdx + c];
              }
            }
            sm.S1[lane * kLdx + c] = t;
            sm.S2[lane * kLdx + c] = w;
          }
          __syncthreads();
          // dZ[i, k0+kk] (+)= Σ_c α[i][c] S1[kk][c] − Bm[i][c] S2[kk][c]
          const int kc = d - k0 < kChunk ? d - k0 : kChunk;
          if (lane < kc)
            for (int i = warp; i < N; i += kWarps) {
              T s = T(0);
              for (int c = 0; c < ct; ++c)
                s += sm.X2[i * kLdx + c] * sm.S1[lane * kLdx + c] - sm.X[i * kLdx + c] * sm.S2[lane * kLdx + c];
              T* p = dZ + static_cast<int64_t>(i) * d + k0 + lane;
              *p = c0 == 0 ? s : *p + s;
            }
          __syncthreads();
        }
    } else if (dY != nullptr || dZ != nullptr) {
      for (int r0 = 0; r0 < N; r0 += kChunk) {
        const int rc = N - r0 < kChunk ? N - r0 : kChunk;
        // S1[rr][c] = (ZV)[r0+rr, c],  S2[rr][c] = Y[r0+rr, tile] − (ZW)[r0+rr, c]
#pragma unroll
        for (int q = 0; q < kChunk / kWarps; ++q) {
          const int rr = warp + kWarps * q, c = lane;
          T zv = T(0), zw = T(0);
          if (rr < rc && c < ct) {
            const T* z = Z + static_cast<int64_t>(r0 + rr) * d;
            for (int a = 0; a < d; ++a) {
              zv += z[a] * sm.X[a * kLdx + c];
              zw += z[a] * sm.X2[a * kLdx + c];
            }
            const int64_t o = static_cast<int64_t>(r0 + rr) * C + c0 + c;
            if (dY != nullptr) dY[o] = zv;
            zw = Y[o] - zw;
          }
          sm.S1[rr * kLdx + c] = zv;
          sm.S2[rr * kLdx + c] = zw;
        }
        __syncthreads();
        // dZ[r0+rr, a] (+)= Σ_c S2[rr][c] V[a][c] − S1[rr][c] W[a][c]
        if (dZ != nullptr)
          for (int e = tid; e < rc * d; e += kThreads) {
            const int rr = e / d, a = e % d;
            T s = T(0);
            for (int c = 0; c < ct; ++c)
              s += sm.S2[rr * kLdx + c] * sm.X[a * kLdx + c] - sm.S1[rr * kLdx + c] * sm.X2[a * kLdx + c];
            T* p = dZ + static_cast<int64_t>(r0 + rr) * d + a;
            *p = c0 == 0 ? s : *p + s;
          }
        __syncthreads();
      }
    }
    __syncthreads();  // X, X2 are refilled by the next tile
  }
  if (dmu != nullptr) {
    const T total = block_sum(dmu_part, sm.red);
    if (tid == 0) dmu[b] = -total;
  }
}

}  // namespace

#ifndef DDFAST_HOST_EMULATION
namespace {

template <typename T, typename Kernel>
int prepare_shared(Kernel kernel, size_t bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return kLaunch;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    return kLaunch;
  if (bytes > static_cast<size_t>(optin)) return kSharedMemory;
  if (bytes > 48 * 1024 &&
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) != cudaSuccess)
    return kSharedMemory;
  return kOk;
}

}  // namespace

int ridge_solve_max_n() { return kMaxN; }

const char* ridge_solve_error_string(int code) {
  switch (code) {
    case kOk: return "ok";
    case kTooLarge: return "factor size exceeds ridge_solve_max_n(), or N, d, C exceed 2^31 - 1";
    case kSharedMemory:
      return "ridge_solve_smem_bytes(n, C, sizeof(T)) exceeds the device's shared memory per block (opt-in)";
    case kLaunch: return "kernel launch failed";
    default: return "unknown error";
  }
}

namespace {

bool sizes_ok(int64_t n, int64_t B, int64_t N, int64_t d, int64_t C) {
  return n >= 1 && n <= kMaxN && B >= 0 && B <= INT_MAX && N <= INT_MAX && d <= INT_MAX && C >= 0 &&
         C <= INT_MAX && N * d >= 0;
}

}  // namespace

template <typename T>
int ridge_solve_fwd_launch(const T* Z, const T* Y, const T* mu, T* W, T* L, T* aux, int* info,
                           int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream) {
  const int64_t n = primal ? d : N;
  if (!sizes_ok(n, B, N, d, C)) return kTooLarge;
  if (B == 0) return kOk;
  const size_t bytes = ridge_solve_smem_bytes(n, C, sizeof(T));
  const int rc = prepare_shared<T>(ridge_solve_fwd_kernel<T>, bytes);
  if (rc != kOk) return rc;
  ridge_solve_fwd_kernel<T><<<static_cast<unsigned>(B), kThreads, bytes, stream>>>(
      Z, Y, mu, W, L, aux, info, static_cast<int>(N), static_cast<int>(d), static_cast<int>(C), primal);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunch;
}

template <typename T>
int ridge_solve_bwd_launch(const T* G, const T* Z, const T* Y, const T* L, const T* aux, T* dZ,
                           T* dY, T* dmu, int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream) {
  const int64_t n = primal ? d : N;
  if (!sizes_ok(n, B, N, d, C)) return kTooLarge;
  if (B == 0) return kOk;
  const size_t bytes = ridge_solve_smem_bytes(n, C, sizeof(T));
  const int rc = prepare_shared<T>(ridge_solve_bwd_kernel<T>, bytes);
  if (rc != kOk) return rc;
  ridge_solve_bwd_kernel<T><<<static_cast<unsigned>(B), kThreads, bytes, stream>>>(
      G, Z, Y, L, aux, dZ, dY, dmu, static_cast<int>(N), static_cast<int>(d), static_cast<int>(C), primal);
  return cudaGetLastError() == cudaSuccess ? kOk : kLaunch;
}

#define DDFAST_RIDGE_INSTANTIATE(T)                                                                        \
  template int ridge_solve_fwd_launch<T>(const T*, const T*, const T*, T*, T*, T*, int*, int64_t, int64_t, \
                                         int64_t, int64_t, bool, cudaStream_t);                            \
  template int ridge_solve_bwd_launch<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*,     \
                                         int64_t, int64_t, int64_t, int64_t, bool, cudaStream_t);

DDFAST_RIDGE_INSTANTIATE(float)
DDFAST_RIDGE_INSTANTIATE(double)
#undef DDFAST_RIDGE_INSTANTIATE

#endif  // DDFAST_HOST_EMULATION

}  // namespace cuda
}  // namespace ddfast
