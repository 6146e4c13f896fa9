// Batched small-n ridge solve on CUDA: plain CUDA launchers on raw pointers (no torch headers).
//
//   dual   : A = Z Zᵀ + μI (N×N), L = chol(A), α = A⁻¹Y, W = Zᵀα            aux = α  [B,N,C]
//   primal : H = Zᵀ Z + μI (d×d), L = chol(H), W = H⁻¹ZᵀY                   aux = W  [B,d,C]
//
// One thread block per problem (batched small problems; a single large problem is better served by
// cuBLAS + cholesky_ex): the factor lives in shared memory (n = N dual, d primal, n <= 128, row stride
// n | 1 so column walks are free of bank conflicts); right-hand sides go through it in tiles of
// kRidgeColTile columns, so the shared memory a block needs does not grow with C.
// Seed: label-distillation §3 eq. 2–3; krr-st-selfsup §3.2 eq. 4.
// Equivalent PyTorch: ddfast.reference.ridge_solve.
#pragma once

#include <cstddef>
#include <cstdint>

#ifndef __CUDA_RUNTIME_H__
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
#endif

namespace ddfast {
namespace cuda {

// Right-hand-side columns per pass, and rows / columns of Z staged per step of the products.
constexpr int kRidgeColTile = 32;
constexpr int kRidgeChunk = 32;
constexpr int kRidgeThreads = 256;

// Bytes of dynamic shared memory one block of the forward or of the backward kernel needs for a factor
// of order n (n = N dual, d primal) with C right-hand sides: n·(n|1) + 2·n·(kRidgeColTile+1) +
// 2·kRidgeChunk·(kRidgeColTile+1) + kRidgeThreads/32 values. It does not grow with C (C is accepted so
// the caller need not know that). A launch needs this to be within the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin (232,448 B on H100/H200, 166,912 B on A100).
inline size_t ridge_solve_smem_bytes(int64_t n, int64_t C, size_t elem_size) {
  (void)C;
  const int64_t tile = kRidgeColTile + 1;
  const int64_t values = n * (n | 1) + 2 * n * tile + 2 * int64_t(kRidgeChunk) * tile + kRidgeThreads / 32;
  return static_cast<size_t>(values) * elem_size;
}

// All arrays contiguous row-major: Z [B,N,d], Y [B,N,C], mu [B], W [B,d,C], L [B,n,n],
// aux [B,n,C], info [B] (0 ok, k>0: leading minor k not positive definite).
// W may be null in the dual form: W = Zᵀα is then not computed (aux = α is always written; in the
// primal form W = aux, and a non-null W gets a copy).
// Returns 0 on success, else an error code (see ridge_solve_error_string).
template <typename T>
int ridge_solve_fwd_launch(const T* Z, const T* Y, const T* mu, T* W, T* L, T* aux, int* info,
                           int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

// G [B,d,C] = ∂loss/∂W. dZ [B,N,d], dY [B,N,C], dmu [B] may be null (not needed). No scratch: the
// products are formed tile by tile in shared memory; dZ is accumulated in place over column tiles.
//   dual:   Bm = A⁻¹ZG, dY = Bm, dZ = α(G − ZᵀBm)ᵀ − BmWᵀ, dμ = −Σ Bm∘α
//   primal: V = H⁻¹G, dY = ZV, dZ = (Y − ZW)Vᵀ − (ZV)Wᵀ, dμ = −Σ V∘W
template <typename T>
int ridge_solve_bwd_launch(const T* G, const T* Z, const T* Y, const T* L, const T* aux, T* dZ,
                           T* dY, T* dmu, int64_t B, int64_t N, int64_t d, int64_t C, bool primal,
                           cudaStream_t stream);

int ridge_solve_max_n();
const char* ridge_solve_error_string(int code);

}  // namespace cuda
}  // namespace ddfast
